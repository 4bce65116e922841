//! The logit lens (nostalgebraist, 2020): the residual stream at one position, after the
//! embedding and after every block, read as if it were the last block's output — through the
//! model's own final norm, unembedding and final soft-cap — to show which tokens the model
//! leans towards at each depth. The last block's reading is the model's own prediction.
//!
//! One forward pass captures every residual; the readings are one small matmul.

use candle_core::{IndexOp, Tensor};

use crate::error::{CandleContext, RunError};
use crate::hooks::{HookPoint, Hooks};
use crate::transformer::{Padding, Transformer, Unembed};

/// What to read.
#[derive(Debug, Clone)]
pub struct LensOptions {
    /// The token position; negative counts from the end (`-1`: the last token, whose
    /// reading is the prediction of the next one).
    pub position: i64,
    /// Tokens per layer, most probable first.
    pub top: usize,
    /// A token whose rank and probability to report at every layer.
    pub token: Option<u32>,
}

impl Default for LensOptions {
    fn default() -> Self {
        Self {
            position: -1,
            top: 5,
            token: None,
        }
    }
}

/// A token's standing in one layer's reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenRank {
    pub id: u32,
    /// 1 for the most probable token; ties go to the lower id.
    pub rank: usize,
    pub prob: f64,
}

/// One layer's reading.
#[derive(Debug, Clone, PartialEq)]
pub struct LensLayer {
    /// The residual read: `blocks.0.hook_resid_pre` (the embedding, with any learned
    /// positions and embedding scale) or `blocks.L.hook_resid_post`.
    pub hook: HookPoint,
    /// The `top` most probable tokens and their probabilities, most probable first.
    pub top: Vec<TokenRank>,
    /// The requested token, if one was.
    pub token: Option<TokenRank>,
}

impl LensLayer {
    /// `embed` for the embedding, else the block's index.
    pub fn label(&self) -> String {
        match self.hook {
            HookPoint::ResidPost(l) => l.to_string(),
            _ => "embed".into(),
        }
    }
}

/// The lens at one position of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Lens {
    /// The position read, counted from the start.
    pub position: usize,
    /// The embedding's reading, then one per block in order.
    pub layers: Vec<LensLayer>,
}

/// The residual hooks the lens reads, in forward order.
pub fn lens_hooks(n_layers: usize) -> Vec<HookPoint> {
    std::iter::once(HookPoint::ResidPre(0))
        .chain((0..n_layers).map(HookPoint::ResidPost))
        .collect()
}

/// `position` (negative from the end) as an index into a prompt of `len` tokens.
pub fn resolve_position(position: i64, len: usize) -> Result<usize, RunError> {
    let i = if position < 0 {
        len as i64 + position
    } else {
        position
    };
    if i < 0 || i >= len as i64 {
        return Err(RunError::Position { position, len });
    }
    Ok(i as usize)
}

/// The logit lens of `t` on prompt `ids` (token ids, already templated) at `opts.position`.
pub fn logit_lens(t: &Transformer, ids: &[u32], opts: &LensOptions) -> Result<Lens, RunError> {
    let vocab = t.config.vocab_size;
    if ids.is_empty() {
        return Err(RunError::Lens("the prompt has no tokens".into()));
    }
    if opts.top == 0 || opts.top > vocab {
        return Err(RunError::Lens(format!(
            "top must be between 1 and the vocabulary size {vocab}, not {}",
            opts.top
        )));
    }
    if let Some(id) = opts.token.filter(|&id| id as usize >= vocab) {
        return Err(RunError::Lens(format!(
            "token id {id} is outside the vocabulary of {vocab}"
        )));
    }
    let position = resolve_position(opts.position, ids.len())?;
    let points = lens_hooks(t.config.n_layers);
    let hooks = points.iter().fold(Hooks::new(), |h, p| h.capture(*p));
    let out = t.forward(&[ids.to_vec()], Padding::Right, &hooks, Unembed::None)?;
    let rows = points
        .iter()
        .map(|p| {
            out.captures
                .get(p)
                .ok_or_else(|| RunError::Lens(format!("`{p}` was not captured")))?
                .i((0, position))
                .run_ctx("lens residual")
        })
        .collect::<Result<Vec<_>, _>>()?;
    // [1, layers + 1, d_model] -> [layers + 1, vocab]
    let x = Tensor::stack(&rows, 0)
        .and_then(|x| x.unsqueeze(0))
        .run_ctx("lens residuals")?;
    let logits: Vec<Vec<f32>> = t
        .residual_logits(&x)?
        .squeeze(0)
        .and_then(|l| l.to_vec2())
        .run_ctx("lens logits")?;
    let layers = points
        .iter()
        .zip(&logits)
        .map(|(&hook, row)| read_layer(hook, row, opts))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Lens { position, layers })
}

