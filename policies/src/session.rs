//! The shared work of one run, done once and reused by every check that needs it: prompt
//! sets tokenised, one batched forward pass per prompt set capturing every hook any check
//! planned to read from it, SAE encodings, last-token logits and greedy generations.
//!
//! Checks never run the model themselves; they ask the session, which caches what is
//! unhooked (interventions are run fresh each time, since they differ per check).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use probes::generate::{generate_capturing, GenerateOptions, PromptActivations, Sampling};
use probes::hooks::{Edit, HookPoint, Hooks};
use probes::sae::search::Labels;
use probes::sae::{Sae, SparseRow};
use probes::transformer::{Padding, Unembed};
use probes::Model;
use rayon::prelude::*;

use crate::error::CheckError;
use crate::load::Policy;
use crate::metrics;
use crate::refusal::Classifier;
use crate::result::{round, TokenValue};
use crate::schema::TokenScope;

/// Rows a generation keeps on one thread: a decode step of this many rows or fewer reads the
/// weights in about the time of one row's, and two threads do not read them faster, so
/// splitting the rows only reads the weights more often.
const SMALL_BATCH: usize = 8;

/// Decoded replies, one per prompt.
pub type Texts = Arc<Vec<String>>;

/// What an audit reads from each prompt's reply.
pub(crate) type Verdicts = Arc<Vec<Reply>>;

/// A set's unhooked pass: each prompt's last logits, and its activations at captured hooks.
type UnhookedPass = (Vec<Vec<f32>>, PromptActivations);

/// A prompt set as tokens, with its key (a digest of its content) for sharing work.
#[derive(Clone)]
pub(crate) struct Tokens {
    pub key: String,
    pub name: String,
    pub texts: Arc<Vec<String>>,
    pub ids: Arc<Vec<Vec<u32>>>,
    /// Tokens every prompt shares at the start (the chat template's preamble), skipped when
    /// scoring tokens.
    pub prefix: usize,
}

impl Tokens {
    /// The rows of `prompt` that `scope` reads.
    pub fn scored<'a, T>(&self, prompt: &'a [T], scope: TokenScope) -> &'a [T] {
        match scope {
            TokenScope::Prompt => &prompt[self.prefix.min(prompt.len())..],
            TokenScope::Last => &prompt[prompt.len().saturating_sub(1)..],
        }
    }
}

/// What an audit reads from one greedy reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    /// The reply's first token: the argmax of the prompt's last logits (none for a reply of
    /// no tokens).
    pub first_token: Option<u32>,
    pub refused: bool,
    /// The whole reply, for the replies asked for whole (examples for a report).
    pub whole: Option<String>,
}

/// Logs, at debug level, how long one pass over a prompt set took (`MECHWATCH_LOG=debug`).
struct Timed<'a> {
    what: &'static str,
    set: &'a str,
    hooks: usize,
    start: std::time::Instant,
}

impl<'a> Timed<'a> {
    fn new(what: &'static str, set: &'a str, hooks: &Hooks) -> Self {
        Self {
            what,
            set,
            hooks: hooks.interventions.len(),
            start: std::time::Instant::now(),
        }
    }
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        tracing::debug!(
            set = self.set,
            interventions = self.hooks,
            seconds = self.start.elapsed().as_secs_f64(),
            "{}",
            self.what
        );
    }
}

/// An SAE as a policy names it, loaded and fitted to the model's hook.
#[derive(Clone)]
pub(crate) struct ResolvedSae {
    pub name: String,
    pub sae: Arc<Sae>,
    pub hook: HookPoint,
    pub labels: Labels,
}

/// Replies as tokens and text, and the prompts' activations captured while generating them.
type Replies = (Vec<(Vec<u32>, String)>, probes::PromptActivations);

