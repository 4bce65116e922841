//! `mechwatch completions SHELL`: the shell completion script, generated from the command
//! definitions themselves (clap_complete), so it never falls behind a new flag.

use std::process::ExitCode;

use clap::Args;
use clap_complete::Shell;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    mechwatch completions bash > /etc/bash_completion.d/mechwatch\n  \
    mechwatch completions zsh > \"${fpath[1]}/_mechwatch\"\n  \
    mechwatch completions fish > ~/.config/fish/completions/mechwatch.fish")]
pub struct CompletionsArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Write `cli`'s completion script for the chosen shell to standard output.
pub fn run(a: CompletionsArgs, mut cli: clap::Command) -> anyhow::Result<ExitCode> {
    let name = cli.get_name().to_string();
    clap_complete::generate(a.shell, &mut cli, name, &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
