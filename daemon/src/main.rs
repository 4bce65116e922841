//! `mechwatch`: the command-line front end. Thin glue over `probes` (and, later, `policies`
//! and `audit-log`); each subcommand lives in its own module under `cmd/`.

mod bench;
mod cmd;
mod daemon;
mod gate;
mod progress;
mod report;
mod verified;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mechwatch",
    version = audit_log::BUILD_VERSION,
    about = "Safety-audit compliance daemon built on mechanistic interpretability"
)]
struct Cli {
    /// No progress on stderr (by default a live bar on a terminal, sparse lines otherwise).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect, fetch and convert models.
    #[command(subcommand)]
    Model(cmd::model::ModelCmd),
    /// Generate text, optionally with steering vectors applied.
    Generate(cmd::generate::GenerateArgs),
    /// Capture activations at hook points for a file of prompts.
    Capture(cmd::capture::CaptureArgs),
    /// Sparse autoencoders: train and evaluate.
    #[command(subcommand)]
    Sae(cmd::sae::SaeCmd),
    /// Run policies on a model once: the release gate (exit 0 pass, 1 fail, 2 could not check).
    Check(cmd::check::CheckArgs),
    /// Watch checkpoint directories and audit each complete checkpoint (a systemd service).
    Daemon(cmd::daemon::DaemonArgs),
    /// One audit in a child process of the daemon (internal).
    #[command(hide = true)]
    DaemonAudit(cmd::daemon::DaemonAuditArgs),
    /// The daemon's queue, its last audits and the log head.
    Status(cmd::daemon::StatusArgs),
    /// A self-contained HTML (or Markdown) report of signed records, verified as it is made.
    Report(cmd::report::ReportArgs),
    /// Validate policy files.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCmd),
    /// Signing keys for the audit log.
    #[command(subcommand)]
    Key(cmd::key::KeyCmd),
    /// Read, verify and export the signed audit log.
    #[command(subcommand)]
    Log(cmd::log::LogCmd),
    /// Run benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(cmd::completions::CompletionsArgs),
    /// Write the manual pages (roff).
    Man(cmd::man::ManArgs),
}

/// How long candle's barrier-pool workers spin for work before they sleep (candle's default is
/// 25,000 rounds). Our batch passes run one micro-batch per core, so a spinning worker takes
/// a core from the other micro-batch. Single-row decode, whose matmuls come quickly one after
/// another, wants some spinning; 2,000 serves both (docs/lab/performance.md, "The barrier
/// pool's spin limit"). A value in the environment wins.
const BARRIER_POOL_SPIN_LIMIT: &str = "2000";

fn main() -> ExitCode {
    // Before any thread starts: candle reads this once, when its pool is first used.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT);
    }
    let cli = Cli::parse();
    progress::set_quiet(cli.quiet);
    // The daemon sets up its own (journald-friendly) logging from its config.
    if !matches!(cli.command, Command::Daemon(_) | Command::DaemonAudit(_)) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("MECHWATCH_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match cli.command {
        Command::Model(c) => cmd::model::run(c),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Capture(a) => cmd::capture::run(a),
        Command::Sae(c) => cmd::sae::run(c),
        Command::Check(a) => cmd::check::run(a),
        Command::Policy(c) => cmd::policy::run(c),
        Command::Daemon(a) => cmd::daemon::run(a),
        Command::DaemonAudit(a) => cmd::daemon::audit_child(a),
        Command::Report(a) => cmd::report::run(a),
        Command::Status(a) => cmd::daemon::status(a),
        Command::Key(c) => cmd::key::run(c),
        Command::Log(c) => cmd::log::run(c),
        Command::Bench(b) => bench::run(b),
        Command::Completions(a) => cmd::completions::run(a, Cli::command()),
        Command::Man(a) => cmd::man::run(a, Cli::command()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            // "Could not check" is exit 2, never 0 or 1.
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each once: many of our errors already print their source inline,
/// and anyhow's `{:#}` would repeat it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.contains(&cause) {
            msg.push_str(": ");
            msg.push_str(&cause);
        }
    }
    msg
}
