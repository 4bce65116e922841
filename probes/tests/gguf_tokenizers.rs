//! GGUF tokenizers against their references, and their bad-input errors.
//!
//! SentencePiece: the `sentencepiece` package trains a small BPE model on a text this test
//! writes; its vocabulary, converted to GGUF metadata as llama.cpp's convert script does, must
//! give sentencepiece's own ids and decodings. `MECHWATCH_SENTENCEPIECE_PYTHON` names a Python
//! with `sentencepiece` installed (`scripts/test-all` makes one in the cache directory).
//! With `MECHWATCH_SPM_KEEP=DIR` the test also leaves its vocabulary and our ids in `DIR` for a
//! comparison with llama.cpp (`tests/python/spm_llamacpp.py`).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::{self, Value as V};
use probes::gguf::GgufFile;
use probes::tokenizer::TextCodec;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/spm_reference.py");

/// Texts with CJK (some characters seen in training, some not), emoji (byte fallback), digits,
/// code, and runs of spaces, tabs and newlines.
const TEXTS: &[&str] = &[
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文, 未知の漢字: 鬱 🦀🎉 emoji 👍🏽.",
    "Prices: 12345 and 3.14159, dated 2024-06-01 at 09:30.",
    "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n",
    "  leading, inner   runs\t\ttabs\n\n\nand trailing   ",
    "x",
    " ",
    "",
];

fn python() -> PathBuf {
    PathBuf::from(std::env::var_os("MECHWATCH_SENTENCEPIECE_PYTHON").expect(
        "MECHWATCH_SENTENCEPIECE_PYTHON must name a Python with sentencepiece installed \
         (scripts/test-all sets one up)",
    ))
}

/// A deterministic training text: prose, code and numbers, with a few CJK words.
fn training_text() -> String {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "model",
        "token", "audit", "safety", "policy", "weights", "layer", "prices", "dated", "leading",
        "inner", "runs", "tabs", "trailing", "emoji", "and", "at", "of", "to",
    ];
    let code = [
        "fn main() {",
        "    let x = vec![1, 2, 3];",
        "    println!(\"{:?}\", x);",
        "}",
        "def f(a, b):",
        "    return a + b",
        "for (int i = 0; i < n; i++) { sum += v[i]; }",
    ];
    let cjk = ["日本語", "テキスト", "中文", "の", "と", "未知", "漢字"];
    let mut out = String::new();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    for line in 0..1500 {
        match line % 5 {
            0 | 1 => {
                let n = 5 + next(10);
                let s: Vec<&str> = (0..n).map(|_| words[next(words.len())]).collect();
                out.push_str(&s.join(" "));
                out.push('.');
            }
            2 => out.push_str(code[next(code.len())]),
            3 => {
                let a = next(100_000);
                let b = next(1000);
                out.push_str(&format!(
                    "{a} and {b}.{}, {}-0{}-1{}",
                    next(99),
                    2000 + next(30),
                    1 + next(9),
                    next(9)
                ));
            }
            _ => {
                let n = 2 + next(4);
                let s: String = (0..n).map(|_| cjk[next(cjk.len())]).collect();
                out.push_str(&s);
                out.push_str(&" ".repeat(1 + next(3)));
                out.push_str(words[next(words.len())]);
            }
        }
        out.push('\n');
    }
    out
}

#[derive(serde::Deserialize)]
struct Reference {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    bos: u32,
    eos: u32,
    unk: u32,
    add_space_prefix: bool,
    ids: Vec<Vec<u32>>,
    decoded: Vec<String>,
}

fn strings(v: &[String]) -> V {
    V::Array(v.iter().map(|s| V::String(s.clone())).collect())
}

/// A GGUF holding only tokenizer metadata.
fn write_gguf(path: &Path, meta: &[(String, V)]) {
    let refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
}

/// GGUF tokenizer metadata for a SentencePiece vocabulary, as llama.cpp's convert writes it.
fn spm_meta(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<(String, V)> {
    vec![
        ("tokenizer.ggml.model".into(), V::String("llama".into())),
        ("tokenizer.ggml.pre".into(), V::String("default".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.scores".into(),
            V::Array(scores.iter().map(|&s| V::F32(s)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.iter().map(|&t| V::I32(t)).collect()),
        ),
    ]
}

fn set(meta: &mut Vec<(String, V)>, key: &str, value: V) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.to_string(), value));
}

