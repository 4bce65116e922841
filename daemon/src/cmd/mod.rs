//! Subcommands.

pub mod capture;
pub mod check;
pub mod completions;
pub mod daemon;
pub mod generate;
pub mod key;
pub mod lens;
pub mod log;
pub mod man;
pub mod model;
pub mod policy;
pub mod report;
pub mod sae;

use anyhow::Context;
use probes::{LoadOptions, Model};

/// Load `spec` (a GGUF file, an HF directory, or a known model name such as `default`).
pub fn load_model(spec: &str) -> anyhow::Result<Model> {
    Model::load(spec, &LoadOptions::default()).with_context(|| format!("loading model `{spec}`"))
}

/// [`load_model`], shown as a task: fetching, hashing and reading a big checkpoint takes a while.
pub fn load_model_showing(
    spec: &str,
    progress: &crate::progress::Progress,
) -> anyhow::Result<Model> {
    progress.run(&format!("loading model {spec}"), None, || load_model(spec))
}

/// [`load_model_showing`] for commands that print their results on stdout: plain progress
/// lines on stderr, never a bar that would run into those results.
pub fn load_model_beside_stdout(spec: &str) -> anyhow::Result<Model> {
    load_model_showing(spec, &crate::progress::Progress::stderr_beside_stdout())
}
