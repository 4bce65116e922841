//! The check kinds, one module each: what a check reads (its plan, made before any forward
//! pass), how it turns the session's activations into a finding, and the evidence it shows.
//!
//! Adding a kind: see "Add a check kind" in `docs/architecture.md`.

use probes::hooks::HookPoint;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{CheckError, PolicyError};
use crate::instruments::Instruments;
use crate::load::{Check, Names, Policy, Validator};
use crate::result::{Evidence, Finding, Metric, RunResult, Status};
use crate::schema::Severity;
use crate::session::Session;

mod attribution;
pub mod attribution_patching;
pub mod direction_probe;
pub mod drift;
pub mod feature_probe;
pub mod induction;
pub mod steering;
#[cfg(test)]
pub(crate) mod testing;

/// What a check needs while its plan is made: the session to plan passes in, the resolved
/// instruments, and the run's list of errors (each naming the policy file and check).
pub(crate) struct Planner<'a, 'm> {
    pub session: &'a mut Session<'m>,
    pub instruments: &'a Instruments,
    pub policy: &'a Policy,
    pub check: &'a Check,
    pub errors: &'a mut Vec<PolicyError>,
}

impl Planner<'_, '_> {
    /// The hook of the policy's direction `name` where the policy names one (a selected
    /// direction's is known only once it is chosen).
    pub fn direction_hook(&self, name: &str) -> Option<HookPoint> {
        self.policy
            .directions
            .get(name)
            .and_then(|d| d.hook.as_ref())
            .and_then(|h| HookPoint::parse(&h.value, self.session.n_layers()).ok())
    }

    /// Capture `hook` in the pass over prompt set `set`.
    pub fn want(&mut self, set: &str, hook: HookPoint) {
        if let Err(e) = self.session.want(self.policy, set, hook) {
            self.errors
                .push(PolicyError::at(&self.policy.path, None, e.to_string()));
        }
    }
}

/// What a check needs to build or reuse an instrument it defines itself (a feature probe's
/// selected latents), once its policy's SAEs and directions are resolved.
pub(crate) struct Resolver<'a, 'm> {
    pub session: &'a mut Session<'m>,
    pub instruments: &'a mut Instruments,
    pub policy: &'a Policy,
    pub check: &'a Check,
}

/// What a check reads while it is evaluated.
pub(crate) struct Cx<'a, 'm> {
    pub session: &'a mut Session<'m>,
    pub instruments: &'a Instruments,
    pub policy: &'a Policy,
    pub check: &'a Check,
    /// The last passing result of this model's lineage, for drift baselines.
    pub last_pass: Option<&'a RunResult>,
}

/// One check kind: its fields, their validation, the passes it reads and its evaluation.
pub(crate) trait Kind: Sized {
    /// The kind's own fields, besides `id`, `kind`, `severity` and `description`: a serde
    /// struct with `deny_unknown_fields`, so that a field of another kind is an error at its
    /// line.
    type Spec: serde::de::DeserializeOwned;

    /// Validate `spec` without a model: the prompt sets, SAEs and directions it names exist,
    /// its values are in range. Each error goes to `v` with its line; `None` when any did.
    fn validate(
        spec: Self::Spec,
        v: &mut Validator<'_>,
        id: &Spanned<String>,
        n: &Names<'_>,
    ) -> Option<Self>;

    /// Check its references against the resolved instruments and plan the (prompt set, hook)
    /// pairs it reads, before any forward pass.
    fn plan(&self, p: &mut Planner<'_, '_>);

    /// Build, or reuse from the lineage, the instruments the check defines itself, and keep
    /// them in `r.instruments` (pinned in the record like the policy's own). Most kinds
    /// define none.
    fn resolve(&self, _r: &mut Resolver<'_, '_>) {}

    /// Turn the session's activations into a finding.
    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError>;
}

