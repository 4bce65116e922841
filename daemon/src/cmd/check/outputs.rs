//! Where `mechwatch check` writes its reports: the main one (`--format`, to `--out`) and any of
//! `--json`, `--junit`, `--sarif` beside it. `-` is standard output, which at most one report
//! may take. Every folder is checked before the audit starts, and when the run cannot check,
//! each report that can be written still is, carrying the error.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::CheckArgs;
use crate::gate::{Format, Outcome};

/// Where one report goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// One report: its format, where it goes, and the flag that asked for it (for messages).
pub struct Report {
    pub format: Format,
    pub sink: Sink,
    pub flag: &'static str,
}

fn is_dash(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// The reports the arguments ask for, refusing two on standard output or two in one file.
pub fn destinations(a: &CheckArgs) -> anyhow::Result<Vec<Report>> {
    let extra: Vec<(Format, &PathBuf)> = [
        (Format::Json, a.json.as_ref()),
        (Format::Junit, a.junit.as_ref()),
        (Format::Sarif, a.sarif.as_ref()),
    ]
    .into_iter()
    .filter_map(|(f, p)| p.map(|p| (f, p)))
    .collect();
    let mut on_stdout: Vec<&str> = extra
        .iter()
        .filter(|(_, p)| is_dash(p))
        .map(|(f, _)| f.flag())
        .collect();
    let main = match &a.out {
        Some(p) if is_dash(p) => {
            on_stdout.insert(0, "--out");
            Sink::Stdout
        }
        Some(p) => Sink::File(p.clone()),
        // Another report took standard output: the main one goes beside the progress lines.
        None if !on_stdout.is_empty() => Sink::Stderr,
        None => Sink::Stdout,
    };
    if on_stdout.len() > 1 {
        bail!(
            "only one report can go to standard output (`-`), but {} ask for it; give the \
             others a file name",
            on_stdout.join(" and ")
        );
    }
    let mut reports = vec![Report {
        format: a.format,
        sink: main,
        flag: "--out",
    }];
    for (format, p) in extra {
        let sink = if is_dash(p) {
            Sink::Stdout
        } else {
            Sink::File(p.clone())
        };
        reports.push(Report {
            format,
            sink,
            flag: format.flag(),
        });
    }
    for (i, r) in reports.iter().enumerate() {
        if let Sink::File(p) = &r.sink {
            if let Some(other) = reports[..i].iter().find(|o| o.sink == r.sink) {
                bail!(
                    "{} and {} both write {}; give each report its own file",
                    other.flag,
                    r.flag,
                    p.display()
                );
            }
        }
    }
    Ok(reports)
}

/// The folder a report file goes in, when it does not exist.
fn missing_folder(sink: &Sink) -> Option<PathBuf> {
    let Sink::File(path) = sink else { return None };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    (!parent.is_dir()).then(|| parent.to_path_buf())
}

/// Refuse report files whose folder does not exist before spending an audit on them.
pub fn folders_exist(reports: &[Report]) -> anyhow::Result<()> {
    let missing: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            let Sink::File(path) = &r.sink else {
                return None;
            };
            missing_folder(&r.sink).map(|folder| {
                format!(
                    "cannot write the {} report to {}: the folder {} does not exist",
                    r.flag,
                    path.display(),
                    folder.display()
                )
            })
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("{}; create it first", missing.join("; "))
    }
}

fn write_one(r: &Report, text: &str) -> anyhow::Result<()> {
    match &r.sink {
        Sink::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("writing to standard output")
        }
        Sink::Stderr => {
            eprint!("{text}");
            Ok(())
        }
        Sink::File(p) => {
            std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))
        }
    }
}

/// Write every report; a report that fails does not keep the others from being written.
pub fn write(reports: &[Report], outcome: &Outcome) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for r in reports {
        if let Err(e) = r
            .format
            .render(outcome)
            .and_then(|text| write_one(r, &text))
        {
            failed.push(format!("{}: {}", r.flag, crate::error_chain(&e)));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("could not write every report: {}", failed.join("; "))
    }
}

/// Write the reports of a run that could not check, where they can be written. The text
/// report on a terminal stream is left out: the error itself goes to standard error.
pub fn write_error(reports: &[Report], outcome: &Outcome) {
    let writable: Vec<&Report> = reports
        .iter()
        .filter(|r| missing_folder(&r.sink).is_none())
        .filter(|r| r.format != Format::Text || matches!(r.sink, Sink::File(_)))
        .collect();
    for r in writable {
        let written = r
            .format
            .render(outcome)
            .and_then(|text| write_one(r, &text));
        if let Err(e) = written {
            eprintln!(
                "warning: could not write the {} report: {}",
                r.flag,
                crate::error_chain(&e)
            );
        }
    }
}
