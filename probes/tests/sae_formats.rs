//! Every SAE format and normalisation mode against known answers computed here, straight from
//! the formulas (SAELens: `x' = norm(x) - b_dec * apply; h = x' W_enc + b_enc`, then the
//! activation; decode `a W_dec + b_dec`, then undo the normalisation).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::Rand;
use probes::sae::{load_sae, Activation, LatentEdit};

const D_IN: usize = 8;
const D_SAE: usize = 24;

struct Ref {
    w_enc: Vec<Vec<f32>>, // [d_in][d_sae]
    b_enc: Vec<f32>,
    w_dec: Vec<Vec<f32>>, // [d_sae][d_in]
    b_dec: Vec<f32>,
    threshold: Vec<f32>,
}

fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

fn reference(
    r: &Ref,
    x: &[f32],
    arch: &str,
    apply_b_dec: bool,
    norm: &str,
    k: usize,
) -> (Vec<f32>, Vec<f32>, f32) {
    let n = x.len() as f32;
    let (xn, scale, shift): (Vec<f32>, f32, f32) = match norm {
        "constant_norm_rescale" => {
            let s = (D_IN as f32).sqrt() / x.iter().map(|v| v * v).sum::<f32>().sqrt();
            (x.iter().map(|v| v * s).collect(), 1.0 / s, 0.0)
        }
        "layer_norm" => {
            let mu = x.iter().sum::<f32>() / n;
            let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / n;
            let sd = (var + 1e-5).sqrt();
            (x.iter().map(|v| (v - mu) / sd).collect(), sd, mu)
        }
        "expected_average_only_in" => (x.iter().map(|v| v * 2.5).collect(), 1.0 / 2.5, 0.0),
        _ => (x.to_vec(), 1.0, 0.0),
    };
    let xin: Vec<f32> = (0..D_IN)
        .map(|i| xn[i] - if apply_b_dec { r.b_dec[i] } else { 0.0 })
        .collect();
    let h: Vec<f32> = (0..D_SAE)
        .map(|j| (0..D_IN).map(|i| xin[i] * r.w_enc[i][j]).sum::<f32>() + r.b_enc[j])
        .collect();
    let a: Vec<f32> = match arch {
        "relu" => h.iter().map(|v| v.max(0.0)).collect(),
        "jumprelu" => h
            .iter()
            .zip(&r.threshold)
            .map(|(v, t)| if v > t { v.max(0.0) } else { 0.0 })
            .collect(),
        "topk" => {
            let mut idx: Vec<usize> = (0..D_SAE).collect();
            idx.sort_by(|&a, &b| h[b].total_cmp(&h[a]));
            let mut a = vec![0.0; D_SAE];
            for &i in &idx[..k] {
                a[i] = h[i].max(0.0);
            }
            a
        }
        _ => unreachable!(),
    };
    let y: Vec<f32> = (0..D_IN)
        .map(|i| {
            ((0..D_SAE).map(|j| a[j] * r.w_dec[j][i]).sum::<f32>() + r.b_dec[i]) * scale + shift
        })
        .collect();
    (a, y, scale)
}

fn weights(seed: u64) -> (Vec<(String, Tensor)>, Ref) {
    let mut rng = Rand::new(seed);
    let w_enc = rng.tensor(&[D_IN, D_SAE], 1.0);
    let b_enc = rng.tensor(&[D_SAE], 0.3);
    let w_dec = rng.tensor(&[D_SAE, D_IN], 1.0);
    let b_dec = rng.tensor(&[D_IN], 0.5);
    let threshold = (rng.tensor(&[D_SAE], 0.5) + 0.5).unwrap();
    let r = Ref {
        w_enc: vec2(&w_enc),
        b_enc: b_enc.to_vec1().unwrap(),
        w_dec: vec2(&w_dec),
        b_dec: b_dec.to_vec1().unwrap(),
        threshold: threshold.to_vec1().unwrap(),
    };
    let t = vec![
        ("W_enc".to_string(), w_enc),
        ("b_enc".to_string(), b_enc),
        ("W_dec".to_string(), w_dec),
        ("b_dec".to_string(), b_dec),
        ("threshold".to_string(), threshold),
    ];
    (t, r)
}

