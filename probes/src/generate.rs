//! Generation with a KV cache: greedy or seeded sampling, stop tokens, and the same hooks
//! (steering, ablation, replacement) active on the prompt and on every generated token.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{CandleContext, RunError};
use crate::hooks::{HookPoint, Hooks};
use crate::transformer::{KvCache, Transformer};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Temperature and nucleus sampling from a seeded generator: the same seed gives the
    /// same tokens.
    Sample {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Generation of a row ends after it emits one of these (which is kept in its output).
    pub stop_tokens: Vec<u32>,
    /// Prefill and decode in f32 even where the model generates with quantized weights
    /// ([`crate::LoadOptions::quantized_decode`]): the reference precision, which a recipe
    /// that must reproduce its output bit for bit pins, and what audits use.
    pub f32_decode: bool,
    /// How many first tokens every prompt has in common (a chat template's preamble), to
    /// prefill once for the whole batch ([`Transformer::prefill_shared`]); 0 for none. It must
    /// not depend on the batch (a prompt set's preamble, not the batch's common prefix), or
    /// a row's tokens would depend on the rows beside it. Not taken where the prefill reads
    /// the file's K-quant blocks (without `f32_decode`): a shared start's passes are f32.
    pub shared_start: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 32,
            sampling: Sampling::Greedy,
            stop_tokens: Vec::new(),
            f32_decode: false,
            shared_start: 0,
        }
    }
}

