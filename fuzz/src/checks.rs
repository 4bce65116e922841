//! The property every fuzz target checks, one function per target, shared by the libFuzzer
//! targets (`fuzz/fuzz_targets/*.rs`) and by the plain `cargo test` that replays the committed
//! corpus (`tests/tests/fuzz_regressions.rs`, which includes this file), so the two can never
//! check different things.
//!
//! Each function takes arbitrary bytes and panics only when a property fails: a parser of
//! untrusted input must return a value that holds its own invariants or an error, never
//! panic, abort, hang or accept what was not signed. This file names nothing of the fuzz
//! crate itself (no `crate::`), so that it compiles as a module of either crate.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use audit_log::checkpoint::Checkpoint;
use audit_log::dsse::{pae, Envelope, IN_TOTO_PAYLOAD_TYPE};
use audit_log::record::Statement;
use audit_log::Signer;
use ed25519_dalek::SigningKey;

/// The key that signs every record the `record_reader` target stores; its seed is fixed so
/// that committed inputs mean the same on every run.
fn fuzz_signer() -> Signer {
    Signer::from_signing_key(SigningKey::from_bytes(&[7u8; 32]))
}

/// The log id `record_reader` gives its database, so that a committed statement can name it.
pub const RECORD_READER_LOG_ID: &str = "f022f022f022f022";

/// A folder of its own under the system temporary directory for each purpose, process and
/// thread (the replay tests run on several threads at once).
fn scratch(purpose: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mechwatch-fuzz-{purpose}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("creating the scratch folder");
    dir
}

/// `checkpoint_header`: safetensors and GGUF headers give tensors inside the file, and every
/// GGUF tensor dequantizes or errors.
pub fn checkpoint_header(data: &[u8]) {
    let path = Path::new("fuzz-input");
    if let Ok(f) = probes::safetensors::SafetensorsFile::parse(path, data.to_vec()) {
        for t in &f.tensors {
            assert!(t.end <= f.bytes().len());
        }
    }
    if let Ok(g) = probes::gguf::GgufFile::parse(path, data.to_vec()) {
        for t in &g.tensors {
            assert!(t.begin <= t.end && t.end <= g.bytes().len());
            let _ = g.load_f32(t);
        }
    }
}

/// `gguf_metadata`: what the loader derives from GGUF metadata, the model configuration and
/// the tokenizer with its chat template, is validated or refused; a tokenizer that was
/// accepted encodes, decodes and renders its template without panicking.
pub fn gguf_metadata(data: &[u8]) {
    use probes::gguf::GgufFile;
    use probes::tokenizer::{Message, TextCodec};

    let path = Path::new("fuzz-input.gguf");
    let Ok(g) = GgufFile::parse(path, data.to_vec()) else {
        return;
    };
    for (key, v) in &g.metadata {
        let _ = (v.as_u64(), v.as_f64(), v.as_str(), v.as_array());
        let _ = (g.meta_usize(key), g.meta_f64(key), g.meta_str(key));
    }
    if let Ok(cfg) = probes::ModelConfig::from_gguf(&g) {
        assert!(cfg.n_heads > 0 && cfg.n_kv_heads > 0, "{cfg:?}");
        assert!(cfg.n_heads.is_multiple_of(cfg.n_kv_heads), "{cfg:?}");
        assert!(
            cfg.head_dim > 0 && cfg.head_dim.is_multiple_of(2),
            "{cfg:?}"
        );
        assert!(
            cfg.vocab_size > 0 && cfg.d_mlp > 0 && cfg.n_layers > 0,
            "{cfg:?}"
        );
        assert!(cfg.norm_eps > 0.0 && cfg.norm_eps.is_finite(), "{cfg:?}");
        let _ = cfg.to_hf_json();
    }
    if let Ok(codec) = TextCodec::from_gguf(&g) {
        if let Ok(ids) = codec.encode("ab ba <|im_start|>user\n12") {
            let _ = codec.decode(&ids);
        }
        for id in 0..4 {
            let _ = codec.token_text(id);
        }
        let _ = codec.token_id("<|im_end|>");
        let _ = codec.apply_chat_template(&[Message::user("hi")]);
    }
}

/// `npz`: a `.npz` archive (and, directly, a bare `.npy` array) gives tensors whose element
/// count matches their shape, or an error; no entry inflates without bound.
pub fn npz(data: &[u8]) {
    use probes::sae::npy::{parse_npy, parse_npz};

    let path = Path::new("fuzz-input.npz");
    let check = |t: &candle_core::Tensor| {
        let n: usize = t.dims().iter().product();
        assert_eq!(t.elem_count(), n);
        let v = t
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("a parsed array converts to f32");
        assert_eq!(v.len(), n);
    };
    if let Ok(arrays) = parse_npz(path, data) {
        for (_, t) in &arrays {
            check(t);
        }
    }
    if let Ok(t) = parse_npy(path, "fuzz", data) {
        check(&t);
    }
}

/// `audit_record`: statements, DSSE envelopes and signed-note checkpoints parse or error, and
/// nothing verifies under a key that did not sign it.
pub fn audit_record(data: &[u8]) {
    let key = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    let _ = serde_json::from_slice::<Statement>(data);
    if let Ok(env) = serde_json::from_slice::<Envelope>(data) {
        let trusted = [("k".to_string(), key)];
        assert!(env.verify(&trusted, 1, &[IN_TOTO_PAYLOAD_TYPE]).is_err());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(Checkpoint::verify(text, "mechwatch", &key).is_err());
    }
}

