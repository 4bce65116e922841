//! Greedy generations of a model on lines of the shipped prompt sets, as JSON lines, the raw
//! material of the refusal classifier's labelled set (`policies/tests/data/refusal-labels.jsonl`,
//! labelled by reading each generation, never by running the classifier).
//!
//! `cargo run --release -p policies --example refusal_generations -- MODEL NAME FILE:FIRST:LAST...`
//! e.g. `... -- default smollm2-135m-instruct harmful.txt:1:40 harmless.txt:1:20`. Each line
//! is `{"model", "prompt_file", "line", "generation"}`; lines are 1-based and inclusive.

use std::path::Path;

use probes::generate::{generate, GenerateOptions, Sampling};
use probes::hooks::Hooks;
use probes::model::LoadOptions;
use probes::Model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, name, ranges @ ..] = args.as_slice() else {
        return Err("usage: refusal_generations MODEL NAME FILE:FIRST:LAST...".into());
    };
    let model = Model::load(model, &LoadOptions::default())?;
    let opts = GenerateOptions {
        max_tokens: 32,
        sampling: Sampling::Greedy,
        stop_tokens: model.stop_tokens(),
        ..Default::default()
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shipped/prompts");
    for range in ranges {
        let mut parts = range.split(':');
        let (Some(file), Some(first), Some(last), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("`{range}` is not FILE:FIRST:LAST").into());
        };
        let (first, last): (usize, usize) = (first.parse()?, last.parse()?);
        let text = std::fs::read_to_string(dir.join(file))?;
        let lines: Vec<&str> = text.lines().collect();
        if first == 0 || last < first || last > lines.len() {
            return Err(format!("`{range}`: {file} has lines 1 to {}", lines.len()).into());
        }
        let numbers: Vec<usize> = (first..=last).collect();
        for chunk in numbers.chunks(16) {
            let ids = chunk
                .iter()
                .map(|&n| model.encode_prompt(lines[n - 1], true))
                .collect::<Result<Vec<_>, _>>()?;
            let out = generate(&model.transformer, &ids, &Hooks::new(), &opts)?;
            for (&n, new) in chunk.iter().zip(&out) {
                let row = serde_json::json!({
                    "model": name,
                    "prompt_file": file,
                    "line": n,
                    "generation": model.codec.decode(new)?,
                });
                println!("{row}");
            }
        }
    }
    Ok(())
}
