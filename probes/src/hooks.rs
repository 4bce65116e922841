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

    /// Parse a TransformerLens name and check it exists in a model with `n_layers` blocks. The
    /// block may be a fraction of depth ([`HookName`]); the result is the absolute hook.
    pub fn parse(name: &str, n_layers: usize) -> Result<HookPoint, RunError> {
        HookName::parse(name)?.resolve(n_layers)
    }

    /// The same hook point at block `l` (hooks outside the blocks are returned unchanged).
    fn at_block(self, l: usize) -> HookPoint {
        match self {
            HookPoint::Embed | HookPoint::LnFinal => self,
            HookPoint::ResidPre(_) => HookPoint::ResidPre(l),
            HookPoint::AttnPattern(_) => HookPoint::AttnPattern(l),
            HookPoint::AttnOut(_) => HookPoint::AttnOut(l),
            HookPoint::ResidMid(_) => HookPoint::ResidMid(l),
            HookPoint::MlpOut(_) => HookPoint::MlpOut(l),
            HookPoint::ResidPost(_) => HookPoint::ResidPost(l),
        }
    }

    /// True for hooks whose activation is `[batch, pos, d_model]`.
    pub fn is_residual_width(self) -> bool {
        !matches!(self, HookPoint::AttnPattern(_))
    }

    /// True for the residual stream between blocks (`hook_resid_pre`, `hook_resid_post`),
    /// where a pass can start from a captured activation ([`crate::Transformer::forward_from`]).
    pub fn is_residual_stream(self) -> bool {
        matches!(self, HookPoint::ResidPre(_) | HookPoint::ResidPost(_))
    }
}

/// A block as a hook name or a policy gives it: an index, or a fraction of the model's depth
/// (`0.5` is the block at half depth), so that one policy fits models of any depth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Block {
    /// Block `L`, counted from 0.
    Index(usize),
    /// A fraction of depth in [0, 1]: block `round(f * (n_layers - 1))`, rounding half away
    /// from zero, so 0.0 is the first block, 1.0 the last and 0.5 on 30 blocks is block 15.
    Depth(f64),
}

impl Block {
    /// `15` or `0.5`: a decimal integer without sign or leading zero, or digits, a point and
    /// digits. A fraction outside [0, 1] (`1.5`, `-0.1`) and any other number (`0..5`, `0.5e1`,
    /// `.5`, `NaN`) are errors that say why.
    pub fn parse(s: &str) -> Result<Block, String> {
        let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
        let malformed = || {
            format!(
                "block `{s}` is neither a block number (`15`) nor a fraction of depth in [0, 1] \
                 written with a decimal point (`0.5`)"
            )
        };
        let unsigned = s.strip_prefix('-').unwrap_or(s);
        if let Some((whole, frac)) = unsigned.split_once('.') {
            if !digits(whole) || !digits(frac) || (whole.len() > 1 && whole.starts_with('0')) {
                return Err(malformed());
            }
            let f: f64 = s.parse().map_err(|_| malformed())?;
            if unsigned != s || !(0.0..=1.0).contains(&f) {
                return Err(format!(
                    "the depth fraction {s} is outside [0, 1] (0 is the first block, 1 the last)"
                ));
            }
            return Ok(Block::Depth(f));
        }
        if !digits(s) || (s.len() > 1 && s.starts_with('0')) || s.len() > 9 {
            return Err(malformed());
        }
        s.parse().map(Block::Index).map_err(|_| malformed())
    }

    /// The block's index in a model with `n_layers` blocks, or why it has none.
    pub fn resolve(self, n_layers: usize) -> Result<usize, String> {
        let l = match self {
            Block::Index(l) => l,
            Block::Depth(f) => (f * n_layers.saturating_sub(1) as f64).round() as usize,
        };
        if l >= n_layers {
            return Err(format!(
                "block {l} is out of range: the model has {n_layers} blocks (0..{})",
                n_layers.saturating_sub(1)
            ));
        }
        Ok(l)
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Block::Index(l) => write!(f, "{l}"),
            Block::Depth(d) => write!(f, "{d:?}"),
        }
    }
}