/// The empty audit log every `record_reader` input starts from: the real schema (made by
/// `AuditLog::open`) with a fixed log id, kept as bytes and copied for each input.
fn empty_log() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let path = scratch("record-reader").join("template.db");
        let _ = std::fs::remove_file(&path);
        let log = audit_log::AuditLog::open(&path, None).expect("creating the template log");
        log.connection()
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'log_id'",
                [RECORD_READER_LOG_ID],
            )
            .expect("fixing the log id");
        log.connection()
            .pragma_update(None, "journal_mode", "DELETE")
            .expect("leaving WAL mode");
        drop(log);
        std::fs::read(&path).expect("reading the template log")
    })
}

/// `record_reader`: a stored row whose bytes are arbitrary but correctly signed is read back
/// the way `log verify` and `log show` read rows (`verify_log`, `store::read_records` and the
/// `Statement` decode). Verification may pass only for a well-formed statement of this log at
/// its position, and whatever decodes re-encodes.
pub fn record_reader(data: &[u8]) {
    let _ = record_reader_verifies(data);
}

/// [`record_reader`]'s work; whether the stored row verified.
pub fn record_reader_verifies(data: &[u8]) -> bool {
    use audit_log::record::{GENESIS_PREV, PREDICATE_TYPE, STATEMENT_TYPE};
    use audit_log::store;

    let signer = fuzz_signer();
    let path = scratch("record-reader").join("log.db");
    std::fs::write(&path, empty_log()).expect("writing the log");
    let conn = rusqlite::Connection::open(&path).expect("opening the log");
    // A scratch copy: no fsync per input (the reads under test do not depend on it).
    conn.pragma_update(None, "synchronous", "OFF")
        .expect("synchronous=OFF");
    let sig = signer.sign(&pae(IN_TOTO_PAYLOAD_TYPE, data));
    let st = serde_json::from_slice::<Statement>(data).ok();
    conn.execute(
        "INSERT INTO records (seq, bytes, sig, key_id, kind, subject) \
         VALUES (0, ?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![
            data,
            sig.to_bytes().as_slice(),
            signer.id(),
            st.as_ref().map_or("?", |s| s.predicate.record.kind()),
            st.as_ref()
                .and_then(|s| s.subject.first())
                .map_or("?".into(), |s| s.name.clone()),
        ],
    )
    .expect("inserting the row");

    let verified = audit_log::verify_log(&conn, &signer.public(), None);
    let rows = store::read_records(&conn, 0, 1).expect("reading the row back");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].bytes, data);
    let decoded = serde_json::from_slice::<Statement>(&rows[0].bytes);
    if let Ok(st) = &decoded {
        let again = serde_json::to_vec(st).expect("a statement encodes");
        let back: Statement = serde_json::from_slice(&again).expect("its encoding decodes");
        assert_eq!(&back, st);
    }
    if let Ok(report) = verified {
        let st = decoded.expect("a verified record decodes");
        assert_eq!(report.records, 1);
        assert_eq!(st.statement_type, STATEMENT_TYPE);
        assert_eq!(st.predicate_type, PREDICATE_TYPE);
        assert_eq!(st.predicate.log.id, RECORD_READER_LOG_ID);
        assert_eq!(st.predicate.log.seq, 0);
        assert_eq!(st.predicate.log.prev, GENESIS_PREV);
        assert_eq!(st.predicate.key_id, signer.id());
        return true;
    }
    false
}

/// Fill `dir` with the prompt files a policy under test may name: `prompts/a.txt` (2
/// prompts) and the shipped policies' `prompts/harmful.txt` and `prompts/harmless.txt` (120
/// each), so that the shipped policies parse there.
pub fn policy_folder(dir: &Path) {
    let prompts = dir.join("prompts");
    if prompts.join("harmless.txt").is_file() {
        return;
    }
    std::fs::create_dir_all(&prompts).expect("creating the prompt folder");
    std::fs::write(prompts.join("a.txt"), "one\ntwo\n").expect("writing a prompt file");
    // Two sets of different prompts: a contrast of a set with its own prompts is refused.
    for name in ["harmful", "harmless"] {
        let many: String = (1..=120).map(|i| format!("{name} prompt {i}\n")).collect();
        std::fs::write(prompts.join(format!("{name}.txt")), many).expect("writing a prompt file");
    }
}

/// `policy_parser`: arbitrary text gives a policy or errors whose locations lie inside the
/// text. Paths resolve inside a folder filled by [`policy_folder`], so references to files
/// are exercised too.
pub fn policy_parser(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = scratch("policy");
    policy_folder(&dir);
    let path = dir.join("policy.toml");
    if let Err(errors) = policies::Policy::parse(&path, text, "0") {
        assert!(!errors.is_empty());
        let lines = text.split('\n').count();
        for e in errors {
            if let Some(at) = e.at {
                assert!(at.line >= 1 && at.line <= lines && at.col >= 1, "{e}");
            }
            let _ = e.to_string();
        }
    }
}
