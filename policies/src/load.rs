//! Reading and validating policy files without a model: TOML syntax, unknown keys, the fields
//! each check kind needs, names that refer to prompt sets, SAEs and directions, paths confined
//! to the policy's directory, prompt files that exist and are not empty, pinned digests, and
//! latent indices against the SAE. Everything read is digested for the run's record.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use probes::digest::sha256_hex;
use probes::sae::search::Labels;
use probes::sae::{load_sae, Sae};
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::checks::CheckBody;
use crate::error::{LineIndex, Loc, PolicyError};
use crate::schema::{
    CheckHead, CheckKind, DirectionSpec, LatentRef, ModelMatch, PolicyFile, PositionsSpec,
    PromptSetSpec, SaeSpec, Severity, SCHEMA_VERSION,
};

/// A file a run read, with its digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct InputFile {
    /// `policy`, `prompts`, `sae`, `labels` or `direction`.
    pub kind: String,
    pub path: String,
    pub sha256: String,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub description: String,
    pub models: ModelMatch,
    /// sha256 of the policy file's bytes.
    pub digest: String,
    pub prompt_sets: BTreeMap<String, PromptSet>,
    pub saes: BTreeMap<String, SaeEntry>,
    pub directions: BTreeMap<String, Direction>,
    /// Where the refusal score's tokens come from (`[refusal]`).
    pub refusal: crate::refusal::ScoreTokens,
    pub checks: Vec<Check>,
    /// Every file this policy reads, the policy itself first.
    pub inputs: Vec<InputFile>,
    /// The policy text, for locating later (model-dependent) errors.
    source: String,
}

#[derive(Debug, Clone)]
pub struct PromptSet {
    pub name: String,
    pub prompts: Vec<String>,
    pub chat: bool,
    /// The prompt file, as the policy names it.
    pub file: String,
    /// The line of the prompt file each prompt is on (1-based), for errors about a prompt.
    pub lines: Vec<usize>,
}

/// A name or value together with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub value: T,
    pub at: Loc,
}

#[derive(Debug, Clone)]
pub enum SaeSource {
    /// The model's default SAE (shipped, or built once by `mechwatch sae default`).
    Builtin { hook: Option<Located<String>> },
    /// Loaded and digest-checked at validation.
    File {
        sae: Arc<Sae>,
        hook: Option<Located<String>>,
    },
}

#[derive(Debug, Clone)]
pub struct SaeEntry {
    pub source: SaeSource,
    pub labels: Labels,
}

#[derive(Debug, Clone)]
pub enum DirectionSource {
    Contrast {
        positive: String,
        negative: String,
        position: i64,
    },
    File {
        vector: Vec<f32>,
    },
}

#[derive(Debug, Clone)]
pub struct Direction {
    /// Where the direction is defined (its `hook` or `layers` key), for later errors.
    pub at: Loc,
    /// The hook it lives at; `None` when it is selected among candidates (`layers`).
    pub hook: Option<Located<String>>,
    pub source: DirectionSource,
    pub select: Option<SelectSpec>,
}

/// Where a selected direction's candidates are read, and the sets and filters that choose
/// one; see [`crate::selection`].
#[derive(Debug, Clone)]
pub struct SelectSpec {
    /// Fractions of depth, inclusive.
    pub layers: Located<[f64; 2]>,
    pub positions: Located<CandidatePositions>,
    pub validate_positive: String,
    pub validate_negative: String,
    pub max_kl: f64,
    pub max_depth: f64,
    /// Candidates, best proxy first, that get the causal scores.
    pub scored: usize,
}

/// Candidate positions: negative offsets from the end of a chat prompt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidatePositions {
    /// Every token the chat template puts after the user's message.
    PostInstruction,
    /// Offsets `from..=to`, both negative.
    Range(i64, i64),
}

#[derive(Debug, Clone)]
pub struct Check {
    pub id: String,
    pub kind: CheckKind,
    pub severity: Severity,
    pub description: String,
    /// The kind's own settings; see [`crate::checks`].
    pub body: CheckBody,
}

