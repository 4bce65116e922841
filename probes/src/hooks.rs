//! TransformerLens-named hook points, and the capture and intervention requests made at them.
//!
//! A hook's name is generated from its variant (`blocks.6.hook_resid_post`), never typed by
//! hand elsewhere: the same string is the tracing field, the policy key and the record column.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::RunError;

/// A point in the forward pass whose activation can be read or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// Token embedding, `[batch, pos, d_model]`.
    Embed,
    /// Input to block L.
    ResidPre(usize),
    /// Attention output of block L (after the output projection).
    AttnOut(usize),
    /// `resid_pre + attn_out`.
    ResidMid(usize),
    /// MLP output of block L.
    MlpOut(usize),
    /// Output of block L.
    ResidPost(usize),
    /// Attention probabilities of block L, `[batch, head, query_pos, key_pos]`.
    AttnPattern(usize),
    /// The final normalised residual stream, input to the unembedding.
    LnFinal,
}

impl HookPoint {
    /// Every hook point of a model with `n_layers` blocks, in forward order.
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let mut v = vec![HookPoint::Embed];
        for l in 0..n_layers {
            v.extend([
                HookPoint::ResidPre(l),
                HookPoint::AttnPattern(l),
                HookPoint::AttnOut(l),
                HookPoint::ResidMid(l),
                HookPoint::MlpOut(l),
                HookPoint::ResidPost(l),
            ]);
        }
        v.push(HookPoint::LnFinal);
        v
    }

    /// Position in the forward pass: hooks that come later compare greater.
    pub fn order(self) -> (usize, usize) {
        match self {
            HookPoint::Embed => (0, 0),
            HookPoint::ResidPre(l) => (l + 1, 0),
            HookPoint::AttnPattern(l) => (l + 1, 1),
            HookPoint::AttnOut(l) => (l + 1, 2),
            HookPoint::ResidMid(l) => (l + 1, 3),
            HookPoint::MlpOut(l) => (l + 1, 4),
            HookPoint::ResidPost(l) => (l + 1, 5),
            HookPoint::LnFinal => (usize::MAX, 0),
        }
    }

    pub fn layer(self) -> Option<usize> {
        match self {
            HookPoint::Embed | HookPoint::LnFinal => None,
            HookPoint::ResidPre(l)
            | HookPoint::AttnPattern(l)
            | HookPoint::AttnOut(l)
            | HookPoint::ResidMid(l)
            | HookPoint::MlpOut(l)
            | HookPoint::ResidPost(l) => Some(l),
        }
    }

    /// Parse a TransformerLens name and check it exists in a model with `n_layers` blocks.
    pub fn parse(name: &str, n_layers: usize) -> Result<HookPoint, RunError> {
        let unknown = || RunError::UnknownHook {
            name: name.to_string(),
            valid: valid_hooks(n_layers),
        };
        let point = match name {
            "hook_embed" => HookPoint::Embed,
            "ln_final.hook_normalized" => HookPoint::LnFinal,
            _ => {
                let rest = name.strip_prefix("blocks.").ok_or_else(unknown)?;
                let (layer, hook) = rest.split_once('.').ok_or_else(unknown)?;
                if layer.starts_with('+') || (layer.len() > 1 && layer.starts_with('0')) {
                    return Err(unknown());
                }
                let l: usize = layer.parse().map_err(|_| unknown())?;
                let p = match hook {
                    "hook_resid_pre" => HookPoint::ResidPre(l),
                    "hook_attn_out" => HookPoint::AttnOut(l),
                    "hook_resid_mid" => HookPoint::ResidMid(l),
                    "hook_mlp_out" => HookPoint::MlpOut(l),
                    "hook_resid_post" => HookPoint::ResidPost(l),
                    "attn.hook_pattern" => HookPoint::AttnPattern(l),
                    _ => return Err(unknown()),
                };
                if l >= n_layers {
                    return Err(unknown());
                }
                p
            }
        };
        Ok(point)
    }

    /// True for hooks whose activation is `[batch, pos, d_model]`.
    pub fn is_residual_width(self) -> bool {
        !matches!(self, HookPoint::AttnPattern(_))
    }
}

