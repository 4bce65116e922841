//! `induction`: induction heads (Olsson et al. 2022) measured on repeated random tokens, the
//! way TransformerLens scores them. A capability-regression check between checkpoints: a
//! model that loses its induction heads loses in-context copying.
//!
//! The input is `n_sequences` sequences of `length` random tokens, each repeated twice
//! (`[BOS] r1 .. rL r1 .. rL`), drawn by a seeded generator from the vocabulary less its
//! added and special tokens. The tokens of one sequence are distinct, so every token of the
//! second repeat has exactly one earlier occurrence. One forward pass captures every block's
//! attention pattern and every position's logits; for every head of every block:
//!
//! - the induction score: the mean attention from each second-repeat token to the token after
//!   its first occurrence (TransformerLens's score; its diagonal also takes two positions of
//!   the first repeat, left out here);
//! - the previous-token score: the mean attention from each token to the one before it (the
//!   first token and the BOS it would attend to left out);
//! - the duplicate-token score: the mean attention from each second-repeat token to its first
//!   occurrence.
//!
//! The in-context loss drop is the mean next-token cross-entropy on the first repeat minus
//! that on the second, in nats; the first token of each repeat, which nothing before it
//! predicts, is left out of both.

use std::collections::BTreeSet;

use candle_core::{DType, Tensor, D};
use probes::hooks::{Block, HookPoint, Hooks};
use probes::{ForwardOutput, Model};
use serde::Deserialize;
use toml::Spanned;

use super::{violated, Cx, Kind, Planner};
use crate::error::CheckError;
use crate::load::{Located, Names, Validator};
use crate::result::{round, AttentionPattern, Evidence, Finding, HeadScores, Metric, Status};

/// Most sequences a check may ask for.
const MAX_SEQUENCES: i64 = 256;
/// Most tokens per repeat a check may ask for (the model's context may allow fewer): every
/// position's logits are kept for a micro-batch, `2 * length` rows of the vocabulary's width.
const MAX_LENGTH: i64 = 256;
/// Heads shown as evidence, best induction score first (named heads are added).
const TOP_HEADS: usize = 5;
/// Heads whose attention pattern is shown.
const TOP_PATTERNS: usize = 2;
/// Most cells per side of a shown pattern: longer sequences are mean-pooled.
const PATTERN_CELLS: usize = 24;

/// The fields of an `induction` check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Random sequences (default 8).
    pub n_sequences: Option<Spanned<i64>>,
    /// Tokens per repeat (default 32): a sequence is `2 * length` tokens, plus BOS.
    pub length: Option<Spanned<i64>>,
    /// Seed of the token generator (default 0).
    pub seed: Option<Spanned<i64>>,
    /// Put the model's BOS token first when it has one (default true), as TransformerLens does.
    pub prepend_bos: Option<bool>,
    /// Where the best head is looked for: `[from, to]` as fractions of the model's depth
    /// (default `[0, 1]`, every block), so that one policy fits models of any depth.
    pub layers: Option<Spanned<Vec<f64>>>,
    /// The best head within `layers`, and each head of `heads`, scores at least this.
    pub min_induction_score: Option<Spanned<f64>>,
    /// The mean loss on the first repeat minus that on the second, in nats, is at least this.
    pub min_loss_drop: Option<Spanned<f64>>,
    /// Heads held to `min_induction_score` each, as `"layer.head"` (e.g. `"5.1"`); the layer
    /// may be a fraction of depth (`"0.5.1"`: head 1 of the block at half depth).
    #[serde(default)]
    pub heads: Vec<Spanned<String>>,
}

/// A validated induction check.
#[derive(Debug, Clone)]
pub struct Induction {
    pub n_sequences: usize,
    /// Tokens per repeat, with where it was written (or the check's id).
    pub length: Located<usize>,
    pub seed: u64,
    pub prepend_bos: bool,
    /// `[from, to]` fractions of depth, when the best head within them is bounded.
    pub layers: Option<(f64, f64)>,
    pub min_induction_score: Option<f64>,
    pub min_loss_drop: Option<f64>,
    /// `(block, head)`, resolved and checked against the model when the plan is made.
    pub heads: Vec<Located<(Block, usize)>>,
}

impl Kind for Induction {
    type Spec = Spec;

