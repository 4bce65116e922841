//! `mechwatch model`, `generate` and `capture` on the real default model.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use e2e::*;
use sha2::{Digest, Sha256};

#[test]
fn fetch_default_is_cached_and_verified() {
    let path = default_model();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        probes::fetch::GGUF_SHA256
    );
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    let o = mechwatch(&["model", "fetch-default"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), path.to_str().unwrap());
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        before,
        "re-downloaded"
    );
}

#[test]
fn model_info_describes_the_default_model() {
    default_model();
    let o = mechwatch(&["model", "info", "default", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["n_layers"], 30);
    assert_eq!(v["d_model"], 576);
    assert_eq!(v["n_kv_heads"], 3);
    assert_eq!(v["files"]["files"][0]["sha256"], probes::fetch::GGUF_SHA256);
    let raw = hex::decode(probes::fetch::GGUF_SHA256).unwrap();
    assert_eq!(v["digest"], hex::encode(Sha256::digest(raw)));
    assert!(v["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h == "blocks.29.attn.hook_pattern"));
    assert!(v["storage_dtypes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d == "Q4_1"));
    let text = mechwatch(&["model", "info", "default"]);
    assert!(stdout(&text).contains("d_model:       576"));
}

#[test]
fn greedy_generation_knows_paris_and_steering_changes_it() {
    default_model();
    let o = mechwatch(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plain = stdout(&o);
    assert!(plain.contains("Paris"), "{plain:?}");

    let tmp = tempfile::tempdir().unwrap();
    let vec_path = tmp.path().join("v.safetensors");
    let v: Vec<f32> = (0..576).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
    let v = Tensor::from_vec(v, 576, &Device::Cpu).unwrap();
    probes::safetensors::write(&vec_path, &[("v".into(), v)], &BTreeMap::new()).unwrap();
    let steer = format!("blocks.10.hook_resid_post:{}:8", vec_path.display());
    let o = mechwatch(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--steer",
        &steer,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(stdout(&o), plain, "steering changed nothing");

    let bad = format!("blocks.99.hook_resid_post:{}:8", vec_path.display());
    let o = mechwatch(&["generate", "--prompt", "x", "--steer", &bad]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unknown hook `blocks.99.hook_resid_post`"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("valid hooks are"));
}

#[test]
fn capture_writes_activations_per_prompt() {
    default_model();
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Hello there\"}\n\"A longer prompt about the weather today\"\n",
    )
    .unwrap();
    let out = tmp.path().join("acts.safetensors");
    let o = mechwatch(&[
        "capture",
        "--hook",
        "blocks.15.hook_resid_post",
        "blocks.2.attn.hook_pattern",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = probes::safetensors::SafetensorsFile::read(&out).unwrap();
    let lengths = f
        .load_f32(f.get("lengths").unwrap(), &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(lengths.len(), 2);
    let t = lengths[1] as usize;
    assert_eq!(
        f.get("blocks.15.hook_resid_post").unwrap().shape,
        [2, t, 576]
    );
    assert_eq!(
        f.get("blocks.2.attn.hook_pattern").unwrap().shape,
        [2, 9, t, t]
    );
    // The same activations come out of the library directly.
    let model =
        probes::Model::load_path(&default_model(), &probes::LoadOptions::default()).unwrap();
    let ids = model.encode_prompt("Hello there", false).unwrap();
    assert_eq!(ids.len(), lengths[0] as usize);
    let hooks = probes::Hooks::new().capture(probes::HookPoint::ResidPost(15));
    let direct = model
        .transformer
        .forward(
            std::slice::from_ref(&ids),
            probes::Padding::Right,
            &hooks,
            probes::Unembed::None,
        )
        .unwrap();
    let want = direct.captures[&probes::HookPoint::ResidPost(15)]
        .get(0)
        .unwrap();
    let got = f
        .load_f32(f.get("blocks.15.hook_resid_post").unwrap(), &Device::Cpu)
        .unwrap();
    let got = got.get(0).unwrap().narrow(0, 0, ids.len()).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{diff}");

    let o = mechwatch(&[
        "capture",
        "--hook",
        "resid",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn converted_hf_directory_behaves_like_the_gguf() {
    let gguf = default_model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    let o = mechwatch(&[
        "model",
        "convert",
        gguf.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let o = mechwatch(&["model", "info", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["storage_dtypes"], serde_json::json!(["F32"]));
    let args = |m: &str| {
        mechwatch(&[
            "generate",
            "--model",
            m,
            "--chat",
            "--prompt",
            "Name a colour.",
            "--max-tokens",
            "10",
        ])
    };
    let a = args(gguf.to_str().unwrap());
    let b = args(dir.to_str().unwrap());
    assert!(a.status.success() && b.status.success());
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn bad_models_exit_2_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\0\0\0").unwrap();
    let o = mechwatch(&["model", "info", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("broken.gguf") && stderr(&o).contains("truncated"),
        "{}",
        stderr(&o)
    );
    let o = mechwatch(&["model", "info", tmp.path().join("absent").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("absent"));
}