fn write_saelens(dir: &Path, cfg: serde_json::Value, t: &[(String, Tensor)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    probes::safetensors::write(&dir.join("sae_weights.safetensors"), t, &BTreeMap::new()).unwrap();
}

fn inputs() -> Tensor {
    Rand::new(99).tensor(&[5, D_IN], 3.0)
}

fn check(sae: &probes::sae::Sae, r: &Ref, arch: &str, apply: bool, norm: &str, k: usize) {
    let x = inputs();
    let acts = sae.encode(&x).unwrap().to_vec2::<f32>().unwrap();
    let recon = sae.reconstruct(&x).unwrap().to_vec2::<f32>().unwrap();
    let coefficients = sae.contributions(&x).unwrap().to_vec2::<f32>().unwrap();
    for (row, xr) in x.to_vec2::<f32>().unwrap().iter().enumerate() {
        let (a, y, scale) = reference(r, xr, arch, apply, norm, k);
        // A latent's coefficient on its decoder row in the reconstruction: the activation
        // times the normalisation's scale.
        for j in 0..D_SAE {
            let want = a[j] * scale;
            assert!(
                (coefficients[row][j] - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{arch}/{norm}: coefficient of latent {j} in row {row}: {} vs {want}",
                coefficients[row][j]
            );
        }
        for j in 0..D_SAE {
            assert!(
                (acts[row][j] - a[j]).abs() < 1e-4,
                "{arch}/{norm}: latent {j} of row {row}: {} vs {}",
                acts[row][j],
                a[j]
            );
        }
        for i in 0..D_IN {
            assert!(
                (recon[row][i] - y[i]).abs() < 1e-3 * (1.0 + y[i].abs()),
                "{arch}/{norm}: recon {i}: {} vs {}",
                recon[row][i],
                y[i]
            );
        }
    }
}

#[test]
fn saelens_v6_every_architecture_and_normalisation() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, r) = weights(1);
    for (arch, k) in [("standard", 0), ("jumprelu", 0), ("topk", 5)] {
        for norm in [
            "none",
            "constant_norm_rescale",
            "layer_norm",
            "expected_average_only_in",
        ] {
            let dir = tmp.path().join(format!("{arch}-{norm}"));
            let mut cfg = serde_json::json!({
                "architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
                "apply_b_dec_to_input": true, "normalize_activations": norm,
                "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"}
            });
            if k > 0 {
                cfg["k"] = k.into();
            }
            if norm == "expected_average_only_in" {
                cfg["norm_scaling_factor"] = 2.5.into();
            }
            let tensors: Vec<_> = t
                .iter()
                .filter(|(n, _)| arch == "jumprelu" || n != "threshold")
                .cloned()
                .collect();
            write_saelens(&dir, cfg, &tensors);
            let sae = load_sae(&dir).unwrap();
            assert_eq!(sae.hook.as_deref(), Some("blocks.1.hook_resid_post"));
            let a = match arch {
                "standard" => "relu",
                a => a,
            };
            check(&sae, &r, a, true, norm, k);
        }
    }
}

#[test]
fn batchtopk_saved_as_jumprelu_and_gated() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, r) = weights(2);
    let dir = tmp.path().join("batchtopk");
    write_saelens(
        &dir,
        serde_json::json!({"architecture": "batchtopk", "d_in": D_IN, "d_sae": D_SAE, "k": 4}),
        &t,
    );
    let sae = load_sae(&dir).unwrap();
    assert_eq!(sae.activation, Activation::JumpRelu);
    check(&sae, &r, "jumprelu", true, "none", 0);

    // Gated: active where x' W_enc + b_gate > 0, magnitude relu(x' (W_enc * exp(r_mag)) + b_mag).
    let mut rng = Rand::new(3);
    let b_gate = rng.tensor(&[D_SAE], 0.5);
    let b_mag = rng.tensor(&[D_SAE], 0.5);
    let r_mag = rng.tensor(&[D_SAE], 0.5);
    let mut g: Vec<(String, Tensor)> = t
        .iter()
        .filter(|(n, _)| n != "b_enc" && n != "threshold")
        .cloned()
        .collect();
    g.extend([
        ("b_gate".into(), b_gate.clone()),
        ("b_mag".into(), b_mag.clone()),
        ("r_mag".into(), r_mag.clone()),
    ]);
    let dir = tmp.path().join("gated");
    write_saelens(
        &dir,
        serde_json::json!({"architecture": "gated", "d_in": D_IN, "d_sae": D_SAE}),
        &g,
    );
    let sae = load_sae(&dir).unwrap();
    let x = inputs();
    let acts = sae.encode(&x).unwrap().to_vec2::<f32>().unwrap();
    let (bg, bm, rm): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        b_gate.to_vec1().unwrap(),
        b_mag.to_vec1().unwrap(),
        r_mag.to_vec1().unwrap(),
    );
    for (row, xr) in x.to_vec2::<f32>().unwrap().iter().enumerate() {
        for j in 0..D_SAE {
            let xin: Vec<f32> = (0..D_IN).map(|i| xr[i] - r.b_dec[i]).collect();
            let dot: f32 = (0..D_IN).map(|i| xin[i] * r.w_enc[i][j]).sum();
            let want = if dot + bg[j] > 0.0 {
                (dot * rm[j].exp() + bm[j]).max(0.0)
            } else {
                0.0
            };
            assert!((acts[row][j] - want).abs() < 1e-4, "gated latent {j}");
        }
    }
}

