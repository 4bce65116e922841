//! Which SAE latents carry a behaviour, for direction probes and steering checks that name
//! `attribute_with`: attribution patching onto the SAE's latents (Syed, Rager and Conmy 2023;
//! Marks et al. 2024), checked against real ablations.
//!
//! One gradient pass over the first [`PROMPTS`] prompts of a set gives the behaviour's
//! gradient `g` at the SAE's hook, through every path from there to the logits. A latent's
//! estimate is its first-order contribution to the behaviour, `sum over positions of
//! c[pos, l] * (W_dec[l] . g[pos])` (`c` from [`probes::sae::Sae::contributions`]), averaged
//! over the prompts: how far the behaviour would drop without the latent. The [`TOP`] latents
//! with the largest estimates are then removed for real (their decoder contribution taken
//! away at every position, the SAE's error term kept) and the behaviour measured again; the
//! drop is the latent's real effect, and the correlation of estimates and effects says how far
//! the estimates can be trusted.

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use probes::hooks::{Hooks, Positions, ReplaceFn};
use probes::{BatchLayout, ForwardOutput, Unembed};
use rayon::prelude::*;

use super::attribution_patching::correlation;
use crate::error::CheckError;
use crate::metrics::Behaviour;
use crate::result::{round, LatentEvidence, Metric};
use crate::session::{ResolvedSae, Session, Tokens};

/// Prompts attributed, from the start of the set: each costs a gradient pass row and
/// [`TOP`] ablated rows.
pub(crate) const PROMPTS: usize = 8;
/// Latents ablated for real, by largest estimate.
pub(crate) const TOP: usize = 8;

