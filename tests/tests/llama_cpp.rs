//! Checked against llama.cpp (issue 18): on real GGUF checkpoints, mechwatch's next-token
//! logits, greedy continuations and token ids agree with llama.cpp, an independent runtime
//! reading the same file.
//!
//! llama.cpp rounds activations to 8 bits in its dot products, so it is not an exact
//! reference: its logits sit tenths away from an f32 run's. The tolerances below are stated
//! against that measured rounding; the exact f32 reference is tests/tests/torch_reference.rs.
//!
//! llama.cpp runs through llama-cpp-python: `MECHWATCH_LLAMA_CPP_PYTHON` names its interpreter
//! (`scripts/llama-cpp-env` builds it once from the pinned sdist and prints the path;
//! `scripts/test-all` does). The 1.5B model's comparison runs with `--ignored`.

use e2e::peers::{self, argmax, pearson, top2_gap};
use probes::{generate, GenerateOptions, Hooks, LoadOptions, Model, Padding, Unembed};

const MAX_TOKENS: usize = 32;
/// The tie for Qwen's top-1 tokens.
const NEAR_TIE: f32 = 0.05;

/// Tokenised by both: Unicode, digits, code and chat markup.
const TOKENIZER_TEXT: &str = "<|im_start|>user\nnaïve café 東京 🦀 €12,345.67 — x^2+1=0?\n\
     fn main() { println!(\"{}\", 0x1F); }<|im_end|>\n<|im_start|>assistant\n\tIt's   done.\n\n";

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// How closely llama.cpp, which rounds activations to 8 bits, must agree with us.
struct Tolerance {
    /// Least Pearson correlation of the next-token logits.
    pearson: f64,
    /// Where either runtime's top-2 gap is below the tie, the top-1 tokens may differ.
    tie: Tie,
}

/// What counts as a near-tie of the top two next-token logits.
enum Tie {
    /// A fixed gap.
    Under(f32),
    /// Half of llama.cpp's measured rounding on this model: the median over the prompts of
    /// the largest logit difference between it and us.
    HalfTheRounding,
}