pub(crate) struct Session<'m> {
    pub model: &'m Model,
    micro_batch: usize,
    /// Hooks to capture per prompt set (by key), planned before any pass runs.
    plan: HashMap<String, BTreeSet<HookPoint>>,
    tokens: HashMap<(bool, Vec<String>), Tokens>,
    acts: HashMap<(String, HookPoint), Arc<Vec<Tensor>>>,
    sparse: HashMap<(String, String), Arc<Vec<Vec<SparseRow>>>>,
    last_logits: HashMap<String, Arc<Vec<Vec<f32>>>>,
    generations: HashMap<(String, usize), Arc<Vec<String>>>,
    verdicts: HashMap<(String, usize, String, usize), Arc<Vec<Reply>>>,
    chat_prefix: Option<usize>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, micro_batch: usize) -> Self {
        Self {
            model,
            micro_batch: micro_batch.max(1),
            plan: HashMap::new(),
            tokens: HashMap::new(),
            acts: HashMap::new(),
            sparse: HashMap::new(),
            last_logits: HashMap::new(),
            generations: HashMap::new(),
            verdicts: HashMap::new(),
            chat_prefix: None,
        }
    }

    /// Prompts per forward pass.
    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    pub fn n_layers(&self) -> usize {
        self.model.config().n_layers
    }

    /// Capture `hook` in the pass over set `name` of `p` (before that pass runs).
    pub fn want(&mut self, p: &Policy, name: &str, hook: HookPoint) -> Result<(), CheckError> {
        let t = self.set_tokens(p, name)?;
        self.plan.entry(t.key).or_default().insert(hook);
        Ok(())
    }

    /// The tokens of set `name` of policy `p`.
    pub fn set_tokens(&mut self, p: &Policy, name: &str) -> Result<Tokens, CheckError> {
        let set = p
            .prompt_sets
            .get(name)
            .ok_or_else(|| CheckError::Unresolved {
                what: "prompt set",
                name: name.to_string(),
            })?;
        let k = (set.chat, set.prompts.clone());
        if let Some(t) = self.tokens.get(&k) {
            let mut t = t.clone();
            t.name = name.to_string();
            return Ok(t);
        }
        let tokenise = |source| CheckError::Tokenise {
            set: name.to_string(),
            source,
        };
        // The set's chat templates render together, in one child process.
        let ids = self
            .model
            .encode_prompts(&set.prompts, set.chat)
            .map_err(tokenise)?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(tokenise)?;
        let bad = |why: String| CheckError::Prompts {
            set: name.to_string(),
            why,
        };
        // Where a prompt is written: the prompt file and line, beside the policy.
        let place = |i: usize| {
            let dir = p.path.parent().unwrap_or(std::path::Path::new(""));
            let line = set.lines.get(i).copied().unwrap_or(0);
            format!("{}:{line}", dir.join(&set.file).display())
        };
        if let Some(i) = ids.iter().position(Vec::is_empty) {
            return Err(bad(format!(
                "prompt {} ({}) has no tokens",
                i + 1,
                place(i)
            )));
        }
        // Every prompt against the context once, before any chunking, so the error names the
        // prompt's place in its set (numbered from 0 by the check, from 1 here).
        let context = self.model.config().max_positions;
        if let Some(i) = ids.iter().position(|p| p.len() > context) {
            return Err(bad(format!(
                "prompt {} ({}) has {} tokens, more than the model's context length of {context}",
                i + 1,
                place(i),
                ids[i].len()
            )));
        }
        let prefix = if set.chat { self.chat_prefix()? } else { 0 };
        let mut hasher_input = String::from(if set.chat { "chat\0" } else { "raw\0" });
        for s in &set.prompts {
            hasher_input.push_str(s);
            hasher_input.push('\0');
        }
        let t = Tokens {
            key: probes::digest::sha256_hex(hasher_input.as_bytes()),
            name: name.to_string(),
            texts: Arc::new(set.prompts.clone()),
            prefix: ids
                .iter()
                .map(|i| i.len() - 1)
                .min()
                .unwrap_or(0)
                .min(prefix),
            ids: Arc::new(ids),
        };
        self.tokens.insert(k, t.clone());
        Ok(t)
    }

    /// The first `n` prompts of `t`, with what the session holds of `t` already (activations,
    /// unhooked last logits): a prompt's outputs are the same bits in any batch, so its rows
    /// of `t`'s passes are its own. Not where the first prompts alone would share the
    /// preamble and the whole set did not (a later prompt does not start with it): their own
    /// passes would then differ from those rows by rounding.
    pub fn first_prompts(&mut self, t: &Tokens, n: usize) -> Tokens {
        let n = n.min(t.ids.len());
        let first = Tokens {
            key: format!("{}:first{n}", t.key),
            name: t.name.clone(),
            texts: Arc::new(t.texts[..n].to_vec()),
            ids: Arc::new(t.ids[..n].to_vec()),
            prefix: t.prefix,
        };
        let m = &self.model.transformer;
        let plain = Hooks::new();
        if m.can_share(&first.ids, t.prefix, &plain) != m.can_share(&t.ids, t.prefix, &plain) {
            return first;
        }
        let held: Vec<_> = self
            .acts
            .iter()
            .filter(|((key, _), _)| *key == t.key)
            .map(|((_, hook), a)| (*hook, Arc::new(a[..n].to_vec())))
            .collect();
        for (hook, a) in held {
            self.acts.insert((first.key.clone(), hook), a);
        }
        if let Some(l) = self.last_logits.get(&t.key) {
            let l = Arc::new(l[..n].to_vec());
            self.last_logits.insert(first.key.clone(), l);
        }
        first
    }

    /// The one-letter messages `a` and `b` through the chat template, rendered together.
    fn a_and_b(&self) -> Result<(Vec<u32>, Vec<u32>), CheckError> {
        let mut both = self.model.encode_prompts(&["a", "b"], true)?.into_iter();
        match (both.next(), both.next()) {
            (Some(a), Some(b)) => Ok((a?, b?)),
            _ => unreachable!("two messages give two renderings"),
        }
    }

    /// The number of tokens the chat template puts before every user message.
    fn chat_prefix(&mut self) -> Result<usize, CheckError> {
        if let Some(n) = self.chat_prefix {
            return Ok(n);
        }
        let (a, b) = self.a_and_b()?;
        let n = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        self.chat_prefix = Some(n);
        Ok(n)
    }

    /// The number of tokens the chat template puts after every user message (the
    /// post-instruction tokens, where Arditi et al. read refusal directions).
    pub fn chat_suffix(&self) -> Result<usize, CheckError> {
        let (a, b) = self.a_and_b()?;
        let n = a
            .iter()
            .rev()
            .zip(b.iter().rev())
            .take_while(|(x, y)| x == y)
            .count();
        Ok(n.min(a.len().saturating_sub(1)))
    }

    /// Per prompt, the activations `[len, d]` at `hook` (one pass captures every planned hook).
    pub fn acts(&mut self, t: &Tokens, hook: HookPoint) -> Result<Arc<Vec<Tensor>>, CheckError> {
        if let Some(a) = self.acts.get(&(t.key.clone(), hook)) {
            return Ok(Arc::clone(a));
        }
        let mut hooks = Hooks::new().capture(hook);
        for h in self.plan.get(&t.key).into_iter().flatten() {
            hooks = hooks.capture(*h);
        }
        let mut per_hook: BTreeMap<HookPoint, Vec<Tensor>> = BTreeMap::new();
        self.each_prompt(t, &hooks, |h, x| {
            per_hook.entry(h).or_default().push(x.contiguous()?);
            Ok(())
        })?;
        self.keep_acts(t, per_hook)?;
        Ok(Arc::clone(&self.acts[&(t.key.clone(), hook)]))
    }

    /// The planned hooks of set `t` whose activations no pass has captured yet.
    fn uncaptured(&self, t: &Tokens) -> Vec<HookPoint> {
        self.plan
            .get(&t.key)
            .into_iter()
            .flatten()
            .filter(|h| !self.acts.contains_key(&(t.key.clone(), **h)))
            .copied()
            .collect()
    }

    /// Keep each prompt's activations at each hook, refusing NaN and infinities.
    fn keep_acts(
        &mut self,
        t: &Tokens,
        per_hook: BTreeMap<HookPoint, Vec<Tensor>>,
    ) -> Result<(), CheckError> {
        for (h, v) in per_hook {
            for (i, x) in v.iter().enumerate() {
                if x.sum_all()
                    .and_then(|s| s.to_scalar::<f32>())
                    .map_or(true, |s| !s.is_finite())
                {
                    return Err(CheckError::NonFinite(format!(
                        "NaN or infinite activations at `{h}` for prompt {} of `{}`",
                        i + 1,
                        t.name
                    )));
                }
            }
            self.acts.insert((t.key.clone(), h), Arc::new(v));
        }
        Ok(())
    }

    /// Sparse SAE activations of every token of every prompt of `t`.
    pub fn sparse(
        &mut self,
        t: &Tokens,
        s: &ResolvedSae,
    ) -> Result<Arc<Vec<Vec<SparseRow>>>, CheckError> {
        let key = (
            t.key.clone(),
            format!("{}:{}", s.sae.manifest.root(), s.hook),
        );
        if let Some(a) = self.sparse.get(&key) {
            return Ok(Arc::clone(a));
        }
        let acts = self.acts(t, s.hook)?;
        let all = Tensor::cat(&acts, 0)?;
        let rows = s.sae.encode_tokens(&all)?;
        let mut out = Vec::with_capacity(acts.len());
        let mut it = rows.into_iter();
        for a in acts.iter() {
            out.push(it.by_ref().take(a.dim(0).unwrap_or(0)).collect());
        }
        let out = Arc::new(out);
        self.sparse.insert(key, Arc::clone(&out));
        Ok(out)
    }

    /// Forward `t` with `hooks` in micro-batches (the shared preamble once), handing each
    /// prompt's activations at each captured hook, padding cut off, to `each` in prompt order.
    fn each_prompt(
        &self,
        t: &Tokens,
        hooks: &Hooks,
        mut each: impl FnMut(HookPoint, Tensor) -> candle_core::Result<()>,
    ) -> Result<(), CheckError> {
        let _timed = Timed::new("captures", &t.name, hooks);
        self.model
            .transformer
            .forward_chunked_shared(
                &t.ids,
                t.prefix,
                self.micro_batch,
                hooks,
                Unembed::None,
                |_, out| {
                    for (h, a) in &out.captures {
                        for (r, len) in out.layout.lengths.iter().enumerate() {
                            a.get(r)
                                .and_then(|x| x.narrow(0, 0, *len))
                                .and_then(|x| each(*h, x))
                                .map_err(|e| probes::RunError::Batch(e.to_string()))?;
                        }
                    }
                    Ok(())
                },
            )
            .map_err(|source| CheckError::Forward {
                set: t.name.clone(),
                source,
            })
    }

    /// Forward token sequences that are not a prompt set (the induction check's random
    /// tokens), all of one length, with `hooks` captured and every position's logits, handing
    /// each micro-batch's output (with its first sequence's index) to `consume` in order.
    /// Micro-batches hold at most 4 sequences: each keeps every position's logits.
    pub fn forward_ids(
        &self,
        what: &str,
        ids: &[Vec<u32>],
        hooks: &Hooks,
        consume: impl FnMut(usize, probes::transformer::ForwardOutput) -> Result<(), probes::RunError>,
    ) -> Result<(), CheckError> {
        self.model
            .transformer
            .forward_chunked(
                ids,
                self.micro_batch.min(4),
                Padding::Right,
                hooks,
                Unembed::All,
                consume,
            )
            .map_err(|source| CheckError::Forward {
                set: what.to_string(),
                source,
            })
    }

    /// Last-token logits of every prompt of `t` under `hooks` (cached when unhooked).
    pub fn last_logits(
        &mut self,
        t: &Tokens,
        hooks: &Hooks,
    ) -> Result<Arc<Vec<Vec<f32>>>, CheckError> {
        let _timed = Timed::new("last logits", &t.name, hooks);
        if hooks.is_empty() {
            if let Some(l) = self.last_logits.get(&t.key) {
                return Ok(Arc::clone(l));
            }
        }
        let rows = match resumable_at(hooks) {
            Some(start) => self.last_logits_from(t, start, hooks)?,
            // The set's unhooked pass also captures what the plan wants of it.
            None if hooks.is_empty() => {
                let capture = self.uncaptured(t);
                let hooks = capture.iter().fold(Hooks::new(), |h, p| h.capture(*p));
                let (rows, captured) = self.last_logits_of(t, &hooks)?;
                self.keep_acts(t, captured)?;
                rows
            }
            None => self.last_logits_of(t, hooks)?.0,
        };
        finite_logits(t, &rows)?;
        let rows = Arc::new(rows);
        if hooks.is_empty() {
            self.last_logits.insert(t.key.clone(), Arc::clone(&rows));
        }
        Ok(rows)
    }

    /// Last-token logits of `t` under `hooks`, by full passes (the shared preamble once, where
    /// `hooks` allow it). Steering and selection compare these logits with those of passes
    /// that add or ablate a direction at every position, which share it too, so both sides of
    /// a comparison run the same way.
    /// Each prompt's activations at the hooks `hooks` captures come with them.
    fn last_logits_of(&self, t: &Tokens, hooks: &Hooks) -> Result<UnhookedPass, CheckError> {
        let mut rows = Vec::with_capacity(t.ids.len());
        let mut captured = PromptActivations::new();
        self.model
            .transformer
            .forward_chunked_shared(
                &t.ids,
                t.prefix,
                self.micro_batch,
                hooks,
                Unembed::Last,
                |_, out| {
                    let l = out
                        .logits
                        .ok_or_else(|| probes::RunError::Batch("no logits".into()))?;
                    let v: Vec<Vec<f32>> = l
                        .to_dtype(DType::F32)
                        .and_then(|l| l.to_vec2())
                        .map_err(|e| probes::RunError::Batch(e.to_string()))?;
                    rows.extend(v);
                    for (h, a) in &out.captures {
                        for (r, len) in out.layout.lengths.iter().enumerate() {
                            let x = a
                                .get(r)
                                .and_then(|x| x.narrow(0, 0, *len))
                                .and_then(|x| x.contiguous())
                                .map_err(|e| probes::RunError::Batch(e.to_string()))?;
                            captured.entry(*h).or_default().push(x);
                        }
                    }
                    Ok(())
                },
            )
            .map_err(|source| CheckError::Forward {
                set: t.name.clone(),
                source,
            })?;
        Ok((rows, captured))
    }

    /// Last-token logits of `t` under `hooks`, whose every edit is at the residual hook
    /// `start`: each pass starts there, from the set's unhooked activations, instead of
    /// running the blocks before it again (a steering sweep, a candidate's addition).
    fn last_logits_from(
        &mut self,
        t: &Tokens,
        start: HookPoint,
        hooks: &Hooks,
    ) -> Result<Vec<Vec<f32>>, CheckError> {
        let acts = self.acts(t, start)?;
        let m = &self.model.transformer;
        let n = self.micro_batch.max(1);
        let chunks: Vec<(usize, &[Vec<u32>])> = t.ids.chunks(n).enumerate().collect();
        let per_chunk = chunks
            .par_iter()
            .map(|&(c, chunk)| -> Result<Vec<Vec<f32>>, CheckError> {
                let longest = chunk.iter().map(Vec::len).max().unwrap_or(0);
                let x = acts[c * n..c * n + chunk.len()]
                    .iter()
                    .map(|a| a.pad_with_zeros(0, 0, longest - a.dim(0)?))
                    .collect::<candle_core::Result<Vec<_>>>()
                    .and_then(|rows| Tensor::stack(&rows, 0))?;
                let out = m
                    .forward_shared_from(chunk, t.prefix, start, &x, hooks, Unembed::Last)
                    .map_err(|source| CheckError::Forward {
                        set: t.name.clone(),
                        source,
                    })?;
                let l = out
                    .logits
                    .ok_or_else(|| CheckError::NonFinite("no logits".into()))?;
                Ok(l.to_dtype(DType::F32)?.to_vec2()?)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(per_chunk.into_iter().flatten().collect())
    }

    /// Greedy generations (decoded) of every prompt of `t` under `hooks` (cached when unhooked).
    pub fn generations(
        &mut self,
        t: &Tokens,
        hooks: &Hooks,
        max_tokens: usize,
    ) -> Result<Arc<Vec<String>>, CheckError> {
        let key = (t.key.clone(), max_tokens);
        if hooks.is_empty() {
            if let Some(g) = self.generations.get(&key) {
                return Ok(Arc::clone(g));
            }
        }
        let texts = self.texts(t, hooks, max_tokens, rayon::current_num_threads())?;
        if hooks.is_empty() {
            self.generations.insert(key, Arc::clone(&texts));
        }
        Ok(texts)
    }

    /// [`Session::generations`] of `t` unhooked and under `hooks`, the two at once, each on
    /// half the threads: a decode step's cost is mostly reading the weights, which rows
    /// decoded together share.
    pub fn generations_with_and_without(
        &mut self,
        t: &Tokens,
        hooks: &Hooks,
        max_tokens: usize,
    ) -> Result<(Texts, Texts), CheckError> {
        let key = (t.key.clone(), max_tokens);
        if self.generations.contains_key(&key) || hooks.is_empty() {
            let base = self.generations(t, &Hooks::new(), max_tokens)?;
            return Ok((base, self.generations(t, hooks, max_tokens)?));
        }
        let lanes = half_the_threads();
        let (base, with) = rayon::join(
            || self.texts(t, &Hooks::new(), max_tokens, lanes),
            || self.texts(t, hooks, max_tokens, lanes),
        );
        let base = base?;
        self.generations.insert(key, Arc::clone(&base));
        Ok((base, with?))
    }

    fn texts(
        &self,
        t: &Tokens,
        hooks: &Hooks,
        max_tokens: usize,
        lanes: usize,
    ) -> Result<Arc<Vec<String>>, CheckError> {
        let (replies, _) = self.generate_replies(t, hooks, max_tokens, &[], lanes, |_, _| false)?;
        Ok(Arc::new(replies.into_iter().map(|r| r.1).collect()))
    }

    /// Each prompt's greedy reply of at most `max_tokens` tokens under `hooks`: its first
    /// token, and whether `classifier` says it refuses (cached when unhooked). A reply stops
    /// generating as soon as its first tokens settle the verdict ([`Classifier::settled`]):
    /// the verdict is the one its whole reply would get, and the tokens after are not computed.
    /// The first `whole` replies run to their end and carry their text.
    pub fn verdicts(
        &mut self,
        t: &Tokens,
        hooks: &Hooks,
        max_tokens: usize,
        classifier: &Classifier,
        whole: usize,
    ) -> Result<Verdicts, CheckError> {
        let key = (t.key.clone(), max_tokens, format!("{classifier:?}"), whole);
        if hooks.is_empty() {
            if let Some(v) = self.verdicts.get(&key) {
                return Ok(Arc::clone(v));
            }
        }
        // An unhooked generation's prefill is the set's pass: it captures what the plan wants.
        let capture = if hooks.is_empty() {
            self.uncaptured(t)
        } else {
            Vec::new()
        };
        let lanes = rayon::current_num_threads();
        let (v, captured) =
            self.replies_judged(t, hooks, max_tokens, classifier, whole, &capture, lanes)?;
        self.keep_acts(t, captured)?;
        let v = Arc::new(v);
        if hooks.is_empty() {
            self.verdicts.insert(key, Arc::clone(&v));
        }
        Ok(v)
    }

    /// [`Session::verdicts`] of `t` unhooked and under `hooks`, the two at once, each on half
    /// the threads (as [`Session::generations_with_and_without`]).
    pub fn verdicts_with_and_without(
        &mut self,
        t: &Tokens,
        hooks: &Hooks,
        max_tokens: usize,
        classifier: &Classifier,
        whole: usize,
    ) -> Result<(Verdicts, Verdicts), CheckError> {
        let key = (t.key.clone(), max_tokens, format!("{classifier:?}"), whole);
        if self.verdicts.contains_key(&key) || hooks.is_empty() {
            let base = self.verdicts(t, &Hooks::new(), max_tokens, classifier, whole)?;
            let with = self.verdicts(t, hooks, max_tokens, classifier, whole)?;
            return Ok((base, with));
        }
        let capture = self.uncaptured(t);
        let lanes = half_the_threads();
        let judged = |h: &Hooks, capture: &[HookPoint]| {
            self.replies_judged(t, h, max_tokens, classifier, whole, capture, lanes)
        };
        let (base, with) = rayon::join(|| judged(&Hooks::new(), &capture), || judged(hooks, &[]));
        let (base, captured) = base?;
        self.keep_acts(t, captured)?;
        let base = Arc::new(base);
        self.verdicts.insert(key, Arc::clone(&base));
        Ok((base, Arc::new(with?.0)))
    }

    /// The replies behind [`Session::verdicts`], on `lanes` threads, with the prompts'
    /// activations at `capture`.
    #[allow(clippy::too_many_arguments)]
    fn replies_judged(
        &self,
        t: &Tokens,
        hooks: &Hooks,
        max_tokens: usize,
        classifier: &Classifier,
        whole: usize,
        capture: &[HookPoint],
        lanes: usize,
    ) -> Result<(Vec<Reply>, PromptActivations), CheckError> {
        let codec = &self.model.codec;
        let settled = |i: usize, ids: &[u32]| {
            i >= whole
                && codec
                    .decode(ids)
                    .is_ok_and(|text| classifier.settled(&text).is_some())
        };
        let (replies, captured) =
            self.generate_replies(t, hooks, max_tokens, capture, lanes, settled)?;
        let v = replies
            .into_iter()
            .enumerate()
            .map(|(i, (ids, text))| Reply {
                first_token: ids.first().copied(),
                refused: classifier.refused(&text),
                whole: (i < whole).then_some(text),
            })
            .collect();
        Ok((v, captured))
    }

    /// Greedy replies of every prompt of `t` under `hooks`, as tokens and decoded, each ending
    /// at a stop token, at `max_tokens` or as soon as `enough(prompt index, tokens so far)`;
    /// and each prompt's activations at the `capture` hooks, taken in the prefill. The
    /// prompts are split over `lanes` threads.
    fn generate_replies(
        &self,
        t: &Tokens,
        hooks: &Hooks,
        max_tokens: usize,
        capture: &[HookPoint],
        lanes: usize,
        enough: impl Fn(usize, &[u32]) -> bool + Sync,
    ) -> Result<Replies, CheckError> {
        let _timed = Timed::new("generation", &t.name, hooks);
        let opts = GenerateOptions {
            max_tokens,
            sampling: Sampling::Greedy,
            stop_tokens: self.model.stop_tokens(),
            // Audits decode in f32, the precision of every other pass: in the batches of 32
            // they generate in, f32 decode steps are also faster than Q8_0 ones (1.6x,
            // `mechwatch bench forward`), whose matmul re-reads the weights for every row.
            f32_decode: true,
            // The set's chat preamble, prefilled once per batch.
            shared_start: t.prefix,
        };
        // Decode steps cost little more for 32 rows than for 8: generate in batches of up to
        // 32, one per lane at once (as the prompt passes run their micro-batches), split
        // evenly so that every lane has one. Rows do not depend on their batch.
        let lanes = lanes.max(1);
        let n = t.ids.len().max(1);
        let rounds = n.div_ceil(self.micro_batch.max(32)).div_ceil(lanes);
        let size = n.div_ceil(rounds * lanes).max(n.min(SMALL_BATCH));
        let chunks: Vec<&[Vec<u32>]> = t.ids.chunks(size).collect();
        let outs = chunks
            .par_iter()
            .enumerate()
            .map(|(c, chunk)| {
                let enough = |r: usize, ids: &[u32]| enough(c * size + r, ids);
                let m = &self.model.transformer;
                generate_capturing(m, chunk, hooks, &opts, enough, capture)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CheckError::Generate {
                set: t.name.clone(),
                source,
            })?;
        let mut replies = Vec::with_capacity(t.ids.len());
        let mut captured: BTreeMap<HookPoint, Vec<Tensor>> = BTreeMap::new();
        for (tokens, acts) in outs {
            for ids in tokens {
                let text = self.model.codec.decode(&ids)?;
                replies.push((ids, text));
            }
            for (h, rows) in acts {
                captured.entry(h).or_default().extend(rows);
            }
        }
        Ok((replies, captured))
    }

    /// The first token of each of `words`, as the assistant's reply would start with it.
    pub fn first_tokens(&self, words: &[String]) -> Result<Vec<u32>, CheckError> {
        let mut ids = Vec::new();
        for w in words {
            let t = self.model.codec.encode(w)?;
            let id = *t.first().ok_or_else(|| CheckError::NoTokens(w.clone()))?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// The tokens of `text` as the assistant's reply would start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, CheckError> {
        Ok(self.model.codec.encode(text)?)
    }

    /// Mean KL(clean || hooked) over every real position, per prompt, in micro-batches of 8
    /// (each keeps its own positions' logits, twice). Both passes run the same way: where the
    /// hooked pass can share the set's preamble, both compute it once for the whole set, and
    /// its positions' KL, the same for every prompt, is summed once.
    ///
    /// The clean pass is then the set's unhooked pass, run as [`Session::last_logits`] runs
    /// it: where no pass has given the set's last logits yet, it keeps them, and captures
    /// what the plan wants of the set.
    pub fn kl_per_prompt(&mut self, t: &Tokens, hooks: &Hooks) -> Result<Vec<f64>, CheckError> {
        let _timed = Timed::new("kl", &t.name, hooks);
        // Only a pass `last_logits` would run the same way: it captures the same hooks, and
        // an attention pattern among them would make it run the full prompts.
        let capture = self.uncaptured(t);
        let pattern = capture
            .iter()
            .any(|h| matches!(h, HookPoint::AttnPattern(_)));
        let clean = (!self.last_logits.contains_key(&t.key) && !pattern)
            .then(|| capture.iter().fold(Hooks::new(), |h, p| h.capture(*p)));
        let (kl, unhooked) = self.kl_and_clean_pass(t, hooks, clean)?;
        // What it kept is for other checks, whose own passes report its faults: the KL
        // stands without it.
        if let Some((rows, captured)) = unhooked {
            if finite_logits(t, &rows).is_ok() && self.keep_acts(t, captured).is_ok() {
                self.last_logits.insert(t.key.clone(), Arc::new(rows));
            }
        }
        Ok(kl)
    }

    /// [`Session::kl_per_prompt`]'s passes, the clean one with the hooks `clean` captures;
    /// where it shares the preamble, also each prompt's last logits and activations at them.
    fn kl_and_clean_pass(
        &self,
        t: &Tokens,
        hooks: &Hooks,
        clean: Option<Hooks>,
    ) -> Result<(Vec<f64>, Option<UnhookedPass>), CheckError> {
        let m = &self.model.transformer;
        let forward = |source| CheckError::Forward {
            set: t.name.clone(),
            source,
        };
        let keep = clean.is_some();
        let clean_hooks = clean.unwrap_or_default();
        let starts = match (
            m.shared_start(&t.ids, t.prefix, &clean_hooks, Unembed::All)
                .map_err(forward)?,
            m.shared_start(&t.ids, t.prefix, hooks, Unembed::All)
                .map_err(forward)?,
        ) {
            (Some(clean), Some(hooked)) => {
                let rows = |s: &probes::SharedStart| -> Result<Vec<Vec<f32>>, CheckError> {
                    let l = s.logits().ok_or_else(|| no_logits(t))?;
                    Ok(l.get(0)?.to_vec2()?)
                };
                let sum = kl_sum(&rows(&clean)?, &rows(&hooked)?, -0.0);
                Some((clean, hooked, sum))
            }
            _ => None,
        };
        // Only a shared clean pass is the one `last_logits` would run.
        let keep = keep && starts.is_some();
        let chunks: Vec<&[Vec<u32>]> = t.ids.chunks(self.micro_batch.min(8)).collect();
        let per_chunk = chunks
            .par_iter()
            .map(|chunk| -> Result<ChunkKl, CheckError> {
                // Per prompt, the logits of the positions the passes computed for it, and the
                // KL summed over the positions before them.
                let (clean, hooked, before) = match &starts {
                    Some((c, h, sum)) => (
                        m.forward_after(c, chunk, &clean_hooks, Unembed::All),
                        m.forward_after(h, chunk, hooks, Unembed::All),
                        *sum,
                    ),
                    None => (
                        m.forward(chunk, Padding::Right, &Hooks::new(), Unembed::All),
                        m.forward(chunk, Padding::Right, hooks, Unembed::All),
                        -0.0,
                    ),
                };
                let (clean, hooked) = (clean.map_err(forward)?, hooked.map_err(forward)?);
                let mut out = ChunkKl::default();
                for (r, p) in chunk.iter().enumerate() {
                    let n = clean.layout.lengths[r];
                    let row = |o: &probes::ForwardOutput| -> Result<Vec<Vec<f32>>, CheckError> {
                        let l = o.logits.as_ref().ok_or_else(|| no_logits(t))?;
                        Ok(l.get(r)?.narrow(0, 0, n)?.to_vec2()?)
                    };
                    let mut clean_rows = row(&clean)?;
                    let kl = kl_sum(&clean_rows, &row(&hooked)?, before) / p.len() as f64;
                    if !kl.is_finite() {
                        return Err(CheckError::NonFinite(format!(
                            "non-finite KL for a prompt of `{}`",
                            t.name
                        )));
                    }
                    out.kl.push(kl);
                    let (Some((start, _, _)), true) = (&starts, keep) else {
                        continue;
                    };
                    out.last.extend(clean_rows.pop());
                    // The preamble's activations, then the prompt's own.
                    for (h, own) in &clean.captures {
                        let before = start.captures(*h).ok_or_else(|| CheckError::Forward {
                            set: t.name.clone(),
                            source: probes::RunError::Batch(format!(
                                "the shared start did not capture `{h}`"
                            )),
                        })?;
                        let x = Tensor::cat(&[&before.get(0)?, &own.get(r)?.narrow(0, 0, n)?], 0)?;
                        out.captured.entry(*h).or_default().push(x);
                    }
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut kl = Vec::with_capacity(t.ids.len());
        let mut last = Vec::new();
        let mut captured = PromptActivations::new();
        for c in per_chunk {
            kl.extend(c.kl);
            last.extend(c.last);
            for (h, rows) in c.captured {
                captured.entry(h).or_default().extend(rows);
            }
        }
        Ok((kl, keep.then_some((last, captured))))
    }

    pub fn token_text(&self, id: u32) -> String {
        self.model.codec.token_text(id)
    }

    /// Per token after the preamble: text and `value(token index)`.
    pub fn token_values(
        &self,
        t: &Tokens,
        prompt: usize,
        value: impl Fn(usize) -> f64,
    ) -> Vec<TokenValue> {
        let ids = &t.ids[prompt];
        (t.prefix..ids.len())
            .map(|i| TokenValue {
                token: self.token_text(ids[i]),
                value: round(value(i)),
            })
            .collect()
    }

    /// `auto: 'a' 'b' 'c'`: the distinct tokens on which `latent` fires most in `sets`.
    fn auto_label(&self, latent: u32, sets: &[(&Tokens, &[Vec<SparseRow>])]) -> String {
        let mut hits: Vec<(f32, u32)> = Vec::new();
        for (t, rows) in sets {
            for (p, prompt) in rows.iter().enumerate() {
                for (i, row) in prompt.iter().enumerate().skip(t.prefix) {
                    if let Some(&(_, v)) = row.iter().find(|(l, _)| *l == latent) {
                        hits.push((v, t.ids[p][i]));
                    }
                }
            }
        }
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut seen = Vec::new();
        for (_, id) in hits {
            let s = visible(&self.token_text(id));
            if !seen.contains(&s) {
                seen.push(s);
            }
            if seen.len() == 4 {
                break;
            }
        }
        if seen.is_empty() {
            "auto: (does not fire on these prompts)".into()
        } else {
            format!(
                "auto: fires on {}",
                seen.iter()
                    .map(|s| format!("'{s}'"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    }

    /// A latent's label: the SAE's own, else the tokens it fires on most in `sets`.
    pub fn label(
        &self,
        s: &ResolvedSae,
        latent: u32,
        sets: &[(&Tokens, &[Vec<SparseRow>])],
    ) -> String {
        match s.labels.get(latent as usize) {
            Some(l) => l.to_string(),
            None => self.auto_label(latent, sets),
        }
    }
}

/// The threads each of two generations run at once may use.
fn half_the_threads() -> usize {
    (rayon::current_num_threads() / 2).max(1)
}

/// The residual hook where every edit of `hooks` acts, when they are all additions or
/// ablations there and nothing is captured: a pass under them can start at that hook.
fn resumable_at(hooks: &Hooks) -> Option<HookPoint> {
    let first = hooks.interventions.first()?.hook;
    let resumable = hooks.capture.is_empty()
        && first.is_residual_stream()
        && hooks
            .interventions
            .iter()
            .all(|i| i.hook == first && matches!(i.edit, Edit::Add { .. } | Edit::Ablate { .. }));
    resumable.then_some(first)
}

/// A token's text for a label: trimmed, or its escaped whitespace when that is all it is.
fn visible(token: &str) -> String {
    let t = token.trim();
    if t.is_empty() {
        token.escape_default().to_string()
    } else {
        t.to_string()
    }
}

/// The activation row at `position` (negative counts from the end) of `a` `[len, d]`.
pub(crate) fn at_position(a: &Tensor, position: i64) -> Option<Tensor> {
    let len = a.dim(0).ok()? as i64;
    let i = if position < 0 {
        len + position
    } else {
        position
    };
    if i < 0 || i >= len {
        return None;
    }
    a.get(i as usize).ok()
}

pub(crate) fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .and_then(|x| x.sum(D::Minus1))
        .and_then(|x| x.to_scalar::<f32>())
        .map_or(f64::NAN, f64::from)
}

/// What one micro-batch of [`Session::kl_per_prompt`] gives: its prompts' KL, and where its
/// clean pass is kept, their last logits and activations.
#[derive(Default)]
struct ChunkKl {
    kl: Vec<f64>,
    last: Vec<Vec<f32>>,
    captured: PromptActivations,
}

/// Refuse logits with a NaN or an infinity, naming the prompt.
fn finite_logits(t: &Tokens, rows: &[Vec<f32>]) -> Result<(), CheckError> {
    match rows.iter().position(|r| r.iter().any(|v| !v.is_finite())) {
        Some(i) => Err(CheckError::NonFinite(format!(
            "NaN or infinite logits for prompt {} of `{}`",
            i + 1,
            t.name
        ))),
        None => Ok(()),
    }
}

fn no_logits(t: &Tokens) -> CheckError {
    CheckError::NonFinite(format!("a pass over `{}` produced no logits", t.name))
}

/// `start` plus the KL of each pair of rows, added in position order.
fn kl_sum(clean: &[Vec<f32>], hooked: &[Vec<f32>], start: f64) -> f64 {
    clean
        .iter()
        .zip(hooked)
        .fold(start, |sum, (a, b)| sum + metrics::kl(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use probes::testing::{self, Rand, D};
    use probes::Positions;

    /// Prompts that share a 5-token start, of different lengths, as a chat set's would.
    fn shared_start_set() -> Tokens {
        let ids: Vec<Vec<u32>> = (0..7u32)
            .map(|i| {
                let own = (0..(2 + i % 4)).map(|j| 10 + (i * 7 + j * 3) % 80);
                [1, 2, 3, 4, 5].into_iter().chain(own).collect()
            })
            .collect();
        Tokens {
            key: "shared".into(),
            name: "shared".into(),
            texts: Arc::new(vec![String::new(); ids.len()]),
            ids: Arc::new(ids),
            prefix: 5,
        }
    }

    fn bits(rows: &[Vec<f32>]) -> Vec<u32> {
        rows.iter().flatten().map(|v| v.to_bits()).collect()
    }

    fn tensor_bits(acts: &[Tensor]) -> Vec<u32> {
        let rows: Vec<Vec<f32>> = acts
            .iter()
            .map(|a| a.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        bits(&rows)
    }

    #[test]
    fn the_first_prompts_take_their_rows_of_the_sets_passes_where_those_are_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let model = testing::load(&testing::llama_dir(dir.path(), 7));
        let hook = HookPoint::ResidPost(1);
        let t = shared_start_set();
        let mut s = Session::new(&model, 16);
        s.plan.entry(t.key.clone()).or_default().insert(hook);
        s.last_logits(&t, &Hooks::new()).unwrap();
        let first = s.first_prompts(&t, 4);
        assert!(s.last_logits.contains_key(&first.key));
        let held = s.acts(&first, hook).unwrap();
        let held_logits = s.last_logits(&first, &Hooks::new()).unwrap();
        // The same bits as the first prompts' own passes.
        let mut own = Session::new(&model, 16);
        assert_eq!(
            tensor_bits(&own.acts(&first, hook).unwrap()),
            tensor_bits(&held)
        );
        assert_eq!(
            bits(&own.last_logits(&first, &Hooks::new()).unwrap()),
            bits(&held_logits)
        );

        // A later prompt that does not start with the preamble: the set's passes did not
        // share it, the first prompts' own would, so nothing is handed down.
        let mut ids = t.ids.to_vec();
        ids.push(vec![9, 2, 3, 4, 5, 6, 7]);
        let odd = Tokens {
            key: "odd".into(),
            texts: Arc::new(vec![String::new(); ids.len()]),
            ids: Arc::new(ids),
            ..t.clone()
        };
        let mut s = Session::new(&model, 16);
        s.last_logits(&odd, &Hooks::new()).unwrap();
        let first = s.first_prompts(&odd, 4);
        assert!(!s.last_logits.contains_key(&first.key));
    }

    #[test]
    fn the_kl_checks_clean_pass_is_the_sets_unhooked_pass_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let model = testing::load(&testing::llama_dir(dir.path(), 7));
        let t = shared_start_set();
        let hook = HookPoint::ResidPost(1);
        let direction = Rand::new(3).tensor(&[D], 1.0);
        let ablated = Hooks::new().ablate(HookPoint::ResidPost(0), Positions::All, direction);
        let session = |micro_batch| {
            let mut s = Session::new(&model, micro_batch);
            s.plan.entry(t.key.clone()).or_default().insert(hook);
            s
        };

        // The set's own passes in one micro-batch; the KL's in micro-batches of 3.
        let mut own = session(16);
        let logits = own.last_logits(&t, &Hooks::new()).unwrap();
        let acts = own.acts(&t, hook).unwrap();
        let kl = own.kl_per_prompt(&t, &ablated).unwrap();

        let mut reused = session(3);
        assert_eq!(reused.kl_per_prompt(&t, &ablated).unwrap(), kl);
        assert!(
            reused.last_logits.contains_key(&t.key)
                && reused.acts.contains_key(&(t.key.clone(), hook)),
            "the KL check's clean pass kept neither the last logits nor the planned capture"
        );
        assert_eq!(
            bits(&reused.last_logits(&t, &Hooks::new()).unwrap()),
            bits(&logits)
        );
        assert_eq!(
            tensor_bits(&reused.acts(&t, hook).unwrap()),
            tensor_bits(&acts)
        );
        assert!(
            kl.iter().all(|k| *k > 0.0),
            "the ablation moved nothing: {kl:?}"
        );

        // An edit inside the preamble cannot share it: the KL's passes run the full prompts,
        // which the set's unhooked pass would not, so nothing is kept.
        let v = Rand::new(4).tensor(&[D], 1.0);
        let inside = Hooks::new().add(HookPoint::ResidPost(0), Positions::Indices(vec![1]), v, 1.0);
        let mut unshared = session(3);
        unshared.kl_per_prompt(&t, &inside).unwrap();
        assert!(unshared.last_logits.is_empty() && unshared.acts.is_empty());
    }
}