    fn validate(
        spec: Spec,
        v: &mut Validator<'_>,
        id: &Spanned<String>,
        _: &Names<'_>,
    ) -> Option<Self> {
        let check = format!("check `{}`", id.get_ref());
        let mut count = |field: &str, s: &Option<Spanned<i64>>, default: i64, range: (i64, i64)| {
            let Some(s) = s else {
                return default;
            };
            let x = *s.get_ref();
            if x < range.0 || x > range.1 {
                v.err(
                    s,
                    format!(
                        "{check}: `{field}` {x} is outside [{}, {}]",
                        range.0, range.1
                    ),
                );
            }
            x
        };
        let n_sequences = count("n_sequences", &spec.n_sequences, 8, (1, MAX_SEQUENCES));
        let length_value = count("length", &spec.length, 32, (2, MAX_LENGTH));
        let seed = count("seed", &spec.seed, 0, (0, i64::MAX));
        let length = match &spec.length {
            Some(s) => v.located(s),
            None => Located {
                value: 32,
                at: v.located(id).at,
            },
        };
        let layers = spec.layers.as_ref().and_then(|s| match s.get_ref()[..] {
            [a, b] if a.is_finite() && b.is_finite() && 0.0 <= a && a <= b && b <= 1.0 => {
                Some((a, b))
            }
            _ => {
                v.err(
                    s,
                    format!(
                        "{check}: `layers` is `[from, to]`, two fractions of the model's depth \
                         with 0 <= from <= to <= 1 (e.g. [0.25, 0.75])"
                    ),
                );
                None
            }
        });
        let min_induction_score = spec.min_induction_score.as_ref().map(|s| {
            let x = *s.get_ref();
            if !(0.0..=1.0).contains(&x) {
                v.err(
                    s,
                    format!("{check}: `min_induction_score` {x} is outside [0, 1]"),
                );
            }
            x
        });
        let min_loss_drop = spec.min_loss_drop.as_ref().map(|s| {
            let x = *s.get_ref();
            if !x.is_finite() {
                v.err(
                    s,
                    format!("{check}: `min_loss_drop` must be a finite number"),
                );
            }
            x
        });
        let heads = parse_heads(v, &check, &spec.heads);
        if min_induction_score.is_none() && min_loss_drop.is_none() {
            v.err(
                id,
                format!(
                    "check `{}` needs `min_induction_score` or `min_loss_drop` (or both): \
                     without a bound it could not fail",
                    id.get_ref()
                ),
            );
        }
        if let (Some(s), None) = (&spec.layers, min_induction_score) {
            v.err(
                s,
                format!("{check}: `layers` bounds the best head to `min_induction_score`, which is missing"),
            );
        }
        if !heads.is_empty() && min_induction_score.is_none() {
            v.err(
                &spec.heads[0],
                format!("{check}: `heads` are held to `min_induction_score`, which is missing"),
            );
        }
        // Any error above is counted by the caller, which then drops this value.
        Some(Induction {
            n_sequences: n_sequences as usize,
            length: Located {
                value: length_value.max(0) as usize,
                at: length.at,
            },
            seed: seed as u64,
            prepend_bos: spec.prepend_bos.unwrap_or(true),
            // Without `layers`, the best head of the whole model is bounded unless only
            // named heads are.
            layers: layers.or((spec.heads.is_empty()).then_some((0.0, 1.0))),
            min_induction_score,
            min_loss_drop,
            heads,
        })
    }

    fn plan(&self, p: &mut Planner<'_, '_>) {
        let model = p.session.model;
        let c = model.config();
        let id = &p.check.id;
        for h in &self.heads {
            let (block, head) = h.value;
            let why = if let Err(why) = block.resolve(c.n_layers) {
                why
            } else if head >= c.n_heads {
                format!(
                    "head {head} is out of range: the model has {} heads per block (0..{})",
                    c.n_heads,
                    c.n_heads.saturating_sub(1)
                )
            } else {
                continue;
            };
            let e = p
                .policy
                .error(&h.at, format!("check `{id}`: head `{block}.{head}`: {why}"));
            p.errors.push(e);
        }
        let l = self.length.value;
        let tokens = 2 * l + usize::from(bos(model, self.prepend_bos).is_some());
        let why = if tokens > c.max_positions {
            Some(format!(
                "`length` {l} makes sequences of {tokens} tokens, more than the model's context \
                 length of {}",
                c.max_positions
            ))
        } else {
            let n = vocabulary(model).len();
            (n < l).then(|| {
                format!(
                    "`length` {l} is more than the {n} ordinary tokens of the model's vocabulary"
                )
            })
        };
        if let Some(why) = why {
            let e = p
                .policy
                .error(&self.length.at, format!("check `{id}`: {why}"));
            p.errors.push(e);
        }
    }

    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
        let model = cx.session.model;
        let c = model.config();
        let named = self
            .heads
            .iter()
            .map(|h| Ok((h.value.0.resolve(c.n_layers)?, h.value.1)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(CheckError::Unmeasurable)?;
        let bos = bos(model, self.prepend_bos);
        let ids = sequences(
            &vocabulary(model),
            self.n_sequences,
            self.length.value,
            self.seed,
            bos,
        );
        let shape = Shape {
            layers: c.n_layers,
            heads: c.n_heads,
            length: self.length.value,
            offset: usize::from(bos.is_some()),
        };
        let mut hooks = Hooks::new();
        for l in 0..c.n_layers {
            hooks = hooks.capture(HookPoint::AttnPattern(l));
        }
        let mut acc = Accumulator::new(shape);
        let mut failure = None;
        let what = "the induction check's random sequences";
        let ran = cx.session.forward_ids(what, &ids, &hooks, |first, out| {
            acc.absorb(first, &ids, &out).map_err(|e| {
                let message = e.to_string();
                failure = Some(e);
                probes::RunError::Batch(message)
            })
        });
        if let Some(e) = failure {
            return Err(e);
        }
        ran?;
        Ok(self.finding(acc.finish(), &named, cx.check.severity))
    }
}

impl Induction {
    /// The blocks `[from, to]` (fractions of depth) cover in a model of `n` blocks.
    pub fn blocks(from: f64, to: f64, n: usize) -> (usize, usize) {
        let last = n.saturating_sub(1);
        let lo = ((from * n as f64).floor() as usize).min(last);
        let hi = ((to * n as f64).ceil() as usize)
            .saturating_sub(1)
            .clamp(lo, last);
        (lo, hi)
    }

