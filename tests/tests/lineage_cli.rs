//! A lineage of two checkpoints through `mechwatch check --log --lineage`: the default model,
//! then an HF copy of it with noise in one MLP matrix. The second audit measures with the
//! first audit's instruments (the shipped default SAE and the stored direction) and trains
//! nothing, so drift compares like with like; an edited stored direction is an error that
//! names the file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use audit_log::record::{RecordBody, Statement};
use e2e::*;

const POLICY: &str = r#"schema = 1
name = "lineage"
version = "1"

[prompts.pos]
file = "prompts/pos.txt"

[prompts.neg]
file = "prompts/neg.txt"

[saes.default]
builtin = "default"

[directions.d]
hook = "blocks.10.hook_resid_post"
positive = "pos"
negative = "neg"

[[checks]]
id = "separates"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "pos"
negative = "neg"
min_auroc = 0.5

[[checks]]
id = "drift"
kind = "drift"
severity = "medium"
sae = "default"
prompts = "pos"
baseline = "last-pass"
max_rate_change = 0.05
"#;

/// The MLP matrix the noisy copy changes: before both the direction's and the SAE's hooks.
const NOISY_TENSOR: &str = "model.layers.3.mlp.down_proj.weight";

struct Env {
    tmp: tempfile::TempDir,
    home: PathBuf,
    db: PathBuf,
    key: PathBuf,
    policy: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let policy = tmp.path().join("policy");
        sample_policy(&policy, "lineage.toml", POLICY);
        let key = tmp.path().join("key.pem");
        let env = Self {
            db: tmp.path().join("log.db"),
            key,
            policy,
            home,
            tmp,
        };
        let o = env.run(&["key", "generate", "--out", env.key.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        env
    }

    /// `mechwatch args...` with its cache (SAEs, instruments) in this test's own folder.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(mechwatch_bin())
            .args(args)
            .env("MECHWATCH_HOME", &self.home)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("running mechwatch")
    }

    fn check(&self, model: &Path) -> (Output, serde_json::Value) {
        self.check_with(model, &[])
    }

    fn check_with(&self, model: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
        let mut args = vec![
            "check",
            "--model",
            model.to_str().unwrap(),
            "--policy",
            self.policy.to_str().unwrap(),
            "--format",
            "json",
            "-q",
            "--log",
            self.db.to_str().unwrap(),
            "--key",
            self.key.to_str().unwrap(),
            "--lineage",
            "smol",
        ];
        args.extend_from_slice(extra);
        let o = self.run(&args);
        let v = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&o), stderr(&o)));
        (o, v)
    }

    /// Every file under the cache, by its path there.
    fn cache_listing(&self) -> BTreeSet<String> {
        fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, root, out);
                } else {
                    out.insert(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.home, &self.home, &mut out);
        out
    }

    /// The `instruments` of each audit record in the log, in order.
    fn recorded_pins(&self) -> Vec<serde_json::Value> {
        let conn = rusqlite::Connection::open(&self.db).unwrap();
        let rows = audit_log::store::read_records_from(&conn, 0, 100).unwrap();
        rows.iter()
            .filter_map(|r| {
                let st: Statement = serde_json::from_slice(&r.bytes).unwrap();
                match st.predicate.record {
                    RecordBody::Audit { result, .. } => Some(result["instruments"].clone()),
                    _ => None,
                }
            })
            .collect()
    }
}

fn finding<'a>(r: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    r["policies"][0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no finding {check} in {r}"))
}