/// A hook as a policy or the command line names it, before the model is known: its block may
/// be a fraction of depth (`blocks.0.5.hook_resid_post`). [`HookName::resolve`] gives the
/// absolute [`HookPoint`], which is what is read, recorded and pinned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HookName {
    /// The hook's kind; its block number is a placeholder when `block` is set.
    point: HookPoint,
    block: Option<Block>,
}

/// The hooks inside a block, by the name after `blocks.L.`.
const BLOCK_HOOKS: &[(&str, HookPoint)] = &[
    ("hook_resid_pre", HookPoint::ResidPre(0)),
    ("hook_attn_out", HookPoint::AttnOut(0)),
    ("hook_resid_mid", HookPoint::ResidMid(0)),
    ("hook_mlp_out", HookPoint::MlpOut(0)),
    ("hook_resid_post", HookPoint::ResidPost(0)),
    ("attn.hook_pattern", HookPoint::AttnPattern(0)),
];

impl HookName {
    /// Check a name's form: a known hook, and a block that is a number or a fraction in [0, 1].
    pub fn parse(name: &str) -> Result<HookName, RunError> {
        let outside = |point| HookName { point, block: None };
        match name {
            "hook_embed" => return Ok(outside(HookPoint::Embed)),
            "ln_final.hook_normalized" => return Ok(outside(HookPoint::LnFinal)),
            _ => {}
        }
        let unknown = || RunError::UnknownHook {
            name: name.to_string(),
            valid: valid_hooks(None),
        };
        let rest = name.strip_prefix("blocks.").ok_or_else(unknown)?;
        let (block, point) = BLOCK_HOOKS
            .iter()
            .find_map(|(suffix, point)| {
                let block = rest.strip_suffix(suffix)?.strip_suffix('.')?;
                Some((block, *point))
            })
            .ok_or_else(unknown)?;
        let block = Block::parse(block).map_err(|why| RunError::BadBlock {
            name: name.to_string(),
            why,
        })?;
        Ok(HookName {
            point,
            block: Some(block),
        })
    }

    /// The block as written, if the hook is inside one.
    pub fn block(&self) -> Option<Block> {
        self.block
    }

    /// The hook of a model with `n_layers` blocks that this name means.
    pub fn resolve(&self, n_layers: usize) -> Result<HookPoint, RunError> {
        let Some(block) = self.block else {
            return Ok(self.point);
        };
        let l = block
            .resolve(n_layers)
            .map_err(|why| beyond_the_model(self.to_string(), why, n_layers))?;
        Ok(self.point.at_block(l))
    }
}

impl fmt::Display for HookName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(block) = self.block else {
            return write!(f, "{}", self.point);
        };
        let (suffix, _) = BLOCK_HOOKS
            .iter()
            .find(|(_, p)| *p == self.point)
            .expect("a block hook is one of BLOCK_HOOKS");
        write!(f, "blocks.{block}.{suffix}")
    }
}

/// The valid hook names, with the block range of a model with `n_layers` blocks if known.
fn valid_hooks(n_layers: Option<usize>) -> String {
    let l = n_layers.map_or_else(
        || "L".to_string(),
        |n| format!("0..{}", n.saturating_sub(1)),
    );
    format!(
        "hook_embed, blocks.{{{l}}}.{{hook_resid_pre, hook_attn_out, hook_resid_mid, \
         hook_mlp_out, hook_resid_post, attn.hook_pattern}}, ln_final.hook_normalized (a block \
         is a number, or a fraction of depth in [0, 1] such as 0.5)"
    )
}

/// The error for hook `name` at a block the model lacks; `why` says which block and how many
/// the model has.
pub(crate) fn beyond_the_model(name: String, why: String, n_layers: usize) -> RunError {
    RunError::UnknownHook {
        name,
        valid: format!("{}; {why}", valid_hooks(Some(n_layers))),
    }
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
    /// `x = f(x)` where `f` rewrites each position from that position's activation alone
    /// (removing one SAE latent's part, say), so that a start every row shares is rewritten
    /// the same way in each and can be computed once; `f` must keep the shape.
    ReplaceEach(ReplaceFn),
}

