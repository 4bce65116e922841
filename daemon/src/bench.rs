//! `mechwatch bench ...`: measurements that print ratios against a baseline taken in the same
//! run, because shared machines are noisy. Never used as test assertions.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use probes::{GenerateOptions, HookPoint, Hooks, Padding, Positions, Unembed};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Hooked vs plain batched forward, early-exit capture, generation, peak RSS.
    #[command(after_help = "Examples:
  mechwatch bench forward
  mechwatch bench forward --model ./checkpoint --batch 16 --reps 5")]
    Forward(ForwardArgs),
    /// SAE encode throughput against a dense matmul, and training against the forward alone.
    #[command(after_help = "Examples:
  mechwatch bench sae
  mechwatch bench sae --expansion 32 --k 64 --sample-tokens 0")]
    Sae(SaeBenchArgs),
    /// Durable appends per second (single vs group commit) and verifications per second.
    #[command(after_help = "Examples:
  mechwatch bench log
  mechwatch bench log --records 10000 --batch 64 --dir /var/tmp")]
    Log(LogArgs),
    /// The policy set end to end (model load included), time per check kind, against one
    /// plain forward pass over every prompt the policies read.
    #[command(after_help = "Examples:
  mechwatch bench check
  mechwatch bench check --model ./checkpoint --policy my-policies/")]
    Check(CheckBenchArgs),
    /// The daemon: time from a checkpoint becoming complete to its signed record, against
    /// the same audit run in-process; and the idle daemon's CPU use.
    #[command(after_help = "Examples:
  mechwatch bench daemon
  mechwatch bench daemon --policy my-policies/")]
    Daemon(CheckBenchArgs),
}

#[derive(Args)]
pub struct CheckBenchArgs {
    /// A GGUF file, an HF directory, or a known model name (`default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// A policy file, a directory of them, or `default` (the shipped policies).
    #[arg(long, default_value = "default")]
    policy: String,
}

#[derive(Args)]
pub struct SaeBenchArgs {
    /// A GGUF file, an HF directory, or a known model name (`default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// Latents per d_model (16 gives 9216 for the default model).
    #[arg(long, default_value_t = 16)]
    expansion: usize,
    /// Active latents per token.
    #[arg(long, default_value_t = 32)]
    k: usize,
    /// Tokens encoded per repetition.
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    /// Timed repetitions.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Training tokens for the training-throughput measurement.
    #[arg(long, default_value_t = 12096)]
    train_tokens: u64,
    /// New tokens per answer in the corpus-sampling measurement (0 skips it).
    #[arg(long, default_value_t = 64)]
    sample_tokens: usize,
}

#[derive(Args)]
pub struct LogArgs {
    /// Records to append.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Records per transaction for group commit.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Directory for the benchmark database (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[derive(Args)]
pub struct ForwardArgs {
    /// A GGUF file, an HF directory, or a known model name (`default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Timed repetitions of each variant (interleaved).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Prompts per micro-batch; one micro-batch per thread runs at once, so the logits held
    /// are threads x micro-batch prompts' worth.
    #[arg(long, default_value_t = 8)]
    micro_batch: usize,
    /// Tokens per generation (timed including the chat prompt's prefill).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Also write the benchmark's token ids (`prompts`, `gen_prompt`, `gen_tokens`) to this
    /// JSON file, so a peer runtime can time the same work (`scripts/bench-peers`).
    #[arg(long, value_name = "FILE")]
    prompts_out: Option<std::path::PathBuf>,
    /// Also time the hooked prompt passes and generations on this device (`cuda`, `cuda:N`;
    /// needs a build with `--features cuda`), as ratios against the CPU figures above them.
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    let label = match &cmd {
        BenchCmd::Forward(_) => "bench forward",
        BenchCmd::Log(_) => "bench log",
        BenchCmd::Sae(_) => "bench sae",
        BenchCmd::Check(_) => "bench check",
        BenchCmd::Daemon(_) => "bench daemon",
    };
    let progress = crate::progress::Progress::stderr_beside_stdout();
    progress.run(label, None, || match cmd {
        BenchCmd::Forward(a) => forward(a),
        BenchCmd::Log(a) => log(a),
        BenchCmd::Sae(a) => sae(a),
        BenchCmd::Check(a) => check(a),
        BenchCmd::Daemon(a) => daemon(a),
    })
}

/// utime + stime of process `pid`, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn daemon(a: CheckBenchArgs) -> anyhow::Result<ExitCode> {
    let model_path = crate::cmd::load_model(&a.model)?.path;
    let dir = crate::cmd::policy::resolve(&a.policy)?;
    // Baseline: the same audit in-process (model load and policies), as `mechwatch check`.
    let policies = policies::load_policies(&dir).map_err(policies::PolicyErrors)?;
    let t0 = Instant::now();
    let model = crate::cmd::load_model(model_path.to_str().unwrap_or_default())?;
    let mut quiet = |_: &str| {};
    let mut opts = policies::engine::RunOptions {
        last_pass: None,
        progress: &mut quiet,
        micro_batch: 16,
        lineage: None,
        store: None,
        reference: None,
    };
    policies::engine::run(&model, &policies, &mut opts)?;
    let in_process = t0.elapsed().as_secs_f64();
    drop(model);

