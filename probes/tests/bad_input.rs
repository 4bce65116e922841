//! Bad checkpoints get typed errors that name the file and tensor; none panics, none loads.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use probes::{LoadError, LoadOptions, Model};

fn load_err(path: &Path) -> LoadError {
    match Model::load_path(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

fn tiny(root: &Path) -> std::path::PathBuf {
    llama_dir(root, "LlamaForCausalLM", 21)
}

#[test]
fn truncated_safetensors_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for cut in [0, 5, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&st, &bytes[..cut]).unwrap();
        let e = load_err(&dir);
        assert!(
            matches!(e, LoadError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
        assert!(e.to_string().contains("model.safetensors"), "{e}");
    }
}

#[test]
fn lying_and_duplicate_headers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().to_string();
    let data = &bytes[8 + n..];
    let write = |h: &str, data: &[u8]| {
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(data);
        std::fs::write(&st, v).unwrap();
    };
    // Trailing bytes (a polyglot file).
    let mut more = data.to_vec();
    more.extend_from_slice(b"<html>");
    write(&header, &more);
    assert!(load_err(&dir).to_string().contains("trailing bytes"));
    // Offsets that disagree with the shape.
    let v: serde_json::Value = serde_json::from_str(&header).unwrap();
    let first = v
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    let mut lying = v.clone();
    lying[&first]["shape"] = serde_json::json!([3, 3]);
    write(&lying.to_string(), data);
    let e = load_err(&dir).to_string();
    assert!(e.contains(&first), "{e}");
    // A duplicate key: serde_json would silently keep the last one.
    let dup = header.replacen('{', &format!("{{\"{first}\":{},", v[&first]), 1);
    write(&dup, data);
    let e = load_err(&dir).to_string();
    assert!(e.contains("duplicate key"), "{e}");
}

#[test]
fn shapes_that_disagree_with_config_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut t = llama_tensors(1, false);
    t[3].1 = Tensor::zeros(
        (HEADS * HEAD_DIM + 1, D),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let name = t[3].0.clone();
    write_dir(&dir, &llama_config("LlamaForCausalLM"), &t);
    let e = load_err(&dir);
    assert!(matches!(e, LoadError::Shape { .. }), "{e}");
    assert!(
        e.to_string().contains(&name) && e.to_string().contains("config.json"),
        "{e}"
    );
}

#[test]
fn missing_tensors_unknown_architectures_and_missing_tokenizers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("missing");
    let mut t = llama_tensors(1, false);
    let gone = t.remove(5).0;
    write_dir(&dir, &llama_config("LlamaForCausalLM"), &t);
    let e = load_err(&dir).to_string();
    assert!(e.contains("missing tensor") && e.contains(&gone), "{e}");

    let dir = tiny(tmp.path());
    std::fs::write(
        dir.join("config.json"),
        llama_config("MambaForCausalLM").to_string(),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, LoadError::UnsupportedArchitecture { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("MambaForCausalLM"));

    let dir = tmp.path().join("notok");
    write_dir(
        &dir,
        &llama_config("LlamaForCausalLM"),
        &llama_tensors(1, false),
    );
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, LoadError::Tokenizer { .. }) && e.to_string().contains("tokenizer.json"),
        "{e}"
    );

    let dir = tmp.path().join("noconfig");
    write_dir(
        &dir,
        &llama_config("LlamaForCausalLM"),
        &llama_tensors(1, false),
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let e = load_err(&dir).to_string();
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
}

#[test]
fn non_finite_weights_are_reported_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    let mut t = llama_tensors(1, false);
    let mut v: Vec<f32> = t[2].1.flatten_all().unwrap().to_vec1().unwrap();
    v[7] = f32::NAN;
    v[9] = f32::INFINITY;
    t[2].1 = Tensor::from_vec(v, t[2].1.dims(), &Device::Cpu).unwrap();
    let name = t[2].0.clone();
    write_dir(&dir, &llama_config("LlamaForCausalLM"), &t);
    let e = load_err(&dir);
    assert!(matches!(e, LoadError::NonFinite { count: 2, .. }), "{e}");
    assert!(e.to_string().contains(&name));
}

#[test]
fn sharded_checkpoints_load_through_the_index_and_lying_indexes_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tiny(tmp.path());
    let dir = tmp.path().join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(single.join(f), dir.join(f)).unwrap();
    }
    let t = llama_tensors(21, false);
    let (a, b) = t.split_at(t.len() / 2);
    probes::safetensors::write(
        &dir.join("model-00001-of-00002.safetensors"),
        a,
        &BTreeMap::new(),
    )
    .unwrap();
    probes::safetensors::write(
        &dir.join("model-00002-of-00002.safetensors"),
        b,
        &BTreeMap::new(),
    )
    .unwrap();
    let mut map = serde_json::Map::new();
    for (k, _) in a {
        map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (k, _) in b {
        map.insert(k.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let p = Rand::new(1).tokens(9);
    let run = |m: &Model| {
        m.transformer
            .forward(
                std::slice::from_ref(&p),
                probes::Padding::Left,
                &probes::Hooks::new(),
                probes::Unembed::Last,
            )
            .unwrap()
            .logits
            .unwrap()
    };
    let sharded = load(&dir);
    assert_eq!(rel_err(&run(&sharded), &run(&load(&single))), 0.0);
    assert_eq!(sharded.manifest.files.len(), 5);

    let mut bad = index.clone();
    bad["weight_map"]["model.norm.weight"] = "../../etc/passwd".into();
    std::fs::write(dir.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    assert!(load_err(&dir)
        .to_string()
        .contains("not a file in this directory"));
}

#[test]
fn truncated_and_corrupted_gguf_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    llama_gguf(&path, 3, candle_core::quantized::GgmlDType::Q4_1);
    let bytes = std::fs::read(&path).unwrap();
    for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = load_err(&path);
        assert!(e.to_string().contains("tiny.gguf"), "cut at {cut}: {e}");
    }
    // Byte flips in the header: an error or a model, never a panic.
    let mut rng = Rand::new(5);
    for i in 0..300 {
        let mut b = bytes.clone();
        let at = (rng.tokens(1)[0] as usize * 131 + i * 17) % 2048.min(b.len());
        b[at] ^= 0x5a;
        std::fs::write(&path, &b).unwrap();
        let _ = Model::load_path(&path, &LoadOptions::default());
    }
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
}

#[test]
fn a_fifo_as_a_weight_tokenizer_or_config_file_is_refused_without_blocking() {
    for name in ["model.safetensors", "tokenizer.json", "config.json"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tiny(tmp.path());
        std::fs::remove_file(dir.join(name)).unwrap();
        mkfifo(&dir.join(name));
        let e = load_err(&dir);
        assert!(
            e.to_string().contains(name) && e.to_string().contains("FIFO"),
            "{name}: {e}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("model.gguf");
    mkfifo(&gguf);
    let e = load_err(&gguf);
    assert!(e.to_string().contains("FIFO"), "{e}");
}
