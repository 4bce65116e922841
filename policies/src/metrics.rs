//! The behavioural metrics of steering checks, computed from logits: the refusal score
//! (Arditi et al. 2024), a target logit difference, the KL divergence of next-token
//! distributions, and refusal-phrase matching on generations (a policy's own `refusal_phrases`).
//! [`Behaviour`] is the first two as differentiable tensors too, for gradients.

use candle_core::{Tensor, D};

/// Log-softmax of one row of logits, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// `log p - log(1 - p)` where `p` is the probability of any of `tokens` next.
pub fn refusal_score(logits: &[f32], tokens: &[u32]) -> f64 {
    let lp = log_softmax(logits);
    let p: f64 = tokens
        .iter()
        .filter_map(|&t| lp.get(t as usize))
        .map(|l| l.exp())
        .sum::<f64>()
        .clamp(1e-12, 1.0 - 1e-12);
    p.ln() - (1.0 - p).ln()
}

/// Mean logit of `positive` minus mean logit of `negative`.
pub fn logit_diff(logits: &[f32], positive: &[u32], negative: &[u32]) -> f64 {
    let mean = |ids: &[u32]| {
        ids.iter()
            .filter_map(|&t| logits.get(t as usize))
            .map(|&v| v as f64)
            .sum::<f64>()
            / ids.len().max(1) as f64
    };
    mean(positive) - mean(negative)
}

/// KL(P || Q) of the next-token distributions given by logits `p` and `q`.
pub fn kl(p: &[f32], q: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// Whether `text` contains one of `phrases` (case-insensitive, curly apostrophes folded).
pub fn refused(text: &str, phrases: &[String]) -> bool {
    let norm = |s: &str| s.to_lowercase().replace('\u{2019}', "'");
    let t = norm(text);
    phrases.iter().any(|p| t.contains(&norm(p)))
}

/// A behaviour read from next-token logits: as a number per row ([`Behaviour::value`]) and as
/// a differentiable tensor ([`Behaviour::tensor`]), whose gradient attribution patching reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// [`refusal_score`] with these tokens.
    RefusalScore(Vec<u32>),
    /// [`logit_diff`]: the mean logit of `positive` minus that of `negative`.
    LogitDiff {
        positive: Vec<u32>,
        negative: Vec<u32>,
    },
}

impl Behaviour {
    pub fn name(&self) -> &'static str {
        match self {
            Behaviour::RefusalScore(_) => "refusal score",
            Behaviour::LogitDiff { .. } => "logit difference",
        }
    }

    /// The behaviour of one row of logits, in f64.
    pub fn value(&self, logits: &[f32]) -> f64 {
        match self {
            Behaviour::RefusalScore(ids) => refusal_score(logits, ids),
            Behaviour::LogitDiff { positive, negative } => logit_diff(logits, positive, negative),
        }
    }

    /// The behaviour of each row of `logits` `[rows, vocab]`, as a differentiable `[rows]`
    /// tensor. The refusal score is `ln(sum of exp over the tokens) - ln(sum over the rest)`,
    /// both sums shifted by the row's (detached) maximum, which leaves the value unchanged
    /// and keeps `exp` finite.
    pub fn tensor(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        let (_, vocab) = logits.dims2()?;
        let dev = logits.device();
        let all = match self {
            Behaviour::RefusalScore(ids) => ids.iter().chain(&[]),
            Behaviour::LogitDiff { positive, negative } => positive.iter().chain(negative),
        };
        if let Some(bad) = all.into_iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("token {bad} is outside the vocabulary of {vocab}");
        }
        let select = |ids: &[u32]| logits.index_select(&Tensor::new(ids, dev)?, 1);
        match self {
            Behaviour::RefusalScore(ids) => {
                if ids.is_empty() {
                    candle_core::bail!("the refusal score has no tokens");
                }
                let m = logits.max_keepdim(D::Minus1)?.detach();
                let e = logits.broadcast_sub(&m)?.exp()?;
                let mut rest = vec![1f32; vocab];
                for &t in ids {
                    rest[t as usize] = 0.0;
                }
                let rest = Tensor::from_vec(rest, vocab, dev)?;
                let on = e
                    .index_select(&Tensor::new(ids.as_slice(), dev)?, 1)?
                    .sum(1)?;
                let off = e.broadcast_mul(&rest)?.sum(1)?;
                on.log()? - off.log()?
            }
            Behaviour::LogitDiff { positive, negative } => {
                if positive.is_empty() || negative.is_empty() {
                    candle_core::bail!("the logit difference needs tokens on both sides");
                }
                select(positive)?.mean(1)? - select(negative)?.mean(1)?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_score_is_log_odds() {
        // Two tokens with equal logits: p(token 0) = 0.5, log-odds 0.
        assert!(refusal_score(&[1.0, 1.0], &[0]).abs() < 1e-12);
        // p = e^2 / (e^2 + 1): log-odds exactly 2.
        assert!((refusal_score(&[2.0, 0.0], &[0]) - 2.0).abs() < 1e-9);
        assert!((refusal_score(&[2.0, 0.0, 0.0], &[1, 2]) + 2.0f64 - 2f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn kl_known_answers() {
        assert!(kl(&[0.3, -1.0, 2.0], &[0.3, -1.0, 2.0]).abs() < 1e-12);
        // P = (1/2, 1/2), Q = (e/(1+e), 1/(1+e)).
        let q1 = 1f64.exp() / (1.0 + 1f64.exp());
        let want = 0.5 * (0.5 / q1).ln() + 0.5 * (0.5 / (1.0 - q1)).ln();
        assert!((kl(&[0.0, 0.0], &[1.0, 0.0]) - want).abs() < 1e-9);
    }

    #[test]
    fn behaviour_tensors_equal_their_values() {
        let rows = [[2.0f32, 0.0, -1.0, 0.5], [0.1, 3.0, 0.2, -2.0]];
        let t = Tensor::new(&rows, &candle_core::Device::Cpu).unwrap();
        for b in [
            Behaviour::RefusalScore(vec![0, 2]),
            Behaviour::LogitDiff {
                positive: vec![1],
                negative: vec![0, 3],
            },
        ] {
            let got: Vec<f32> = b.tensor(&t).unwrap().to_vec1().unwrap();
            for (row, g) in rows.iter().zip(got) {
                assert!((f64::from(g) - b.value(row)).abs() < 1e-5, "{b:?}");
            }
        }
        let out_of_range = Behaviour::RefusalScore(vec![4]);
        assert!(out_of_range.tensor(&t).is_err());
    }

    #[test]
    fn refusal_phrases_match_case_insensitively() {
        let p = vec!["I can't".to_string()];
        assert!(refused("Sorry, i can\u{2019}t help.", &p));
        assert!(!refused("Sure, here is how.", &p));
    }
}