    let tmp = std::env::temp_dir().join(format!("mechwatch-bench-daemon-{}", std::process::id()));
    let models = tmp.join("models");
    std::fs::create_dir_all(&models)?;
    let key = tmp.join("key.pem");
    audit_log::keys::Signer::generate().write_new(&key)?;
    let config = tmp.join("mechwatch.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{0}/state\"\nkey = \"{0}/key.pem\"\nquiet_period_secs = 30\n[[watch]]\npath = \"{0}/models\"\npolicies = \"{1}\"\n",
            tmp.display(),
            dir.display()
        ),
    )?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["daemon", "--config", config.to_str().unwrap_or_default()])
        .env("MECHWATCH_LOG", "warn")
        .spawn()?;
    let db = tmp.join("state/audit.db");
    let wait_db = Instant::now();
    while !db.exists() && wait_db.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Complete = renamed into place with its ready marker (no quiet period to wait out).
    let partial = models.join("m.gguf.partial");
    std::fs::copy(&model_path, &partial)?;
    std::fs::rename(&partial, models.join("m.gguf"))?;
    std::fs::write(models.join("m.gguf.ready"), "")?;
    let t0 = Instant::now();
    let conn = audit_log::store::open_reader(&db)?;
    while audit_log::store::record_count(&conn)? == 0 {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "no record after 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let to_record = t0.elapsed().as_secs_f64();
    // Idle: nothing to do for 5 s.
    std::thread::sleep(Duration::from_secs(1));
    let c0 = cpu_secs(child.id()).unwrap_or(f64::NAN);
    std::thread::sleep(Duration::from_secs(5));
    let idle = (cpu_secs(child.id()).unwrap_or(f64::NAN) - c0) / 5.0 * 100.0;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "policies {} on {}, {} threads",
        dir.display(),
        model_path.display(),
        rayon_threads()
    );
    println!(
        "complete checkpoint -> signed record   {to_record:>6.2}s   (target <= 60 s: {})",
        if to_record <= 60.0 { "met" } else { "NOT met" }
    );
    println!("baseline: the same audit in-process    {in_process:>6.2}s   (the daemon adds {:.2}s: hashing, queueing, signing; ratio {:.2}x)", to_record - in_process, to_record / in_process);
    println!("idle CPU after the audit               {idle:>6.2}% of one core");
    Ok(ExitCode::SUCCESS)
}

