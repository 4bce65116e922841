//! `mechwatch lens`: the logit lens of one prompt, for debugging a check — which tokens the
//! residual stream leans towards after the embedding and after each block, as a table a
//! person reads or as JSON.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use policies::result::round;
use probes::lens::{logit_lens, Lens, LensOptions, TokenRank};
use probes::Model;
use serde::Serialize;

#[derive(Args)]
pub struct LensArgs {
    /// A GGUF file, an HF directory, or a name from `mechwatch model list` (`default`).
    #[arg(long, default_value = "default")]
    model: String,
    /// The prompt text, put through the model's chat template (as policy prompt sets are by
    /// default) unless --raw.
    #[arg(long)]
    prompt: String,
    /// Tokenise the prompt as plain text, without the chat template.
    #[arg(long)]
    raw: bool,
    /// The token position to read, counted in the templated prompt; negative counts from the
    /// end (-1, the default, is the last token: the lens shows the predicted next token).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    position: i64,
    /// Tokens shown per layer, most probable first.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Also show this token's rank and probability at every layer: its text as the model's
    /// vocabulary spells it (e.g. `Ġ` for a leading space) or text that is one token.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

/// Most tokens per layer the table and JSON show: beyond this the output is no longer
/// something a person reads.
const MAX_TOP: usize = 100;

pub fn run(a: LensArgs) -> anyhow::Result<ExitCode> {
    if a.prompt.trim().is_empty() {
        bail!("--prompt is empty: give the text whose residual stream to read");
    }
    if a.top == 0 || a.top > MAX_TOP {
        bail!("--top {} is out of range: give 1 to {MAX_TOP}", a.top);
    }
    let model = super::load_model_beside_stdout(&a.model)?;
    let ids = model
        .encode_prompt(&a.prompt, !a.raw)
        .with_context(|| match a.raw {
            true => "tokenising --prompt".to_string(),
            false => "putting --prompt through the chat template (--raw skips it)".to_string(),
        })?;
    let token = a
        .token
        .as_deref()
        .map(|t| resolve_token(&model, t))
        .transpose()?;
    let opts = LensOptions {
        position: a.position,
        top: a.top,
        token,
    };
    let lens = logit_lens(&model.transformer, &ids, &opts)
        .with_context(|| format!("the logit lens of --prompt ({} tokens)", ids.len()))?;
    let report = Report::new(&model, &a, &ids, token, &lens);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(ExitCode::SUCCESS)
}

/// The id of `--token`: a vocabulary entry as spelled, or text that encodes to one token.
fn resolve_token(model: &Model, text: &str) -> anyhow::Result<u32> {
    if let Some(id) = model.codec.token_id(text) {
        return Ok(id);
    }
    let ids = model
        .codec
        .encode(text)
        .with_context(|| format!("tokenising --token {text:?}"))?;
    match ids.as_slice() {
        [id] => Ok(*id),
        [] => bail!("--token {text:?} is no token of this model"),
        many => bail!(
            "--token {text:?} is not one token of this model but {}: {}; give one of them",
            many.len(),
            many.iter()
                .map(|&i| format!("{:?}", model.codec.token_text(i)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}

/// What `--json` prints; the table shows the same.
#[derive(Serialize)]
struct Report {
    model: String,
    digest: String,
    prompt: String,
    chat: bool,
    /// The templated prompt's tokens.
    tokens: Vec<String>,
    position: usize,
    /// The token at `position`.
    token_at_position: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Target>,
    layers: Vec<Layer>,
}

#[derive(Serialize)]
struct Target {
    token: String,
    id: u32,
}

#[derive(Serialize)]
struct Layer {
    /// `embed` or the block's index.
    layer: String,
    hook: String,
    top: Vec<Ranked>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Ranked>,
}

#[derive(Serialize)]
struct Ranked {
    token: String,
    id: u32,
    rank: usize,
    /// Rounded to 6 significant digits, so that the output is byte-identical across runs.
    prob: f64,
}

impl Report {
    fn new(model: &Model, a: &LensArgs, ids: &[u32], token: Option<u32>, lens: &Lens) -> Self {
        let text = |id: u32| model.codec.token_text(id);
        let ranked = |r: &TokenRank| Ranked {
            token: text(r.id),
            id: r.id,
            rank: r.rank,
            prob: round(r.prob),
        };
        Self {
            model: model.path.display().to_string(),
            digest: model.manifest.root(),
            prompt: a.prompt.clone(),
            chat: !a.raw,
            tokens: ids.iter().map(|&i| text(i)).collect(),
            position: lens.position,
            token_at_position: text(ids[lens.position]),
            target: token.map(|id| Target {
                token: text(id),
                id,
            }),
            layers: lens
                .layers
                .iter()
                .map(|l| Layer {
                    layer: l.label(),
                    hook: l.hook.to_string(),
                    top: l.top.iter().map(ranked).collect(),
                    target: l.token.as_ref().map(ranked),
                })
                .collect(),
        }
    }

    /// Layer × top tokens, with the target's rank and probability in the last column.
    fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "logit lens of {} at position {} of {} ({:?}), next-token probabilities:",
            self.model,
            self.position,
            self.tokens.len(),
            self.token_at_position
        );
        let mut rows: Vec<Vec<String>> = vec![std::iter::once("layer".to_string())
            .chain((1..=self.layers.first().map_or(0, |l| l.top.len())).map(|i| format!("#{i}")))
            .chain(self.target.iter().map(|t| format!("{:?} rank, p", t.token)))
            .collect()];
        for l in &self.layers {
            rows.push(
                std::iter::once(l.layer.clone())
                    .chain(
                        l.top
                            .iter()
                            .map(|r| format!("{:?} {}", r.token, prob(r.prob))),
                    )
                    .chain(
                        l.target
                            .iter()
                            .map(|r| format!("{} {}", r.rank, prob(r.prob))),
                    )
                    .collect(),
            );
        }
        let cols = rows[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                rows.iter()
                    .map(|r| r.get(c).map_or(0, |x| x.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(x, w)| format!("{x:<w$}"))
                .collect();
            let _ = writeln!(s, "{}", line.join("  ").trim_end());
        }
        s
    }
}

/// A probability in a few characters: three decimals, or one significant digit below 0.001.
fn prob(p: f64) -> String {
    if p >= 0.001 || p == 0.0 {
        format!("{p:.3}")
    } else {
        format!("{p:.0e}")
    }
}
