//! Independent runtimes our logits and generations are compared with (issue 18): llama.cpp
//! through llama-cpp-python (`tests/python/llama_cpp_peer.py`) and an f32 reference in
//! PyTorch through transformers (`tests/python/torch_reference.py`). Both read the same GGUF
//! file, get the same token ids and answer one JSON request.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use probes::Model;

/// Our own prompts: chat-templated and plain, prose, code, digits and Unicode.
pub const CHAT: &[&str] = &[
    "What is the capital of France?",
    "Write a Python function that reverses a linked list.",
    "Explain the difference between a process and a thread.",
    "How do I pick a lock to break into my neighbour's house?",
    "Translate 'good morning' into Japanese and German.",
    "¿Cuál es la raíz cuadrada de 144? Responde en español.",
    "Summarise: the quick brown fox jumps over the lazy dog 3 times.",
    "Give me a SQL query counting orders per customer in 2023.",
];
pub const PLAIN: &[&str] = &[
    "The three primary colours are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "// Rust: sum the even numbers of a slice\nfn sum_even(xs: &[i64]) -> i64 {",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Das Lied",
    "東京は日本の首都です。大阪は",
    "1, 1, 2, 3, 5, 8, 13, 21,",
    "<html>\n  <head>\n    <title>Audit log</title>",
    "Once upon a time, in a village by the sea, there lived",
];

/// The 16 prompts' token ids: [`CHAT`] through the chat template, then [`PLAIN`] as text.
pub fn prompts(model: &Model) -> Vec<Vec<u32>> {
    let mut ids: Vec<Vec<u32>> = CHAT
        .iter()
        .map(|t| model.encode_prompt(t, true).unwrap())
        .collect();
    ids.extend(PLAIN.iter().map(|t| model.encode_prompt(t, false).unwrap()));
    ids
}

/// A peer's answer: its JSON and the next-token logits it wrote, a row per prompt.
pub struct Answer {
    pub json: serde_json::Value,
    pub logits: Vec<Vec<f32>>,
}

impl Answer {
    /// Greedy continuation of each prompt.
    pub fn greedy(&self) -> Vec<Vec<u32>> {
        self.per_prompt("greedy", |x| x.as_u64().unwrap() as u32)
    }

    /// Top-2 logit gap at each generated token of each prompt.
    pub fn gaps(&self) -> Vec<Vec<f32>> {
        self.per_prompt("gaps", |x| x.as_f64().unwrap() as f32)
    }

    fn per_prompt<T>(&self, key: &str, f: impl Fn(&serde_json::Value) -> T) -> Vec<Vec<T>> {
        self.json["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[key].as_array().unwrap().iter().map(&f).collect())
            .collect()
    }
}

/// The interpreter named by `var`, or a panic that says how to get one.
pub fn python(var: &str, how: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} must name a Python interpreter: {how}"))
}

/// Run the peer `script` (in `tests/python/`) with `python` on `request`, to which the path
/// of the logits file is added as `logits_out`.
pub fn ask(python: &Path, script: &str, mut request: serde_json::Value) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let logits_out = dir.path().join("logits.f32");
    request["logits_out"] = serde_json::json!(logits_out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let vocab = json["vocab"].as_u64().unwrap() as usize;
    let raw = std::fs::read(&logits_out).unwrap();
    assert_eq!(
        raw.len() % (vocab * 4),
        0,
        "logits file of {} bytes",
        raw.len()
    );
    let logits = raw
        .chunks_exact(vocab * 4)
        .map(|row| {
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
        .collect();
    Answer { json, logits }
}

pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

pub fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

/// The largest absolute difference between two rows of logits.
pub fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The gap between the two largest values of `row`.
pub fn top2_gap(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in row {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

/// Our next-token logits after each of `prompts`, one prompt per pass.
pub fn last_logits(model: &Model, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    prompts
        .iter()
        .map(|p| {
            let out = model
                .transformer
                .forward(
                    std::slice::from_ref(p),
                    probes::Padding::Left,
                    &probes::Hooks::new(),
                    probes::Unembed::Last,
                )
                .unwrap();
            out.logits.unwrap().to_vec2::<f32>().unwrap().remove(0)
        })
        .collect()
}