#[test]
fn sentencepiece_vocabulary_encodes_and_decodes_as_sentencepiece() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("train.txt"), training_text()).unwrap();
    std::fs::write(
        tmp.path().join("texts.json"),
        serde_json::to_string(TEXTS).unwrap(),
    )
    .unwrap();
    let o = Command::new(python())
        .arg(SCRIPT)
        .arg(tmp.path())
        .output()
        .expect("run sentencepiece");
    assert!(
        o.status.success(),
        "sentencepiece: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: Reference =
        serde_json::from_slice(&std::fs::read(tmp.path().join("reference.json")).unwrap()).unwrap();
    // The model really has byte tokens and merges to choose between.
    assert!(r.types.iter().filter(|&&t| t == 6).count() == 256);
    assert!(r.tokens.len() > 500, "{} tokens", r.tokens.len());

    let mut meta = spm_meta(&r.tokens, &r.scores, &r.types);
    set(&mut meta, "tokenizer.ggml.bos_token_id", V::U32(r.bos));
    set(&mut meta, "tokenizer.ggml.eos_token_id", V::U32(r.eos));
    set(&mut meta, "tokenizer.ggml.unknown_token_id", V::U32(r.unk));
    set(
        &mut meta,
        "tokenizer.ggml.add_space_prefix",
        V::Bool(r.add_space_prefix),
    );
    let path = tmp.path().join("spm.gguf");
    write_gguf(&path, &meta);
    let codec = TextCodec::from_gguf(&GgufFile::read(&path).unwrap()).unwrap();
    if let Some(dir) = std::env::var_os("MECHWATCH_SPM_KEEP") {
        keep_for_llama_cpp(Path::new(&dir), &meta, &codec);
    }

    let mut byte_fallbacks = 0;
    for (i, text) in TEXTS.iter().enumerate() {
        let ids = codec.encode(text).unwrap();
        assert_eq!(ids, r.ids[i], "ids of {text:?}");
        byte_fallbacks += ids.iter().filter(|&&id| r.types[id as usize] == 6).count();
        assert_eq!(
            codec.decode(&ids).unwrap(),
            *text,
            "decode(encode({text:?}))"
        );
        // The `tokenizers` form (what `model convert` writes as tokenizer.json) agrees.
        let hf = codec.tokenizer.encode(*text, false).unwrap();
        assert_eq!(hf.get_ids(), &ids[..], "tokenizer.json ids of {text:?}");
        assert_eq!(codec.tokenizer.decode(&ids, true).unwrap(), *text);
        assert_eq!(r.decoded[i], *text, "sentencepiece's decoding of {text:?}");
        // Plain text starts with BOS (llama.cpp's default for SentencePiece).
        let with_bos = codec.encode_text(text).unwrap();
        assert_eq!(with_bos[0], r.bos);
        assert_eq!(&with_bos[1..], &ids[..]);
    }
    assert!(byte_fallbacks >= 8, "only {byte_fallbacks} byte tokens");
    // Control tokens in text are matched, and the text after them gets the space prefix again
    // (llama.cpp's rule).
    let hello = codec.encode("Hello").unwrap();
    let mut expected = vec![r.bos];
    expected.extend(&hello);
    expected.push(r.eos);
    expected.extend(&hello);
    assert_eq!(codec.encode("<s>Hello</s>Hello").unwrap(), expected);
    assert_eq!(codec.token_id("<s>"), Some(r.bos));
    assert_eq!(codec.bos_token.as_deref(), Some("<s>"));
}

/// Leave the vocabulary (with the llama hyper-parameters llama.cpp's loader wants), the texts
/// and our ids (with BOS) in `dir`, for `tests/python/spm_llamacpp.py DIR` to compare with
/// llama.cpp (docs/lab/tokenizers.md).
fn keep_for_llama_cpp(dir: &Path, meta: &[(String, V)], codec: &TextCodec) {
    let mut m = meta.to_vec();
    for (k, v) in [
        ("general.architecture", V::String("llama".into())),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(8)),
        ("llama.block_count", V::U32(1)),
        ("llama.feed_forward_length", V::U32(16)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(2)),
        ("llama.rope.dimension_count", V::U32(4)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
    ] {
        set(&mut m, k, v);
    }
    std::fs::create_dir_all(dir).unwrap();
    write_gguf(&dir.join("spm.gguf"), &m);
    let ours: Vec<Vec<u32>> = TEXTS
        .iter()
        .map(|t| codec.encode_text(t).unwrap())
        .collect();
    let json = serde_json::json!({ "texts": TEXTS, "ids": ours });
    std::fs::write(dir.join("ours.json"), json.to_string()).unwrap();
}

/// `abc` is `ab c` or `a bc` depending only on which of `ab` and `bc` scores higher, through
/// the GGUF path (the unit tests in `tokenizer::spm` cover the merge loop itself).
#[test]
fn merge_order_follows_the_scores_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "bc", "\u{2581}"]
        .map(String::from)
        .to_vec();
    let types = [2, 1, 1, 1, 1, 1, 1];
    for (ab, bc, expected) in [(-1.0, -2.0, [4, 3]), (-2.0, -1.0, [1, 5])] {
        let scores = [0.0, -9.0, -9.0, -9.0, ab, bc, -9.0];
        let mut meta = spm_meta(&tokens, &scores, &types);
        set(&mut meta, "tokenizer.ggml.add_space_prefix", V::Bool(false));
        let path = tmp.path().join("m.gguf");
        write_gguf(&path, &meta);
        let codec = TextCodec::from_gguf(&GgufFile::read(&path).unwrap()).unwrap();
        assert_eq!(codec.encode("abc").unwrap(), expected, "ab {ab}, bc {bc}");
        assert_eq!(codec.decode(&expected).unwrap(), "abc");
        // Characters outside the vocabulary become the unknown token.
        assert_eq!(codec.encode("a\u{00e9}").unwrap(), [1, 0]);
    }
}