/// The default model as an HF directory, with Gaussian noise (sigma 1e-3, fixed seed) added
/// to one MLP matrix of the f32 safetensors file, in place.
fn noisy_copy(env: &Env, gguf: &Path) -> PathBuf {
    let dir = env.tmp.path().join("smol-nudged");
    let o = env.run(&[
        "model",
        "convert",
        gguf.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[NOISY_TENSOR];
    assert_eq!(t["dtype"], "F32", "{t}");
    let begin = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + n + t["data_offsets"][1].as_u64().unwrap() as usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    for chunk in bytes[begin..end].chunks_exact_mut(4) {
        let x = f32::from_le_bytes(chunk.try_into().unwrap());
        let noise = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
        chunk.copy_from_slice(&(x + (1e-3 * noise) as f32).to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    dir
}

#[test]
fn a_nudged_checkpoint_reuses_its_lineages_instruments() {
    let env = Env::new();
    let gguf = default_model();
    let nudged = noisy_copy(&env, &gguf);

    // The reference: the default model. Its SAE is the shipped one, its direction is
    // computed on it and stored. Drift has no baseline yet: a warning, which still passes.
    let (o, first) = env.check(&gguf);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let pins = first["instruments"].as_array().unwrap().clone();
    let pin = |kind: &str| {
        pins.iter()
            .find(|p| p["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} pinned: {first}"))
            .clone()
    };
    let (sae, direction) = (pin("sae"), pin("direction"));
    let reference = first["model"]["digest"].as_str().unwrap();
    assert_eq!(sae["origin"], "shipped");
    assert_eq!(direction["reference"], reference);
    assert_eq!(direction["origin"], format!("built on {reference}"));
    let cache = env.cache_listing();
    let stored = format!(
        "instruments/directions/{}.safetensors",
        direction["sha256"].as_str().unwrap()
    );
    assert!(cache.contains(&stored), "{cache:?}");

    // The nudged copy: another checkpoint of the same lineage.
    let (o, second) = env.check(&nudged);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_ne!(second["model"]["digest"], first["model"]["digest"]);
    // Measured with the same instruments, and nothing was trained or computed anew: the
    // cache holds exactly the files it held.
    assert_eq!(second["instruments"], first["instruments"]);
    assert_eq!(env.cache_listing(), cache);
    // Drift compares like with like (the same SAE) and the checkpoints barely differ.
    let drift = finding(&second, "drift");
    assert_eq!(drift["status"], "pass", "{drift}");
    assert_eq!(finding(&second, "separates")["status"], "pass");
    // The signed records name the pinned digests.
    let recorded = env.recorded_pins();
    assert_eq!(recorded.len(), 2);
    for r in &recorded {
        assert_eq!(r, &first["instruments"]);
    }

    // An edited stored direction: the next audit cannot use it, and says which file.
    let path = env.home.join(&stored);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let (o, third) = env.check(&nudged);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(third["verdict"], "error");
    let f = finding(&third, "separates");
    assert_eq!(f["status"], "error", "{f}");
    let why = f["explanation"].as_str().unwrap();
    for part in [
        path.display().to_string(),
        "lineage.toml".to_string(),
        "[directions.d]".to_string(),
        "no longer matches".to_string(),
    ] {
        assert!(why.contains(&part), "{part}: {why}");
    }
}

#[test]
fn a_base_checkpoint_sets_the_lineages_instruments() {
    let env = Env::new();
    let gguf = default_model();
    let nudged = noisy_copy(&env, &gguf);
    let info = env.run(&["model", "info", "--json", gguf.to_str().unwrap()]);
    assert!(info.status.success(), "{}", stderr(&info));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let base = info["digest"].as_str().unwrap();

    // The first audit of the lineage, of the nudged copy, measures with the base's
    // instruments: the shipped SAE (nothing trained) and the direction computed on the base.
    let (o, r) = env.check_with(&nudged, &["--base", gguf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_ne!(r["model"]["digest"], base);
    let pins = r["instruments"].as_array().unwrap();
    let sae = pins.iter().find(|p| p["kind"] == "sae").unwrap();
    let direction = pins.iter().find(|p| p["kind"] == "direction").unwrap();
    assert_eq!(sae["origin"], "shipped");
    assert_eq!(direction["reference"], base);
    assert_eq!(direction["origin"], format!("built on {base}"));
    let trained: Vec<String> = env
        .cache_listing()
        .into_iter()
        .filter(|f| f.starts_with("sae/default-") || f.starts_with("sae/corpus-"))
        .collect();
    assert!(trained.is_empty(), "{trained:?}");
}

/// A gate run on a model whose default SAE is not built trains nothing: each check that reads
/// the SAE is an `error` finding saying what is missing, the command that builds it and about
/// how long that takes; the checks that do not read it still run.
#[test]
fn a_gate_run_never_trains_a_missing_default_sae() {
    let env = Env::new();
    let model = probes::testing::llama_dir(env.tmp.path(), 7);
    let policy = env.tmp.path().join("tiny");
    std::fs::create_dir_all(policy.join("prompts")).unwrap();
    std::fs::write(
        policy.join("prompts/pos.txt"),
        "w1 w2 w3\nw1 w4 w5\nw1 w6 w7\n",
    )
    .unwrap();
    std::fs::write(
        policy.join("prompts/neg.txt"),
        "w9 w2 w3\nw9 w4 w5\nw9 w6 w7\n",
    )
    .unwrap();
    let text = r#"schema = 1
name = "tiny"
version = "1"

[prompts.pos]
file = "prompts/pos.txt"
chat = false

[prompts.neg]
file = "prompts/neg.txt"
chat = false

[saes.default]
builtin = "default"

[directions.d]
hook = "blocks.1.hook_resid_post"
positive = "pos"
negative = "neg"

[[checks]]
id = "separates"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "pos"
negative = "neg"
min_auroc = 0.5

[[checks]]
id = "feature"
kind = "feature_probe"
severity = "low"
sae = "default"
latents = [0]

[[checks.expect]]
prompts = "pos"
min_active_fraction = 0.0
"#;
    std::fs::write(policy.join("tiny.toml"), text).unwrap();
    let o = env.run(&[
        "check",
        "--model",
        model.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--format",
        "json",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&o), stderr(&o)));
    assert_eq!(r["verdict"], "error", "{r}");
    let feature = finding(&r, "feature");
    assert_eq!(feature["status"], "error", "{feature}");
    let why = feature["explanation"].as_str().unwrap();
    for part in [
        "tiny.toml",
        "[saes.default]",
        "not built for this model",
        &format!("mechwatch sae default --model {}", model.display()),
        "minutes on two cores",
    ] {
        assert!(why.contains(part), "{part}: {why}");
    }
    let separates = finding(&r, "separates");
    assert_ne!(separates["status"], "error", "{separates}");
    let trained: Vec<String> = env
        .cache_listing()
        .into_iter()
        .filter(|p| p.starts_with("sae"))
        .collect();
    assert!(
        trained.is_empty(),
        "a gate run started a training: {trained:?}"
    );
}