impl fmt::Debug for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edit::Add { coeff, .. } => write!(f, "Add(coeff={coeff})"),
            Edit::Ablate { .. } => write!(f, "Ablate"),
            Edit::Replace(_) => write!(f, "Replace"),
            Edit::ReplaceEach(_) => write!(f, "ReplaceEach"),
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

    /// [`Hooks::replace`] by a function of each position alone ([`Edit::ReplaceEach`]).
    pub fn replace_each(mut self, hook: HookPoint, positions: Positions, f: ReplaceFn) -> Self {
        self.interventions.push(Intervention {
            hook,
            positions,
            edit: Edit::ReplaceEach(f),
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
            "blocks.3.hook_resid",
            "resid",
            "blocks.hook_resid_pre",
            "blocks.0.5",
        ] {
            let e = HookPoint::parse(bad, 3).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("hook_resid_post"), "{e}");
        }
        for bad in ["blocks.x.hook_resid_pre", "blocks.01.hook_resid_pre"] {
            let e = HookPoint::parse(bad, 3).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("block number"), "{e}");
        }
    }

    #[test]
    fn a_block_may_be_a_fraction_of_depth() {
        // round(f * (n - 1)), half away from zero.
        for (name, n, want) in [
            ("blocks.0.5.hook_resid_post", 30, HookPoint::ResidPost(15)),
            ("blocks.0.5.hook_resid_post", 24, HookPoint::ResidPost(12)),
            ("blocks.0.5.hook_resid_post", 28, HookPoint::ResidPost(14)),
            ("blocks.0.0.hook_resid_pre", 30, HookPoint::ResidPre(0)),
            ("blocks.1.0.hook_mlp_out", 30, HookPoint::MlpOut(29)),
            (
                "blocks.1.0.attn.hook_pattern",
                24,
                HookPoint::AttnPattern(23),
            ),
            ("blocks.0.25.hook_attn_out", 30, HookPoint::AttnOut(7)),
            ("blocks.0.25.hook_attn_out", 24, HookPoint::AttnOut(6)),
            ("blocks.0.75.hook_resid_mid", 28, HookPoint::ResidMid(20)),
            ("blocks.0.5.hook_resid_post", 1, HookPoint::ResidPost(0)),
        ] {
            assert_eq!(HookPoint::parse(name, n).unwrap(), want, "{name} on {n}");
        }
    }

    #[test]
    fn a_plain_integer_is_an_absolute_block() {
        assert_eq!(
            HookPoint::parse("blocks.15.hook_resid_post", 30).unwrap(),
            HookPoint::ResidPost(15)
        );
        assert_eq!(
            HookName::parse("blocks.1.hook_resid_post").unwrap().block(),
            Some(Block::Index(1))
        );
        assert_eq!(
            HookName::parse("blocks.1.0.hook_resid_post")
                .unwrap()
                .block(),
            Some(Block::Depth(1.0))
        );
    }

    #[test]
    fn a_fraction_outside_the_unit_interval_is_refused() {
        for bad in [
            "blocks.1.5.hook_resid_post",
            "blocks.-0.1.hook_resid_post",
            "blocks.-0.0.hook_resid_post",
            "blocks.2.0.attn.hook_pattern",
        ] {
            let e = HookName::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("outside [0, 1]"), "{e}");
        }
    }

    #[test]
    fn malformed_blocks_are_refused() {
        for bad in [
            "blocks.0..5.hook_resid_post",
            "blocks.0.5e1.hook_resid_post",
            "blocks.NaN.hook_resid_post",
            "blocks.inf.hook_resid_post",
            "blocks..5.hook_resid_post",
            "blocks.1..hook_resid_post",
            "blocks.00.5.hook_resid_post",
            "blocks.0.5.5.hook_resid_post",
            "blocks.+0.5.hook_resid_post",
            "blocks. 0.5.hook_resid_post",
            "blocks.-3.hook_resid_post",
            "blocks..hook_resid_post",
        ] {
            let e = HookPoint::parse(bad, 30).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("fraction of depth"), "{e}");
        }
    }

    #[test]
    fn a_block_beyond_the_model_names_its_depth() {
        let e = HookPoint::parse("blocks.30.hook_resid_post", 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the model has 30 blocks (0..29)"), "{e}");
        assert!(
            e.contains("unknown hook") && e.contains("blocks.{0..29}"),
            "{e}"
        );
    }

    #[test]
    fn a_fraction_prints_as_written() {
        for name in ["blocks.0.5.hook_resid_post", "blocks.1.0.attn.hook_pattern"] {
            assert_eq!(HookName::parse(name).unwrap().to_string(), name);
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