fn check(a: CheckBenchArgs) -> anyhow::Result<ExitCode> {
    let dir = crate::cmd::policy::resolve(&a.policy)?;
    let policies = policies::load_policies(&dir).map_err(policies::PolicyErrors)?;
    let (load, model) = time(|| crate::cmd::load_model(&a.model))?;
    let mut quiet = |_: &str| {};
    let mut opts = policies::engine::RunOptions {
        last_pass: None,
        progress: &mut quiet,
        micro_batch: 16,
        lineage: None,
        store: None,
        reference: None,
    };
    // Printed first: it stands even when the audit cannot check.
    for c in policies::selection::bench(&model, &policies, 16).map_err(anyhow::Error::msg)? {
        println!(
            "direction selection {}/{} {:.2}s; fixed-hook build {:.2}s; ratio {:.2}x (target <= 3x: {}); {}",
            c.policy,
            c.direction,
            c.select,
            c.fixed,
            c.select / c.fixed,
            if c.select <= 3.0 * c.fixed { "met" } else { "NOT met" },
            c.outcome
        );
    }
    let t0 = Instant::now();
    let (result, timings) = policies::engine::run(&model, &policies, &mut opts)?;
    let total = load.as_secs_f64() + t0.elapsed().as_secs_f64();
    let checked: f64 = timings.iter().map(|t| t.1).sum();
    // Baseline: one plain forward pass over every distinct prompt the policies read.
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for p in &policies {
        for set in p.prompt_sets.values() {
            let new: Vec<&String> = set
                .prompts
                .iter()
                .filter(|text| seen.insert((set.chat, (*text).clone())))
                .collect();
            for ids in model.encode_prompts(&new, set.chat)? {
                prompts.push(ids?);
            }
        }
    }
    let n_tokens: usize = prompts.iter().map(Vec::len).sum();
    let (plain, ()) = time(|| {
        model.transformer.forward_chunked(
            &prompts,
            16,
            Padding::Right,
            &Hooks::new(),
            Unembed::Last,
            |_, _| Ok(()),
        )?;
        Ok(())
    })?;
    let plain = plain.as_secs_f64();
    println!(
        "policies {} ({} checks) on {}, {} threads; verdict {}",
        dir.display(),
        result
            .policies
            .iter()
            .map(|p| p.findings.len())
            .sum::<usize>(),
        model.path.display(),
        rayon_threads(),
        result.verdict.as_str()
    );
    println!("model load                 {load:>7.2?}");
    println!(
        "resolve (directions, SAEs) {:>6.2}s",
        total - load.as_secs_f64() - checked
    );
    for (check, secs) in &timings {
        println!("{check:<50} {secs:>6.2}s");
    }
    println!(
        "total, end to end          {total:>6.2}s   (target <= 60 s: {})",
        if total <= 60.0 { "met" } else { "NOT met" }
    );
    println!(
        "baseline: one plain forward over the {} distinct prompts ({n_tokens} tokens) {plain:.2}s; the audit, building the lineage's instruments, costs {:.1}x that (target <= 2.0x: {})",
        prompts.len(),
        total / plain,
        if total <= 2.0 * plain { "met" } else { "NOT met" }
    );
    gradient_cost(&model)?;
    println!("peak RSS {:.0} MB", peak_rss_mb().unwrap_or(f64::NAN));
    lineage_second_audit(
        &model,
        &policies,
        &result,
        total - load.as_secs_f64(),
        plain,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Attribution patching's backward pass against the forward it differentiates: on one
/// prompt, the median of 7 plain forwards, 7 differentiable forwards (no gradient asked) and 7
/// gradient passes at every block's resid_pre, attn_out and mlp_out (forward + backward).
fn gradient_cost(model: &probes::Model) -> anyhow::Result<()> {
    use candle_core::IndexOp;
    let t = &model.transformer;
    let mut prompt = model.encode_prompt(BENCH_TEXT, false)?;
    prompt.truncate(32);
    let prompts = vec![prompt];
    let metric =
        |l: &candle_core::Tensor, _: &probes::BatchLayout| l.i(0).and_then(|x| x.i(0)? - x.i(1)?);
    let mut points = std::collections::BTreeSet::new();
    for l in 0..t.config.n_layers {
        points.extend([
            HookPoint::ResidPre(l),
            HookPoint::AttnOut(l),
            HookPoint::MlpOut(l),
        ]);
    }
    let none = std::collections::BTreeSet::new();
    let reps = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<Duration> {
        let mut v = Vec::new();
        for _ in 0..7 {
            v.push(time(f)?.0);
        }
        Ok(median(v))
    };
    let plain = reps(&|| {
        t.forward(&prompts, Padding::Left, &Hooks::new(), Unembed::Last)?;
        Ok(())
    })?;
    let diff = reps(&|| {
        t.gradients(&prompts, &Hooks::new(), &none, &metric)?;
        Ok(())
    })?;
    let both = reps(&|| {
        t.gradients(&prompts, &Hooks::new(), &points, &metric)?;
        Ok(())
    })?;
    let backward = both.saturating_sub(diff).as_secs_f64();
    println!(
        "attribution gradients, {} tokens: plain forward {plain:.2?}, differentiable forward {diff:.2?}, with backward {both:.2?}",
        prompts[0].len()
    );
    println!(
        "backward pass {backward:.3}s = {:.2}x the differentiable forward it differentiates (target <= 3x: {}), {:.2}x the plain forward",
        backward / diff.as_secs_f64(),
        if backward <= 3.0 * diff.as_secs_f64() { "met" } else { "NOT met" },
        backward / plain.as_secs_f64()
    );
    Ok(())
}

/// A second checkpoint of the lineage (the same weights under another audit) measuring with
/// the first audit's pinned instruments: its time against the first's, model load excluded,
/// and against the plain forward `plain` seconds.
fn lineage_second_audit(
    model: &probes::Model,
    policies: &[policies::Policy],
    first: &policies::RunResult,
    first_secs: f64,
    plain: f64,
) -> anyhow::Result<()> {
    let mut quiet = |_: &str| {};
    let mut opts = policies::engine::RunOptions {
        last_pass: Some(first),
        progress: &mut quiet,
        micro_batch: 16,
        lineage: None,
        store: None,
        reference: Some(first),
    };
    let (t, (second, _)) = time(|| Ok(policies::engine::run(model, policies, &mut opts)?))?;
    let reused = second.instruments == first.instruments;
    println!(
        "lineage: first audit {first_secs:.2}s, second (pinned instruments{}) {:.2}s: {:.2}x (target <= 1.2x)",
        if reused { " reused" } else { " NOT reused" },
        t.as_secs_f64(),
        t.as_secs_f64() / first_secs
    );
    let ratio = t.as_secs_f64() / plain;
    println!(
        "audit with the lineage's instruments in place: {ratio:.2}x the plain forward (target <= 2.0x: {})",
        if ratio <= 2.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

/// Text we wrote ourselves, tiled into fixed-length token windows.
const BENCH_TEXT: &str = "The audit daemon watches a directory of model checkpoints. When a new \
file settles, it hashes every byte, loads the weights, and reads the residual stream at the layers \
named in each policy. A sparse autoencoder turns those activations into features a reviewer can \
name, and a steering check measures how far one direction moves the model's behaviour. Every \
result is written to a signed log, so that an auditor can later confirm what was checked, on \
which prompts, and why the verdict came out the way it did. Ops teams want the service quiet and \
predictable; release engineers want a clear exit code; reviewers want evidence they can follow.";

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn time<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(Duration, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed(), v))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn forward(a: ForwardArgs) -> anyhow::Result<ExitCode> {
    // Refuse an unusable device before the minutes of CPU measurements.
    let device = a
        .device
        .as_deref()
        .map(probes::device_named)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (load, model) = time(|| crate::cmd::load_model(&a.model))?;
    let c = model.config().clone();
    let mut stream = Vec::new();
    while stream.len() < a.batch * a.tokens {
        stream.extend(model.codec.encode(BENCH_TEXT)?);
    }
    let prompts: Vec<Vec<u32>> = stream
        .chunks(a.tokens)
        .take(a.batch)
        .map(<[u32]>::to_vec)
        .collect();
    let n_tokens = (a.batch * a.tokens) as f64;
    let mid = c.n_layers / 2;
    let hook = HookPoint::ResidPost(mid);
    let plain = Hooks::new();
    let hooked = Hooks::new().capture(hook);
    println!(
        "model {} ({} layers, d_model {}), load {:.2}s, batch {}x{} tokens in micro-batches of {}, {} threads",
        model.path.display(),
        c.n_layers,
        c.d_model,
        load.as_secs_f64(),
        a.batch,
        a.tokens,
        a.micro_batch,
        rayon_threads()
    );
    let fwd = |h: &Hooks, u: Unembed| -> anyhow::Result<()> {
        // Logits are consumed micro-batch by micro-batch, as the policy engine does.
        model.transformer.forward_chunked(
            &prompts,
            a.micro_batch,
            Padding::Left,
            h,
            u,
            |_, out| {
                std::hint::black_box(&out.logits);
                Ok(())
            },
        )?;
        Ok(())
    };
    // The baseline for `forward_chunked`'s parallel micro-batches: the same micro-batches,
    // one after the other, each split over every thread.
    let serial = |h: &Hooks| -> anyhow::Result<()> {
        for chunk in prompts.chunks(a.micro_batch.max(1)) {
            let out = model
                .transformer
                .forward(chunk, Padding::Left, h, Unembed::All)?;
            std::hint::black_box(&out.logits);
        }
        Ok(())
    };
    // A warm-up pass, then each repetition measures every variant once, so that the machine's
    // noise spreads evenly over them.
    fwd(&plain, Unembed::All)?;
    let (mut t_plain, mut t_hooked, mut t_early, mut t_serial, mut t_last) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..a.reps {
        t_plain.push(time(|| fwd(&plain, Unembed::All))?.0);
        t_hooked.push(time(|| fwd(&hooked, Unembed::All))?.0);
        t_early.push(time(|| fwd(&hooked, Unembed::None))?.0);
        t_serial.push(time(|| serial(&hooked))?.0);
        t_last.push(time(|| fwd(&hooked, Unembed::Last))?.0);
    }
    let (p, h, e, s, l) = (
        median(t_plain),
        median(t_hooked),
        median(t_early),
        median(t_serial),
        median(t_last),
    );
    let tps = |d: Duration| n_tokens / d.as_secs_f64();
    println!(
        "plain forward (logits at every position):   {:>8.0} tok/s",
        tps(p)
    );
    println!(
        "hooked forward (capture {hook}):   {:>8.0} tok/s   overhead {:+.1}% vs plain",
        tps(h),
        (h.as_secs_f64() / p.as_secs_f64() - 1.0) * 100.0
    );
    println!(
        "hooked forward, one micro-batch at a time:    {:>8.0} tok/s   {:.2}x the time of the above",
        tps(s),
        s.as_secs_f64() / h.as_secs_f64()
    );
    // What a peer's prompt processing computes: the cache, and logits at the last position.
    println!(
        "hooked prompt processing (capture {hook}, last-position logits): {:>8.0} tok/s",
        tps(l)
    );
    println!(
        "capture {hook} only, early exit: {:>8.0} tok/s   {:.2}x plain",
        tps(e),
        p.as_secs_f64() / e.as_secs_f64()
    );

    let prompt = model.encode_prompt("Write a short note about checkpoints.", true)?;
    if let Some(path) = &a.prompts_out {
        let ids = serde_json::json!({
            "prompts": prompts,
            "gen_prompt": prompt,
            "gen_tokens": a.gen_tokens,
        });
        std::fs::write(path, ids.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let opts = GenerateOptions {
        max_tokens: a.gen_tokens,
        stop_tokens: vec![],
        ..Default::default()
    };
    let steer = candle_core::Tensor::ones(
        c.d_model,
        candle_core::DType::F32,
        model.transformer.device(),
    )?;
    let steering = Hooks::new().add(
        hook,
        Positions::All,
        (steer / (c.d_model as f64).sqrt())?,
        4.0,
    );
    let gen = |h: &Hooks| -> anyhow::Result<usize> {
        Ok(probes::generate(&model.transformer, std::slice::from_ref(&prompt), h, &opts)?[0].len())
    };
    gen(&plain)?; // warm-up (builds the Q8_0 decode weights when it decodes a step)
    println!("decode precision: {}", model.transformer.precision());
    let (g_plain, n_plain) = time(|| gen(&plain))?;
    let (g_steer, n_steer) = time(|| gen(&steering))?;
    let cpu_steer_tps = n_steer as f64 / g_steer.as_secs_f64();
    println!(
        "generation, no hooks:             {:>8.1} tok/s",
        n_plain as f64 / g_plain.as_secs_f64()
    );
    println!(
        "generation, steering at {hook}: {:>8.1} tok/s   {:.2}x no hooks",
        n_steer as f64 / g_steer.as_secs_f64(),
        (n_steer as f64 / g_steer.as_secs_f64()) / (n_plain as f64 / g_plain.as_secs_f64())
    );
    // Batched greedy generation as audits run it (32 rows at a time), in both precisions:
    // quantized (the file's K-quant blocks in the prefill and decode steps, a Q8_0 copy of
    // the other weights in decode steps) and f32.
    let rows: Vec<Vec<u32>> = prompts.iter().take(32).cloned().collect();
    let batched = |f32_decode: bool| -> anyhow::Result<usize> {
        let opts = GenerateOptions {
            max_tokens: 32,
            stop_tokens: vec![],
            f32_decode,
            ..Default::default()
        };
        let out = probes::generate(&model.transformer, &rows, &plain, &opts)?;
        Ok(out.iter().map(Vec::len).sum())
    };
    let (b_q8, n_q8) = time(|| batched(false))?;
    let (b_f32, n_f32) = time(|| batched(true))?;
    let q8_tps = n_q8 as f64 / b_q8.as_secs_f64();
    let f32_tps = n_f32 as f64 / b_f32.as_secs_f64();
    println!(
        "batched generation, {} prompts x 32 tokens: quantized {q8_tps:.1} tok/s, f32 {f32_tps:.1} tok/s ({:.2}x quantized)",
        rows.len(),
        f32_tps / q8_tps
    );
    let f32_mb = model_params(&c) as f64 * 4.0 / 1e6;
    if let Some(device) = &device {
        let cpu = DeviceBaseline {
            prompt_tps: tps(l),
            steer_tps: cpu_steer_tps,
            batched_tps: f32_tps,
        };
        let name = a.device.as_deref().unwrap_or_default();
        on_device(&model, (name, device), &prompts, &prompt, &a, cpu)?;
    }
    if let Some(rss) = peak_rss_mb() {
        println!(
            "peak RSS {:.0} MB; f32 weights {:.0} MB; budget 1.5x + 300 MB = {:.0} MB",
            rss * 1.048576,
            f32_mb,
            1.5 * f32_mb + 300.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The CPU's figures that a device's are printed against.
struct DeviceBaseline {
    prompt_tps: f64,
    steer_tps: f64,
    batched_tps: f64,
}

/// `bench forward --device`: the hooked prompt processing, the steered generation and the
/// batched greedy generation again, with the model's weights on `device`.
fn on_device(
    model: &probes::Model,
    (name, device): (&str, &candle_core::Device),
    prompts: &[Vec<u32>],
    prompt: &[u32],
    a: &ForwardArgs,
    cpu: DeviceBaseline,
) -> anyhow::Result<()> {
    let (moved, gpu) = time(|| {
        let gpu = model.transformer.on_device(device)?;
        device.synchronize()?;
        Ok(gpu)
    })?;
    let c = &gpu.config;
    let hook = HookPoint::ResidPost(c.n_layers / 2);
    let hooked = Hooks::new().capture(hook);
    // The device computes what the CPU does: the first micro-batch's last-position logits.
    let first = &prompts[..a.micro_batch.clamp(1, prompts.len())];
    let last = |t: &probes::Transformer| -> anyhow::Result<candle_core::Tensor> {
        let out = t.forward(first, Padding::Left, &hooked, Unembed::Last)?;
        let logits = out.logits.context("no logits")?;
        Ok(logits.to_device(&candle_core::Device::Cpu)?)
    };
    let (on_cpu, on_gpu) = (last(&model.transformer)?, last(&gpu)?);
    let scale = on_cpu.abs()?.max_all()?.to_scalar::<f32>()?;
    let diff = (&on_gpu - &on_cpu)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let same_top1 = on_cpu.argmax(1)?.to_vec1::<u32>()? == on_gpu.argmax(1)?.to_vec1::<u32>()?;
    // Kernels run asynchronously: a timed pass ends when the device has finished it.
    let prompt_pass = || -> anyhow::Result<()> {
        gpu.forward_chunked(
            prompts,
            a.micro_batch,
            Padding::Left,
            &hooked,
            Unembed::Last,
            |_, out| {
                std::hint::black_box(&out.logits);
                Ok(())
            },
        )?;
        device.synchronize()?;
        Ok(())
    };
    prompt_pass()?; // warm-up: kernel loading, cuBLAS handles
    let mut t = Vec::new();
    for _ in 0..a.reps.max(1) {
        t.push(time(prompt_pass)?.0);
    }
    let n_tokens = prompts.iter().map(Vec::len).sum::<usize>() as f64;
    let prompt_tps = n_tokens / median(t).as_secs_f64();
    let steer = candle_core::Tensor::ones(c.d_model, candle_core::DType::F32, device)?;
    let steering = Hooks::new().add(
        hook,
        Positions::All,
        (steer / (c.d_model as f64).sqrt())?,
        4.0,
    );
    let gen = |rows: &[Vec<u32>], h: &Hooks, max_tokens: usize| -> anyhow::Result<usize> {
        let opts = GenerateOptions {
            max_tokens,
            stop_tokens: vec![],
            ..Default::default()
        };
        let out = probes::generate(&gpu, rows, h, &opts)?;
        Ok(out.iter().map(Vec::len).sum())
    };
    let one = vec![prompt.to_vec()];
    gen(&one, &steering, 8)?; // warm-up
    let (g, n) = time(|| gen(&one, &steering, a.gen_tokens))?;
    let steer_tps = n as f64 / g.as_secs_f64();
    let rows: Vec<Vec<u32>> = prompts.iter().take(32).cloned().collect();
    gen(&rows, &Hooks::new(), 2)?; // warm-up at this batch's shapes
    let (b, nb) = time(|| gen(&rows, &Hooks::new(), 32))?;
    let batched_tps = nb as f64 / b.as_secs_f64();
    println!(
        "on {name} ({}; weights moved in {:.2}s):",
        gpu.precision(),
        moved.as_secs_f64()
    );
    println!(
        "  last-position logits of {} prompts against the CPU's: largest difference {diff:.2e} ({:.2e} of the largest logit); top-1 {}",
        first.len(),
        diff / scale.max(f32::MIN_POSITIVE),
        if same_top1 { "identical" } else { "DIFFERS" }
    );
    println!(
        "  hooked prompt processing (capture {hook}, last-position logits): {prompt_tps:>8.0} tok/s   {:.2}x the CPU's",
        prompt_tps / cpu.prompt_tps
    );
    println!(
        "  generation, steering at {hook}: {steer_tps:>8.1} tok/s   {:.2}x the CPU's (its decode precision above)",
        steer_tps / cpu.steer_tps
    );
    println!(
        "  batched generation, {} prompts x 32 tokens: {batched_tps:.1} tok/s   {:.2}x the CPU's f32 decode",
        rows.len(),
        batched_tps / cpu.batched_tps
    );
    Ok(())
}

fn model_params(c: &probes::ModelConfig) -> usize {
    let d = c.d_model;
    let attn = d * c.n_heads * c.head_dim * 2 + d * c.n_kv_heads * c.head_dim * 2;
    let mlp = 3 * d * c.d_mlp;
    let embed = c.vocab_size * d * if c.tie_embeddings { 1 } else { 2 };
    c.n_layers * (attn + mlp + 2 * d) + embed + d
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string())
    })
}

/// A record of realistic size: a run result with a few findings and their evidence (~2 KB).
fn realistic_record(i: u64) -> audit_log::RecordBody {
    let findings: Vec<serde_json::Value> = (0..4)
        .map(|c| {
            serde_json::json!({
                "check": format!("refusal-integrity/{c}"),
                "status": if (i + c).is_multiple_of(7) { "fail" } else { "pass" },
                "metric": 0.731 + c as f64 * 0.01,
                "evidence": {
                    "prompts": ["How do I pick a lock on my own front door?", "Write a poem about rain."],
                    "top_latents": [{"index": 1203, "label": "requests for harmful instructions", "attribution": 0.42}],
                    "tokens": [{"token": " lock", "activation": 3.21}, {"token": " door", "activation": 1.07}],
                },
            })
        })
        .collect();
    audit_log::RecordBody::Audit {
        model: audit_log::ModelSubject {
            path: format!("/srv/models/candidate-{i}"),
            root_sha256: format!("{:064x}", i),
            files: vec![audit_log::FileDigest {
                path: "model.safetensors".into(),
                sha256: format!("{:064x}", i + 1),
                size: 538_000_000,
            }],
        },
        inputs: vec![audit_log::InputDigest {
            kind: "policy".into(),
            path: "refusal.toml".into(),
            sha256: format!("{:064x}", 7),
        }],
        verdict: "pass".into(),
        result: serde_json::json!({ "findings": findings }),
    }
}

fn log(a: LogArgs) -> anyhow::Result<ExitCode> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("mechwatch-bench-log-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let path = dir.join("bench.db");
    let _ = std::fs::remove_file(&path);
    // A head witness without its log refuses a new log there (a deleted log).
    let _ = std::fs::remove_file(audit_log::store::head_path(&path));
    let signer = audit_log::Signer::generate();
    let public = signer.public();
    let size = serde_json::to_vec(&realistic_record(0))?.len();
    let mut log = audit_log::AuditLog::open(&path, Some(signer))?;

    let single_n = 300u64;
    let (t_single, ()) = time(|| {
        for i in 0..single_n {
            log.append(realistic_record(i))?;
        }
        Ok(())
    })?;
    let single_rate = single_n as f64 / t_single.as_secs_f64();
    let grouped_n = a.records.saturating_sub(single_n);
    let (t_group, ()) = time(|| {
        let mut i = single_n;
        while i < a.records {
            let n = (a.batch as u64).min(a.records - i);
            log.append_batch((i..i + n).map(realistic_record).collect())?;
            i += n;
        }
        Ok(())
    })?;
    let group_rate = grouped_n as f64 / t_group.as_secs_f64();
    drop(log);
    println!(
        "record body ~{size} bytes, {} records, synchronous=FULL, WAL",
        a.records
    );
    println!("durable appends, one commit each:      {single_rate:>9.0} /s");
    println!(
        "durable appends, group commit of {:>4}: {group_rate:>9.0} /s   {:.1}x single",
        a.batch,
        group_rate / single_rate
    );

    let conn = audit_log::store::open_reader(&path)?;
    let (t_verify, report) =
        time(|| audit_log::verify_log(&conn, &public, None).map_err(|f| anyhow::anyhow!("{f}")))?;
    let verify_rate = report.records as f64 / t_verify.as_secs_f64();
    // Baseline in the same run: one strict signature check per record, nothing else.
    let sample = audit_log::store::read_records(&conn, 0, 10_000)?;
    let (t_single_sig, ()) = time(|| {
        for r in &sample {
            let sig = ed25519_dalek::Signature::from_bytes(r.sig.as_slice().try_into()?);
            public.verify_strict(
                &audit_log::dsse::pae(audit_log::dsse::IN_TOTO_PAYLOAD_TYPE, &r.bytes),
                &sig,
            )?;
        }
        Ok(())
    })?;
    let sig_rate = sample.len() as f64 / t_single_sig.as_secs_f64();
    println!(
        "full verification (batched signatures, chain, checkpoints): {verify_rate:>9.0} records/s   {:.2}x one-by-one signature checks ({sig_rate:.0}/s)",
        verify_rate / sig_rate
    );
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}

fn sae(a: SaeBenchArgs) -> anyhow::Result<ExitCode> {
    use candle_core::{Device, Tensor};
    let model = crate::cmd::load_model(&a.model)?;
    let d = model.config().d_model;
    let n_lat = d * a.expansion;
    let tmp = std::env::temp_dir().join(format!("mechwatch-bench-sae-{}", std::process::id()));
    // A random SAE of the right shape, written and loaded like any SAELens SAE.
    std::fs::create_dir_all(&tmp)?;
    let w_enc = Tensor::randn(0f32, 0.05, (d, n_lat), &Device::Cpu)?;
    let w_dec = w_enc.t()?.contiguous()?;
    let tensors = vec![
        ("W_enc".to_string(), w_enc.clone()),
        (
            "b_enc".to_string(),
            Tensor::zeros(n_lat, candle_core::DType::F32, &Device::Cpu)?,
        ),
        ("W_dec".to_string(), w_dec),
        (
            "b_dec".to_string(),
            Tensor::zeros(d, candle_core::DType::F32, &Device::Cpu)?,
        ),
    ];
    probes::safetensors::write(
        &tmp.join("sae_weights.safetensors"),
        &tensors,
        &Default::default(),
    )?;
    std::fs::write(
        tmp.join("cfg.json"),
        serde_json::json!({"architecture": "topk", "d_in": d, "d_sae": n_lat, "k": a.k})
            .to_string(),
    )?;
    let sae = probes::sae::load_sae(&tmp)?;
    let x = Tensor::randn(0f32, 1.0, (a.tokens, d), &Device::Cpu)?;
    sae.encode_topk(&x)?; // warm-up
    let (mut t_mm, mut t_enc) = (Vec::new(), Vec::new());
    for _ in 0..a.reps {
        t_mm.push(
            time(|| {
                for start in (0..a.tokens).step_by(256) {
                    let xb = x.narrow(0, start, 256.min(a.tokens - start))?;
                    std::hint::black_box(xb.matmul(&w_enc)?);
                }
                Ok(())
            })?
            .0,
        );
        t_enc.push(time(|| Ok(std::hint::black_box(sae.encode_topk(&x)?.len())))?.0);
    }
    let (mm, enc) = (median(t_mm), median(t_enc));
    let rate = |t: Duration| a.tokens as f64 / t.as_secs_f64();
    println!(
        "SAE {d} -> {n_lat} latents (TopK k={}), {} tokens, {} threads",
        a.k,
        a.tokens,
        rayon_threads()
    );
    println!("dense matmul x W_enc alone:      {:>9.0} tok/s", rate(mm));
    println!(
        "encode (matmul + bias + top-k): {:>9.0} tok/s   {:.2}x the matmul alone",
        rate(enc),
        rate(enc) / rate(mm)
    );

    // Training throughput against the forward pass alone on the same windows.
    let hook = probes::sae::default::hook(model.config().n_layers);
    let point = model.hook(&hook)?;
    // A corpus longer than the run, so that training streams one forward pass per step as on
    // real corpora (a shorter one would be run once and trained on from memory).
    let per_copy = model.codec.encode(BENCH_TEXT)?.len().max(1) as u64;
    let docs = vec![BENCH_TEXT.repeat((a.train_tokens / per_copy + 2) as usize)];
    let cfg = probes::sae::train::TrainConfig {
        hook: hook.clone(),
        latents: n_lat,
        k: a.k,
        sparsity: probes::sae::train::Sparsity::TopK,
        tokens: a.train_tokens,
        context: 64,
        windows_per_step: 32,
        lr: 4e-4,
        seed: 0,
        dead_after_tokens: 1_000_000,
        checkpoint_every_steps: u64::MAX,
        window_shifts: 1,
        reshuffle_epochs: false,
    };
    let wins = probes::sae::train::windows(&model, &docs, 64, 0)?;
    let steps = a.train_tokens.div_ceil(32 * 63) as usize;
    let (t_fwd, ()) = time(|| {
        for s in 0..steps {
            let batch: Vec<Vec<u32>> = (0..32)
                .map(|i| wins[(s * 32 + i) % wins.len()].clone())
                .collect();
            std::hint::black_box(probes::sae::train::activations(&model, point, &batch)?);
        }
        Ok(())
    })?;
    let out = tmp.join("train");
    let (t_train, last) = time(|| {
        Ok(probes::sae::train::train(
            &model,
            &docs,
            &cfg,
            &out,
            |_| std::ops::ControlFlow::Continue(()),
        )?)
    })?;
    let fwd_rate = (steps * 32 * 63) as f64 / t_fwd.as_secs_f64();
    // Steady state: the trainer's own rate excludes its one-time set-up (tokenising, the
    // forward pass that fixes the input scale and b_dec).
    let _ = t_train;
    let train_rate = last.tokens_per_sec;
    println!("forward to {hook} alone:  {fwd_rate:>9.0} tok/s");
    println!(
        "training (forward + SAE step):           {train_rate:>9.0} tok/s   {:.2}x the forward's time",
        fwd_rate / train_rate
    );
    let _ = std::fs::remove_dir_all(&tmp);
    if a.sample_tokens > 0 {
        corpus_sampling(&model, a.sample_tokens)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The default SAE's corpus writing (one answer to each seed prompt, `tokens` new tokens)
/// with 32 prompts per batch, the baseline, against the recipe's batch.
fn corpus_sampling(model: &probes::Model, tokens: usize) -> anyhow::Result<()> {
    use probes::sae::default::{sample, Recipe};
    let recipe = Recipe::for_model(model);
    let rate = |batch: usize| -> anyhow::Result<f64> {
        let r = Recipe {
            samples_per_prompt: 1,
            max_new_tokens: tokens,
            generation_batch: batch,
            ..recipe.clone()
        };
        let (t, n) = time(|| {
            Ok(sample(model, &r, |_, _| {})?
                .iter()
                .map(Vec::len)
                .sum::<usize>())
        })?;
        Ok(n as f64 / t.as_secs_f64())
    };
    let base = rate(32)?;
    let ours = rate(recipe.generation_batch)?;
    println!(
        "SAE corpus sampling, {tokens} tokens per answer, {} batches at once:",
        rayon_threads()
    );
    println!("  32 prompts per batch:   {base:>9.0} tok/s");
    println!(
        "  {:>3} prompts per batch:  {ours:>9.0} tok/s   {:.2}x 32",
        recipe.generation_batch,
        ours / base
    );
    Ok(())
}
