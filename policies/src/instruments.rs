//! The instruments a policy measures with, resolved against the model before any check runs:
//! its SAEs (loaded, fitted to a hook of this model; the builtin default SAE found or built)
//! and its directions (a file's vector, or a difference of means computed from the session's
//! activations once every policy has planned its hooks).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use probes::hooks::HookPoint;
use probes::sae::Sae;

use crate::engine::RunOptions;
use crate::error::{CheckError, PolicyError};
use crate::load::{Direction, DirectionSource, Located, Policy, SaeSource};
use crate::result::InputRecord;
use crate::session::{at_position, ResolvedSae, Session};

/// A direction as a policy names it, with its vector computed on this model.
#[derive(Clone)]
pub(crate) struct ResolvedDirection {
    pub hook: HookPoint,
    pub position: i64,
    /// Difference of means (or the file's vector) `[d_model]`.
    pub raw: Tensor,
    /// Unit length `[d_model]`.
    pub unit: Tensor,
    pub norm: f64,
}

/// Every policy's resolved SAEs and directions, by policy name then the policy's own name.
pub(crate) struct Instruments {
    saes: HashMap<(String, String), ResolvedSae>,
    directions: HashMap<(String, String), ResolvedDirection>,
    builtin: Option<Arc<Sae>>,
    /// Whether a default SAE that is not built yet may be trained (minutes) or is an error.
    pub build_missing: bool,
    /// Inputs found while resolving (the builtin SAE), for the run's record.
    pub inputs: Vec<InputRecord>,
}

impl Instruments {
    pub fn new(build_missing: bool) -> Self {
        Self {
            saes: HashMap::new(),
            directions: HashMap::new(),
            builtin: None,
            build_missing,
            inputs: Vec::new(),
        }
    }

    pub fn sae(&self, p: &Policy, name: &str) -> Result<ResolvedSae, CheckError> {
        self.saes
            .get(&(p.name.clone(), name.to_string()))
            .cloned()
            .ok_or_else(|| CheckError::Unresolved {
                what: "SAE",
                name: name.to_string(),
            })
    }

    /// The SAE if it resolved (its errors are reported once, where it is defined).
    pub fn sae_if_resolved(&self, p: &Policy, name: &str) -> Option<ResolvedSae> {
        self.saes.get(&(p.name.clone(), name.to_string())).cloned()
    }

    pub fn direction(&self, p: &Policy, name: &str) -> Result<ResolvedDirection, CheckError> {
        self.directions
            .get(&(p.name.clone(), name.to_string()))
            .cloned()
            .ok_or_else(|| CheckError::Unresolved {
                what: "direction",
                name: name.to_string(),
            })
    }

