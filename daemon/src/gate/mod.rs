//! The gate's reports for one `mechwatch check` run, one module per format: the text a person
//! reads first ([`text`]), the full result as JSON ([`json`]), JUnit XML ([`junit`]) and SARIF
//! 2.1.0 ([`sarif`]). Each renders both outcomes: the policies ran (a verdict), or the run
//! could not check (exit 2), so that CI always gets a report in the format it reads.

pub mod json;
pub mod junit;
pub mod sarif;
pub mod text;

use audit_log::ModelSubject;
use clap::ValueEnum;
use policies::result::RunResult;

/// What one run produced.
pub enum Outcome<'a> {
    /// The policies ran; the result carries the verdict.
    Checked(&'a RunResult),
    /// The run stopped before a verdict (exit 2).
    CouldNotCheck(&'a CheckError),
}

/// Why a run could not check: the stage it stopped at, the error, and the model when it loaded.
pub struct CheckError {
    pub stage: String,
    pub message: String,
    pub model: Option<ModelSubject>,
}

/// A report format. Adding one is a module here and a line in [`Format::render`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Junit,
    Sarif,
}

impl Format {
    pub fn render(self, outcome: &Outcome) -> anyhow::Result<String> {
        Ok(match self {
            Format::Text => text::render(outcome),
            Format::Json => serde_json::to_string_pretty(&json::render(outcome)?)? + "\n",
            Format::Junit => junit::render(outcome),
            Format::Sarif => serde_json::to_string_pretty(&sarif::render(outcome))? + "\n",
        })
    }

    /// The flag that writes this format beside the main report.
    pub fn flag(self) -> &'static str {
        match self {
            Format::Text => "--out",
            Format::Json => "--json",
            Format::Junit => "--junit",
            Format::Sarif => "--sarif",
        }
    }
}

/// One line, at most `n` characters.
pub(crate) fn clip(t: &str, n: usize) -> String {
    let one = t.replace('\n', " ");
    if one.chars().count() <= n {
        one
    } else {
        format!("{}…", one.chars().take(n).collect::<String>())
    }
}
