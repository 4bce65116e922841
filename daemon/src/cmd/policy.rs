//! `mechwatch policy check`: validate policy files without running them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate policies (a file, a directory of *.toml, or `default`): syntax, unknown keys,
    /// references, paths, prompt files, pinned digests. With --model, also hooks, SAE fit and
    /// latent ranges against that model. Exits 0 when valid, 2 otherwise.
    Check {
        path: String,
        #[arg(long)]
        model: Option<String>,
    },
    /// Print the directory of the shipped policies (written there on first use).
    Shipped,
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCmd::Check { path, model } => {
            let dir = resolve(&path)?;
            let policies = match policies::load_policies(&dir) {
                Ok(p) => p,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!("{} error(s)", errors.len());
                    return Ok(ExitCode::from(2));
                }
            };
            if let Some(spec) = model {
                let model = super::load_model(&spec)?;
                if let Err(errors) = policies::engine::resolve_only(&model, &policies) {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    eprintln!("{} error(s) against {spec}", errors.0.len());
                    return Ok(ExitCode::from(2));
                }
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
        PolicyCmd::Shipped => {
            println!("{}", policies::shipped::materialize()?.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `default` means the shipped policies.
pub fn resolve(path: &str) -> anyhow::Result<PathBuf> {
    if path == "default" {
        Ok(policies::shipped::materialize()?)
    } else {
        Ok(PathBuf::from(path))
    }
}