fn load_error(meta: &[(String, V)]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.gguf");
    write_gguf(&path, meta);
    let g = GgufFile::read(&path).unwrap();
    let e = TextCodec::from_gguf(&g)
        .err()
        .expect("bad tokenizer metadata must be refused")
        .to_string();
    assert!(e.contains("bad.gguf"), "error does not name the file: {e}");
    e
}

#[test]
fn bad_sentencepiece_metadata_is_refused_naming_file_and_key() {
    let tokens: Vec<String> = ["<unk>", "<s>", "a", "b", "ab"].map(String::from).to_vec();
    let scores = [0.0, 0.0, -1.0, -1.0, -0.5];
    let types = [2, 3, 1, 1, 1];
    // Sound as written.
    let good = spm_meta(&tokens, &scores, &types);
    let tmp = tempfile::tempdir().unwrap();
    write_gguf(&tmp.path().join("ok.gguf"), &good);
    TextCodec::from_gguf(&GgufFile::read(&tmp.path().join("ok.gguf")).unwrap()).unwrap();

    let mut m = good.clone();
    set(
        &mut m,
        "tokenizer.ggml.scores",
        V::Array(scores[..4].iter().map(|&s| V::F32(s)).collect()),
    );
    let e = load_error(&m);
    assert!(
        e.contains("tokenizer.ggml.scores holds 4 values") && e.contains("5 tokens"),
        "{e}"
    );

    let mut m = good.clone();
    set(
        &mut m,
        "tokenizer.ggml.token_type",
        V::Array(types[..3].iter().map(|&t| V::I32(t)).collect()),
    );
    assert!(load_error(&m).contains("tokenizer.ggml.token_type holds 3 values"));

    let mut m = good.clone();
    let mut nan = scores;
    nan[3] = f32::NAN;
    set(
        &mut m,
        "tokenizer.ggml.scores",
        V::Array(nan.iter().map(|&s| V::F32(s)).collect()),
    );
    assert!(load_error(&m).contains("tokenizer.ggml.scores[3] is NaN"));

    let mut m = good.clone();
    let mut bad_type = types;
    bad_type[2] = 7;
    set(
        &mut m,
        "tokenizer.ggml.token_type",
        V::Array(bad_type.iter().map(|&t| V::I32(t)).collect()),
    );
    let e = load_error(&m);
    assert!(
        e.contains("tokenizer.ggml.token_type[2] = 7 is not a token type"),
        "{e}"
    );

    // No byte tokens and no unknown token: characters outside the vocabulary have no id.
    let mut no_unk = types;
    no_unk[0] = 1;
    let e = load_error(&spm_meta(&tokens, &scores, &no_unk));
    assert!(
        e.contains("no byte token <0x00>") && e.contains("tokenizer.ggml.unknown_token_id"),
        "{e}"
    );

    let mut m = good.clone();
    set(&mut m, "tokenizer.ggml.unknown_token_id", V::U32(5));
    assert!(load_error(&m)
        .contains("tokenizer.ggml.unknown_token_id = U32(5) is not a token id below 5"));

    let mut m = good.clone();
    m.retain(|(k, _)| k != "tokenizer.ggml.scores");
    assert!(load_error(&m).contains("needs tokenizer.ggml.scores"));

    let mut m = good.clone();
    set(&mut m, "tokenizer.ggml.add_space_prefix", V::U8(1));
    assert!(load_error(&m).contains("tokenizer.ggml.add_space_prefix = U8(1) is not a bool"));

    let mut m = good.clone();
    set(&mut m, "tokenizer.ggml.model", V::String("t5".into()));
    let e = load_error(&m);
    assert!(
        e.contains("tokenizer.ggml.model `t5` is not supported"),
        "{e}"
    );
}

fn splits(pre: &impl PreTokenizer, text: &str) -> Vec<String> {
    let mut s = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut s).unwrap();
    s.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(w, _, _)| w.to_string())
        .collect()
}

/// Tekken (Mistral Nemo) splits words at case changes and keeps single digits apart;
/// pieces are in GPT-2's byte alphabet (`Ġ` is a space, `Ċ` a newline).
#[test]
fn tekken_pre_tokenizer_splits_at_case_changes_and_digits() {
    let pre = probes::tokenizer::gguf_pre_tokenizer("tekken").unwrap();
    assert_eq!(
        splits(&pre, "HelloWorld's 123 a/b\nXML"),
        ["Hello", "World", "'s", "Ġ", "1", "2", "3", "Ġa", "/b", "Ċ", "XML"]
    );
}