#[test]
fn saelens_pre_v6_config_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, r) = weights(4);
    let dir = tmp.path().join("old");
    let tensors: Vec<_> = t
        .iter()
        .filter(|(n, _)| n != "threshold")
        .cloned()
        .collect();
    write_saelens(
        &dir,
        serde_json::json!({"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_pre",
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": false,
            "normalize_activations": "none", "model_name": "tiny"}),
        &tensors,
    );
    let sae = load_sae(&dir).unwrap();
    assert_eq!(sae.format, "saelens-pre-v6");
    assert_eq!(sae.hook.as_deref(), Some("blocks.0.hook_resid_pre"));
    check(&sae, &r, "topk", false, "none", 3);
}

#[test]
fn sparsify_folder_loads_with_transposed_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, r) = weights(5);
    let get = |n: &str| t.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let dir = tmp.path().join("layers.1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cfg.json"), serde_json::json!({"activation": "topk", "k": 4, "num_latents": D_SAE, "normalize_decoder": true, "d_in": D_IN}).to_string()).unwrap();
    let st = vec![
        (
            "encoder.weight".to_string(),
            get("W_enc").t().unwrap().contiguous().unwrap(),
        ),
        ("encoder.bias".to_string(), get("b_enc")),
        ("W_dec".to_string(), get("W_dec")),
        ("b_dec".to_string(), get("b_dec")),
    ];
    probes::safetensors::write(&dir.join("sae.safetensors"), &st, &BTreeMap::new()).unwrap();
    let sae = load_sae(&dir).unwrap();
    assert_eq!(sae.hook.as_deref(), Some("blocks.1.hook_resid_post"));
    check(&sae, &r, "topk", true, "none", 4);
}

#[test]
fn gemma_scope_npz_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, r) = weights(6);
    let path = tmp.path().join("params.npz");
    let refs: Vec<(&str, &Tensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    probes::sae::npy::write_npz(&path, &refs).unwrap();
    let sae = load_sae(&path).unwrap();
    assert_eq!(sae.format, "gemma-scope");
    check(&sae, &r, "jumprelu", false, "none", 0);
    assert_eq!(load_sae(tmp.path()).unwrap().d_sae, D_SAE);
    // An entry that inflates past what its header's shape holds (a zip bomb with an honest
    // header) stops one byte past the shape, not at the archive's inflation budget.
    let bomb = tmp.path().join("bomb.npz");
    {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&bomb).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("W_enc.npy", opts).unwrap();
        let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }".to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        zip.write_all(b"\x93NUMPY\x01\x00").unwrap();
        zip.write_all(&(header.len() as u16).to_le_bytes()).unwrap();
        zip.write_all(header.as_bytes()).unwrap();
        zip.write_all(&vec![0u8; 64 << 20]).unwrap();
        zip.finish().unwrap();
    }
    let e = load_sae(&bomb).unwrap_err().to_string();
    assert!(e.contains("holds more than the 16 data bytes"), "{e}");
}