/// The top tokens (and the requested one) of one layer's logits.
fn read_layer(hook: HookPoint, logits: &[f32], opts: &LensOptions) -> Result<LensLayer, RunError> {
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(RunError::Lens(format!(
            "the reading at `{hook}` holds NaN or infinite logits"
        )));
    }
    // Softmax in f64: the probabilities of a 50k-token vocabulary sum in f32 with visible
    // error, and f64 makes the order of summation irrelevant at the precision reported.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let prob = |id: usize| (logits[id] as f64 - max).exp() / sum;
    // Most probable first; equal logits in id order, so the reading is deterministic.
    let before = |a: usize, b: usize| logits[b].total_cmp(&logits[a]).then(a.cmp(&b));
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    let k = opts.top.min(ids.len());
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, |&a, &b| before(a, b));
        ids.truncate(k);
    }
    ids.sort_unstable_by(|&a, &b| before(a, b));
    let top = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| TokenRank {
            id: id as u32,
            rank: i + 1,
            prob: prob(id),
        })
        .collect();
    let token = opts.token.map(|id| {
        let id = id as usize;
        let rank = 1 + (0..logits.len()).filter(|&j| before(j, id).is_lt()).count();
        TokenRank {
            id: id as u32,
            rank,
            prob: prob(id),
        }
    });
    Ok(LensLayer { hook, top, token })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(logits: &[f32], top: usize, token: Option<u32>) -> LensLayer {
        let opts = LensOptions {
            position: -1,
            top,
            token,
        };
        read_layer(HookPoint::ResidPost(0), logits, &opts).unwrap()
    }

    #[test]
    fn top_tokens_are_the_largest_logits_with_softmax_probabilities() {
        let l = layer(&[0.0, 2.0, 1.0, 2.0, -1.0], 3, Some(4));
        let ids: Vec<u32> = l.top.iter().map(|t| t.id).collect();
        assert_eq!(ids, [1, 3, 2], "ties in id order");
        let z: f64 = [0.0f64, 2.0, 1.0, 2.0, -1.0].iter().map(|v| v.exp()).sum();
        assert!((l.top[0].prob - 2f64.exp() / z).abs() < 1e-12);
        assert!((l.top[2].prob - 1f64.exp() / z).abs() < 1e-12);
        let t = l.token.unwrap();
        assert_eq!((t.id, t.rank), (4, 5));
        assert!((t.prob - (-1f64).exp() / z).abs() < 1e-12);
    }

    #[test]
    fn a_tied_token_ranks_after_the_lower_ids() {
        let l = layer(&[1.0, 1.0, 1.0], 1, Some(2));
        assert_eq!(l.top[0].id, 0);
        assert_eq!(l.token.unwrap().rank, 3);
    }

    #[test]
    fn non_finite_logits_are_an_error_naming_the_hook() {
        let opts = LensOptions::default();
        let e = read_layer(HookPoint::ResidPost(3), &[0.0, f32::NAN], &opts).unwrap_err();
        assert!(e.to_string().contains("blocks.3.hook_resid_post"), "{e}");
    }

    #[test]
    fn positions_count_from_either_end() {
        assert_eq!(resolve_position(0, 4).unwrap(), 0);
        assert_eq!(resolve_position(-1, 4).unwrap(), 3);
        assert_eq!(resolve_position(-4, 4).unwrap(), 0);
        for bad in [4, -5, 100] {
            let e = resolve_position(bad, 4).unwrap_err().to_string();
            assert!(
                e.contains(&bad.to_string()) && e.contains("4 tokens"),
                "{e}"
            );
        }
    }
}
