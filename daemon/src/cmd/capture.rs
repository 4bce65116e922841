//! `mechwatch capture`: run a prompt file through the model and save activations at hook
//! points to safetensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::Args;
use probes::{Hooks, Padding, Unembed};

/// Prompts per forward pass: bounds memory on long prompt files.
const BATCH: usize = 32;

#[derive(Args)]
pub struct CaptureArgs {
    /// A GGUF file, an HF directory, or a name from `mechwatch model list` (`default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// Hook names, e.g. `blocks.15.hook_resid_post`; the block may be a fraction of depth
    /// (`blocks.0.5.hook_resid_post`, block round(0.5 * (n_layers - 1))). Tensors are named
    /// after the resolved hook.
    #[arg(long, required = true, num_args = 1..)]
    hook: Vec<String>,
    /// One prompt per line, or JSONL with a `prompt` (or `text`) field per line.
    #[arg(long)]
    prompts: PathBuf,
    /// Wrap each prompt in the chat template.
    #[arg(long)]
    chat: bool,
    /// The safetensors file to write: one tensor per hook, [prompt, pos, ...], plus `tokens`
    /// and `lengths`.
    #[arg(long)]
    out: PathBuf,
}

/// Read a prompt file: JSONL objects (`prompt` or `text`) or JSON strings per line if the
/// name ends in `.jsonl`, otherwise one prompt per non-empty line.
pub fn read_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let p = match &v {
                serde_json::Value::String(s) => s.clone(),
                _ => v["prompt"]
                    .as_str()
                    .or_else(|| v["text"].as_str())
                    .with_context(|| {
                        format!("{}:{}: no `prompt` or `text` field", path.display(), i + 1)
                    })?
                    .to_string(),
            };
            prompts.push(p);
        } else {
            prompts.push(line.to_string());
        }
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}

pub fn run(a: CaptureArgs) -> anyhow::Result<ExitCode> {
    let model = super::load_model_beside_stdout(&a.model)?;
    let points = a
        .hook
        .iter()
        .map(|h| model.hook(h))
        .collect::<Result<Vec<_>, _>>()?;
    let mut hooks = Hooks::new();
    for p in &points {
        hooks = hooks.capture(*p);
    }
    let prompts = read_prompts(&a.prompts)?;
    let ids = model
        .encode_prompts(&prompts, a.chat)?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let max_len = ids.iter().map(Vec::len).max().unwrap_or(0);
    // Per hook, per prompt: the activation over that prompt's real tokens.
    let mut rows: BTreeMap<_, Vec<Tensor>> = BTreeMap::new();
    for chunk in ids.chunks(BATCH) {
        let out = model
            .transformer
            .forward(chunk, Padding::Right, &hooks, Unembed::None)?;
        for (point, act) in out.captures {
            for (r, len) in out.layout.lengths.iter().enumerate() {
                let row = act.get(r)?;
                // Residual hooks are [pos, d]; patterns are [head, q, k].
                let row = if point.is_residual_width() {
                    row.narrow(0, 0, *len)?
                        .pad_with_zeros(0, 0, max_len - len)?
                } else {
                    row.narrow(1, 0, *len)?
                        .narrow(2, 0, *len)?
                        .pad_with_zeros(1, 0, max_len - len)?
                        .pad_with_zeros(2, 0, max_len - len)?
                };
                rows.entry(point).or_default().push(row);
            }
        }
    }
    let mut tensors = Vec::new();
    for (point, r) in rows {
        tensors.push((point.to_string(), Tensor::stack(&r, 0)?));
    }
    let mut tokens = vec![0u32; ids.len() * max_len];
    for (r, p) in ids.iter().enumerate() {
        tokens[r * max_len..r * max_len + p.len()].copy_from_slice(p);
    }
    tensors.push((
        "tokens".into(),
        Tensor::from_vec(tokens, (ids.len(), max_len), &Device::Cpu)?,
    ));
    let lengths: Vec<u32> = ids.iter().map(|p| p.len() as u32).collect();
    tensors.push((
        "lengths".into(),
        Tensor::from_vec(lengths, ids.len(), &Device::Cpu)?,
    ));
    let mut meta = BTreeMap::new();
    meta.insert("model_digest".into(), model.manifest.root());
    meta.insert("padding".into(), "right".into());
    meta.insert("prompts".into(), serde_json::to_string(&prompts)?);
    probes::safetensors::write(&a.out, &tensors, &meta)?;
    eprintln!(
        "captured {} hook(s) over {} prompts ({} tokens max) into {}",
        points.len(),
        ids.len(),
        max_len,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