    /// `name` as a hook of this model, or an error at its place in the policy.
    pub fn hook(
        s: &Session<'_>,
        p: &Policy,
        name: &Located<String>,
        errors: &mut Vec<PolicyError>,
    ) -> Option<HookPoint> {
        match HookPoint::parse(&name.value, s.n_layers()) {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(p.error(&name.at, e.to_string()));
                None
            }
        }
    }

    /// Load and fit `p`'s SAEs, check its directions' hooks, and plan the passes its
    /// contrast directions read.
    pub fn resolve(
        &mut self,
        s: &mut Session<'_>,
        p: &Policy,
        opts: &mut RunOptions<'_>,
        errors: &mut Vec<PolicyError>,
    ) {
        let d_model = s.model.config().d_model;
        for (name, entry) in &p.saes {
            let (sae, hook_spec) = match &entry.source {
                SaeSource::File { sae, hook } => (Arc::clone(sae), hook.clone()),
                SaeSource::Builtin { hook } => match self.builtin_sae(s, opts) {
                    Ok(sae) => {
                        self.inputs.push(InputRecord {
                            policy: p.name.clone(),
                            kind: "sae".into(),
                            path: format!("builtin:default ({})", sae.path.display()),
                            sha256: sae.manifest.root(),
                        });
                        (sae, hook.clone())
                    }
                    Err(e) => {
                        errors.push(PolicyError::at(
                            &p.path,
                            None,
                            format!("[saes.{name}]: the default SAE: {e}"),
                        ));
                        continue;
                    }
                },
            };
            let hook_name = hook_spec
                .as_ref()
                .map(|h| h.value.clone())
                .or_else(|| sae.hook.clone());
            let Some(hook_name) = hook_name else {
                errors.push(PolicyError::at(
                    &p.path,
                    None,
                    format!("[saes.{name}]: the SAE's config names no hook; set `hook`"),
                ));
                continue;
            };
            match sae.check_fits(&hook_name, s.n_layers(), d_model) {
                Ok(hook) => {
                    self.saes.insert(
                        (p.name.clone(), name.clone()),
                        ResolvedSae {
                            name: name.clone(),
                            sae,
                            hook,
                            labels: entry.labels.clone(),
                        },
                    );
                }
                Err(e) => {
                    let at = hook_spec.map(|h| h.at);
                    errors.push(PolicyError::at(&p.path, at, format!("[saes.{name}]: {e}")));
                }
            }
        }
        for d in p.directions.values() {
            let Some(hook) = Self::hook(s, p, &d.hook, errors) else {
                continue;
            };
            if !hook.is_residual_width() {
                errors.push(p.error(
                    &d.hook.at,
                    format!(
                        "`{}` is not a residual-stream-width hook; a direction needs one",
                        d.hook.value
                    ),
                ));
                continue;
            }
            if let DirectionSource::Contrast {
                positive, negative, ..
            } = &d.source
            {
                for set in [positive, negative] {
                    if let Err(e) = s.want(p, set, hook) {
                        errors.push(PolicyError::at(&p.path, None, e.to_string()));
                    }
                }
            }
        }
    }

    /// Compute every direction of `p` (after every policy planned its hooks).
    pub fn compute_directions(
        &mut self,
        s: &mut Session<'_>,
        p: &Policy,
        errors: &mut Vec<PolicyError>,
    ) {
        for (name, d) in &p.directions {
            match compute_direction(s, p, d) {
                Ok(r) => {
                    self.directions.insert((p.name.clone(), name.clone()), r);
                }
                Err(e) => errors.push(p.error(&d.hook.at, format!("direction `{name}`: {e}"))),
            }
        }
    }

    /// The default SAE of the model: shipped, cached, or (when allowed) trained now.
    fn builtin_sae(
        &mut self,
        s: &Session<'_>,
        opts: &mut RunOptions<'_>,
    ) -> Result<Arc<Sae>, String> {
        if let Some(sae) = &self.builtin {
            return Ok(Arc::clone(sae));
        }
        let dir = if self.build_missing {
            probes::sae::default::ensure_reporting(s.model, &mut *opts.progress)
                .map_err(|e| e.to_string())?
        } else {
            probes::sae::default::built(s.model)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "it is not built for this model yet; `mechwatch sae default --model {}` \
                         builds it (about 25 minutes on two cores)",
                        s.model.path.display()
                    )
                })?
        };
        let sae = Arc::new(probes::sae::load_sae(&dir).map_err(|e| e.to_string())?);
        self.builtin = Some(Arc::clone(&sae));
        Ok(sae)
    }
}

fn compute_direction(
    s: &mut Session<'_>,
    p: &Policy,
    d: &Direction,
) -> Result<ResolvedDirection, CheckError> {
    let hook = HookPoint::parse(&d.hook.value, s.n_layers())
        .map_err(|e| CheckError::Unmeasurable(e.to_string()))?;
    let d_model = s.model.config().d_model;
    let dev = Device::Cpu;
    let (raw, position) = match &d.source {
        DirectionSource::File { vector } => {
            if vector.len() != d_model {
                return Err(CheckError::Unmeasurable(format!(
                    "the vector has {} entries but the model's d_model is {d_model}",
                    vector.len()
                )));
            }
            (Tensor::from_vec(vector.clone(), d_model, &dev)?, -1)
        }
        DirectionSource::Contrast {
            positive,
            negative,
            position,
        } => {
            let mut mean = |set: &str| -> Result<Tensor, CheckError> {
                let t = s.set_tokens(p, set)?;
                let acts = s.acts(&t, hook)?;
                let rows = acts
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        at_position(a, *position).ok_or_else(|| CheckError::Position {
                            position: *position,
                            prompt: i + 1,
                            set: set.to_string(),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Tensor::stack(&rows, 0).and_then(|x| x.mean(0))?)
            };
            let pm = mean(positive)?;
            let nm = mean(negative)?;
            ((pm - nm)?, *position)
        }
    };
    let norm = raw.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    if !(norm.is_finite() && norm > 0.0) {
        return Err(CheckError::Unmeasurable(
            "the direction has zero or non-finite length".into(),
        ));
    }
    let unit = (&raw / norm)?;
    Ok(ResolvedDirection {
        hook,
        position,
        raw,
        unit,
        norm,
    })
}
