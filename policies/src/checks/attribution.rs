//! Which SAE latents a direction's projection comes from, for direction probes and steering
//! checks that name `attribute_with`.

use std::collections::BTreeMap;

use candle_core::Tensor;
use probes::hooks::{HookPoint, Hooks, Positions};

use crate::error::CheckError;
use crate::result::{round, LatentEvidence};
use crate::session::{at_position, dot, ResolvedSae, Session, Tokens};

/// Latents tried by cross-layer attribution, from each of its two rankings.
const CANDIDATES: usize = 6;

/// The SAE latents behind a direction's projection at `position` of each prompt in `t`.
///
/// With the SAE at the direction's own hook: activation x gradient of the projection (the
/// gradient is the direction itself, so this is exact). With the SAE at an earlier hook,
/// each candidate latent (the [`CANDIDATES`] with the largest direct-path estimate, and as
/// many of the most active at the position) is removed there, at that position, with the
/// SAE's error term kept, and the model re-run: its value is the mean drop in the projection
/// at the direction's hook, through every path.
pub(crate) fn attribute(
    session: &mut Session<'_>,
    s: &ResolvedSae,
    t: &Tokens,
    (dir_hook, unit): (HookPoint, &Tensor),
    position: i64,
) -> Result<Vec<LatentEvidence>, CheckError> {
    if s.hook.order() > dir_hook.order() {
        return Err(CheckError::Unmeasurable(format!(
            "SAE `{}` reads `{}`, after the direction's hook `{dir_hook}`: it cannot explain it",
            s.name, s.hook
        )));
    }
    let acts = session.acts(t, s.hook)?;
    let rows = acts
        .iter()
        .map(|a| {
            at_position(a, position)
                .ok_or_else(|| CheckError::Unmeasurable("position outside a prompt".to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let x = Tensor::stack(&rows, 0)?;
    let sparse = s.sae.encode_tokens(&x)?;
    let grads: Vec<f32> = s
        .sae
        .w_dec
        .matmul(&unit.unsqueeze(1)?)
        .and_then(|g| g.flatten_all())
        .and_then(|g| g.to_vec1())?;
    let n = sparse.len() as f64;
    let (mut direct, mut active): (BTreeMap<u32, f64>, BTreeMap<u32, f64>) = Default::default();
    for row in &sparse {
        for &(l, v) in row {
            *direct.entry(l).or_default() += v as f64 * grads[l as usize] as f64 / n;
            *active.entry(l).or_default() += v as f64 / n;
        }
    }
    let (ranked, measure) = if s.hook == dir_hook {
        (
            by_magnitude(direct),
            "activation x gradient of the projection onto the direction".to_string(),
        )
    } else {
        let mut candidates: Vec<u32> = Vec::new();
        for scores in [direct, active] {
            for (l, _) in by_magnitude(scores).into_iter().take(CANDIDATES) {
                if !candidates.contains(&l) {
                    candidates.push(l);
                }
            }
        }
        let clean: Vec<f64> = session
            .acts(t, dir_hook)?
            .iter()
            .map(|a| at_position(a, position).map_or(f64::NAN, |x| dot(&x, unit)))
            .collect();
        let mut effects = BTreeMap::new();
        for l in candidates {
            let edit = probes::sae::LatentEdit::Scale {
                latent: l as usize,
                factor: 0.0,
            };
            let removed = probes::sae::keep_sinks(s.sae.splice(vec![edit], true), s.sae.d_in);
            let hooks = Hooks::new().replace(s.hook, Positions::Indices(vec![position]), removed);
            let ablated = session.projections(t, dir_hook, unit, position, &hooks)?;
            let drop = clean.iter().zip(&ablated).map(|(c, a)| c - a).sum::<f64>() / n;
            effects.insert(l, drop);
        }
        (
            by_magnitude(effects),
            format!(
                "drop in the projection onto the direction at `{dir_hook}` when the latent is removed at `{}` (error term kept)",
                s.hook
            ),
        )
    };
    let all = session.sparse(t, s)?;
    let sets = [(t, all.as_slice())];
    Ok(ranked
        .into_iter()
        .take(8)
        .map(|(l, v)| LatentEvidence {
            sae: s.name.clone(),
            latent: l as usize,
            label: session.label(s, l, &sets),
            value: round(v),
            measure: format!("{measure}, mean over `{}`", t.name),
        })
        .collect())
}

/// Largest magnitude first, ties by latent index.
fn by_magnitude(scores: BTreeMap<u32, f64>) -> Vec<(u32, f64)> {
    let mut ranked: Vec<(u32, f64)> = scores.into_iter().collect();
    ranked.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_is_by_magnitude_then_index() {
        let scores = BTreeMap::from([(3, -2.0), (1, 2.0), (2, 0.5)]);
        assert_eq!(by_magnitude(scores), [(1, 2.0), (3, -2.0), (2, 0.5)]);
    }
}