    /// `named`: the `heads` as (block, head) of this model.
    fn finding(
        &self,
        m: Measured,
        named: &[(usize, usize)],
        severity: crate::schema::Severity,
    ) -> Finding {
        let n_layers = m.shape.layers;
        let mut metrics = Vec::new();
        let mut met = true;
        let mut said = Vec::new();
        if let (Some(min), Some((from, to))) = (self.min_induction_score, self.layers) {
            let (lo, hi) = Self::blocks(from, to, n_layers);
            let best = m
                .ranked()
                .into_iter()
                .find(|h| (lo..=hi).contains(&h.layer))
                .expect("every block has heads");
            metrics.push(Metric {
                name: format!("best induction score in blocks {lo}-{hi}"),
                value: best.induction,
                bound: format!(">= {min}"),
            });
            let ok = best.induction >= min;
            met &= ok;
            said.push(format!(
                "the best induction head in blocks {lo}-{hi}, {}.{}, scores {:.3} ({} {min})",
                best.layer,
                best.head,
                best.induction,
                if ok { "at least" } else { "below" }
            ));
        }
        let mut heads_ok = true;
        for &(layer, head) in named {
            let s = m.scores(layer, head);
            let min = self.min_induction_score.unwrap_or(0.0);
            metrics.push(Metric {
                name: format!("induction score of head {layer}.{head}"),
                value: s.induction,
                bound: format!(">= {min}"),
            });
            let ok = s.induction >= min;
            met &= ok;
            heads_ok &= ok;
            if !ok {
                said.push(format!(
                    "head {layer}.{head} scores {:.3}, below {min}",
                    s.induction
                ));
            }
        }
        if heads_ok && !named.is_empty() {
            said.push(format!(
                "each named head scores at least {}",
                self.min_induction_score.unwrap_or(0.0)
            ));
        }
        let drop = m.loss_first - m.loss_second;
        metrics.push(Metric {
            name: "in-context loss drop (nats)".into(),
            value: round(drop),
            bound: self
                .min_loss_drop
                .map(|x| format!(">= {x}"))
                .unwrap_or_default(),
        });
        if let Some(min) = self.min_loss_drop {
            let ok = drop >= min;
            met &= ok;
            said.push(format!(
                "the loss drops by {drop:.3} nats from the first repeat to the second ({} {min})",
                if ok { "at least" } else { "below" }
            ));
        }
        metrics.push(Metric {
            name: "mean loss on the first repeat (nats)".into(),
            value: round(m.loss_first),
            bound: String::new(),
        });
        metrics.push(Metric {
            name: "mean loss on the second repeat (nats)".into(),
            value: round(m.loss_second),
            bound: String::new(),
        });
        let all = m.all();
        let best_by = |f: fn(&HeadScores) -> f64| {
            all.iter()
                .max_by(|a, b| f(a).total_cmp(&f(b)).then(b.layer.cmp(&a.layer)))
                .map_or(f64::NAN, f)
        };
        metrics.push(Metric {
            name: "best previous-token score".into(),
            value: best_by(|h| h.previous_token),
            bound: String::new(),
        });
        metrics.push(Metric {
            name: "best duplicate-token score".into(),
            value: best_by(|h| h.duplicate_token),
            bound: String::new(),
        });
        let finite = metrics.iter().all(|x| x.value.is_finite());
        let status = if !finite {
            Status::Error
        } else if met {
            Status::Pass
        } else {
            violated(severity)
        };
        let ranked = m.ranked();
        let mut heads: Vec<HeadScores> = ranked.iter().take(TOP_HEADS).cloned().collect();
        for &(layer, head) in named {
            if !heads.iter().any(|x| x.layer == layer && x.head == head) {
                heads.push(m.scores(layer, head));
            }
        }
        let patterns = ranked
            .iter()
            .take(TOP_PATTERNS)
            .map(|h| m.pattern(h.layer, h.head))
            .collect();
        let explanation = format!(
            "on {} sequences of {} random tokens repeated twice, {}",
            self.n_sequences,
            self.length.value,
            said.join("; ")
        );
        let explanation = if finite {
            explanation
        } else {
            format!("{explanation}; a score is not a finite number")
        };
        Finding::new(
            status,
            explanation,
            metrics,
            Evidence {
                heads,
                patterns,
                ..Evidence::default()
            },
        )
    }
}

/// Each of a check's `heads` as [`parse_head`] reads it; one that does not parse is an error at
/// its line, and left out.
pub(super) fn parse_heads(
    v: &mut Validator<'_>,
    check: &str,
    heads: &[Spanned<String>],
) -> Vec<Located<(Block, usize)>> {
    let mut parsed = Vec::new();
    for h in heads {
        match parse_head(h.get_ref()) {
            Ok(lh) => parsed.push(Located {
                value: lh,
                at: v.located(h).at,
            }),
            Err(why) => v.err(
                h,
                format!(
                    "{check}: head `{}` is not `layer.head`, a block (an index from 0, or a \
                     fraction of depth such as 0.5) and a head index (e.g. \"5.1\", \
                     \"0.5.1\"){why}",
                    h.get_ref()
                ),
            ),
        }
    }
    parsed
}

/// `"5.1"` as (block 5, head 1), `"0.5.1"` as (half depth, head 1): the block as hook names
/// write it ([`Block::parse`]), then a decimal head index without sign or spaces. The error is
/// empty, or `": "` and why the block is refused.
pub(super) fn parse_head(s: &str) -> Result<(Block, usize), String> {
    let (l, h) = s.rsplit_once('.').ok_or_else(String::new)?;
    if h.is_empty() || !h.bytes().all(|b| b.is_ascii_digit()) || h.len() > 9 {
        return Err(String::new());
    }
    let head = h.parse().map_err(|_| String::new())?;
    let block = Block::parse(l).map_err(|why| format!(": {why}"))?;
    Ok((block, head))
}

/// The token a sequence starts with: the one the tokenizer puts before plain text, else the
/// configuration's BOS, when `prepend` asks for one.
fn bos(model: &Model, prepend: bool) -> Option<u32> {
    if !prepend {
        return None;
    }
    model.codec.add_bos.or(model.config().bos_token_id)
}

/// The ordinary tokens random sequences are drawn from: every id both the tokenizer and the
/// embedding know, less the tokenizer's added tokens (special and user-defined) and BOS/EOS.
pub(crate) fn vocabulary(model: &Model) -> Vec<u32> {
    let c = model.config();
    let codec = &model.codec;
    let n = c.vocab_size.min(codec.tokenizer.get_vocab_size(true));
    let mut special: BTreeSet<u32> = codec
        .tokenizer
        .get_added_tokens_decoder()
        .keys()
        .copied()
        .collect();
    special.extend(c.bos_token_id);
    special.extend(c.eos_token_ids.iter().copied());
    special.extend(codec.add_bos);
    special.extend(codec.add_eos);
    (0..n as u32).filter(|i| !special.contains(i)).collect()
}

/// SplitMix64 (Steele et al. 2014): a fixed, dependency-free generator, so that a seed gives
/// the same tokens in every build.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by the multiply-high method.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// `n` sequences of `length` distinct tokens of `vocab`, each repeated twice, after `bos`.
pub(crate) fn sequences(
    vocab: &[u32],
    n: usize,
    length: usize,
    seed: u64,
    bos: Option<u32>,
) -> Vec<Vec<u32>> {
    let mut pool = vocab.to_vec();
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| {
            // A partial Fisher-Yates shuffle: the first `length` of the pool, drawn anew.
            for i in 0..length {
                let j = i + rng.below(pool.len() - i);
                pool.swap(i, j);
            }
            let r = &pool[..length];
            bos.into_iter()
                .chain(r.iter().copied())
                .chain(r.iter().copied())
                .collect()
        })
        .collect()
}