/// Generate continuations for a batch of prompts (left-padded together). Returns the new
/// tokens of each prompt.
pub fn generate(
    model: &Transformer,
    prompts: &[Vec<u32>],
    hooks: &Hooks,
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>, RunError> {
    generate_until(model, prompts, hooks, opts, |_, _| false)
}

/// [`generate`], where row `r` also ends as soon as `enough(r, tokens so far)` holds: a caller
/// that needs only what a reply settles early (whether it refuses) stops paying for it there.
///
/// A row that ends, by a stop token or by `enough`, leaves the batch, so later decode steps
/// cost nothing for it. The rows left decode the same bits as before: each row attends over
/// its own keys, and every product is computed the same way whatever the row count.
pub fn generate_until(
    model: &Transformer,
    prompts: &[Vec<u32>],
    hooks: &Hooks,
    opts: &GenerateOptions,
    enough: impl Fn(usize, &[u32]) -> bool,
) -> Result<Vec<Vec<u32>>, RunError> {
    generate_capturing(model, prompts, hooks, opts, enough, &[]).map(|(out, _)| out)
}

/// A sampler that would sample nothing meaningful (a NaN or negative temperature, a nucleus
/// outside (0, 1]) or more new tokens than the context holds is an error, not a generation.
fn check_options(model: &Transformer, opts: &GenerateOptions) -> Result<(), RunError> {
    if let Sampling::Sample {
        temperature, top_p, ..
    } = opts.sampling
    {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(RunError::Batch(format!(
                "temperature {temperature} must be positive and finite (greedy decoding \
                 takes no temperature)"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(RunError::Batch(format!("top-p {top_p} must be in (0, 1]")));
        }
    }
    let context = model.config.max_positions;
    if opts.max_tokens > context {
        return Err(RunError::Batch(format!(
            "{} new tokens is more than the model's context of {context}",
            opts.max_tokens
        )));
    }
    Ok(())
}

/// Each prompt's activations at each captured hook, `[tokens, width]`, in prompt order.
pub type PromptActivations = BTreeMap<HookPoint, Vec<Tensor>>;

/// [`generate_until`], also capturing `capture` in the pass over the prompts (the prefill):
/// each prompt's activations at each of those hooks, the same bits a prompt pass captures
/// when the generation is f32 ([`GenerateOptions::f32_decode`], or a model without
/// quantized generation); otherwise the prefill's, whose products read the file's blocks.
/// A caller that generates from a prompt set and also reads its activations runs the set
/// once.
pub fn generate_capturing(
    model: &Transformer,
    prompts: &[Vec<u32>],
    hooks: &Hooks,
    opts: &GenerateOptions,
    enough: impl Fn(usize, &[u32]) -> bool,
    capture: &[HookPoint],
) -> Result<(Vec<Vec<u32>>, PromptActivations), RunError> {
    check_options(model, opts)?;
    let mut out = vec![Vec::new(); prompts.len()];
    let mut captured = BTreeMap::new();
    if opts.max_tokens == 0 && capture.is_empty() {
        return Ok((out, captured));
    }
    let mut rngs: Vec<rand::rngs::StdRng> = (0..prompts.len())
        .map(|r| match opts.sampling {
            Sampling::Sample { seed, .. } => {
                rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(r as u64))
            }
            Sampling::Greedy => rand::rngs::StdRng::seed_from_u64(0),
        })
        .collect();
    let mut cache = Some(KvCache::new(opts.f32_decode));
    let prefill_hooks = capture
        .iter()
        .fold(hooks.clone(), |h, point| h.capture(*point));
    let started = std::time::Instant::now();
    let prefilled = model.prefill_shared(prompts, opts.shared_start, &prefill_hooks, &mut cache)?;
    let prefill_s = started.elapsed().as_secs_f64();
    for point in capture {
        let a = prefilled
            .captures
            .get(point)
            .ok_or_else(|| RunError::Batch(format!("the prefill did not capture `{point}`")))?;
        let layout = &prefilled.layout;
        let rows = (0..prompts.len())
            .map(|r| {
                a.get(r)
                    .and_then(|x| x.narrow(0, layout.offset(r), layout.lengths[r]))
                    .and_then(|x| x.contiguous())
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .run_ctx("prefill captures")?;
        captured.insert(*point, rows);
    }
    if opts.max_tokens == 0 {
        return Ok((out, captured));
    }
    let mut logits = prefilled
        .logits
        .ok_or_else(|| RunError::Batch("prefill produced no logits".into()))?;
    // The prompts still generating, in the cache's row order.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    let mut row_steps = 0usize;
    let mut steps = 0usize;
    for step in 0..opts.max_tokens {
        let rows: Vec<Vec<f32>> = logits
            .to_dtype(DType::F32)
            .and_then(|l| l.to_vec2())
            .run_ctx("reading logits")?;
        let mut next = Vec::with_capacity(rows.len());
        let mut keep = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let r = active[i];
            if row.iter().any(|v| v.is_nan()) {
                return Err(RunError::Intervention {
                    hook: "logits".into(),
                    detail: format!("NaN logits for prompt {r} at generated token {step}"),
                });
            }
            let t = choose(row, &opts.sampling, &mut rngs[r]);
            out[r].push(t);
            if !opts.stop_tokens.contains(&t) && !enough(r, &out[r]) {
                keep.push(i);
                next.push(t);
            }
        }
        if keep.is_empty() || step + 1 == opts.max_tokens {
            break;
        }
        if keep.len() < active.len() {
            if let Some(c) = cache.as_mut() {
                c.keep_rows(&keep)?;
            }
            active = keep.iter().map(|&i| active[i]).collect();
        }
        row_steps += next.len();
        steps += 1;
        logits = model.decode_step(&next, hooks, &mut cache)?;
    }
    tracing::debug!(
        rows = prompts.len(),
        prefill_s,
        steps,
        row_steps,
        decode_s = started.elapsed().as_secs_f64() - prefill_s,
        "generation"
    );
    Ok((out, captured))
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn choose(row: &[f32], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    let (temperature, top_p) = match *sampling {
        Sampling::Greedy => return argmax(row),
        Sampling::Sample {
            temperature, top_p, ..
        } => (temperature, top_p),
    };
    if temperature <= 0.0 {
        return argmax(row);
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, ((v as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    // Stable order: by probability, then by token id, so ties never depend on sort internals.
    // The nucleus is usually small: sort only the 256 most likely tokens unless they hold
    // less than top_p of the mass.
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    const HEAD: usize = 256;
    if probs.len() > HEAD {
        probs.select_nth_unstable_by(HEAD - 1, order);
        let head_mass: f64 = probs[..HEAD].iter().map(|p| p.1).sum();
        if head_mass / total >= top_p {
            probs.truncate(HEAD);
        }
    }
    probs.sort_by(order);
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    let probs = &probs[..cut];
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut x = rng.gen::<f64>() * mass;
    for p in probs {
        x -= p.1;
        if x <= 0.0 {
            return p.0;
        }
    }
    probs[probs.len() - 1].0
}

/// Greedy next-token ids from `[batch, vocab]` logits.
pub fn greedy_tokens(logits: &Tensor) -> Result<Vec<u32>, RunError> {
    let rows: Vec<Vec<f32>> = logits.to_vec2().run_ctx("reading logits")?;
    Ok(rows.iter().map(|r| argmax(r)).collect())
}
