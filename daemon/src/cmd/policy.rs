//! `mechwatch policy check`: validate policy files without running them; `policy shipped`.
//!
//! With `--json`, `policy check` prints one JSON object on standard output (docs/cli.md):
//! `{"valid", "model", "policies": [{"name", "version", "checks", "path", "digest"}],
//! "errors": [{"path", "line", "column", "message"}]}`, with the same exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use policies::PolicyError;
use serde_json::json;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate policies (a file, a directory of *.toml, or `default`): syntax, unknown keys,
    /// references, paths, prompt files, pinned digests. With --model, also hooks, SAE fit and
    /// latent ranges against that model. Exits 0 when valid, 2 otherwise.
    #[command(after_help = "Examples:
  mechwatch policy check default
  mechwatch policy check my-policies/ --model ./checkpoint
  mechwatch policy check my-policies/strict.toml --json | jq .errors")]
    Check {
        /// A policy file, a directory of *.toml policies, or `default` (the shipped ones).
        path: String,
        /// Also resolve the policies against this model (a GGUF file, an HF directory or a
        /// known name such as `default`).
        #[arg(long)]
        model: Option<String>,
        /// Print one JSON object (valid, policies, errors) on standard output instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the directory of the shipped policies (written there on first use).
    #[command(after_help = "Examples:
  mechwatch policy shipped
  cp -r \"$(mechwatch policy shipped)\" my-policies/")]
    Shipped,
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCmd::Check { path, model, json } => check(&path, model.as_deref(), json),
        PolicyCmd::Shipped => {
            println!("{}", policies::shipped::materialize()?.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(path: &str, model: Option<&str>, as_json: bool) -> anyhow::Result<ExitCode> {
    let dir = resolve(path)?;
    let invalid = |errors: &[PolicyError], against: &str| -> anyhow::Result<ExitCode> {
        if as_json {
            let errors: Vec<_> = errors
                .iter()
                .map(|e| {
                    json!({
                        "path": e.path.display().to_string(),
                        "line": e.at.as_ref().map(|l| l.line),
                        "column": e.at.as_ref().map(|l| l.col),
                        "message": e.message,
                    })
                })
                .collect();
            let v = json!({ "valid": false, "model": model, "policies": [], "errors": errors });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            for e in errors {
                eprintln!("{e}");
            }
            eprintln!("{} error(s){against}", errors.len());
        }
        Ok(ExitCode::from(2))
    };
    let policies = match policies::load_policies(&dir) {
        Ok(p) => p,
        Err(errors) => return invalid(&errors, ""),
    };
    if let Some(spec) = model {
        let model = super::load_model_beside_stdout(spec)?;
        if let Err(errors) = policies::engine::resolve_only(&model, &policies) {
            return invalid(&errors.0, &format!(" against {spec}"));
        }
    }
    if as_json {
        let list: Vec<_> = policies
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "version": p.version,
                    "checks": p.checks.len(),
                    "path": p.path.display().to_string(),
                    "digest": p.digest,
                })
            })
            .collect();
        let v = json!({ "valid": true, "model": model, "policies": list, "errors": [] });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for p in &policies {
        println!(
            "ok  {} {} ({} checks) {}",
            p.name,
            p.version,
            p.checks.len(),
            p.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `default` means the shipped policies.
pub fn resolve(path: &str) -> anyhow::Result<PathBuf> {
    if path == "default" {
        Ok(policies::shipped::materialize()?)
    } else {
        Ok(PathBuf::from(path))
    }
}
