//! Interoperability with SAELens itself, not only with our reading of its format: SAEs that
//! SAELens saves load here and encode as SAELens encodes them, and the default SAE that
//! mechwatch trains (TopK, and BatchTopK saved as `jumprelu`) loads in SAELens unchanged and
//! encodes real activations as it does here.
//!
//! SAELens runs in Python: `MECHWATCH_SAELENS_PYTHON` names an interpreter with `sae-lens`
//! installed (`scripts/test-all` makes one in the cache directory).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use e2e::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/saelens_interop.py");

fn python() -> PathBuf {
    let var = std::env::var_os("MECHWATCH_SAELENS_PYTHON").expect(
        "MECHWATCH_SAELENS_PYTHON must name a Python with sae-lens installed \
         (scripts/test-all sets one up)",
    );
    PathBuf::from(var)
}

fn saelens(args: &[&str]) {
    let o = Command::new(python())
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("run SAELens");
    assert!(
        o.status.success(),
        "SAELens failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn read(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Largest absolute difference, relative to the largest magnitude in `want` (at least 1).
fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    max_abs_diff(got, want) / max_abs(want).max(1.0)
}

/// Rows whose set of active latents differs between the two encodings.
fn rows_with_other_latents(got: &Tensor, want: &Tensor) -> usize {
    let (g, w) = (
        got.to_vec2::<f32>().unwrap(),
        want.to_vec2::<f32>().unwrap(),
    );
    g.iter()
        .zip(&w)
        .filter(|(g, w)| {
            g.iter()
                .zip(w.iter())
                .any(|(a, b)| (*a > 0.0) != (*b > 0.0))
        })
        .count()
}

#[test]
fn saes_saved_by_saelens_encode_here_as_in_saelens() {
    let tmp = tempfile::tempdir().unwrap();
    saelens(&["make", tmp.path().to_str().unwrap()]);
    for arch in [
        "standard",
        "standard_norm",
        "jumprelu",
        "topk",
        "gated",
        "batchtopk",
    ] {
        let dir = tmp.path().join(arch);
        let sae = probes::sae::load_sae(&dir).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let want = read(&dir.join("expected.safetensors"));
        let feats = sae.encode(&want["x"]).unwrap();
        assert_eq!(rows_with_other_latents(&feats, &want["feats"]), 0, "{arch}");
        let d = rel_diff(&feats, &want["feats"]);
        assert!(d < 1e-4, "{arch}: latents differ from SAELens's by {d}");
        let d = rel_diff(&sae.reconstruct(&want["x"]).unwrap(), &want["recon"]);
        assert!(
            d < 1e-4,
            "{arch}: reconstruction differs from SAELens's by {d}"
        );
    }
}

#[test]
fn the_default_sae_loads_in_saelens_and_encodes_real_activations_as_here() {
    default_model();
    let o = mechwatch(&["sae", "default"]);
    assert!(o.status.success(), "{}", stderr(&o));
    encodes_real_activations_as_saelens(Path::new(stdout(&o).trim()));
}

/// A BatchTopK SAE that `mechwatch sae train` saved (as SAELens `jumprelu`, one threshold)
/// loads in SAELens and encodes as it does here.
#[test]
fn a_batchtopk_sae_trained_here_loads_in_saelens_and_encodes_as_here() {
    default_model();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(
        &corpus,
        format!("{HARMLESS_SAMPLE}{HARMFUL_SAMPLE}").repeat(6),
    )
    .unwrap();
    let out = tmp.path().join("sae");
    let o = train_small_batchtopk_sae(&corpus, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    encodes_real_activations_as_saelens(&out);
}

/// SAELens loads the SAE in `sae_dir` and encodes and reconstructs real activations at its
/// hook, for real prompts, as mechwatch does.
fn encodes_real_activations_as_saelens(sae_dir: &Path) {
    let sae = probes::sae::load_sae(sae_dir).unwrap();
    let hook = sae.hook.clone().expect("the SAE names its hook");

    // Real activations at the SAE's hook, for real prompts.
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, format!("{HARMFUL_SAMPLE}{HARMLESS_SAMPLE}")).unwrap();
    let acts = tmp.path().join("acts.safetensors");
    let o = mechwatch(&[
        "capture",
        "--model",
        "default",
        "--hook",
        &hook,
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        acts.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let captured = read(&acts);
    let lengths = captured["lengths"].to_vec1::<u32>().unwrap();
    let rows: Vec<Tensor> = lengths
        .iter()
        .enumerate()
        .map(|(p, &len)| {
            captured[hook.as_str()]
                .get(p)
                .unwrap()
                .narrow(0, 0, len as usize)
                .unwrap()
        })
        .collect();
    let x = Tensor::cat(&rows, 0).unwrap();
    assert!(x.dim(0).unwrap() > 50);
    let x_path = tmp.path().join("x.safetensors");
    candle_core::safetensors::save(
        &[("x".to_string(), x.clone())].into_iter().collect(),
        &x_path,
    )
    .unwrap();

    let out = tmp.path().join("saelens.safetensors");
    saelens(&[
        "encode",
        sae_dir.to_str().unwrap(),
        x_path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let want = read(&out);
    let feats = sae.encode(&x).unwrap();
    let fired = feats.to_vec2::<f32>().unwrap().concat();
    assert!(fired.iter().any(|v| *v > 0.0), "no latent fired");
    assert_eq!(rows_with_other_latents(&feats, &want["feats"]), 0);
    let d = rel_diff(&feats, &want["feats"]);
    assert!(d < 1e-4, "latents differ from SAELens's by {d}");
    let d = rel_diff(&sae.reconstruct(&x).unwrap(), &want["recon"]);
    assert!(d < 1e-4, "reconstruction differs from SAELens's by {d}");
}
