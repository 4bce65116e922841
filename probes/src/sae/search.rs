//! Finding features: rank the latents that separate two prompt sets (AUROC of each prompt's
//! maximum activation, and the difference of means), list top-activating token contexts, and
//! read Neuronpedia-style labels.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::{candle, Sae, SaeError, SparseRow};
use crate::hooks::{HookPoint, Hooks};
use crate::model::Model;
use crate::transformer::{Padding, Unembed};

/// Sparse latent activations of every token of every prompt.
pub struct PromptActs {
    pub tokens: Vec<Vec<u32>>,
    /// `acts[prompt][token]`: active latents.
    pub acts: Vec<Vec<SparseRow>>,
}

/// Encode the activations at `hook` of every prompt (right-padded batches of 16).
pub fn prompt_acts(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    prompts: &[Vec<u32>],
) -> Result<PromptActs, SaeError> {
    let hooks = Hooks::new().capture(hook);
    let mut acts = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(16) {
        let out = model
            .transformer
            .forward(chunk, Padding::Right, &hooks, Unembed::None)
            .map_err(|e| SaeError::Format {
                path: "<model>".into(),
                detail: e.to_string(),
            })?;
        let a = &out.captures[&hook];
        for (r, p) in chunk.iter().enumerate() {
            let x = a
                .get(r)
                .and_then(|x| x.narrow(0, 0, p.len()))
                .map_err(candle("activations"))?;
            acts.push(sae.encode_tokens(&x)?);
        }
    }
    Ok(PromptActs {
        tokens: prompts.to_vec(),
        acts,
    })
}

impl PromptActs {
    /// Each prompt's maximum activation of `latent` over its tokens.
    pub fn max_of(&self, latent: u32) -> Vec<f32> {
        self.acts
            .iter()
            .map(|p| {
                p.iter()
                    .flat_map(|row| row.iter().filter(|(i, _)| *i == latent).map(|(_, v)| *v))
                    .fold(0.0, f32::max)
            })
            .collect()
    }

    /// Per prompt, the dense vector of max activations `[prompts][d_sae]`.
    fn maxes(&self, d_sae: usize) -> Vec<Vec<f32>> {
        self.acts
            .iter()
            .map(|p| {
                let mut m = vec![0f32; d_sae];
                for row in p {
                    for &(i, v) in row {
                        m[i as usize] = m[i as usize].max(v);
                    }
                }
                m
            })
            .collect()
    }
}

/// Area under the ROC curve of scores `pos` against `neg` (ties count half).
pub fn auroc(pos: &[f32], neg: &[f32]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return 0.5;
    }
    let mut all: Vec<(f32, bool)> = pos
        .iter()
        .map(|&v| (v, true))
        .chain(neg.iter().map(|&v| (v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Mann-Whitney U with average ranks for ties.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0; // ranks i+1..=j
        rank_sum += avg * all[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let (p, n) = (pos.len() as f64, neg.len() as f64);
    (rank_sum - p * (p + 1.0) / 2.0) / (p * n)
}

/// One token context where a latent fired.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    pub prompt: usize,
    pub token: usize,
    pub activation: f32,
    /// The text around the token, with the token itself in `[[ ]]`.
    pub text: String,
}

/// A latent that separates the positive from the negative set.
#[derive(Debug, Clone, Serialize)]
pub struct LatentRank {
    pub index: usize,
    pub label: Option<String>,
    pub auroc: f64,
    pub mean_positive: f64,
    pub mean_negative: f64,
    pub contexts: Vec<Context>,
}

/// Text of `tokens` around position `at`, the token marked.
pub fn context_text(model: &Model, tokens: &[u32], at: usize, radius: usize) -> String {
    let lo = at.saturating_sub(radius);
    let hi = (at + radius + 1).min(tokens.len());
    let before = model.codec.decode(&tokens[lo..at]).unwrap_or_default();
    let tok = model.codec.decode(&tokens[at..at + 1]).unwrap_or_default();
    let after = model.codec.decode(&tokens[at + 1..hi]).unwrap_or_default();
    format!("{before}[[{tok}]]{after}").replace('\n', "\\n")
}

/// The `n` strongest (prompt, token) activations of `latent`.
pub fn top_contexts(model: &Model, acts: &PromptActs, latent: u32, n: usize) -> Vec<Context> {
    let mut hits: Vec<(usize, usize, f32)> = Vec::new();
    for (p, rows) in acts.acts.iter().enumerate() {
        for (t, row) in rows.iter().enumerate() {
            if let Some(&(_, v)) = row.iter().find(|(i, _)| *i == latent) {
                hits.push((p, t, v));
            }
        }
    }
    hits.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    hits.into_iter()
        .take(n)
        .map(|(p, t, v)| Context {
            prompt: p,
            token: t,
            activation: v,
            text: context_text(model, &acts.tokens[p], t, 6),
        })
        .collect()
}

/// Rank latents by how well each prompt's max activation separates `pos` from `neg`.
pub fn contrast(
    model: &Model,
    sae: &Sae,
    pos: &PromptActs,
    neg: &PromptActs,
    top: usize,
    labels: &Labels,
) -> Vec<LatentRank> {
    let (mp, mn) = (pos.maxes(sae.d_sae), neg.maxes(sae.d_sae));
    let mut ranked: Vec<(usize, f64, f64, f64)> = (0..sae.d_sae)
        .map(|j| {
            let p: Vec<f32> = mp.iter().map(|m| m[j]).collect();
            let n: Vec<f32> = mn.iter().map(|m| m[j]).collect();
            let mean =
                |v: &[f32]| v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len().max(1) as f64;
            (j, auroc(&p, &n), mean(&p), mean(&n))
        })
        .filter(|r| r.2 > 0.0 || r.3 > 0.0)
        .collect();
    ranked.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then((b.2 - b.3).total_cmp(&(a.2 - a.3)))
            .then(a.0.cmp(&b.0))
    });
    ranked
        .into_iter()
        .take(top)
        .map(|(j, auroc, mean_positive, mean_negative)| LatentRank {
            index: j,
            label: labels.get(j).map(str::to_string),
            auroc,
            mean_positive,
            mean_negative,
            contexts: top_contexts(model, pos, j as u32, 3),
        })
        .collect()
}

