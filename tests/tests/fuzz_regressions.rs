//! The fuzz corpus as regression tests: every file under `fuzz/regressions/<target>/` (seeds,
//! the corpus the fuzzer grew, and each input that once crashed, after its fix) runs through
//! the very check its fuzz target runs, with no libFuzzer and no nightly toolchain. The
//! `daemon_config` inputs replay in the daemon's own tests, where its parser lives.
//!
//! The seeds are written by `write_fuzz_seeds` (ignored; run it with `--ignored` after
//! changing a format), and `seeds_reach_past_the_header` keeps them meaningful: a seed that no
//! longer parses would leave the fuzzer starting from nothing.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn regressions(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target)
}

/// Every committed input of `target`, in name order; there must be some.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = regressions(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn replay(target: &str, check: fn(&[u8])) {
    for (path, bytes) in inputs(target) {
        // Printed so that a failing input is named in the test's output.
        eprintln!("replaying {}", path.display());
        check(&bytes);
    }
}

#[test]
fn checkpoint_header_corpus_replays() {
    replay("checkpoint_header", checks::checkpoint_header);
}

#[test]
fn gguf_metadata_corpus_replays() {
    replay("gguf_metadata", checks::gguf_metadata);
}

#[test]
fn npz_corpus_replays() {
    replay("npz", checks::npz);
}

#[test]
fn audit_record_corpus_replays() {
    replay("audit_record", checks::audit_record);
}

#[test]
fn record_reader_corpus_replays() {
    replay("record_reader", checks::record_reader);
}

#[test]
fn policy_parser_corpus_replays() {
    replay("policy_parser", checks::policy_parser);
}

#[test]
fn seeds_reach_past_the_header() {
    let read = |target: &str, name: &str| std::fs::read(regressions(target).join(name)).unwrap();

    let g = probes::gguf::GgufFile::parse(
        Path::new("seed.gguf"),
        read("gguf_metadata", "seed-llama-tokenizer.gguf"),
    )
    .unwrap();
    let cfg = probes::ModelConfig::from_gguf(&g).unwrap();
    assert_eq!((cfg.d_model, cfg.n_heads, cfg.n_kv_heads), (8, 2, 1));
    let codec = probes::tokenizer::TextCodec::from_gguf(&g).unwrap();
    let text = codec
        .apply_chat_template(&[probes::tokenizer::Message::user("ab")])
        .unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    assert_eq!(codec.encode("ab").unwrap(), [2]);
    assert_eq!(g.metadata["fuzz.nested"].as_array().unwrap().len(), 2);

    let g = probes::gguf::GgufFile::parse(
        Path::new("seed.gguf"),
        read("checkpoint_header", "seed-f32-tensor.gguf"),
    )
    .unwrap();
    assert_eq!(g.load_f32(&g.tensors[0]).unwrap().dims(), [4]);
    let st = probes::safetensors::SafetensorsFile::parse(
        Path::new("seed.safetensors"),
        read("checkpoint_header", "seed-f32-tensor.safetensors"),
    )
    .unwrap();
    assert_eq!(st.tensors.len(), 1);

    let npz =
        probes::sae::npy::parse_npz(Path::new("seed.npz"), &read("npz", "seed-two-arrays.npz"))
            .unwrap();
    assert_eq!(npz.len(), 2);
    probes::sae::npy::parse_npy(Path::new("seed.npy"), "a", &read("npz", "seed-array.npy"))
        .unwrap();

    assert!(checks::record_reader_verifies(&read(
        "record_reader",
        "seed-error-record.json"
    )));
    serde_json::from_slice::<audit_log::Statement>(&read("audit_record", "seed-statement.json"))
        .unwrap();
    let env: audit_log::dsse::Envelope =
        serde_json::from_slice(&read("audit_record", "seed-envelope.json")).unwrap();
    let other = ed25519_dalek::SigningKey::from_bytes(&[8u8; 32]).verifying_key();
    env.verify(
        &[("k".into(), other)],
        1,
        &[audit_log::dsse::IN_TOTO_PAYLOAD_TYPE],
    )
    .unwrap();
    let note = String::from_utf8(read("audit_record", "seed-checkpoint.note")).unwrap();
    audit_log::checkpoint::Checkpoint::verify(&note, "mechwatch", &other).unwrap();

    let dir = tempfile::tempdir().unwrap();
    checks::policy_folder(dir.path());
    for name in ["seed-refusal-integrity.toml", "seed-capability-cost.toml"] {
        let text = String::from_utf8(read("policy_parser", name)).unwrap();
        policies::Policy::parse(&dir.path().join("p.toml"), &text, "0").unwrap();
    }
}