/// Load every `*.toml` policy in `path` (a file or a directory, not recursive), in name order.
pub fn load_policies(path: &Path) -> Result<Vec<Policy>, Vec<PolicyError>> {
    let files = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| vec![PolicyError::io(path, e)])?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(vec![PolicyError::at(
                path,
                None,
                "no policy files (*.toml) in this directory",
            )]);
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match Policy::load(&f) {
            Ok(p) => policies.push(p),
            Err(mut e) => errors.append(&mut e),
        }
    }
    let mut names = BTreeSet::new();
    for p in &policies {
        if !names.insert(p.name.clone()) {
            errors.push(PolicyError::at(
                &p.path,
                None,
                format!("another policy is also named `{}`", p.name),
            ));
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

impl Policy {
    /// Parse and validate one policy file, reporting every error found (each with its line
    /// and column), not only the first.
    pub fn load(path: &Path) -> Result<Self, Vec<PolicyError>> {
        let bytes =
            probes::files::read_text_file(path).map_err(|e| vec![PolicyError::io(path, e)])?;
        let text = String::from_utf8(bytes.clone())
            .map_err(|_| vec![PolicyError::at(path, None, "not UTF-8 text")])?;
        Self::parse(path, &text, &sha256_hex(&bytes))
    }

    /// Validate `text` as the policy at `path` (files it names are read relative to the
    /// path's directory).
    pub fn parse(path: &Path, text: &str, digest: &str) -> Result<Self, Vec<PolicyError>> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            vec![PolicyError::at(
                path,
                e.span().map(|s| Loc::of(text, s.start)),
                e.message().trim_end(),
            )]
        })?;
        let mut v = Validator {
            path,
            dir: policy_dir(path),
            text,
            lines: LineIndex::new(text),
            errors: Vec::new(),
            broken: BTreeSet::new(),
            inputs: vec![InputFile {
                kind: "policy".into(),
                path: path
                    .file_name()
                    .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
                sha256: digest.to_string(),
            }],
        };
        let policy = v.policy(file, digest);
        if v.errors.is_empty() {
            Ok(policy)
        } else {
            Err(v.errors)
        }
    }

    /// Where `at` is, as an error about this policy.
    pub fn error(&self, at: &Loc, message: impl Into<String>) -> PolicyError {
        PolicyError::at(&self.path, Some(*at), message)
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Validation state of one policy file: its errors so far and the files it read. Check
/// kinds validate their own fields with its helpers.
pub(crate) struct Validator<'a> {
    path: &'a Path,
    dir: PathBuf,
    text: &'a str,
    /// Where `text`'s lines start: locating a value is a binary search, not a scan.
    lines: LineIndex,
    errors: Vec<PolicyError>,
    /// Definitions (kind, name) that had errors of their own: references to them are not
    /// reported again as undefined, so each root cause is reported once.
    broken: BTreeSet<(&'static str, String)>,
    inputs: Vec<InputFile>,
}

impl<'a> Validator<'a> {
    fn loc<T>(&self, s: &Spanned<T>) -> Loc {
        self.at(s.span().start)
    }

    /// The line and column of byte `offset` of the policy text.
    fn at(&self, offset: usize) -> Loc {
        self.lines.loc(self.text, offset)
    }

    /// `s`'s value with where it was written, for errors found later against the model.
    pub(crate) fn located<T: Clone>(&self, s: &Spanned<T>) -> Located<T> {
        Located {
            value: s.get_ref().clone(),
            at: self.loc(s),
        }
    }

    pub(crate) fn err<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        let loc = self.loc(at);
        self.errors
            .push(PolicyError::at(self.path, Some(loc), message));
    }

    fn policy(&mut self, f: PolicyFile, digest: &str) -> Policy {
        if *f.schema.get_ref() != SCHEMA_VERSION {
            self.err(
                &f.schema,
                format!(
                    "unsupported schema {}; this mechwatch reads schema {SCHEMA_VERSION}",
                    f.schema.get_ref()
                ),
            );
        }
        if f.name.get_ref().trim().is_empty() {
            self.err(&f.name, "the policy name is empty");
        } else {
            self.printable(&f.name, "the policy name", false);
        }
        self.printable(&f.version, "the policy version", false);
        if let Some(d) = &f.description {
            self.printable(d, "the policy description", true);
        }
        self.defined_names();
        let supported = probes::architecture_names();
        for a in &f.models.architectures {
            if !supported.contains(&a.get_ref().as_str()) {
                self.err(
                    a,
                    format!(
                        "[models] architecture `{}` is not a family mechwatch supports ({})",
                        a.get_ref(),
                        supported.join(", ")
                    ),
                );
            }
        }
        let prompt_sets = f
            .prompts
            .iter()
            .filter_map(|(name, spec)| self.prompt_set(name, spec).map(|s| (name.clone(), s)))
            .collect::<BTreeMap<_, _>>();
        self.mark_broken("prompt set", &f.prompts, &prompt_sets);
        let saes = f
            .saes
            .iter()
            .filter_map(|(name, spec)| self.sae(name, spec).map(|s| (name.clone(), s)))
            .collect::<BTreeMap<_, _>>();
        self.mark_broken("SAE", &f.saes, &saes);
        let directions = f
            .directions
            .iter()
            .filter_map(|(name, spec)| {
                self.direction(spec, &prompt_sets)
                    .map(|d| (name.clone(), d))
            })
            .collect::<BTreeMap<_, _>>();
        self.mark_broken("direction", &f.directions, &directions);
        let refusal = crate::refusal::validate(f.refusal.as_ref(), self, &prompt_sets);
        let names = Names {
            prompts: &prompt_sets,
            saes: &saes,
            directions: &directions,
        };
        let mut ids = BTreeSet::new();
        let mut checks = Vec::new();
        for table in self.check_tables() {
            let Some((head, fields)) = self.split_check(table) else {
                continue;
            };
            if !ids.insert(head.id.get_ref().clone()) {
                self.err(
                    &head.id,
                    format!("duplicate check id `{}`", head.id.get_ref()),
                );
            }
            if let Some(check) = self.check(&head, fields, &names) {
                checks.push(check);
            }
        }
        if f.checks.is_empty() {
            self.errors.push(PolicyError::at(
                self.path,
                None,
                "the policy has no [[checks]]",
            ));
        }
        let mut inputs = std::mem::take(&mut self.inputs);
        inputs[1..].sort();
        inputs.dedup();
        Policy {
            path: self.path.to_path_buf(),
            name: f.name.into_inner(),
            version: f.version.into_inner(),
            description: f.description.map(Spanned::into_inner).unwrap_or_default(),
            models: ModelMatch {
                architectures: f
                    .models
                    .architectures
                    .into_iter()
                    .map(|a| a.into_inner())
                    .collect(),
                n_layers: f.models.n_layers,
                d_model: f.models.d_model,
                name_contains: f.models.name_contains,
            },
            digest: digest.to_string(),
            prompt_sets,
            saes,
            directions,
            refusal,
            checks,
            inputs,
            source: self.text.to_string(),
        }
    }

    /// Resolve `rel` inside the policy's directory: no absolute paths, no `..`, and no
    /// symlink that leads out.
    pub(crate) fn confined(&mut self, rel: &Spanned<String>) -> Option<PathBuf> {
        let p = Path::new(rel.get_ref());
        if p.is_absolute()
            || p.components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            self.err(
                rel,
                format!(
                    "`{}` leaves the policy's directory; paths must stay inside it",
                    rel.get_ref()
                ),
            );
            return None;
        }
        let full = self.dir.join(p);
        let (Ok(real), Ok(root)) = (full.canonicalize(), self.dir.canonicalize()) else {
            self.err(rel, format!("`{}` does not exist", full.display()));
            return None;
        };
        if !real.starts_with(&root) {
            self.err(
                rel,
                format!(
                    "`{}` resolves to `{}`, outside the policy's directory",
                    rel.get_ref(),
                    real.display()
                ),
            );
            return None;
        }
        Some(full)
    }

    pub(crate) fn read(&mut self, rel: &Spanned<String>, kind: &str) -> Option<(PathBuf, Vec<u8>)> {
        let full = self.confined(rel)?;
        if let Err(why) = single_link(&full) {
            self.err(rel, why);
            return None;
        }
        // Prompts, labels and direction vectors: text-sized files, never gigabytes.
        match probes::files::read_text_file(&full) {
            Ok(bytes) => {
                self.inputs.push(InputFile {
                    kind: kind.into(),
                    path: rel.get_ref().clone(),
                    sha256: sha256_hex(&bytes),
                });
                Some((full, bytes))
            }
            Err(e) => {
                self.err(rel, format!("cannot read `{}`: {e}", full.display()));
                None
            }
        }
    }

    fn prompt_set(&mut self, name: &str, spec: &PromptSetSpec) -> Option<PromptSet> {
        let (full, bytes) = self.read(&spec.file, "prompts")?;
        let Ok(text) = String::from_utf8(bytes) else {
            self.err(
                &spec.file,
                format!("`{}` is not UTF-8 text", full.display()),
            );
            return None;
        };
        let jsonl = full.extension().is_some_and(|e| e == "jsonl");
        let mut prompts = Vec::new();
        let mut at = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            // Blank lines, and in a `.txt` file comment lines, are no prompts (and `lines`
            // does not count them); a prompt that starts with `#` goes in a `.jsonl` file.
            if line.is_empty() || (!jsonl && line.starts_with('#')) {
                continue;
            }
            if jsonl {
                match serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("prompt").and_then(|p| p.as_str().map(str::to_string)))
                {
                    Some(p) => {
                        prompts.push(p);
                        at.push(i + 1);
                    }
                    None => {
                        self.err(
                            &spec.file,
                            format!(
                                "{}:{}: expected a JSON object with a string `prompt`",
                                full.display(),
                                i + 1
                            ),
                        );
                        return None;
                    }
                }
            } else {
                prompts.push(line.to_string());
                at.push(i + 1);
            }
        }
        if let Some(range) = &spec.lines {
            let [lo, hi] = match range.get_ref()[..] {
                [lo, hi] => [lo, hi].map(|x| usize::try_from(x).unwrap_or(0)),
                _ => {
                    self.err(
                        range,
                        format!(
                            "`lines` is `[from, to]`, exactly two line numbers (1-based, \
                             inclusive); this list has {} elements",
                            range.get_ref().len()
                        ),
                    );
                    return None;
                }
            };
            if lo == 0 || hi < lo || hi > prompts.len() {
                let [from, to] = [range.get_ref()[0], range.get_ref()[1]];
                self.err(
                    range,
                    format!(
                        "prompt range [{from}, {to}] is outside 1..={} (the prompts in `{}`)",
                        prompts.len(),
                        spec.file.get_ref()
                    ),
                );
                return None;
            }
            prompts = prompts[lo - 1..hi].to_vec();
            at = at[lo - 1..hi].to_vec();
        }
        if prompts.is_empty() {
            self.err(
                &spec.file,
                format!("prompt set `{name}` is empty (`{}`)", spec.file.get_ref()),
            );
            return None;
        }
        Some(PromptSet {
            name: name.to_string(),
            prompts,
            chat: spec.chat,
            file: spec.file.get_ref().clone(),
            lines: at,
        })
    }

    fn sae(&mut self, name: &str, spec: &SaeSpec) -> Option<SaeEntry> {
        if let Some(h) = &spec.hook {
            self.hook_syntax(h);
        }
        let hook = spec.hook.as_ref().map(|h| Located {
            value: h.get_ref().clone(),
            at: self.loc(h),
        });
        let labels = match &spec.labels {
            Some(rel) => {
                let full = self.read(rel, "labels")?.0;
                match Labels::read(&full) {
                    Ok(l) => l,
                    Err(e) => {
                        self.err(rel, e.to_string());
                        return None;
                    }
                }
            }
            None => Labels::default(),
        };
        let source = match (&spec.builtin, &spec.path) {
            (Some(b), None) => {
                if b.get_ref() != "default" {
                    self.err(
                        b,
                        format!(
                            "unknown builtin SAE `{}`; the one builtin is `default`",
                            b.get_ref()
                        ),
                    );
                    return None;
                }
                if spec.sha256.is_some() {
                    self.err(b, "a builtin SAE is not pinned by `sha256`; its digest is recorded in each result");
                }
                SaeSource::Builtin { hook }
            }
            (None, Some(rel)) => {
                let full = self.confined(rel)?;
                // The pin is checked on the files' bytes before any is parsed: a file that
                // is not the pinned one is never read as JSON or tensors, nor shown.
                let digest = self.sae_digest(rel, &full)?;
                match &spec.sha256 {
                    None => {
                        self.err(rel, format!("SAE `{name}` needs `sha256 = \"{digest}\"` (the digest of its files) to pin it"));
                        return None;
                    }
                    Some(want) if !want.get_ref().eq_ignore_ascii_case(&digest) => {
                        self.err(
                            want,
                            format!(
                                "SAE `{name}` at `{}` has digest {digest}, not the pinned {}",
                                rel.get_ref(),
                                want.get_ref()
                            ),
                        );
                        return None;
                    }
                    Some(_) => {}
                }
                let sae = match load_sae(&full) {
                    Ok(s) => s,
                    Err(e) => {
                        self.err(rel, e.to_string());
                        return None;
                    }
                };
                if sae.manifest.root() != digest {
                    self.err(
                        rel,
                        format!(
                            "SAE `{name}` at `{}` changed while it was read (digest {digest}, \
                             then {})",
                            rel.get_ref(),
                            sae.manifest.root()
                        ),
                    );
                    return None;
                }
                self.inputs.push(InputFile {
                    kind: "sae".into(),
                    path: rel.get_ref().clone(),
                    sha256: digest,
                });
                SaeSource::File {
                    sae: Arc::new(sae),
                    hook,
                }
            }
            _ => {
                self.errors.push(PolicyError::at(
                    self.path,
                    None,
                    format!("[saes.{name}] needs exactly one of `path` or `builtin`"),
                ));
                return None;
            }
        };
        Some(SaeEntry { source, labels })
    }

    /// The manifest digest of the SAE at `full` (`rel` in the policy), from the files
    /// [`load_sae`] reads there, each held to the rules of a policy's files (inside the
    /// policy's directory after symlinks, one hard link, a regular file) and none parsed.
    fn sae_digest(&mut self, rel: &Spanned<String>, full: &Path) -> Option<String> {
        let mut manifest = probes::digest::Manifest::default();
        for (name, path) in sae_files(full) {
            if let Err(why) = self.policy_file(&path) {
                self.err(rel, format!("SAE file `{}`: {why}", path.display()));
                return None;
            }
            match probes::files::read_regular(&path) {
                Ok(bytes) => manifest.add(&name, &bytes),
                Err(e) => {
                    self.err(rel, format!("cannot read `{}`: {e}", path.display()));
                    return None;
                }
            }
        }
        Some(manifest.root())
    }

    /// Why the file at `path` may not be read for this policy, if it may not: it resolves
    /// outside the policy's directory, has a second hard link, or is no regular file.
    fn policy_file(&self, path: &Path) -> Result<(), String> {
        let (Ok(real), Ok(root)) = (path.canonicalize(), self.dir.canonicalize()) else {
            return Err("does not exist".into());
        };
        if !real.starts_with(&root) {
            return Err(format!(
                "resolves to `{}`, outside the policy's directory",
                real.display()
            ));
        }
        match std::fs::metadata(&real) {
            Ok(m) if m.is_file() => single_link(&real),
            Ok(_) => Err("is not a regular file".into()),
            Err(e) => Err(format!("cannot be read: {e}")),
        }
    }

    fn direction(
        &mut self,
        spec: &DirectionSpec,
        sets: &BTreeMap<String, PromptSet>,
    ) -> Option<Direction> {
        let (hook, at) = match (&spec.hook, &spec.layers) {
            (Some(h), None) => {
                self.hook_syntax(h);
                (Some(self.located(h)), self.loc(h))
            }
            (None, Some(l)) => (None, self.loc(l)),
            (Some(_), Some(l)) => {
                self.err(
                    l,
                    "a direction has either one `hook` or candidate `layers`, not both",
                );
                return None;
            }
            (None, None) => {
                self.errors.push(PolicyError::at(
                    self.path,
                    None,
                    "a direction needs `hook`, or candidate `layers` to select it among",
                ));
                return None;
            }
        };
        let select = match &spec.layers {
            Some(l) => Some(self.select_spec(spec, l, sets)?),
            None => {
                self.selection_keys_unused(spec);
                None
            }
        };
        let source = match (&spec.positive, &spec.negative, &spec.file) {
            (Some(p), Some(n), None) => {
                let (p, n) = self.contrast(("positive", p), ("negative", n), sets)?;
                DirectionSource::Contrast {
                    positive: p,
                    negative: n,
                    position: spec.position,
                }
            }
            (None, None, Some(rel)) => {
                let (full, bytes) = self.read(rel, "direction")?;
                let digest = sha256_hex(&bytes);
                match &spec.sha256 {
                    Some(want) if want.get_ref().eq_ignore_ascii_case(&digest) => {}
                    Some(want) => {
                        self.err(
                            want,
                            format!(
                                "`{}` has sha256 {digest}, not the pinned {}",
                                rel.get_ref(),
                                want.get_ref()
                            ),
                        );
                        return None;
                    }
                    None => {
                        self.err(
                            rel,
                            format!("a direction file needs `sha256 = \"{digest}\"` to pin it"),
                        );
                        return None;
                    }
                }
                match read_vector(&full, bytes, spec.tensor.as_deref()) {
                    Ok(vector) => DirectionSource::File { vector },
                    Err(e) => {
                        self.err(rel, e);
                        return None;
                    }
                }
            }
            _ => {
                self.errors.push(PolicyError::at(
                    self.path,
                    Some(at),
                    "a direction needs either `positive` and `negative` prompt sets or a `file`",
                ));
                return None;
            }
        };
        if let (Some(_), DirectionSource::File { .. }) = (&select, &source) {
            self.errors.push(PolicyError::at(
                self.path,
                Some(at),
                "a direction read from a `file` has one hook; `layers` selects among \
                 difference-of-means candidates and needs `positive` and `negative`",
            ));
            return None;
        }
        Some(Direction {
            at,
            hook,
            source,
            select,
        })
    }

    /// The candidates and filters of a direction selected among `layers`.
    fn select_spec(
        &mut self,
        spec: &DirectionSpec,
        layers: &Spanned<Vec<f64>>,
        sets: &BTreeMap<String, PromptSet>,
    ) -> Option<SelectSpec> {
        let [from, to] = match layers.get_ref()[..] {
            [from, to] => [from, to],
            _ => {
                self.err(
                    layers,
                    format!(
                        "`layers` is `[from, to]`, exactly two fractions of depth; this list has \
                         {} elements",
                        layers.get_ref().len()
                    ),
                );
                return None;
            }
        };
        if !(0.0..=1.0).contains(&from) || !(0.0..=1.0).contains(&to) {
            self.err(
                layers,
                format!("`layers` are fractions of depth in [0, 1]; [{from}, {to}] is outside"),
            );
            return None;
        }
        if from > to {
            self.err(layers, format!("`layers` [{from}, {to}] is an empty range"));
            return None;
        }
        let positions = match &spec.positions {
            None => Located {
                value: CandidatePositions::PostInstruction,
                at: self.loc(layers),
            },
            Some(p) => {
                let value = match p.get_ref() {
                    PositionsSpec::Named(n) if n == "post_instruction" => {
                        CandidatePositions::PostInstruction
                    }
                    PositionsSpec::Range(r) if matches!(r[..], [a, b] if a <= b && b < 0) => {
                        CandidatePositions::Range(r[0], r[1])
                    }
                    _ => {
                        self.err(
                            p,
                            "`positions` is \"post_instruction\" or negative offsets [from, to] \
                             (inclusive, e.g. [-5, -1]) among the post-instruction tokens",
                        );
                        return None;
                    }
                };
                Located {
                    value,
                    at: self.loc(p),
                }
            }
        };
        let fraction = |v: &mut Self, x: &Option<Spanned<f64>>, default: f64, what: &str| match x {
            None => Some(default),
            Some(x) if x.get_ref().is_finite() && *x.get_ref() > 0.0 => Some(*x.get_ref()),
            Some(x) => {
                v.err(x, format!("`{what}` must be a positive number"));
                None
            }
        };
        let max_kl = fraction(self, &spec.max_kl, 0.1, "max_kl")?;
        let max_depth = fraction(self, &spec.max_depth, 0.8, "max_depth")?;
        if max_depth > 1.0 {
            if let Some(x) = &spec.max_depth {
                self.err(x, "`max_depth` is a fraction of depth in (0, 1]");
            }
            return None;
        }
        let scored = match &spec.scored {
            None => crate::selection::SCORED,
            Some(x) if (1..=crate::selection::MAX_SCORED as i64).contains(x.get_ref()) => {
                *x.get_ref() as usize
            }
            Some(x) => {
                self.err(
                    x,
                    format!(
                        "`scored` is how many blocks' best candidates get the causal scores: 1 to {}",
                        crate::selection::MAX_SCORED
                    ),
                );
                return None;
            }
        };
        let (Some(vp), Some(vn)) = (&spec.validate_positive, &spec.validate_negative) else {
            self.err(
                layers,
                "a direction selected among `layers` needs held-out `validate_positive` and \
                 `validate_negative` prompt sets",
            );
            return None;
        };
        let (vp, vn) = self.contrast(("validate_positive", vp), ("validate_negative", vn), sets)?;
        Some(SelectSpec {
            layers: Located {
                value: [from, to],
                at: self.loc(layers),
            },
            positions,
            validate_positive: vp,
            validate_negative: vn,
            max_kl,
            max_depth,
            scored,
        })
    }

    /// The selection keys mean nothing without `layers`.
    fn selection_keys_unused(&mut self, spec: &DirectionSpec) {
        let keys = [
            ("positions", spec.positions.as_ref().map(|x| x.span())),
            (
                "validate_positive",
                spec.validate_positive.as_ref().map(|x| x.span()),
            ),
            (
                "validate_negative",
                spec.validate_negative.as_ref().map(|x| x.span()),
            ),
            ("max_kl", spec.max_kl.as_ref().map(|x| x.span())),
            ("max_depth", spec.max_depth.as_ref().map(|x| x.span())),
            ("scored", spec.scored.as_ref().map(|x| x.span())),
        ];
        for (key, span) in keys {
            if let Some(span) = span {
                let loc = self.at(span.start);
                self.errors.push(PolicyError::at(
                    self.path,
                    Some(loc),
                    format!("`{key}` belongs to a direction selected among `layers`"),
                ));
            }
        }
    }

    /// Hook names are checked for form here and against the model when it is known.
    /// Remember the definitions of `kind` that failed validation (defined but not valid).
    fn mark_broken<A, B>(
        &mut self,
        kind: &'static str,
        defined: &BTreeMap<String, A>,
        valid: &BTreeMap<String, B>,
    ) {
        let failed = defined.keys().filter(|n| !valid.contains_key(*n));
        self.broken.extend(failed.map(|n| (kind, n.clone())));
    }

    fn hook_syntax(&mut self, hook: &Spanned<String>) {
        // The layer count is known only with the model: a block number is checked then, a
        // fraction of depth here.
        if let Err(e) = probes::HookName::parse(hook.get_ref()) {
            self.err(hook, e.to_string());
        }
    }

    pub(crate) fn set(
        &mut self,
        name: &Spanned<String>,
        sets: &BTreeMap<String, PromptSet>,
    ) -> Option<String> {
        if sets.contains_key(name.get_ref()) {
            Some(name.get_ref().clone())
        } else if self
            .broken
            .contains(&("prompt set", name.get_ref().clone()))
        {
            None
        } else {
            self.err(
                name,
                format!(
                    "no prompt set `{}` (defined: {})",
                    name.get_ref(),
                    list(sets.keys())
                ),
            );
            None
        }
    }

    pub(crate) fn named<T>(
        &mut self,
        what: &'static str,
        name: &Spanned<String>,
        map: &BTreeMap<String, T>,
    ) -> Option<String> {
        if map.contains_key(name.get_ref()) {
            Some(name.get_ref().clone())
        } else if self.broken.contains(&(what, name.get_ref().clone())) {
            None
        } else {
            self.err(
                name,
                format!(
                    "no {what} `{}` (defined: {})",
                    name.get_ref(),
                    list(map.keys())
                ),
            );
            None
        }
    }

    pub(crate) fn latent(
        &mut self,
        r: &Spanned<LatentRef>,
        sae: &SaeEntry,
    ) -> Option<Located<usize>> {
        let at = self.loc(r);
        let index = match r.get_ref() {
            LatentRef::Index(i) => {
                if *i < 0 {
                    self.err(r, format!("latent index {i} is negative"));
                    return None;
                }
                *i as usize
            }
            LatentRef::Label(l) => match sae.labels.find(l) {
                Some(i) => i,
                None => {
                    self.err(
                        r,
                        format!("no latent is labelled `{l}` in the SAE's labels"),
                    );
                    return None;
                }
            },
        };
        if let SaeSource::File { sae: s, .. } = &sae.source {
            if let Err(e) = s.check_latent(index) {
                self.err(r, e.to_string());
                return None;
            }
        }
        Some(Located { value: index, at })
    }

    /// Every `[[checks]]` table, with the spans of its keys and values.
    fn check_tables(&mut self) -> Vec<Spanned<DeValue<'a>>> {
        let Ok(doc) = DeTable::parse(self.text) else {
            // Unreachable: the same text parsed as a policy file already.
            return Vec::new();
        };
        let mut doc = doc.into_inner();
        match doc.remove("checks").map(Spanned::into_inner) {
            Some(DeValue::Array(a)) => a.iter().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// A check's common fields, and the rest of its table (its kind's fields).
    fn split_check(
        &mut self,
        table: Spanned<DeValue<'a>>,
    ) -> Option<(CheckHead, ValueDeserializer<'a>)> {
        let span = table.span();
        let DeValue::Table(all) = table.into_inner() else {
            let at = self.at(span.start);
            self.errors.push(PolicyError::at(
                self.path,
                Some(at),
                "each [[checks]] entry is a table",
            ));
            return None;
        };
        let (mut head, mut rest) = (DeTable::new(), DeTable::new());
        for (k, v) in all {
            if CheckHead::KEYS.iter().any(|key| **key == **k.get_ref()) {
                head.insert(k, v);
            } else {
                rest.insert(k, v);
            }
        }
        let head = Spanned::new(span.clone(), DeValue::Table(head));
        match CheckHead::deserialize(ValueDeserializer::from(head)) {
            Ok(h) => Some((
                h,
                ValueDeserializer::from(Spanned::new(span, DeValue::Table(rest))),
            )),
            Err(e) => {
                self.toml_error(&e, span.start, "");
                None
            }
        }
    }

    fn toml_error(&mut self, e: &toml::de::Error, fallback: usize, prefix: &str) {
        let at = self.at(e.span().map_or(fallback, |s| s.start));
        self.errors.push(PolicyError::at(
            self.path,
            Some(at),
            format!("{prefix}{}", e.message().trim_end()),
        ));
    }

    /// A check's kind-specific fields as `T`: a field of another kind is an error at its line.
    pub(crate) fn kind_fields<T: serde::de::DeserializeOwned>(
        &mut self,
        kind: CheckKind,
        id: &Spanned<String>,
        fields: ValueDeserializer<'_>,
    ) -> Option<T> {
        match T::deserialize(fields) {
            Ok(t) => Some(t),
            Err(e) => {
                let prefix = format!("check `{}` ({}): ", id.get_ref(), kind.name());
                self.toml_error(&e, id.span().start, &prefix);
                None
            }
        }
    }

    fn check(
        &mut self,
        head: &CheckHead,
        fields: ValueDeserializer<'_>,
        n: &Names<'_>,
    ) -> Option<Check> {
        let before = self.errors.len();
        let id = head.id.get_ref().clone();
        if id.is_empty()
            || !id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            self.err(
                &head.id,
                "a check id is non-empty and uses only letters, digits, `-`, `_` and `.`",
            );
        }
        if let Some(d) = &head.description {
            self.printable(d, "a check's description", true);
        }
        let body = CheckBody::validate(head.kind, fields, self, &head.id, n);
        if self.errors.len() > before {
            return None;
        }
        Some(Check {
            id,
            kind: head.kind,
            severity: head.severity,
            description: head
                .description
                .as_ref()
                .map(|d| d.get_ref().clone())
                .unwrap_or_default(),
            body: body?,
        })
    }

    /// An error at `s` if it holds a character that would rewrite a report or a terminal
    /// when shown: a control character (line breaks unless `multiline`, escape sequences)
    /// or a bidirectional override. Names and descriptions appear in every report and log.
    pub(crate) fn printable(&mut self, s: &Spanned<String>, what: &str, multiline: bool) {
        let allowed = |c: char| multiline && (c == '\n' || c == '\t');
        if let Some(c) = s.get_ref().chars().find(|c| hidden(*c) && !allowed(*c)) {
            let lines = if multiline { "" } else { ", line breaks" };
            self.err(
                s,
                format!(
                    "{what} {:?} holds U+{:04X}: names and descriptions appear in reports and \
                     logs, so they may not hold control characters{lines} or bidirectional \
                     overrides",
                    s.get_ref(),
                    u32::from(c)
                ),
            );
        }
    }

    /// The names of prompt sets, SAEs and directions, checked like the policy's name at their
    /// keys (serde reads table keys without their spans).
    fn defined_names(&mut self) {
        let Ok(doc) = DeTable::parse(self.text) else {
            return;
        };
        let doc = doc.into_inner();
        for (table, what) in [
            ("prompts", "the prompt set name"),
            ("saes", "the SAE name"),
            ("directions", "the direction name"),
        ] {
            let Some(DeValue::Table(t)) = doc.get(table).map(Spanned::get_ref) else {
                continue;
            };
            for key in t.keys() {
                let name = Spanned::new(key.span(), key.get_ref().to_string());
                if name.get_ref().trim().is_empty() {
                    self.err(&name, format!("{what} is empty"));
                } else {
                    self.printable(&name, what, false);
                }
            }
        }
    }

    /// Two prompt sets that a check or direction contrasts, each named by its `field`: both
    /// must exist and differ. A set against itself, or against a set of the same prompts,
    /// separates nothing (an AUROC of 0.5, a zero difference of means, equal patches) whatever
    /// the model does, so such a check could only pass or fail by its bound.
    pub(crate) fn contrast(
        &mut self,
        (a_field, a): (&str, &Spanned<String>),
        (b_field, b): (&str, &Spanned<String>),
        sets: &BTreeMap<String, PromptSet>,
    ) -> Option<(String, String)> {
        let (a, b_name) = (self.set(a, sets), self.set(b, sets));
        let (a, b_name) = (a?, b_name?);
        if a == b_name {
            self.err(
                b,
                format!(
                    "`{a_field}` and `{b_field}` name the same prompt set `{a}`: a set contrasted \
                     with itself separates nothing"
                ),
            );
            return None;
        }
        let (x, y) = (&sets[&a], &sets[&b_name]);
        if x.prompts == y.prompts && x.chat == y.chat {
            self.err(
                b,
                format!(
                    "`{a_field}` (`{a}`) and `{b_field}` (`{b_name}`) hold the same prompts: \
                     a set contrasted with itself separates nothing"
                ),
            );
            return None;
        }
        Some((a, b_name))
    }

    /// `x` if it is a finite number, else an error at its line naming `field`.
    pub(crate) fn finite_at(&mut self, x: &Spanned<f64>, field: &str) -> Option<f64> {
        let v = *x.get_ref();
        if v.is_finite() {
            Some(v)
        } else {
            self.err(x, format!("`{field}` must be a finite number, not {v}"));
            None
        }
    }

    /// `x` if it is within `[lo, hi]` (so finite), else an error at its line naming `field`.
    pub(crate) fn within(
        &mut self,
        x: &Spanned<f64>,
        field: &str,
        lo: f64,
        hi: f64,
    ) -> Option<f64> {
        let v = *x.get_ref();
        if (lo..=hi).contains(&v) {
            Some(v)
        } else {
            self.err(x, format!("`{field}` {v} is outside [{lo}, {hi}]"));
            None
        }
    }

    /// A list of words or phrases that a measure reads: not empty, and no entry empty or
    /// only whitespace (an empty phrase is in every reply; an empty word has no token).
    pub(crate) fn words(&mut self, list: &Spanned<Vec<Spanned<String>>>, field: &str) -> bool {
        if list.get_ref().is_empty() {
            self.err(
                list,
                format!("`{field}` is empty: it would measure nothing"),
            );
            return false;
        }
        let mut ok = true;
        for w in list.get_ref() {
            if w.get_ref().trim().is_empty() {
                self.err(
                    w,
                    format!(
                        "`{field}` holds an empty or blank entry {:?}, which would match \
                         everything or nothing",
                        w.get_ref()
                    ),
                );
                ok = false;
            }
        }
        ok
    }

    /// How many errors were found so far.
    pub(crate) fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// `v`, or an error that check `id` needs `field`.
    pub(crate) fn required<'s, T>(
        &mut self,
        id: &Spanned<String>,
        field: &str,
        v: &'s Option<T>,
    ) -> Option<&'s T> {
        if v.is_none() {
            self.err(id, format!("check `{}` needs `{field}`", id.get_ref()));
        }
        v.as_ref()
    }
}