/// The latents of `s` that carry `behaviour` at the last token of the first [`PROMPTS`]
/// prompts of `t`, the largest estimates first, and the Pearson correlation of the top
/// latents' estimates with their real effects as a metric.
pub(crate) fn attribute(
    session: &mut Session<'_>,
    s: &ResolvedSae,
    t: &Tokens,
    behaviour: &Behaviour,
) -> Result<(Vec<LatentEvidence>, Metric), CheckError> {
    let prompts: Vec<Vec<u32>> = t.ids.iter().take(PROMPTS).cloned().collect();
    if prompts.is_empty() {
        return Err(CheckError::Unmeasurable(format!(
            "`{}` has no prompts to attribute",
            t.name
        )));
    }
    let model = &session.model.transformer;
    let forward = |source| CheckError::Forward {
        set: t.name.clone(),
        source,
    };
    let b = behaviour.clone();
    let metric = move |logits: &Tensor, _: &BatchLayout| b.tensor(logits)?.sum_all();
    let started = std::time::Instant::now();
    let g = model
        .gradients(&prompts, &Hooks::new(), &BTreeSet::from([s.hook]), &metric)
        .map_err(forward)?;
    let missing = || CheckError::Unmeasurable(format!("the pass did not capture `{}`", s.hook));
    let acts = g.acts.get(&s.hook).ok_or_else(missing)?;
    let grads = g.grads.get(&s.hook).ok_or_else(missing)?;
    let (rows, len, d) = acts.dims3()?;
    // Padding positions are no part of any prompt: no latent of theirs is attributed.
    let real: Vec<f32> = (0..rows)
        .flat_map(|r| (0..len).map(move |p| (r, p)))
        .map(|(r, p)| if p >= g.layout.offset(r) { 1.0 } else { 0.0 })
        .collect();
    let real = Tensor::from_vec(real, (rows * len, 1), acts.device())?;
    let c = s
        .sae
        .contributions(&acts.to_dtype(DType::F32)?.reshape((rows * len, d))?)?
        .broadcast_mul(&real)?; // [rows * len, d_sae]
    let n = rows as f64;
    let estimates: Vec<f32> = s
        .sae
        .latent_effects(&c, &grads.reshape((rows * len, d))?)?
        .sum(0)?
        .to_vec1()?;
    let active: Vec<f32> = c.abs()?.sum(0)?.to_vec1()?;
    let mut ranked: Vec<(usize, f64)> = estimates
        .iter()
        .zip(&active)
        .enumerate()
        .filter(|(_, (_, a))| **a > 0.0)
        .map(|(l, (e, _))| (l, f64::from(*e) / n))
        .collect();
    ranked.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
    ranked.truncate(TOP);

    let values = |out: &ForwardOutput| -> Result<Vec<f64>, CheckError> {
        let logits: Vec<Vec<f32>> = out
            .logits
            .as_ref()
            .ok_or_else(|| CheckError::NonFinite("the pass produced no logits".into()))?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        Ok(logits.iter().map(|row| behaviour.value(row)).collect())
    };
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        "attribution gradient"
    );
    // The unablated pass keeps the activation at the SAE's hook; in the residual stream, the
    // ablated passes start from it instead of running the blocks before it again. All compute
    // the set's shared preamble once.
    let clean = model
        .forward_shared(
            &prompts,
            t.prefix,
            &Hooks::new().capture(s.hook),
            Unembed::Last,
        )
        .map_err(forward)?;
    let base = values(&clean)?;
    let at_hook = clean.captures.get(&s.hook).ok_or_else(missing)?;
    let resumable = s.hook.is_residual_stream();
    // The passes run one per thread.
    let effects = ranked
        .par_iter()
        .map(|&(l, _)| {
            // The latent's decoder contribution at every position, taken away: computed from
            // each position's own activation, so the shared preamble loses it once for all.
            let sae = Arc::clone(&s.sae);
            let f: ReplaceFn = Arc::new(move |x: &Tensor| {
                let dims = x.dims().to_vec();
                let d = *dims.last().expect("an activation has a width");
                let flat = x.to_dtype(DType::F32)?.reshape(((), d))?;
                let removed = sae
                    .contributions(&flat)
                    .and_then(|c| sae.decoded_latent(&c, l))
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                x - removed.reshape(dims)?.to_dtype(x.dtype())?
            });
            let hooks = Hooks::new().replace_each(s.hook, Positions::All, f);
            let out = if resumable {
                model.forward_shared_from(
                    &prompts,
                    t.prefix,
                    s.hook,
                    at_hook,
                    &hooks,
                    Unembed::Last,
                )
            } else {
                model.forward_shared(&prompts, t.prefix, &hooks, Unembed::Last)
            };
            let ablated = values(&out.map_err(forward)?)?;
            Ok(base.iter().zip(&ablated).map(|(b, a)| b - a).sum::<f64>() / n)
        })
        .collect::<Result<Vec<f64>, CheckError>>()?;
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        "attribution ablations"
    );
    if ranked
        .iter()
        .map(|r| r.1)
        .chain(effects.iter().copied())
        .any(|x| !x.is_finite())
    {
        return Err(CheckError::NonFinite(format!(
            "a latent attribution of the {} on `{}` is NaN or infinite",
            behaviour.name(),
            t.name
        )));
    }
    let est: Vec<f64> = ranked.iter().map(|r| r.1).collect();
    let r = correlation(&est, &effects);
    let metric = Metric {
        name: format!(
            "latent attribution: pearson correlation of estimates and ablations, top {}",
            ranked.len()
        ),
        value: round(r.unwrap_or(f64::NAN)),
        bound: String::new(),
    };
    let all = session.sparse(t, s)?;
    let sets = [(t, all.as_slice())];
    let k = prompts.len();
    let latents = ranked
        .into_iter()
        .zip(effects)
        .map(|((l, v), effect)| LatentEvidence {
            sae: s.name.clone(),
            latent: l,
            label: session.label(s, l as u32, &sets),
            value: round(v),
            effect: Some(round(effect)),
            measure: format!(
                "first-order estimate of the drop in the {} at the last token without the \
                 latent at `{}` (activation x gradient through every later block); effect: \
                 the real drop when it is removed there, SAE error kept; mean over the first \
                 {k} prompts of `{}`",
                behaviour.name(),
                s.hook,
                t.name
            ),
        })
        .collect();
    Ok((latents, metric))
}