/// The registry: one line per kind, `Variant(module::Type) = "name as written in policies"`.
macro_rules! kinds {
    ($($variant:ident($ty:ty) = $name:literal,)*) => {
        /// The check kinds, as `kind = "..."` names them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
        pub enum CheckKind {
            $(#[serde(rename = $name)] $variant,)*
        }

        impl CheckKind {
            /// The kind's name as written in policies (and in `mechwatch bench check`).
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }

        /// A validated check's settings, by kind.
        #[derive(Debug, Clone)]
        #[allow(clippy::large_enum_variant)]
        pub enum CheckBody {
            $($variant($ty),)*
        }

        impl CheckBody {
            pub fn kind(&self) -> CheckKind {
                match self {
                    $(Self::$variant(_) => CheckKind::$variant,)*
                }
            }

            /// Read `fields` (a check's table without its common keys) as `kind`'s fields and
            /// validate them.
            pub(crate) fn validate(
                kind: CheckKind,
                fields: toml::de::ValueDeserializer<'_>,
                v: &mut Validator<'_>,
                id: &Spanned<String>,
                n: &Names<'_>,
            ) -> Option<Self> {
                match kind {
                    $(CheckKind::$variant => {
                        let spec: <$ty as Kind>::Spec = v.kind_fields(kind, id, fields)?;
                        <$ty as Kind>::validate(spec, v, id, n).map(Self::$variant)
                    })*
                }
            }

            pub(crate) fn plan(&self, p: &mut Planner<'_, '_>) {
                match self {
                    $(Self::$variant(k) => k.plan(p),)*
                }
            }

            pub(crate) fn resolve(&self, r: &mut Resolver<'_, '_>) {
                match self {
                    $(Self::$variant(k) => k.resolve(r),)*
                }
            }

            pub(crate) fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
                match self {
                    $(Self::$variant(k) => k.evaluate(cx),)*
                }
            }
        }
    };
}

kinds! {
    FeatureProbe(feature_probe::FeatureProbe) = "feature_probe",
    DirectionProbe(direction_probe::DirectionProbe) = "direction_probe",
    Steering(steering::Steering) = "steering",
    Drift(drift::Drift) = "drift",
    Induction(induction::Induction) = "induction",
    AttributionPatching(attribution_patching::AttributionPatching) = "attribution_patching",
}

/// A failed or violated check is `fail`, or only `warn` when its severity is low or info.
pub(crate) fn violated(severity: Severity) -> Status {
    if severity >= Severity::Medium {
        Status::Fail
    } else {
        Status::Warn
    }
}

/// Whether `value` is at least `min`. NaN on either side is an error, not an answer: every
/// comparison with NaN is false, so a bound held as `value < min => violated` would pass.
pub(crate) fn at_least(what: &str, value: f64, min: f64) -> Result<bool, CheckError> {
    comparable(what, value, min)?;
    Ok(value >= min)
}

/// Whether `value` is at most `max`; NaN on either side is an error, as for [`at_least`].
pub(crate) fn at_most(what: &str, value: f64, max: f64) -> Result<bool, CheckError> {
    comparable(what, value, max)?;
    Ok(value <= max)
}

fn comparable(what: &str, value: f64, bound: f64) -> Result<(), CheckError> {
    if value.is_nan() || bound.is_nan() {
        return Err(CheckError::NonFinite(format!(
            "{what} is {value}, held to the bound {bound}: a NaN cannot be compared, so the \
             check cannot pass"
        )));
    }
    Ok(())
}

impl Finding {
    /// A finding without its check's identity, which the engine fills in.
    pub(crate) fn new(
        status: Status,
        explanation: String,
        metrics: Vec<Metric>,
        evidence: Evidence,
    ) -> Self {
        Self {
            check: String::new(),
            kind: CheckKind::Steering,
            severity: Severity::Info,
            status,
            description: String::new(),
            explanation,
            metrics,
            evidence,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{at_least, at_most};

    #[test]
    fn a_nan_comparison_is_an_error_never_a_pass() {
        assert!(at_least("x", 1.0, 0.5).unwrap());
        assert!(!at_least("x", 0.1, 0.5).unwrap());
        assert!(at_most("x", 0.1, 0.5).unwrap());
        assert!(!at_most("x", 1.0, 0.5).unwrap());
        for (value, bound) in [(f64::NAN, 0.5), (0.5, f64::NAN), (f64::NAN, f64::NAN)] {
            assert!(at_least("x", value, bound).is_err(), "{value} >= {bound}");
            assert!(at_most("x", value, bound).is_err(), "{value} <= {bound}");
        }
    }
}