/// The layout of the pass: blocks, heads per block, tokens per repeat, and whether BOS
/// comes first (`offset` 1) or not (0).
#[derive(Debug, Clone, Copy)]
struct Shape {
    layers: usize,
    heads: usize,
    length: usize,
    offset: usize,
}

impl Shape {
    fn tokens(&self) -> usize {
        2 * self.length + self.offset
    }
}

/// Sums over the sequences, filled micro-batch by micro-batch in sequence order.
struct Accumulator {
    shape: Shape,
    /// Per `layer * heads + head`: summed induction, previous-token and duplicate-token
    /// attention.
    sums: Vec<[f64; 3]>,
    /// Summed cross-entropy on the first and the second repeat.
    loss: [f64; 2],
    sequences: usize,
    /// The first sequence's patterns, per block `[heads, query, key]` flattened.
    first: Vec<Vec<f32>>,
}

/// The scores of every head, averaged over the sequences.
struct Measured {
    shape: Shape,
    /// Per `layer * heads + head`: induction, previous-token and duplicate-token score.
    means: Vec<[f64; 3]>,
    loss_first: f64,
    loss_second: f64,
    first: Vec<Vec<f32>>,
}

impl Accumulator {
    fn new(shape: Shape) -> Self {
        Self {
            shape,
            sums: vec![[0.0; 3]; shape.layers * shape.heads],
            loss: [0.0; 2],
            sequences: 0,
            first: Vec::new(),
        }
    }

    /// Add the patterns and losses of one micro-batch, whose first sequence is `first` of
    /// `ids`.
    fn absorb(
        &mut self,
        first: usize,
        ids: &[Vec<u32>],
        out: &ForwardOutput,
    ) -> Result<(), CheckError> {
        let Shape {
            layers,
            heads,
            length: l,
            offset: b,
        } = self.shape;
        let t = self.shape.tokens();
        let rows = out.layout.lengths.len();
        for layer in 0..layers {
            let hook = HookPoint::AttnPattern(layer);
            let a = out.captures.get(&hook).ok_or_else(|| {
                CheckError::Unmeasurable(format!(
                    "the model's attention cannot be captured: no `{hook}` in its forward pass"
                ))
            })?;
            if a.dims() != [rows, heads, t, t] {
                return Err(CheckError::Unmeasurable(format!(
                    "the model's attention cannot be captured: `{hook}` has shape {:?}, not \
                     [{rows}, {heads}, {t}, {t}] (batch, head, query, key)",
                    a.dims()
                )));
            }
            let v: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(CheckError::NonFinite(format!(
                    "NaN or infinite attention at `{hook}` on the induction check's sequences"
                )));
            }
            for r in 0..rows {
                for h in 0..heads {
                    let base = (r * heads + h) * t * t;
                    let at = |q: usize, k: usize| f64::from(v[base + q * t + k]);
                    let s = &mut self.sums[layer * heads + h];
                    for q in b + l..b + 2 * l {
                        s[0] += at(q, q - l + 1);
                        s[2] += at(q, q - l);
                    }
                    for q in b + 1..t {
                        s[1] += at(q, q - 1);
                    }
                }
            }
            if first == 0 {
                self.first.push(v[..heads * t * t].to_vec());
            }
        }
        let logits = out
            .logits
            .as_ref()
            .ok_or_else(|| CheckError::NonFinite("the pass returned no logits".into()))?
            .to_dtype(DType::F32)?;
        // One sequence at a time: a row's logits are `t x vocab` floats, and the
        // log-sum-exp's temporaries are as large again.
        for (r, seq) in ids[first..first + rows].iter().enumerate() {
            let row_logits = logits.get(r)?.narrow(0, 0, t - 1)?.contiguous()?;
            let next = Tensor::from_vec(seq[1..].to_vec(), (t - 1, 1), row_logits.device())?;
            let picked = row_logits.gather(&next, D::Minus1)?.squeeze(D::Minus1)?;
            let row: Vec<f32> = (row_logits.log_sum_exp(D::Minus1)? - picked)?.to_vec1()?;
            // `row[p]` is the loss of the token at `p + 1`; each repeat's first token is left
            // out.
            let first: f64 = row[b..b + l - 1].iter().map(|x| f64::from(*x)).sum();
            let second: f64 = row[b + l..b + 2 * l - 1]
                .iter()
                .map(|x| f64::from(*x))
                .sum();
            if !(first.is_finite() && second.is_finite()) {
                return Err(CheckError::NonFinite(
                    "NaN or infinite loss on the induction check's sequences".into(),
                ));
            }
            self.loss[0] += first;
            self.loss[1] += second;
        }
        self.sequences += rows;
        Ok(())
    }

    fn finish(self) -> Measured {
        let l = self.shape.length;
        let n = self.sequences.max(1) as f64;
        let per_repeat = n * l as f64;
        let previous = n * (2 * l - 1) as f64;
        let per_loss = n * (l - 1) as f64;
        Measured {
            shape: self.shape,
            means: self
                .sums
                .iter()
                .map(|s| [s[0] / per_repeat, s[1] / previous, s[2] / per_repeat])
                .collect(),
            loss_first: self.loss[0] / per_loss,
            loss_second: self.loss[1] / per_loss,
            first: self.first,
        }
    }
}