#[test]
fn bad_saes_are_named_with_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = weights(7);
    let no_thr: Vec<_> = t
        .iter()
        .filter(|(n, _)| n != "threshold")
        .cloned()
        .collect();
    let case = |name: &str, cfg: serde_json::Value, tensors: &[(String, Tensor)]| -> String {
        let dir = tmp.path().join(name);
        write_saelens(&dir, cfg, tensors);
        load_sae(&dir).unwrap_err().to_string()
    };
    let e = case(
        "nokey",
        serde_json::json!({"architecture": "standard", "d_sae": D_SAE}),
        &no_thr,
    );
    assert!(
        e.contains("cfg.json") && e.contains("`d_in`") && e.contains("missing"),
        "{e}"
    );
    let e = case(
        "bigk",
        serde_json::json!({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": D_SAE + 1}),
        &no_thr,
    );
    assert!(e.contains("`k`") && e.contains("exceeds"), "{e}");
    let mut transposed = no_thr.clone();
    transposed[2].1 = transposed[2].1.t().unwrap().contiguous().unwrap();
    let e = case(
        "transposed",
        serde_json::json!({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}),
        &transposed,
    );
    assert!(
        e.contains("sae_weights.safetensors") && e.contains("`W_dec`") && e.contains("transposed"),
        "{e}"
    );
    let mut shape = no_thr.clone();
    shape[1].1 = Tensor::zeros(D_SAE + 1, candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = case(
        "shape",
        serde_json::json!({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}),
        &shape,
    );
    assert!(e.contains("`b_enc`") && e.contains("expected [24]"), "{e}");
    let mut nan = no_thr.clone();
    let mut v: Vec<f32> = nan[3].1.to_vec1().unwrap();
    v[0] = f32::NAN;
    nan[3].1 = Tensor::new(v, &Device::Cpu).unwrap();
    let e = case(
        "nan",
        serde_json::json!({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}),
        &nan,
    );
    assert!(e.contains("`b_dec`") && e.contains("NaN"), "{e}");
    let e = case(
        "eavg",
        serde_json::json!({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "normalize_activations": "expected_average_only_in"}),
        &no_thr,
    );
    assert!(e.contains("norm_scaling_factor"), "{e}");

    // Fitting a model: width, hook and latent range.
    let dir = tmp.path().join("ok");
    write_saelens(
        &dir,
        serde_json::json!({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "metadata": {"hook_name": "blocks.1.hook_resid_post"}}),
        &no_thr,
    );
    let sae = load_sae(&dir).unwrap();
    assert!(sae.check_fits("blocks.1.hook_resid_post", 2, D_IN).is_ok());
    assert!(sae
        .check_fits("blocks.1.hook_resid_post", 2, 64)
        .unwrap_err()
        .to_string()
        .contains("d_in is 8"));
    assert!(sae
        .check_fits("blocks.0.hook_resid_post", 2, D_IN)
        .unwrap_err()
        .to_string()
        .contains("trained on"));
    assert!(sae
        .check_fits("blocks.5.hook_resid_post", 2, D_IN)
        .unwrap_err()
        .to_string()
        .contains("unknown hook"));
    assert!(sae
        .check_latent(D_SAE)
        .unwrap_err()
        .to_string()
        .contains("out of range"));
}

#[test]
fn splicing_with_error_term_is_identity_until_a_latent_is_edited() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = weights(8);
    let no_thr: Vec<_> = t
        .iter()
        .filter(|(n, _)| n != "threshold")
        .cloned()
        .collect();
    let dir = tmp.path().join("s");
    write_saelens(
        &dir,
        serde_json::json!({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}),
        &no_thr,
    );
    let sae = std::sync::Arc::new(load_sae(&dir).unwrap());
    let x = inputs().reshape((1, 5, D_IN)).unwrap();
    let same = sae.splice(vec![], true)(&x).unwrap();
    assert!(common::rel_err(&same, &x) < 1e-5);
    let recon = sae.splice(vec![], false)(&x).unwrap();
    let want = sae
        .reconstruct(&x.reshape((5, D_IN)).unwrap())
        .unwrap()
        .reshape((1, 5, D_IN))
        .unwrap();
    assert!(common::rel_err(&recon, &want) < 1e-6);
    // Clamping latent j adds (value - a_j) * W_dec[j] to every token.
    let acts = sae.encode(&x.reshape((5, D_IN)).unwrap()).unwrap();
    let edited = sae.splice(
        vec![LatentEdit::Clamp {
            latent: 3,
            value: 10.0,
        }],
        true,
    )(&x)
    .unwrap();
    let row = sae.w_dec.get(3).unwrap();
    for tok in 0..5 {
        let a3: f32 = acts.get(tok).unwrap().get(3).unwrap().to_scalar().unwrap();
        let want =
            (x.get(0).unwrap().get(tok).unwrap() + (&row * f64::from(10.0 - a3)).unwrap()).unwrap();
        assert!(common::rel_err(&edited.get(0).unwrap().get(tok).unwrap(), &want) < 1e-4);
    }
}
