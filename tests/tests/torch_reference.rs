//! Checked against an independent f32 reference (issue 18): Hugging Face transformers, in
//! PyTorch, reads the same GGUF file (dequantized by the `gguf` package, not by candle) and
//! runs it in f32. Our f32 pass must give the same next-token logits to float rounding, the
//! same top-1 token wherever the reference's top two are not tied, and the same greedy
//! continuations, parting only at a tie.
//!
//! `MECHWATCH_TORCH_PYTHON` names the interpreter (`scripts/test-all` sets it: SAELens's
//! environment, which has transformers and PyTorch, with `gguf` added).

use e2e::peers::{self, argmax, top2_gap};
use probes::{generate, GenerateOptions, Hooks, LoadOptions, Model};

const MAX_TOKENS: usize = 24;
/// Float rounding in a different order moves a logit by far less than this.
const LOGIT_TOLERANCE: f32 = 1e-3;
/// Top-2 gaps below this are ties, where either runtime may pick either token.
const TIE: f32 = 1e-2;

fn agree_with_the_f32_reference(model: &Model) {
    let name = model.path.display();
    let prompts = peers::prompts(model);
    let python = peers::python(
        "MECHWATCH_TORCH_PYTHON",
        "a Python with transformers, torch and gguf (scripts/test-all sets it)",
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let peer = peers::ask(
        &python,
        "torch_reference.py",
        serde_json::json!({
            "model": model.path,
            "prompts": prompts,
            "max_tokens": MAX_TOKENS,
            "threads": threads,
        }),
    );
    assert_eq!(peer.logits.len(), prompts.len());

    let ours = peers::last_logits(model, &prompts);
    let mut worst = 0f32;
    for (i, (a, b)) in ours.iter().zip(&peer.logits).enumerate() {
        assert_eq!(a.len(), b.len(), "{name}: vocabulary sizes differ");
        let diff = peers::largest_difference(a, b);
        worst = worst.max(diff);
        assert!(
            diff <= LOGIT_TOLERANCE,
            "{name}: prompt {i}: a logit differs from the f32 reference by {diff}"
        );
        if top2_gap(b) >= TIE {
            assert_eq!(argmax(a), argmax(b), "{name}: prompt {i}: top-1 differs");
        }
    }

    let opts = GenerateOptions {
        max_tokens: MAX_TOKENS,
        ..Default::default()
    };
    let gens = generate(&model.transformer, &prompts, &Hooks::new(), &opts).unwrap();
    let (greedy, gaps) = (peer.greedy(), peer.gaps());
    let mut identical = 0;
    for (i, (g, theirs)) in gens.iter().zip(&greedy).enumerate() {
        match g.iter().zip(theirs).position(|(a, b)| a != b) {
            None => identical += 1,
            Some(at) => assert!(
                gaps[i][at] < TIE,
                "{name}: prompt {i}: greedy continuations part at token {at} where the \
                 reference's top-2 gap is {}",
                gaps[i][at]
            ),
        }
    }
    assert!(
        identical >= prompts.len() - 1,
        "{name}: only {identical} of {} greedy continuations equal the reference's",
        prompts.len()
    );
    eprintln!(
        "{name}: largest logit difference {worst:.2e}; greedy {MAX_TOKENS}-token continuations \
         identical on {identical}/{} (transformers {}, torch {})",
        prompts.len(),
        peer.json["transformers"],
        peer.json["torch"]
    );
}

/// The model in the reference's precision: f32 throughout, decode steps included.
fn f32_model(path: &std::path::Path) -> Model {
    Model::load_path(
        path,
        &LoadOptions {
            quantized_decode: false,
        },
    )
    .unwrap()
}

#[test]
fn default_model_agrees_with_the_f32_reference() {
    agree_with_the_f32_reference(&f32_model(&e2e::default_model()));
}

#[test]
fn qwen2_5_coder_0_5b_agrees_with_the_f32_reference() {
    agree_with_the_f32_reference(&f32_model(&e2e::fetched_model(
        "qwen2.5-coder-0.5b-instruct",
    )));
}
