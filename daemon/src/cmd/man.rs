//! `mechwatch man`: manual pages in roff, generated from the command definitions
//! (clap_mangen): `mechwatch.1` and one page per subcommand (`mechwatch-check.1`,
//! `mechwatch-log-verify.1`, ...).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    mechwatch man | man -l -\n  \
    mechwatch man --dir /usr/local/share/man/man1")]
pub struct ManArgs {
    /// Write every page (mechwatch.1 and one per subcommand) into this directory, which is
    /// created if missing. Without it, mechwatch.1 goes to standard output.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

pub fn run(a: ManArgs, cli: clap::Command) -> anyhow::Result<ExitCode> {
    match a.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            // Pages are written by name: a page that is a symbolic link would be written
            // through, onto whatever it points at.
            for entry in std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_page = name.starts_with("mechwatch") && name.ends_with(".1");
                if is_page && entry.file_type().is_ok_and(|t| t.is_symlink()) {
                    anyhow::bail!(
                        "{} is a symbolic link: remove it, or write the pages elsewhere",
                        entry.path().display()
                    );
                }
            }
            clap_mangen::generate_to(cli, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
        }
        None => {
            // As `generate_to` does for the pages it writes: no `help` subcommand.
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cli.disable_help_subcommand(true))
                .render(&mut out)
                .context("writing the man page to standard output")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