impl Measured {
    fn scores(&self, layer: usize, head: usize) -> HeadScores {
        let s = self.means[layer * self.shape.heads + head];
        HeadScores {
            layer,
            head,
            induction: round(s[0]),
            previous_token: round(s[1]),
            duplicate_token: round(s[2]),
        }
    }

    fn all(&self) -> Vec<HeadScores> {
        (0..self.shape.layers)
            .flat_map(|l| (0..self.shape.heads).map(move |h| (l, h)))
            .map(|(l, h)| self.scores(l, h))
            .collect()
    }

    /// Every head, the highest induction score first (ties: the earlier head).
    fn ranked(&self) -> Vec<HeadScores> {
        let mut v = self.all();
        v.sort_by(|a, b| {
            b.induction
                .total_cmp(&a.induction)
                .then(a.layer.cmp(&b.layer))
                .then(a.head.cmp(&b.head))
        });
        v
    }

    /// Head `layer.head`'s pattern on the first sequence, mean-pooled to at most
    /// [`PATTERN_CELLS`] cells per side.
    fn pattern(&self, layer: usize, head: usize) -> AttentionPattern {
        let t = self.shape.tokens();
        let stride = t.div_ceil(PATTERN_CELLS).max(1);
        let cells = t.div_ceil(stride);
        let p = &self.first[layer][head * t * t..(head + 1) * t * t];
        let rows = (0..cells)
            .map(|i| {
                (0..cells)
                    .map(|j| {
                        let qs = i * stride..((i + 1) * stride).min(t);
                        let ks = j * stride..((j + 1) * stride).min(t);
                        let n = (qs.len() * ks.len()) as f64;
                        let sum: f64 = qs
                            .flat_map(|q| ks.clone().map(move |k| (q, k)))
                            .map(|(q, k)| f64::from(p[q * t + k]))
                            .sum();
                        (sum / n * 1e4).round() / 1e4
                    })
                    .collect()
            })
            .collect();
        AttentionPattern {
            layer,
            head,
            sequence: 0,
            stride,
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{Device, Tensor};
    use probes::hooks::{HookPoint, Hooks};
    use probes::testing::{self, VOCAB};
    use probes::{Padding, Unembed};

    use super::*;
    use crate::checks::testing::{metric, run_policy, Tiny};
    use crate::result::{Finding, RunResult};

    /// An induction check after a policy head, as `Tiny::policy` and the tests write it.
    fn check(fields: &str) -> String {
        format!(
            "\n[[checks]]\nid = \"induction\"\nkind = \"induction\"\nseverity = \"medium\"\n{fields}"
        )
    }

    /// The 1-based line of `needle` in the policy file of `tiny`.
    fn line_of(tiny: &Tiny, needle: &str) -> usize {
        let text = std::fs::read_to_string(tiny.dir.path().join("policy/tiny.toml")).unwrap();
        text.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in {text}"))
            + 1
    }

    fn errors(tiny: &Tiny, fields: &str) -> Vec<String> {
        match tiny.policy(&check(fields)) {
            Ok(p) => match crate::engine::resolve_only(&tiny.model, &[p]) {
                Ok(()) => panic!("`{fields}` was accepted"),
                Err(e) => e.0.iter().map(ToString::to_string).collect(),
            },
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    fn head(f: &Finding, layer: usize, head: usize) -> &HeadScores {
        f.evidence
            .heads
            .iter()
            .find(|h| h.layer == layer && h.head == head)
            .unwrap_or_else(|| panic!("no head {layer}.{head} in {:?}", f.evidence.heads))
    }

    // A two-block attention-only GPT-2 whose weights implement an induction circuit by hand.
    // The residual stream holds three blocks of dimensions: the token one-hot, the position
    // one-hot, and a slot into which block 0 copies the previous token. Block 0, head 0 is a
    // previous-token head (its query at position i reads one-hot i - 1, its key one-hot j);
    // block 1, head 0 is an induction head (its query reads the current token, its key the
    // previous-token slot), so it attends to the position after the current token's earlier
    // occurrence. Head 1 of each block attends to position 0 and writes nothing. MLPs are
    // zero. LayerNorm only subtracts a constant and rescales: every residual vector is a sum
    // of the same number of one-hots.
    const POSITIONS: usize = 64;
    const D: usize = VOCAB + POSITIONS + VOCAB;
    const HEADS: usize = 2;
    const HD: usize = D / HEADS;
    const TOK: usize = 0;
    const POS: usize = VOCAB;
    const PREV: usize = VOCAB + POSITIONS;

    fn zeros(shape: &[usize]) -> Vec<f32> {
        vec![0.0; shape.iter().product()]
    }

    fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn induction_gpt2(root: &Path) -> probes::Model {
        // LayerNorm's scale on block 0's input: two ones among D dimensions.
        let mu = 2.0 / D as f64;
        let var = (2.0 * (1.0 - mu).powi(2) + (D as f64 - 2.0) * mu * mu) / D as f64;
        let sigma0 = (var + 1e-5).sqrt() as f32;
        let mut t: Vec<(String, Tensor)> = Vec::new();
        let mut wte = zeros(&[VOCAB, D]);
        for i in 0..VOCAB {
            wte[i * D + TOK + i] = 1.0;
        }
        let mut wpe = zeros(&[POSITIONS, D]);
        for p in 0..POSITIONS {
            wpe[p * D + POS + p] = 1.0;
        }
        t.push(("wte.weight".into(), tensor(wte, &[VOCAB, D])));
        t.push(("wpe.weight".into(), tensor(wpe, &[POSITIONS, D])));
        let (q0, k0, v0) = (0, D, 2 * D);
        for layer in 0..2 {
            // Conv1D weights are [in, out]; out is q | k | v, head 0 then head 1.
            let mut w = zeros(&[D, 3 * D]);
            let mut bias = zeros(&[3 * D]);
            let mut set = |i: usize, o: usize, x: f32| w[i * 3 * D + o] = x;
            if layer == 0 {
                for m in 0..POSITIONS - 1 {
                    set(POS + m + 1, q0 + m, 2.0);
                    set(POS + m, k0 + m, 1.0);
                }
                for m in 0..VOCAB {
                    set(TOK + m, v0 + m, 1.0);
                }
            } else {
                for m in 0..VOCAB {
                    set(TOK + m, q0 + m, 3.0);
                    set(PREV + m, k0 + m, 1.0);
                }
            }
            // Head 1: a constant query, a key that is large at position 0 only.
            set(POS, k0 + HD, 1.0);
            bias[q0 + HD] = 20.0;
            let mut o = zeros(&[D, D]);
            if layer == 0 {
                for m in 0..VOCAB {
                    o[m * D + PREV + m] = sigma0;
                }
            }
            let p = format!("h.{layer}");
            let ones = || tensor(vec![1.0; D], &[D]);
            let zero = |n: &[usize]| tensor(zeros(n), n);
            t.push((format!("{p}.ln_1.weight"), ones()));
            t.push((format!("{p}.ln_1.bias"), zero(&[D])));
            t.push((format!("{p}.attn.c_attn.weight"), tensor(w, &[D, 3 * D])));
            t.push((format!("{p}.attn.c_attn.bias"), tensor(bias, &[3 * D])));
            t.push((format!("{p}.attn.c_proj.weight"), tensor(o, &[D, D])));
            t.push((format!("{p}.attn.c_proj.bias"), zero(&[D])));
            t.push((format!("{p}.ln_2.weight"), ones()));
            t.push((format!("{p}.ln_2.bias"), zero(&[D])));
            t.push((format!("{p}.mlp.c_fc.weight"), zero(&[D, 4])));
            t.push((format!("{p}.mlp.c_fc.bias"), zero(&[4])));
            t.push((format!("{p}.mlp.c_proj.weight"), zero(&[4, D])));
            t.push((format!("{p}.mlp.c_proj.bias"), zero(&[D])));
        }
        t.push(("ln_f.weight".into(), tensor(vec![1.0; D], &[D])));
        t.push(("ln_f.bias".into(), tensor(zeros(&[D]), &[D])));
        let config = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_embd": D, "n_head": HEADS, "n_layer": 2, "n_positions": POSITIONS,
            "n_inner": 4, "vocab_size": VOCAB, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new", "bos_token_id": 0, "eos_token_id": 1
        });
        let dir = root.join("induction-gpt2");
        testing::write_dir(&dir, &config, &t);
        testing::load(&dir)
    }

    fn write_policy(dir: &Path, fields: &str) -> std::path::PathBuf {
        let path = dir.join("induction.toml");
        let text = format!(
            "schema = 1\nname = \"induction\"\nversion = \"1\"\n{}",
            check(fields)
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_hand_built_induction_circuit_is_found_and_only_its_induction_head_scores() {
        let dir = tempfile::tempdir().unwrap();
        let model = induction_gpt2(dir.path());
        let path = write_policy(
            dir.path(),
            "n_sequences = 4\nlength = 20\nlayers = [0.5, 1.0]\nmin_induction_score = 0.9\n",
        );
        let r = run_policy(&model, &path);
        let f = &r.policies[0].findings[0];
        assert_eq!(f.status, Status::Pass, "{f:?}");
        // Four heads: all of them are shown.
        assert_eq!(f.evidence.heads.len(), 4, "{f:?}");
        let induction = head(f, 1, 0);
        assert!(induction.induction >= 0.9, "{induction:?}");
        assert_eq!(
            (f.evidence.heads[0].layer, f.evidence.heads[0].head),
            (1, 0)
        );
        for h in &f.evidence.heads[1..] {
            assert!(h.induction < 0.02, "{h:?}");
        }
        let previous = head(f, 0, 0);
        assert!(previous.previous_token >= 0.9, "{previous:?}");
        assert!(induction.previous_token < 0.1, "{induction:?}");
        assert!(f.evidence.heads.iter().all(|h| h.duplicate_token < 0.1));
        assert!(metric(f, "best induction score in blocks 1-1") >= 0.9);
        // The top head's pattern on the first sequence: 41 positions in cells of 2.
        let p = &f.evidence.patterns[0];
        assert_eq!((p.layer, p.head, p.stride, p.rows.len()), (1, 0, 2, 21));

        // Block 0 holds no induction head: bounding it there fails.
        let path = write_policy(
            dir.path(),
            "n_sequences = 4\nlength = 20\nlayers = [0.0, 0.5]\nmin_induction_score = 0.9\n",
        );
        let f = &run_policy(&model, &path).policies[0].findings[0];
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(
            metric(f, "best induction score in blocks 0-0") < 0.02,
            "{f:?}"
        );
        assert!(f.explanation.contains("below 0.9"), "{}", f.explanation);
    }

    #[test]
    fn random_sequences_are_distinct_seeded_and_avoid_special_tokens() {
        let tiny = Tiny::new();
        let vocab = vocabulary(&tiny.model);
        // The tiny config's BOS (1) and EOS (2) are left out.
        assert_eq!(vocab.len(), VOCAB - 2);
        assert!(!vocab.contains(&1) && !vocab.contains(&2));
        let a = sequences(&vocab, 5, 30, 7, Some(1));
        assert_eq!(a, sequences(&vocab, 5, 30, 7, Some(1)));
        assert_ne!(a, sequences(&vocab, 5, 30, 8, Some(1)));
        for s in &a {
            assert_eq!(s.len(), 61);
            assert_eq!(s[0], 1);
            assert_eq!(s[1..31], s[31..]);
            let distinct: BTreeSet<u32> = s[1..31].iter().copied().collect();
            assert_eq!(distinct.len(), 30);
            assert!(distinct.iter().all(|t| vocab.contains(t)));
        }
    }

    #[test]
    fn a_named_head_may_name_its_block_by_depth() {
        let tiny = Tiny::new();
        // 1.0 of depth is the last of the tiny model's 2 blocks.
        let f = tiny.finding(&check(
            "n_sequences = 2\nlength = 8\nmin_induction_score = 0.0\nheads = [\"1.0.3\", \"0.0.2\"]\n",
        ));
        assert!(metric(&f, "induction score of head 1.3") >= 0.0);
        assert!(metric(&f, "induction score of head 0.2") >= 0.0);
    }

    #[test]
    fn bounds_pass_and_fail_and_two_runs_are_byte_identical() {
        let tiny = Tiny::new();
        let fields = "n_sequences = 5\nlength = 12\nmin_induction_score = 0.0\nmin_loss_drop = -100\nheads = [\"1.3\"]\n";
        let run = || -> RunResult { tiny.run(&check(fields), None) };
        let (a, b) = (run(), run());
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        let f = &a.policies[0].findings[0];
        assert_eq!(f.status, Status::Pass, "{f:?}");
        let drop = metric(f, "in-context loss drop");
        let (first, second) = (
            metric(f, "mean loss on the first repeat"),
            metric(f, "mean loss on the second repeat"),
        );
        assert!((drop - (first - second)).abs() < 1e-4, "{f:?}");
        // The named head is shown beside the top five.
        assert!(metric(f, "induction score of head 1.3") >= 0.0);
        head(f, 1, 3);
        // A random model has no induction head to speak of.
        let f = tiny.finding(&check("length = 12\nmin_induction_score = 0.99\n"));
        assert_eq!(f.status, Status::Fail, "{f:?}");
        let f = tiny.finding(&check("length = 12\nmin_loss_drop = 50\n"));
        assert_eq!(f.status, Status::Fail, "{f:?}");
        // A low severity only warns.
        let f = tiny
            .finding(&check("length = 12\nmin_loss_drop = 50\n").replace("\"medium\"", "\"low\""));
        assert_eq!(f.status, Status::Warn, "{f:?}");
    }

    #[test]
    fn bad_fields_are_named_with_their_policy_file_and_line() {
        let tiny = Tiny::new();
        let file = "tiny.toml";
        for (fields, needle, message) in [
            (
                "min_induction_score = 0.4\nheads = [\"1.9\"]\n",
                "heads =",
                "head `1.9`: head 9 is out of range: the model has 4 heads per block (0..3)",
            ),
            (
                "min_induction_score = 0.4\nheads = [\"0.0\", \"2.1\"]\n",
                "heads =",
                "head `2.1`: block 2 is out of range: the model has 2 blocks (0..1)",
            ),
            (
                "min_induction_score = 0.4\nheads = [\"a.1\"]\n",
                "heads =",
                "head `a.1` is not `layer.head`",
            ),
            (
                "min_induction_score = 0.4\nheads = [\"1.5.1\"]\n",
                "heads =",
                "the depth fraction 1.5 is outside [0, 1]",
            ),
            (
                "min_induction_score = 0.4\nheads = [\"0..5.1\"]\n",
                "heads =",
                "block `0..5` is neither a block number",
            ),
            (
                "min_induction_score = 0.4\nlayers = [0.5, 1.5]\n",
                "layers =",
                "`layers` is `[from, to]`",
            ),
            (
                "min_induction_score = 0.4\nlayers = [0.7, 0.2]\n",
                "layers =",
                "`layers` is `[from, to]`",
            ),
            (
                "min_loss_drop = 1.0\nlayers = [0.2, 0.7]\n",
                "layers =",
                "`min_induction_score`, which is missing",
            ),
            (
                "min_induction_score = 1.4\n",
                "min_induction_score",
                "`min_induction_score` 1.4 is outside [0, 1]",
            ),
            (
                "min_loss_drop = 1\nlength = 40\n",
                "length =",
                "`length` 40 makes sequences of 81 tokens, more than the model's context length of 64",
            ),
            (
                "min_loss_drop = 1\nn_sequences = 0\n",
                "n_sequences",
                "`n_sequences` 0 is outside [1, 256]",
            ),
            ("length = 4\n", "id = \"induction\"", "needs `min_induction_score` or `min_loss_drop`"),
            (
                "min_loss_drop = 1\nmin_auroc = 0.5\n",
                "min_auroc",
                "unknown field `min_auroc`",
            ),
        ] {
            let shown = errors(&tiny, fields);
            // The error names the file, the line of the offending field, and the check.
            let line = line_of(&tiny, needle);
            assert!(
                shown.iter().any(|e| e.contains(&format!("{file}:{line}:"))
                    && e.contains("check `induction`")
                    && e.contains(message)),
                "{fields}: {shown:?}"
            );
        }
    }

    #[test]
    fn attention_that_cannot_be_captured_is_an_error_not_a_pass() {
        let shape = Shape {
            layers: 2,
            heads: 4,
            length: 3,
            offset: 1,
        };
        let ids = vec![vec![1, 5, 6, 7, 5, 6, 7]];
        let out = ForwardOutput {
            logits: None,
            captures: Default::default(),
            layout: probes::BatchLayout::new(vec![7], Padding::Right),
        };
        let e = Accumulator::new(shape).absorb(0, &ids, &out).unwrap_err();
        assert!(
            e.to_string().contains(
                "the model's attention cannot be captured: no `blocks.0.attn.hook_pattern`"
            ),
            "{e}"
        );
    }

    /// The scores of the default model, recomputed from its captured attention patterns and
    /// logits with plain loops, equal the check's.
    #[test]
    fn default_model_scores_equal_a_reference_from_captured_patterns() {
        let model = probes::Model::load(
            "default",
            &probes::LoadOptions {
                quantized_decode: false,
            },
        )
        .expect("the default model (see README's set-up)");
        let c = model.config().clone();
        let dir = tempfile::tempdir().unwrap();
        let (n, l, seed) = (3, 10, 5);
        let path = write_policy(
            dir.path(),
            &format!(
                "n_sequences = {n}\nlength = {l}\nseed = {seed}\nmin_loss_drop = -100\nheads = [\"3.1\", \"12.7\"]\nmin_induction_score = 0.0\n"
            ),
        );
        let r = run_policy(&model, &path);
        let f = &r.policies[0].findings[0];
        assert_eq!(f.status, Status::Pass, "{f:?}");

        // The same sequences, through an independent pass.
        let bos = model.codec.add_bos.or(c.bos_token_id);
        let ids = sequences(&vocabulary(&model), n, l, seed as u64, bos);
        let b = usize::from(bos.is_some());
        let t = 2 * l + b;
        let mut hooks = Hooks::new();
        for layer in 0..c.n_layers {
            hooks = hooks.capture(HookPoint::AttnPattern(layer));
        }
        let mut induction = vec![vec![0.0f64; c.n_heads]; c.n_layers];
        let mut previous = induction.clone();
        let mut duplicate = induction.clone();
        let (mut first, mut second) = (0.0f64, 0.0f64);
        for s in &ids {
            let out = model
                .transformer
                .forward(std::slice::from_ref(s), Padding::Left, &hooks, Unembed::All)
                .unwrap();
            for layer in 0..c.n_layers {
                // [1, head, query, key]
                let a: Vec<Vec<Vec<f32>>> = out.captures[&HookPoint::AttnPattern(layer)]
                    .get(0)
                    .unwrap()
                    .to_vec3()
                    .unwrap();
                for h in 0..c.n_heads {
                    for i in 0..l {
                        // The second occurrence of the sequence's i-th token.
                        let q = b + l + i;
                        induction[layer][h] += f64::from(a[h][q][b + i + 1]) / (n * l) as f64;
                        duplicate[layer][h] += f64::from(a[h][q][b + i]) / (n * l) as f64;
                    }
                    for q in b + 1..t {
                        previous[layer][h] += f64::from(a[h][q][q - 1]) / (n * (t - b - 1)) as f64;
                    }
                }
            }
            let logits: Vec<Vec<f32>> = out.logits.unwrap().get(0).unwrap().to_vec2().unwrap();
            let loss = |p: usize| -> f64 {
                // Cross-entropy of token p + 1 given the logits at p.
                let row: Vec<f64> = logits[p].iter().map(|x| f64::from(*x)).collect();
                let max = row.iter().cloned().fold(f64::MIN, f64::max);
                let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                lse - row[s[p + 1] as usize]
            };
            for i in 1..l {
                first += loss(b + i - 1) / (n * (l - 1)) as f64;
                second += loss(b + l + i - 1) / (n * (l - 1)) as f64;
            }
        }
        let close = |a: f64, b: f64, what: &str| {
            assert!(
                (a - b).abs() <= 2e-4 * (1.0 + b.abs()),
                "{what}: check {a}, reference {b}"
            );
        };
        assert!(f.evidence.heads.len() >= 5);
        for h in &f.evidence.heads {
            let what = format!("head {}.{}", h.layer, h.head);
            close(h.induction, induction[h.layer][h.head], &what);
            close(h.previous_token, previous[h.layer][h.head], &what);
            close(h.duplicate_token, duplicate[h.layer][h.head], &what);
        }
        // The best head anywhere is the first one shown.
        let best = induction.iter().flatten().cloned().fold(f64::MIN, f64::max);
        close(f.evidence.heads[0].induction, best, "best head");
        close(
            metric(f, "mean loss on the first repeat"),
            first,
            "first-repeat loss",
        );
        close(
            metric(f, "mean loss on the second repeat"),
            second,
            "second-repeat loss",
        );
        let best_prev = previous.iter().flatten().cloned().fold(f64::MIN, f64::max);
        close(
            metric(f, "best previous-token score"),
            best_prev,
            "previous-token",
        );
    }
}
