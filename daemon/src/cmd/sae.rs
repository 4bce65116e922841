//! `mechwatch sae train | eval`: sparse autoencoders on the model's residual stream.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use probes::sae::train::{train_within, Progress, TrainConfig};

#[derive(Subcommand)]
pub enum SaeCmd {
    /// Train a TopK or BatchTopK SAE (AuxK, unit-norm decoder) on activations streamed from the
    /// model; saves SAELens v6 files; resumes from OUT/checkpoint.* if present.
    #[command(after_help = "Examples:
  mechwatch sae train --hook blocks.11.hook_resid_post --corpus corpus.txt --latents 4608 --k 32 --tokens 2000000 --out sae-l11/
  mechwatch sae train --model ./checkpoint --hook blocks.6.hook_resid_post --corpus a.jsonl b.txt --latents 8192 --k 64 --sparsity batchtopk --tokens 5000000 --out sae/")]
    Train(TrainArgs),
    /// L0, FVU / explained variance, dead latents, CE loss recovered and KL on held-out text.
    #[command(after_help = "Examples:
  mechwatch sae eval --sae sae-l11/ --corpus held-out.txt
  mechwatch sae eval --model ./checkpoint --sae sae/ --corpus held-out.txt --tokens 16384 --json")]
    Eval(EvalArgs),
    /// Rank the latents that separate two prompt sets (AUROC, mean difference), with the
    /// token contexts where each fires.
    #[command(after_help = "Examples:
  mechwatch sae search --sae \"$(mechwatch sae default)\" --positive harmful.txt --negative harmless.txt --chat
  mechwatch sae search --sae sae/ --labels labels.jsonl --positive pos.txt --negative neg.txt --top 20 --json")]
    Search(SearchArgs),
    /// The top-activating examples of one latent over a corpus.
    #[command(after_help = "Examples:
  mechwatch sae top --sae \"$(mechwatch sae default)\" --latent 1234 --corpus corpus.txt
  mechwatch sae top --sae sae/ --latent 7 --corpus a.txt b.txt --n 20 --json")]
    Top(TopArgs),
    /// Print the default SAE's folder: for the default model the SAE shipped in this binary,
    /// for another model the recipe's SAE, trained on first use (corpus: text the model writes
    /// itself from our seed prompts).
    #[command(after_help = "Examples:
  mechwatch sae default
  mechwatch sae default --eval
  mechwatch sae default --retrain
  mechwatch sae default --model ./checkpoint --recipe")]
    Default {
        /// A GGUF file, an HF directory, or a known model name (`default`).
        #[arg(long, default_value = "default")]
        model: String,
        /// Then evaluate it on held-out text we wrote (`probes/data/sae-eval-text.txt`).
        #[arg(long)]
        eval: bool,
        /// Train the recipe's SAE (about 25 minutes for the default model; cached afterwards)
        /// instead of using the shipped one, write its f16 copy beside it and say whether it
        /// is byte-identical to the shipped SAE.
        #[arg(long)]
        retrain: bool,
        /// Print the recipe for this model as JSON, and do nothing else.
        #[arg(long)]
        recipe: bool,
        /// Print where the self-generated corpus is cached, and do nothing else.
        #[arg(long, hide = true)]
        corpus_dir: bool,
        /// Print where the recipe's SAE is (or would be) cached, and do nothing else.
        #[arg(long, hide = true)]
        recipe_dir: bool,
    },
    /// Remove the default-SAE folders that older recipes left for this model under
    /// `$MECHWATCH_HOME/sae/`, and the corpora no remaining recipe uses.
    #[command(after_help = "Examples:
  mechwatch sae prune --dry-run
  mechwatch sae prune --model ./checkpoint")]
    Prune {
        /// A GGUF file, an HF directory, or a known model name (`default`).
        #[arg(long, default_value = "default")]
        model: String,
        /// List what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
pub struct SaeModelArgs {
    /// A GGUF file, an HF directory, or a known model name (`default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// The SAE folder (SAELens: cfg.json and sae_weights.safetensors).
    #[arg(long)]
    sae: PathBuf,
    /// The hook the SAE reads [default: the one in its cfg.json].
    #[arg(long)]
    hook: Option<String>,
    /// Neuronpedia-style JSONL labels (`index`, `description`).
    #[arg(long)]
    labels: Option<PathBuf>,
}

#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    m: SaeModelArgs,
    /// Prompts where the feature should fire (one per line, or JSONL).
    #[arg(long)]
    positive: PathBuf,
    /// Prompts where it should not fire (same formats).
    #[arg(long)]
    negative: PathBuf,
    /// Wrap prompts in the chat template.
    #[arg(long)]
    chat: bool,
    /// Latents to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TopArgs {
    #[command(flatten)]
    m: SaeModelArgs,
    /// The latent's index.
    #[arg(long)]
    latent: usize,
    /// Plain-text files or JSONL (`text` or `prompt`) to read.
    #[arg(long, required = true, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Examples to print.
    #[arg(long, default_value_t = 10)]
    n: usize,
    /// Corpus tokens to read.
    #[arg(long, default_value_t = 8192)]
    tokens: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

struct Loaded {
    model: probes::Model,
    sae: std::sync::Arc<probes::sae::Sae>,
    hook: probes::HookPoint,
    labels: probes::sae::search::Labels,
}

fn load(m: &SaeModelArgs) -> anyhow::Result<Loaded> {
    let model = super::load_model_beside_stdout(&m.model)?;
    let sae = std::sync::Arc::new(probes::sae::load_sae(&m.sae)?);
    let hook_name = m
        .hook
        .clone()
        .or_else(|| sae.hook.clone())
        .context("the SAE names no hook; pass --hook")?;
    let c = model.config();
    let hook = sae.check_fits(&hook_name, c.n_layers, c.d_model)?;
    let labels = match &m.labels {
        Some(p) => probes::sae::search::Labels::read(p)?,
        None => Default::default(),
    };
    Ok(Loaded {
        model,
        sae,
        hook,
        labels,
    })
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    m: SaeModelArgs,
    /// Held-out plain-text files or JSONL (`text` or `prompt`).
    #[arg(long, required = true, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Evaluation tokens (whole windows).
    #[arg(long, default_value_t = 8192)]
    tokens: u64,
    /// Tokens per window.
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// Seed of the window order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SparsityArg {
    Topk,
    Batchtopk,
}

#[derive(Args)]
pub struct TrainArgs {
    /// A GGUF file, an HF directory, or a known model name (`default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// The hook to read, e.g. `blocks.11.hook_resid_post`.
    #[arg(long)]
    hook: String,
    /// Plain-text files (documents separated by blank lines) or JSONL (`text` or `prompt`).
    #[arg(long, required = true, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Latents (the SAE's width).
    #[arg(long)]
    latents: usize,
    /// Active latents per token (on average, with `--sparsity batchtopk`).
    #[arg(long)]
    k: usize,
    /// `topk` (saved as SAELens `topk`) or `batchtopk` (saved as `jumprelu`).
    #[arg(long, value_enum, default_value_t = SparsityArg::Topk)]
    sparsity: SparsityArg,
    /// Training tokens.
    #[arg(long)]
    tokens: u64,
    /// The folder to write the SAE (and its resumable checkpoints) to.
    #[arg(long)]
    out: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// Windows per optimizer step.
    #[arg(long, default_value_t = 32)]
    windows_per_step: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 4e-4)]
    lr: f64,
    /// Seed of the initialization and the window order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A latent that has not fired for this many tokens gets the AuxK loss [default: a tenth
    /// of --tokens, between 10,000 and 1,000,000].
    #[arg(long)]
    dead_after_tokens: Option<u64>,
    /// Write a resumable checkpoint every this many steps.
    #[arg(long, default_value_t = 200)]
    checkpoint_every_steps: u64,
    /// Lay the window grid this many times, each shifted by context / N tokens, so that every
    /// token is seen after different amounts of context.
    #[arg(long, default_value_t = 1)]
    window_shifts: usize,
    /// Visit the windows in a new seeded order in every epoch after the first.
    #[arg(long)]
    reshuffle_epochs: bool,
    /// Keep the corpus's activations (f16) in memory across epochs when they fit in this many
    /// MiB; otherwise run the model again every step. Changes time and memory, never the
    /// weights.
    #[arg(long, default_value_t = probes::sae::train::ACTIVATION_CACHE_BYTES >> 20)]
    activation_cache_mib: usize,
}