/// What a policy defines, for checks to refer to by name.
pub(crate) struct Names<'a> {
    pub prompts: &'a BTreeMap<String, PromptSet>,
    pub saes: &'a BTreeMap<String, SaeEntry>,
    pub directions: &'a BTreeMap<String, Direction>,
}

/// The folder a policy's files are named relative to: its parent, or the working
/// directory for a bare file name (whose parent is the empty path).
fn policy_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Files a policy reads must have one name only. A hard link is a second name for a file
/// that may live outside the policy's folder, which the path check cannot see: the link's
/// path is inside, its content is not. Refused rather than trusted.
fn single_link(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.nlink() > 1 => Err(format!(
            "`{}` has {} hard links; a policy's files must have one name only, since a hard \
             link can bring in a file from outside the policy's directory (copy the file \
             instead)",
            path.display(),
            m.nlink()
        )),
        _ => Ok(()),
    }
}

/// A character that changes how the text around it shows: a control character (escape
/// sequences, line breaks, NUL) or a bidirectional formatting character.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// The files [`load_sae`] reads for the SAE at `path`, each with the name its manifest gives
/// it: a Gemma Scope `params.npz` (named, or in the folder), else `cfg.json` with the SAELens
/// or sparsify weights. None when the folder is no SAE (loading it then says why).
fn sae_files(path: &Path) -> Vec<(String, PathBuf)> {
    let (dir, file) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        (policy_dir(path), Some(path.to_path_buf()))
    };
    let named = |p: PathBuf| {
        let name = p
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        (name, p)
    };
    let npz = match &file {
        Some(f) => f.extension().is_some_and(|e| e == "npz").then(|| f.clone()),
        None => Some(dir.join("params.npz")).filter(|p| p.exists()),
    };
    if let Some(npz) = npz {
        return vec![named(npz)];
    }
    let cfg = dir.join("cfg.json");
    if !cfg.exists() {
        return Vec::new();
    }
    let weights = ["sae_weights.safetensors", "sae.safetensors"]
        .into_iter()
        .map(|w| dir.join(w))
        .find(|w| w.exists());
    std::iter::once(cfg).chain(weights).map(named).collect()
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// A 1-D f32 vector from a safetensors file: the tensor named `name`, or its only tensor.
fn read_vector(path: &Path, bytes: Vec<u8>, name: Option<&str>) -> Result<Vec<f32>, String> {
    let f = probes::safetensors::SafetensorsFile::parse(path, bytes).map_err(|e| e.to_string())?;
    let info = match name {
        Some(n) => f
            .get(n)
            .ok_or_else(|| format!("no tensor `{n}` in `{}`", path.display()))?,
        None => {
            let all = &f.tensors;
            if all.len() != 1 {
                return Err(format!(
                    "`{}` holds {} tensors; name one with `tensor`",
                    path.display(),
                    all.len()
                ));
            }
            &all[0]
        }
    };
    let t = f
        .load_f32(info, &candle_core::Device::Cpu)
        .map_err(|e| e.to_string())?;
    if t.dims().len() != 1 {
        return Err(format!(
            "tensor `{}` is not a vector (shape {:?})",
            info.name,
            t.dims()
        ));
    }
    let v = t.to_vec1::<f32>().map_err(|e| e.to_string())?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(format!(
            "tensor `{}` holds NaN or infinite values",
            info.name
        ));
    }
    if v.iter().all(|x| *x == 0.0) {
        return Err(format!(
            "tensor `{}` is all zeros: it has no direction",
            info.name
        ));
    }
    Ok(v)
}