/// Compare mechwatch and llama.cpp on the cached model `name`.
fn agree_with_llama_cpp(name: &str, tolerance: Tolerance) {
    let model = Model::load(name, &LoadOptions::default()).unwrap_or_else(|e| {
        panic!("{e}\n(the test suite fetches it: `mechwatch model fetch {name}`)")
    });
    let prompts = peers::prompts(&model);
    let python = peers::python(
        "MECHWATCH_LLAMA_CPP_PYTHON",
        "`export MECHWATCH_LLAMA_CPP_PYTHON=$(scripts/llama-cpp-env)` builds it once",
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let peer = peers::ask(
        &python,
        "llama_cpp_peer.py",
        serde_json::json!({
            "mode": "compare",
            "model": model.path,
            "threads": threads,
            "prompts": prompts,
            "max_tokens": MAX_TOKENS,
            "texts": [TOKENIZER_TEXT],
        }),
    );
    let tokenized = &peer.json["tokenized"][0];

    // Token ids: the chat markup parsed as special tokens, with and without the tokens the
    // model adds to plain text.
    assert_eq!(
        model.codec.encode(TOKENIZER_TEXT).unwrap(),
        ids(&tokenized["plain"]),
        "{name}: token ids differ from llama.cpp's"
    );
    assert_eq!(
        model.codec.encode_text(TOKENIZER_TEXT).unwrap(),
        ids(&tokenized["with_special"]),
        "{name}: token ids (with the model's added special tokens) differ from llama.cpp's"
    );

    // Next-token logits after each prompt. llama.cpp rounds activations to 8 bits in its dot
    // products, which moves logits by tenths (0.25-0.42 at most on Qwen2.5-Coder-0.5B, against
    // 3e-5 between us and an f32 PyTorch run, tests/tests/torch_reference.rs); where its own
    // top two are that close, its top-1 may differ from the f32 one, and from ours.
    let ours = peers::last_logits(&model, &prompts);
    // llama.cpp's rounding on this model: the median over the prompts of the largest logit
    // difference. Greedy continuations may part only where one runtime's top two are closer
    // than half of it.
    let largest: Vec<f32> = ours
        .iter()
        .zip(&peer.logits)
        .map(|(a, b)| peers::largest_difference(a, b))
        .collect();
    let mut sorted = largest.clone();
    sorted.sort_by(f32::total_cmp);
    let greedy_tie = sorted[sorted.len() / 2] / 2.0;
    let top1_tie = match tolerance.tie {
        Tie::Under(gap) => gap,
        Tie::HalfTheRounding => greedy_tie,
    };
    let mut problems = Vec::new();
    let mut worst = f64::INFINITY;
    let mut top1 = 0;
    for (i, (a, b)) in ours.iter().zip(&peer.logits).enumerate() {
        assert_eq!(a.len(), b.len(), "{name}: vocabulary sizes differ");
        let diff = largest[i];
        let r = pearson(a, b);
        worst = worst.min(r);
        eprintln!(
            "{name}: prompt {i:2}: top-1 ours {} (gap {:.3}), llama.cpp {} (gap {:.3}); \
             Pearson {r:.6}; largest logit difference {diff:.3}",
            argmax(a),
            top2_gap(a),
            argmax(b),
            top2_gap(b),
        );
        if r < tolerance.pearson {
            problems.push(format!(
                "prompt {i}: Pearson {r:.5} < {}",
                tolerance.pearson
            ));
        }
        if argmax(a) == argmax(b) {
            top1 += 1;
        } else if top2_gap(a).min(top2_gap(b)) >= top1_tie {
            problems.push(format!(
                "prompt {i}: top-1 {} differs from llama.cpp's {} with no near-tie (top-2 \
                 gaps: ours {:.3}, llama.cpp {:.3}; a tie is under {top1_tie:.3})",
                argmax(a),
                argmax(b),
                top2_gap(a),
                top2_gap(b)
            ));
        }
    }

    // Greedy continuations, as an audit generates them (f32 decode steps).
    let opts = GenerateOptions {
        max_tokens: MAX_TOKENS,
        f32_decode: true,
        ..Default::default()
    };
    let gens = generate(&model.transformer, &prompts, &Hooks::new(), &opts).unwrap();
    let mut identical = 0;
    let (greedy, gaps) = (peer.greedy(), peer.gaps());
    for (i, (g, theirs)) in gens.iter().zip(&greedy).enumerate() {
        let Some(at) = g.iter().zip(theirs).position(|(a, b)| a != b) else {
            assert_eq!(g.len(), theirs.len(), "{name}: prompt {i}: lengths differ");
            identical += 1;
            continue;
        };
        // Where they part, one runtime must have been at a near-tie. Our gap there is read
        // from a prompt pass over the common prefix.
        let mut prefix = prompts[i].clone();
        prefix.extend_from_slice(&g[..at]);
        let out = model
            .transformer
            .forward(&[prefix], Padding::Left, &Hooks::new(), Unembed::Last)
            .unwrap();
        let row = out.logits.unwrap().to_vec2::<f32>().unwrap().remove(0);
        let (ours_gap, their_gap) = (top2_gap(&row), gaps[i][at]);
        eprintln!(
            "{name}: prompt {i:2}: greedy continuations part at token {at} (top-2 gaps: ours \
             {ours_gap:.4}, llama.cpp {their_gap:.4})"
        );
        if ours_gap.min(their_gap) >= greedy_tie {
            problems.push(format!(
                "prompt {i}: greedy continuations part at token {at} with no near-tie \
                 (top-2 gaps: ours {ours_gap:.4}, llama.cpp {their_gap:.4}; a tie is under \
                 {greedy_tie:.3})"
            ));
        }
    }
    eprintln!(
        "{name}: top-1 identical on {top1}/{n}, worst Pearson {worst:.6}, greedy \
         {MAX_TOKENS}-token continuations identical on {identical}/{n}, partings only under \
         {greedy_tie:.3}",
        n = prompts.len()
    );
    assert!(problems.is_empty(), "{name}: {}", problems.join("; "));
}

/// Qwen2.5-Coder: the Pearson and top-1 tie. llama.cpp's rounding moves these
/// models' logits by 0.25-0.52; greedy continuations part on about half the prompts
/// (2026-12-02), so no count is asserted: an f32 run of the same file in PyTorch parts from
/// llama.cpp where we do (ours and PyTorch's logits differ by 3e-5, and our greedy
/// continuations equal PyTorch's on 16 of 16 prompts).
const QWEN: Tolerance = Tolerance {
    pearson: 0.999,
    tie: Tie::Under(NEAR_TIE),
};

/// The default model is Q4_1, whose activations llama.cpp rounds to Q8_1: its logits move by
/// 0.45-1.77 (16 prompts, 2026-12-02), against 7e-5 between us and PyTorch in f32. A fixed
/// tie of 0.1 failed on a CI machine where our own top two were 0.082 apart and llama.cpp's
/// rounding, 1.15 at most on that prompt, put its top-1 0.348 ahead (2026-12-03), so the
/// tie is stated against the rounding measured in the same run.
const DEFAULT: Tolerance = Tolerance {
    pearson: 0.998,
    tie: Tie::HalfTheRounding,
};

#[test]
fn default_model_agrees_with_llama_cpp() {
    agree_with_llama_cpp("default", DEFAULT);
}

#[test]
fn qwen2_5_coder_0_5b_agrees_with_llama_cpp() {
    agree_with_llama_cpp("qwen2.5-coder-0.5b-instruct", QWEN);
}

#[test]
#[ignore = "1.1 GB model, kept out of the suite: run with --ignored"]
fn qwen2_5_coder_1_5b_agrees_with_llama_cpp() {
    agree_with_llama_cpp("qwen2.5-coder-1.5b-instruct", QWEN);
}