/// Latent labels from a Neuronpedia-style JSONL file (`index` as string or number, `description`).
#[derive(Debug, Clone, Default)]
pub struct Labels(HashMap<usize, String>);

impl Labels {
    pub fn read(path: &Path) -> Result<Self, SaeError> {
        let text = std::fs::read_to_string(path).map_err(|source| SaeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut map = HashMap::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |d: &str| SaeError::Config {
                path: path.to_path_buf(),
                field: format!("line {}", i + 1),
                detail: d.to_string(),
            };
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
            let index = match &v["index"] {
                serde_json::Value::String(s) => s
                    .parse::<usize>()
                    .map_err(|_| bad("`index` is not a number"))?,
                serde_json::Value::Number(n) => {
                    n.as_u64().ok_or_else(|| bad("`index` is not a number"))? as usize
                }
                _ => return Err(bad("missing `index`")),
            };
            let desc = v["description"]
                .as_str()
                .ok_or_else(|| bad("missing `description`"))?;
            map.insert(index, desc.to_string());
        }
        Ok(Self(map))
    }

    /// The latent labelled `label` (exactly; the smallest index if several are).
    pub fn find(&self, label: &str) -> Option<usize> {
        self.0
            .iter()
            .filter(|(_, l)| l.as_str() == label)
            .map(|(i, _)| *i)
            .min()
    }

    pub fn get(&self, latent: usize) -> Option<&str> {
        self.0.get(&latent).map(String::as_str)
    }

    /// `1203 ("requests for harmful instructions")` or just `1203`.
    pub fn show(&self, latent: usize) -> String {
        match self.get(latent) {
            Some(l) => format!("{latent} (\"{l}\")"),
            None => latent.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_answers() {
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
        assert_eq!(auroc(&[1.0, 2.0], &[3.0, 4.0]), 0.0);
        assert_eq!(auroc(&[1.0, 1.0], &[1.0, 1.0]), 0.5);
        assert!((auroc(&[1.0, 3.0], &[2.0]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn fast_selection_equals_a_full_sort() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for round in 0..400 {
            // Long rows exercise the blocked fast path; coarse values give many ties.
            let n = rng.gen_range(1..if round % 2 == 0 { 300 } else { 3000 });
            let k = rng.gen_range(1..40);
            let row: Vec<f32> = (0..n)
                .map(|_| (rng.gen_range(-5..6) as f32) * 0.5)
                .collect();
            let bias: Vec<f32> = (0..n)
                .map(|_| (rng.gen_range(-2..3) as f32) * 0.25)
                .collect();
            let full_sort = |values: Vec<f32>| -> Vec<(u32, f32)> {
                let mut want: Vec<(u32, f32)> = values
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (i as u32, v))
                    .collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                want.into_iter().take(k).filter(|(_, v)| *v > 0.0).collect()
            };
            assert_eq!(
                super::super::select_top_biased(&row, None, k),
                full_sort(row.clone()),
                "n={n} k={k}"
            );
            let biased: Vec<f32> = row.iter().zip(&bias).map(|(r, b)| r + b).collect();
            assert_eq!(
                super::super::select_top_biased(&row, Some(&bias), k),
                full_sort(biased),
                "n={n} k={k}, biased"
            );
        }
    }
}