/// Writes the seed files. Run after changing a format:
/// `cargo test --release -p e2e --test fuzz_regressions -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes the committed seed files"]
fn write_fuzz_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = regressions(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    write(
        "gguf_metadata",
        "seed-llama-tokenizer.gguf",
        &seeds::llama_gguf(),
    );
    write(
        "checkpoint_header",
        "seed-f32-tensor.gguf",
        &seeds::tensor_gguf(),
    );
    write(
        "checkpoint_header",
        "seed-f32-tensor.safetensors",
        &seeds::safetensors(),
    );
    write("npz", "seed-two-arrays.npz", &seeds::npz());
    write("npz", "seed-array.npy", &seeds::npy());
    let statement = seeds::statement();
    write("record_reader", "seed-error-record.json", &statement);
    write("audit_record", "seed-statement.json", &statement);
    let (envelope, note) = seeds::envelope_and_note(&statement);
    write("audit_record", "seed-envelope.json", &envelope);
    write("audit_record", "seed-checkpoint.note", &note);
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/shipped");
    for name in ["refusal-integrity.toml", "capability-cost.toml"] {
        let text = std::fs::read(shipped.join(name)).unwrap();
        write("policy_parser", &format!("seed-{name}"), &text);
    }
}

mod seeds {
    //! Small valid inputs of each format, built here byte by byte.

    use audit_log::record::*;
    use audit_log::Signer;
    use ed25519_dalek::SigningKey;

    /// A GGUF v3 writer: metadata key/values, then tensors of f32 data.
    #[derive(Default)]
    struct Gguf {
        kv: Vec<u8>,
        n_kv: u64,
        tensors: Vec<(String, Vec<f32>)>,
    }

    fn string(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }

    impl Gguf {
        fn key(&mut self, key: &str, ty: u32) -> &mut Vec<u8> {
            self.n_kv += 1;
            string(&mut self.kv, key);
            self.kv.extend(ty.to_le_bytes());
            &mut self.kv
        }
        fn str(&mut self, key: &str, v: &str) -> &mut Self {
            string(self.key(key, 8), v);
            self
        }
        fn u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.key(key, 4).extend(v.to_le_bytes());
            self
        }
        fn f32(&mut self, key: &str, v: f32) -> &mut Self {
            self.key(key, 6).extend(v.to_le_bytes());
            self
        }
        fn strs(&mut self, key: &str, items: &[&str]) -> &mut Self {
            let b = self.key(key, 9);
            b.extend(8u32.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for s in items {
                string(b, s);
            }
            self
        }
        fn i32s(&mut self, key: &str, items: &[i32]) -> &mut Self {
            let b = self.key(key, 9);
            b.extend(5u32.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for v in items {
                b.extend(v.to_le_bytes());
            }
            self
        }
        /// An array of arrays of u8.
        fn nested(&mut self, key: &str, items: &[&[u8]]) -> &mut Self {
            let b = self.key(key, 9);
            b.extend(9u32.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for inner in items {
                b.extend(0u32.to_le_bytes());
                b.extend((inner.len() as u64).to_le_bytes());
                b.extend(*inner);
            }
            self
        }
        fn bytes(&self) -> Vec<u8> {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend((self.tensors.len() as u64).to_le_bytes());
            b.extend(self.n_kv.to_le_bytes());
            b.extend(&self.kv);
            let mut offset = 0u64;
            for (name, data) in &self.tensors {
                string(&mut b, name);
                b.extend(1u32.to_le_bytes());
                b.extend((data.len() as u64).to_le_bytes());
                b.extend(0u32.to_le_bytes()); // F32
                b.extend(offset.to_le_bytes());
                offset += (data.len() as u64 * 4).div_ceil(32) * 32;
            }
            b.resize(b.len().div_ceil(32) * 32, 0);
            for (_, data) in &self.tensors {
                let start = b.len();
                for v in data {
                    b.extend(v.to_le_bytes());
                }
                b.resize(start + (b.len() - start).div_ceil(32) * 32, 0);
            }
            b
        }
    }

    /// A llama configuration with a byte-level BPE tokenizer, control tokens, a chat template
    /// and a nested metadata array.
    pub fn llama_gguf() -> Vec<u8> {
        let tokens = [
            "a",
            "b",
            "ab",
            "ba",
            "Ġ",
            "1",
            "2",
            "Ċ",
            "<|im_start|>",
            "<|im_end|>",
            "u",
            "s",
            "e",
            "r",
        ];
        let mut types = vec![1; tokens.len()];
        types[8] = 3;
        types[9] = 3;
        Gguf::default()
            .str("general.architecture", "llama")
            .u32("general.alignment", 32)
            .u32("llama.embedding_length", 8)
            .u32("llama.attention.head_count", 2)
            .u32("llama.attention.head_count_kv", 1)
            .u32("llama.block_count", 1)
            .u32("llama.feed_forward_length", 16)
            .u32("llama.context_length", 64)
            .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .f32("llama.rope.freq_base", 10_000.0)
            .str("tokenizer.ggml.model", "gpt2")
            .str("tokenizer.ggml.pre", "smollm")
            .strs("tokenizer.ggml.tokens", &tokens)
            .i32s("tokenizer.ggml.token_type", &types)
            .strs("tokenizer.ggml.merges", &["a b", "b a"])
            .u32("tokenizer.ggml.bos_token_id", 8)
            .u32("tokenizer.ggml.eos_token_id", 9)
            .str(
                "tokenizer.chat_template",
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                 {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            )
            .nested("fuzz.nested", &[&[1, 2], &[3]])
            .bytes()
    }

    /// One f32 tensor of four values.
    pub fn tensor_gguf() -> Vec<u8> {
        let mut g = Gguf::default();
        g.str("general.architecture", "llama");
        g.tensors.push(("w".into(), vec![1.0, -2.0, 0.5, 4.0]));
        g.bytes()
    }

    pub fn safetensors() -> Vec<u8> {
        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header);
        b.extend(1.0f32.to_le_bytes());
        b.extend(2.0f32.to_le_bytes());
        b
    }

    pub fn npz() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("params.npz");
        let dev = candle_core::Device::Cpu;
        let a = candle_core::Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = candle_core::Tensor::ones(4, candle_core::DType::F32, &dev).unwrap();
        probes::sae::npy::write_npz(&path, &[("W_enc", &a), ("b_enc", &b)]).unwrap();
        std::fs::read(&path).unwrap()
    }

    pub fn npy() -> Vec<u8> {
        let mut header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 1), }".to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((header.len() as u16).to_le_bytes());
        b.extend(header.as_bytes());
        b.extend(1.5f64.to_le_bytes());
        b.extend((-3.0f64).to_le_bytes());
        b
    }

    /// An error record at position 0 of the `record_reader` log, signed by its key.
    pub fn statement() -> Vec<u8> {
        let signer = Signer::from_signing_key(SigningKey::from_bytes(&[7u8; 32]));
        let record = RecordBody::Error {
            model: None,
            inputs: vec![],
            stage: "load".into(),
            message: "seed".into(),
        };
        let st = Statement {
            statement_type: STATEMENT_TYPE.into(),
            subject: record.subjects(RECORD_VERSION),
            predicate_type: PREDICATE_TYPE.into(),
            predicate: Predicate {
                version: RECORD_VERSION,
                log: LogPosition {
                    id: super::checks::RECORD_READER_LOG_ID.into(),
                    seq: 0,
                    prev: GENESIS_PREV.into(),
                },
                time: "2026-01-01T00:00:00Z".into(),
                host: "fuzz".into(),
                mechwatch_version: "0.1.0".into(),
                key_id: signer.id().into(),
                record,
            },
        };
        serde_json::to_vec(&st).unwrap()
    }

    /// A DSSE envelope of `statement` and a checkpoint note, both signed by a key other than
    /// the one `audit_record` trusts.
    pub fn envelope_and_note(statement: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let other = Signer::from_signing_key(SigningKey::from_bytes(&[8u8; 32]));
        let sig = other.sign(&audit_log::dsse::pae(
            audit_log::dsse::IN_TOTO_PAYLOAD_TYPE,
            statement,
        ));
        let env = audit_log::dsse::Envelope::new(
            audit_log::dsse::IN_TOTO_PAYLOAD_TYPE,
            statement,
            "k",
            &sig,
        );
        let note = audit_log::checkpoint::Checkpoint {
            origin: "mechwatch.dev/log/f022f022f022f022".into(),
            size: 1,
            root: [3u8; 32],
        }
        .sign("mechwatch", &other);
        (serde_json::to_vec(&env).unwrap(), note.into_bytes())
    }
}