fn valid_hooks(n_layers: usize) -> String {
    format!(
        "hook_embed, blocks.{{0..{}}}.{{hook_resid_pre, hook_attn_out, hook_resid_mid, \
         hook_mlp_out, hook_resid_post, attn.hook_pattern}}, ln_final.hook_normalized",
        n_layers.saturating_sub(1)
    )
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => write!(f, "hook_embed"),
            HookPoint::ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            HookPoint::AttnOut(l) => write!(f, "blocks.{l}.hook_attn_out"),
            HookPoint::ResidMid(l) => write!(f, "blocks.{l}.hook_resid_mid"),
            HookPoint::MlpOut(l) => write!(f, "blocks.{l}.hook_mlp_out"),
            HookPoint::ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
            HookPoint::AttnPattern(l) => write!(f, "blocks.{l}.attn.hook_pattern"),
            HookPoint::LnFinal => write!(f, "ln_final.hook_normalized"),
        }
    }
}

/// Which token positions of each prompt an intervention touches. Indices count real tokens
/// (padding excluded) from the start of the prompt; negative ones count from the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Positions {
    All,
    /// The last token of the current pass (the prompt's last token, then each generated one).
    Last,
    Indices(Vec<i64>),
}

/// A function that rewrites an activation, for SAE splicing and similar replacements.
pub type ReplaceFn = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// What an intervention does to the activation at its positions.
#[derive(Clone)]
pub enum Edit {
    /// `x += coeff * vector`.
    Add { vector: Tensor, coeff: f32 },
    /// `x -= (x . d) d` with `d` the unit direction: directional ablation.
    Ablate { direction: Tensor },
    /// `x = f(x)`; `f` must keep the shape.
    Replace(ReplaceFn),
}

impl fmt::Debug for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edit::Add { coeff, .. } => write!(f, "Add(coeff={coeff})"),
            Edit::Ablate { .. } => write!(f, "Ablate"),
            Edit::Replace(_) => write!(f, "Replace"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Intervention {
    pub hook: HookPoint,
    pub positions: Positions,
    pub edit: Edit,
}

/// The hooks of one forward pass or generation: what to capture and what to change.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub capture: BTreeSet<HookPoint>,
    pub interventions: Vec<Intervention>,
}

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn capture(mut self, hook: HookPoint) -> Self {
        self.capture.insert(hook);
        self
    }

    pub fn add(
        mut self,
        hook: HookPoint,
        positions: Positions,
        vector: Tensor,
        coeff: f32,
    ) -> Self {
        self.interventions.push(Intervention {
            hook,
            positions,
            edit: Edit::Add { vector, coeff },
        });
        self
    }

    pub fn ablate(mut self, hook: HookPoint, positions: Positions, direction: Tensor) -> Self {
        self.interventions.push(Intervention {
            hook,
            positions,
            edit: Edit::Ablate { direction },
        });
        self
    }

    /// Directional ablation as in Arditi et al. (2024): project `direction` out of every block
    /// input and every attention and MLP output, at every position.
    pub fn ablate_everywhere(mut self, n_layers: usize, direction: &Tensor) -> Self {
        for l in 0..n_layers {
            for hook in [
                HookPoint::ResidPre(l),
                HookPoint::AttnOut(l),
                HookPoint::MlpOut(l),
            ] {
                self = self.ablate(hook, Positions::All, direction.clone());
            }
        }
        self
    }

    pub fn replace(mut self, hook: HookPoint, positions: Positions, f: ReplaceFn) -> Self {
        self.interventions.push(Intervention {
            hook,
            positions,
            edit: Edit::Replace(f),
        });
        self
    }

    /// The latest hook point anything is attached to, if any.
    pub fn deepest(&self) -> Option<HookPoint> {
        self.capture
            .iter()
            .copied()
            .chain(self.interventions.iter().map(|i| i.hook))
            .max_by_key(|h| h.order())
    }

    pub fn is_empty(&self) -> bool {
        self.capture.is_empty() && self.interventions.is_empty()
    }

    pub(crate) fn touches(&self, hook: HookPoint) -> bool {
        self.capture.contains(&hook) || self.interventions.iter().any(|i| i.hook == hook)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_for_every_hook() {
        for h in HookPoint::all(3) {
            assert_eq!(HookPoint::parse(&h.to_string(), 3).unwrap(), h);
        }
    }

    #[test]
    fn unknown_hooks_list_the_valid_ones() {
        for bad in [
            "blocks.3.hook_resid_post",
            "blocks.x.hook_resid_pre",
            "resid",
            "blocks.01.hook_resid_pre",
        ] {
            let e = HookPoint::parse(bad, 3).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("hook_resid_post"), "{e}");
        }
    }

    #[test]
    fn forward_order_is_the_listing_order() {
        let all = HookPoint::all(2);
        let mut sorted = all.clone();
        sorted.sort_by_key(|h| h.order());
        assert_eq!(all, sorted);
    }
}
