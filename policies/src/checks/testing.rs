//! In-process audits on a tiny random model for the check modules' tests: the model, an SAE
//! for it and a policy folder are written by the test, then run through the real engine.

use std::collections::BTreeMap;
use std::path::Path;

use probes::testing::{self, Rand, D};

use crate::engine::{run, RunOptions};
use crate::result::{Finding, RunResult};
use crate::Policy;

/// A tiny model with a policy folder beside it.
pub(crate) struct Tiny {
    pub dir: tempfile::TempDir,
    pub model: probes::Model,
    /// The digest of the SAE at `sae/` (16 TopK latents at `blocks.0.hook_resid_post`).
    pub sae_sha: String,
}

impl Tiny {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = testing::load(&testing::llama_dir(dir.path(), 7));
        let sae_sha = write_sae(&dir.path().join("policy/sae"));
        let prompts = dir.path().join("policy/prompts");
        std::fs::create_dir_all(&prompts).expect("prompts folder");
        // Two sets of distinct words, 8 prompts each.
        let set = |offset: usize| -> String {
            (0..8)
                .map(|i| {
                    (0..5)
                        .map(|j| format!("w{}", offset + 2 * ((i + j) % 20)))
                        .collect::<Vec<_>>()
                        .join(" ")
                        + "\n"
                })
                .collect()
        };
        std::fs::write(prompts.join("pos.txt"), set(10)).expect("pos prompts");
        std::fs::write(prompts.join("neg.txt"), set(11)).expect("neg prompts");
        Self {
            dir,
            model,
            sae_sha,
        }
    }

    /// Write `checks` (TOML) after a head that defines prompt sets `pos` and `neg`, SAE `s`
    /// and direction `d` (at `blocks.1.hook_resid_post`), and load it.
    pub fn policy(&self, checks: &str) -> Result<Policy, Vec<crate::PolicyError>> {
        self.policy_at("blocks.1.hook_resid_post", checks)
    }

    /// [`Tiny::policy`] with direction `d` at `hook`.
    pub fn policy_at(&self, hook: &str, checks: &str) -> Result<Policy, Vec<crate::PolicyError>> {
        let text = format!(
            r#"schema = 1
name = "tiny"
version = "1"

[prompts.pos]
file = "prompts/pos.txt"
chat = false

[prompts.neg]
file = "prompts/neg.txt"
chat = false

[saes.s]
path = "sae"
sha256 = "{}"

[directions.d]
hook = "{hook}"
positive = "pos"
negative = "neg"
{checks}"#,
            self.sae_sha
        );
        let path = self.dir.path().join("policy/tiny.toml");
        std::fs::write(&path, text).expect("policy file");
        Policy::load(&path)
    }

    /// Run `checks` and return the whole result.
    pub fn run(&self, checks: &str, last_pass: Option<&RunResult>) -> RunResult {
        self.run_with(checks, last_pass, None)
    }

    /// Run `checks` with `reference` as the lineage's reference.
    pub fn run_with(
        &self,
        checks: &str,
        last_pass: Option<&RunResult>,
        reference: Option<&RunResult>,
    ) -> RunResult {
        let policy = self.policy(checks).expect("the test policy validates");
        let mut quiet = |_: &str| {};
        let mut opts = RunOptions {
            last_pass,
            progress: &mut quiet,
            micro_batch: 3,
            lineage: None,
            store: Some(self.store()),
            reference,
        };
        run(&self.model, &[policy], &mut opts)
            .expect("the test policy resolves")
            .0
    }

    /// Run `policy` on `model` (this test's store), with `last_pass` as the lineage's last
    /// pass.
    pub fn run_on(
        &self,
        model: &probes::Model,
        policy: &Policy,
        last_pass: Option<&RunResult>,
    ) -> RunResult {
        let mut quiet = |_: &str| {};
        let mut opts = RunOptions {
            last_pass,
            progress: &mut quiet,
            micro_batch: 3,
            lineage: None,
            store: Some(self.store()),
            reference: None,
        };
        run(model, std::slice::from_ref(policy), &mut opts)
            .expect("the test policy resolves")
            .0
    }

    /// The instrument store of this test.
    pub fn store(&self) -> std::path::PathBuf {
        self.dir.path().join("store")
    }

    /// The only finding of `checks`.
    pub fn finding(&self, checks: &str) -> Finding {
        let r = self.run(checks, None);
        r.policies[0].findings[0].clone()
    }
}

/// Run the policy file at `path` on `model` through the real engine.
pub(crate) fn run_policy(model: &probes::Model, path: &Path) -> RunResult {
    let policy = Policy::load(path).expect("the test policy validates");
    let mut quiet = |_: &str| {};
    let mut opts = RunOptions {
        last_pass: None,
        progress: &mut quiet,
        micro_batch: 3,
        lineage: None,
        store: None,
        reference: None,
    };
    run(model, &[policy], &mut opts)
        .expect("the test policy resolves")
        .0
}

/// A metric's value by its name's start.
pub(crate) fn metric(f: &Finding, prefix: &str) -> f64 {
    f.metrics
        .iter()
        .find(|m| m.name.starts_with(prefix))
        .unwrap_or_else(|| panic!("no metric {prefix} in {f:?}"))
        .value
}

/// A SAELens TopK folder for the tiny model's residual stream; returns its digest.
fn write_sae(dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("SAE folder");
    let cfg = serde_json::json!({
        "architecture": "topk", "d_in": D, "d_sae": 16, "k": 4, "dtype": "float32",
        "apply_b_dec_to_input": true, "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.0.hook_resid_post"}
    });
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).expect("cfg.json");
    let mut r = Rand::new(11);
    let tensors = vec![
        ("W_enc".to_string(), r.tensor(&[D, 16], 0.3)),
        ("b_enc".to_string(), r.tensor(&[16], 0.1)),
        ("W_dec".to_string(), r.tensor(&[16, D], 0.3)),
        ("b_dec".to_string(), r.tensor(&[D], 0.1)),
    ];
    probes::safetensors::write(
        &dir.join("sae_weights.safetensors"),
        &tensors,
        &BTreeMap::new(),
    )
    .expect("SAE weights");
    probes::sae::load_sae(dir)
        .expect("the SAE loads")
        .manifest
        .root()
}