/// Read corpus documents: JSONL lines (`text`, `prompt`, or a bare string), or plain text
/// split into documents at blank lines.
pub fn read_corpus(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading corpus {}", f.display()))?;
        if f.extension().is_some_and(|e| e == "jsonl") {
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: invalid JSON", f.display(), i + 1))?;
                let doc = v
                    .as_str()
                    .or_else(|| v["text"].as_str())
                    .or_else(|| v["prompt"].as_str());
                docs.push(
                    doc.with_context(|| format!("{}:{}: no `text` field", f.display(), i + 1))?
                        .to_string(),
                );
            }
        } else {
            docs.extend(
                text.split("\n\n")
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
            );
        }
    }
    if docs.is_empty() {
        bail!(
            "the corpus ({}) is empty",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(docs)
}

/// A training run's progress as two tasks: computing the corpus's activations once, then the
/// steps (with the loss figures beside the count).
fn show_training(
    progress: &crate::progress::Progress,
    caching: &mut Option<bool>,
    p: &Progress,
) -> std::ops::ControlFlow<()> {
    let now_caching = p.caching.is_some();
    if *caching != Some(now_caching) {
        if caching.is_some() {
            progress.end(true);
        }
        match p.caching {
            Some((_, total)) => progress.begin(
                "computing the corpus's activations once",
                Some(total as u64),
                "windows",
                None,
            ),
            None => progress.begin("training the SAE", Some(p.total_tokens), "tokens", None),
        }
        *caching = Some(now_caching);
    }
    match p.caching {
        Some((done, _)) => progress.advance(done as u64),
        None => {
            progress.message(&format!(
                "FVU {:.3}, L0 {:.1}, dead {}",
                p.fvu, p.l0, p.dead
            ));
            progress.advance(p.tokens);
        }
    }
    std::ops::ControlFlow::Continue(())
}

pub fn train_config(a: &TrainArgs) -> TrainConfig {
    TrainConfig {
        hook: a.hook.clone(),
        latents: a.latents,
        k: a.k,
        sparsity: match a.sparsity {
            SparsityArg::Topk => probes::sae::train::Sparsity::TopK,
            SparsityArg::Batchtopk => probes::sae::train::Sparsity::BatchTopK,
        },
        tokens: a.tokens,
        context: a.context,
        windows_per_step: a.windows_per_step,
        lr: a.lr,
        seed: a.seed,
        dead_after_tokens: a
            .dead_after_tokens
            .unwrap_or((a.tokens / 10).clamp(10_000, 1_000_000)),
        checkpoint_every_steps: a.checkpoint_every_steps.max(1),
        window_shifts: a.window_shifts,
        reshuffle_epochs: a.reshuffle_epochs,
    }
}

pub fn run(cmd: SaeCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SaeCmd::Default {
            model,
            eval,
            retrain,
            recipe,
            corpus_dir,
            recipe_dir,
        } => {
            let model = super::load_model_beside_stdout(&model)?;
            if recipe_dir {
                let r = probes::sae::default::Recipe::for_model(&model);
                println!("{}", r.dir().display());
                return Ok(ExitCode::SUCCESS);
            }
            if recipe {
                let r = probes::sae::default::Recipe::for_model(&model);
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(ExitCode::SUCCESS);
            }
            if corpus_dir {
                println!(
                    "{}",
                    probes::sae::default::Recipe::for_model(&model)
                        .corpus_dir()
                        .display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut progress = crate::progress::Progress::stderr();
            let dir = if retrain {
                let trained = probes::sae::default::train_recipe_reporting(&model, &mut progress)?;
                drop(progress);
                let f16 = trained.join("f16");
                probes::sae::shipped::write_f16(&trained, &f16)?;
                let weights = std::fs::read(f16.join("sae_weights.safetensors"))?;
                let digest = probes::digest::sha256_hex(&weights);
                if digest == probes::sae::shipped::WEIGHTS_SHA256 {
                    eprintln!("the retrained f16 weights are byte-identical to the shipped SAE");
                } else {
                    eprintln!(
                        "the retrained f16 weights differ from the shipped SAE (sha256 {digest}, \
                         shipped {})",
                        probes::sae::shipped::WEIGHTS_SHA256
                    );
                }
                f16
            } else {
                probes::sae::default::ensure_reporting(&model, &mut progress)?
            };
            println!("{}", dir.display());
            if eval {
                let sae = std::sync::Arc::new(probes::sae::load_sae(&dir)?);
                let c = model.config();
                let hook_name = sae.hook.clone().context("the default SAE names its hook")?;
                let hook = sae.check_fits(&hook_name, c.n_layers, c.d_model)?;
                let docs: Vec<String> = probes::sae::default::EVAL_TEXT
                    .split("\n\n")
                    .map(str::to_string)
                    .collect();
                let wins = probes::sae::train::windows(&model, &docs, 64, 1)?;
                let r = probes::sae::eval::evaluate(&model, &sae, hook, &wins, 8)?;
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
        }
        SaeCmd::Prune { model, dry_run } => {
            let model = super::load_model_beside_stdout(&model)?;
            let stale = probes::sae::default::stale_folders(&model)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            if !dry_run {
                probes::sae::default::prune(&stale)?;
            }
            for s in &stale {
                println!(
                    "{verb} {} ({:.1} MB)",
                    s.path.display(),
                    s.bytes as f64 / 1e6
                );
            }
            let total: u64 = stale.iter().map(|s| s.bytes).sum();
            println!(
                "{verb} {} folders, {:.1} MB",
                stale.len(),
                total as f64 / 1e6
            );
        }
        SaeCmd::Search(a) => {
            let l = load(&a.m)?;
            let encode = |f: &Path| -> anyhow::Result<Vec<Vec<u32>>> {
                let prompts = super::capture::read_prompts(f)?;
                Ok(l.model
                    .encode_prompts(&prompts, a.chat)?
                    .into_iter()
                    .collect::<Result<_, _>>()?)
            };
            let pos =
                probes::sae::search::prompt_acts(&l.model, &l.sae, l.hook, &encode(&a.positive)?)?;
            let neg =
                probes::sae::search::prompt_acts(&l.model, &l.sae, l.hook, &encode(&a.negative)?)?;
            let ranked =
                probes::sae::search::contrast(&l.model, &l.sae, &pos, &neg, a.top, &l.labels);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&ranked)?);
            } else {
                println!(
                    "latents separating {} from {} at {}:",
                    a.positive.display(),
                    a.negative.display(),
                    l.hook
                );
                for r in &ranked {
                    println!(
                        "  {:<40} AUROC {:.3}  mean max {:.2} vs {:.2}",
                        l.labels.show(r.index),
                        r.auroc,
                        r.mean_positive,
                        r.mean_negative
                    );
                    for c in &r.contexts {
                        println!("      {:.2}  {}", c.activation, c.text);
                    }
                }
            }
        }
        SaeCmd::Top(a) => {
            let l = load(&a.m)?;
            l.sae.check_latent(a.latent)?;
            let docs = read_corpus(&a.corpus)?;
            let wins = probes::sae::train::windows(&l.model, &docs, 64, 1)?;
            let n = (a.tokens as usize).div_ceil(64).min(wins.len());
            let acts = probes::sae::search::prompt_acts(&l.model, &l.sae, l.hook, &wins[..n])?;
            let top = probes::sae::search::top_contexts(&l.model, &acts, a.latent as u32, a.n);
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"latent": a.latent, "label": l.labels.get(a.latent), "examples": top})
                    )?
                );
            } else {
                println!(
                    "latent {} at {}: top {} of {} windows",
                    l.labels.show(a.latent),
                    l.hook,
                    top.len(),
                    n
                );
                for c in &top {
                    println!("  {:.2}  {}", c.activation, c.text);
                }
            }
        }
        SaeCmd::Eval(a) => {
            let Loaded {
                model, sae, hook, ..
            } = load(&a.m)?;
            let docs = read_corpus(&a.corpus)?;
            let wins = probes::sae::train::windows(&model, &docs, a.context, a.seed)?;
            let n = (a.tokens as usize).div_ceil(a.context).min(wins.len());
            let r = probes::sae::eval::evaluate(&model, &sae, hook, &wins[..n], 8)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "SAE {} at {} on {} tokens ({} attention-sink tokens left out)",
                    a.m.sae.display(),
                    r.hook,
                    r.tokens,
                    r.sink_tokens
                );
                println!("L0                  {:.1}", r.l0);
                println!(
                    "FVU                 {:.3}  (explained variance {:.3})",
                    r.fvu, r.explained_variance
                );
                println!("dead latents        {} of {}", r.dead_latents, r.d_sae);
                println!(
                    "CE clean / SAE / 0  {:.3} / {:.3} / {:.3}",
                    r.ce_clean, r.ce_sae, r.ce_zero_ablation
                );
                println!("CE loss recovered   {:.3}", r.ce_loss_recovered);
                println!("KL (clean || SAE)   {:.4}", r.kl_sae);
            }
        }
        SaeCmd::Train(a) => {
            let progress = crate::progress::Progress::stderr();
            let model = super::load_model_showing(&a.model, &progress)?;
            let docs = read_corpus(&a.corpus)?;
            let cfg = train_config(&a);
            let cache_bytes = a.activation_cache_mib.saturating_mul(1 << 20);
            let mut caching = None;
            let last = train_within(&model, &docs, &cfg, &a.out, cache_bytes, |p| {
                show_training(&progress, &mut caching, p)
            })
            .with_context(|| format!("training an SAE into {}", a.out.display()));
            if caching.is_some() {
                progress.end(last.is_ok());
            }
            drop(progress);
            let last = last?;
            write_training_record(&a.out, &cfg, &a.corpus, &last)?;
            println!(
                "trained {} latents (k={}) at {} on {} tokens: FVU {:.3}, L0 {:.1}, dead {}; saved to {}",
                cfg.latents, cfg.k, cfg.hook, last.tokens, last.fvu, last.l0, last.dead, a.out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_training_record(
    out: &Path,
    cfg: &TrainConfig,
    corpus: &[PathBuf],
    last: &Progress,
) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for c in corpus {
        let bytes = std::fs::read(c)?;
        files.push(serde_json::json!({"path": c.display().to_string(), "sha256": probes::digest::sha256_hex(&bytes)}));
    }
    let rec = serde_json::json!({
        "config": cfg,
        "corpus": files,
        "final": {"step": last.step, "tokens": last.tokens, "fvu": last.fvu, "l0": last.l0, "dead": last.dead},
    });
    std::fs::write(out.join("training.json"), serde_json::to_vec_pretty(&rec)?)?;
    Ok(())
}
