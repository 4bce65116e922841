//! `mechwatch generate`: text generation with optional steering.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use probes::{GenerateOptions, Hooks, Positions, Sampling};

#[derive(Args)]
pub struct GenerateArgs {
    /// A GGUF file, an HF directory, or a name from `mechwatch model list` (`default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// New tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling: sample from the smallest set of tokens with this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Add COEFF times the vector in FILE at HOOK on every position: `HOOK:FILE:COEFF`.
    /// HOOK's block may be a fraction of depth (`blocks.0.5.hook_resid_post`). FILE is a
    /// safetensors file with one 1-D tensor (or a tensor named after the resolved hook).
    #[arg(long, value_name = "HOOK:FILE:COEFF")]
    steer: Vec<String>,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    let model = super::load_model_beside_stdout(&a.model)?;
    let mut hooks = Hooks::new();
    for spec in &a.steer {
        let (hook, file, coeff) = parse_steer(spec)?;
        let point = model.hook(hook)?;
        let vector = load_vector(Path::new(file), &point.to_string())?;
        hooks = hooks.add(point, Positions::All, vector, coeff);
    }
    let ids = model.encode_prompt(&a.prompt, a.chat)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: match a.temperature {
            Some(temperature) => Sampling::Sample {
                temperature,
                top_p: a.top_p,
                seed: a.seed,
            },
            None => Sampling::Greedy,
        },
        stop_tokens: model.stop_tokens(),
        f32_decode: false,
        shared_start: 0,
    };
    let out = probes::generate(&model.transformer, &[ids], &hooks, &opts)?;
    println!("{}", model.codec.decode(&out[0])?);
    Ok(ExitCode::SUCCESS)
}

fn parse_steer(spec: &str) -> anyhow::Result<(&str, &str, f32)> {
    let (rest, coeff) = spec
        .rsplit_once(':')
        .with_context(|| format!("--steer `{spec}`: expected HOOK:FILE:COEFF"))?;
    let (hook, file) = rest
        .split_once(':')
        .with_context(|| format!("--steer `{spec}`: expected HOOK:FILE:COEFF"))?;
    let coeff: f32 = coeff
        .parse()
        .with_context(|| format!("--steer `{spec}`: coefficient `{coeff}` is not a number"))?;
    if !coeff.is_finite() {
        bail!("--steer `{spec}`: coefficient must be finite");
    }
    Ok((hook, file, coeff))
}

/// A steering vector from a safetensors file: its only tensor, or the one named `hook`.
pub fn load_vector(path: &Path, hook: &str) -> anyhow::Result<candle_core::Tensor> {
    let file = probes::safetensors::SafetensorsFile::read(path)?;
    let info = match file.get(hook) {
        Some(i) => i,
        None if file.tensors.len() == 1 => &file.tensors[0],
        None => bail!(
            "{}: holds {} tensors and none is named `{hook}`",
            path.display(),
            file.tensors.len()
        ),
    };
    let t = file.load_f32(info, &candle_core::Device::Cpu)?;
    let t = match t.dims() {
        [_] => t,
        [1, _] => t.squeeze(0)?,
        d => bail!(
            "{}: tensor `{}` has shape {d:?}, expected a vector",
            path.display(),
            info.name
        ),
    };
    Ok(t)
}
