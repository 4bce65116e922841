//! Prompt passes that compute a shared start once.
//!
//! Chat-templated prompts all begin with the template's preamble (about half the tokens of a
//! short request). [`Transformer::forward_chunked_shared`] runs that preamble once, as a
//! one-row pass whose keys and values become every micro-batch's cache, runs only each
//! prompt's own tokens after it, and hands back the same output as the full pass: captures
//! and logits of the preamble are the one row's, repeated for every prompt. Each prompt's own
//! tokens attend over the same keys as in the full pass, so the outputs agree with it to
//! rounding (the products run over fewer rows; `--test shared_prefix` bounds the difference).

use candle_core::Tensor;
use std::collections::BTreeMap;

use crate::error::{CandleContext, RunError};
use crate::hooks::{Edit, HookPoint, Hooks, Intervention, Positions};
use crate::transformer::{
    in_micro_batches, BatchLayout, ForwardOutput, KvCache, Padding, PassKind, Transformer, Unembed,
};

/// The preamble's pass: its cache, captures `[1, shared, ..]` and logits `[1, shared, vocab]`.
struct Preamble {
    cache: KvCache,
    captures: BTreeMap<HookPoint, Tensor>,
    logits: Option<Tensor>,
}

impl Transformer {
    /// [`Transformer::forward_chunked`] with right padding, computing the first `shared` tokens,
    /// which every prompt must have in common, once. Falls back to the full pass where sharing
    /// cannot give the same output: a prompt no longer than the shared start, a hook that
    /// may change it differently from row to row (a replacement at every position, or an
    /// edit at an index that falls inside it), or an attention pattern hook (whose keys the
    /// split pass would cut). An added vector or an ablated direction at every position is
    /// computed in the preamble's pass too.
    pub fn forward_chunked_shared(
        &self,
        prompts: &[Vec<u32>],
        shared: usize,
        micro_batch: usize,
        hooks: &Hooks,
        unembed: Unembed,
        consume: impl FnMut(usize, ForwardOutput) -> Result<(), RunError>,
    ) -> Result<(), RunError> {
        if !self.can_share(prompts, shared, hooks) {
            return self.forward_chunked(
                prompts,
                micro_batch,
                Padding::Right,
                hooks,
                unembed,
                consume,
            );
        }
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        self.check_lengths(&lengths)?;
        self.validate(hooks)?;
        let preamble = self.preamble(&prompts[0][..shared], hooks, unembed)?;
        in_micro_batches(
            prompts,
            micro_batch,
            |chunk| {
                self.own_tokens(&preamble, chunk, shared, hooks, unembed, PassKind::Plain)
                    .map(|(out, _)| out)
            },
            consume,
        )
    }

    /// [`Transformer::forward`] with right padding, computing the first `shared` tokens, which
    /// every prompt must have in common, once (as [`Transformer::forward_chunked_shared`]).
    pub fn forward_shared(
        &self,
        prompts: &[Vec<u32>],
        shared: usize,
        hooks: &Hooks,
        unembed: Unembed,
    ) -> Result<ForwardOutput, RunError> {
        if !self.can_share(prompts, shared, hooks) {
            return self.forward(prompts, Padding::Right, hooks, unembed);
        }
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        self.check_lengths(&lengths)?;
        self.validate(hooks)?;
        let preamble = self.preamble(&prompts[0][..shared], hooks, unembed)?;
        self.own_tokens(&preamble, prompts, shared, hooks, unembed, PassKind::Plain)
            .map(|(out, _)| out)
    }

    /// [`Transformer::forward_from`] with right padding, computing the first `shared` tokens,
    /// which every prompt must have in common, once (as [`Transformer::forward_shared`]): only
    /// the blocks after `start` run, and only on the prompts' own tokens. `x` is the full
    /// pass's activation at `start`, `[batch, positions, d_model]`, of which only the prompts'
    /// own positions are read; the preamble's keys and values come from its one-row pass.
    pub fn forward_shared_from(
        &self,
        prompts: &[Vec<u32>],
        shared: usize,
        start: HookPoint,
        x: &Tensor,
        hooks: &Hooks,
        unembed: Unembed,
    ) -> Result<ForwardOutput, RunError> {
        if !self.can_share(prompts, shared, hooks) {
            return self.forward_from(prompts, Padding::Right, start, x, hooks, unembed);
        }
        let layout = BatchLayout::new(prompts.iter().map(Vec::len).collect(), Padding::Right);
        self.check_start(&layout, start, x, hooks)?;
        let own = x
            .narrow(1, shared, layout.seq_len - shared)
            .run_ctx("the prompts' own positions")?;
        let preamble = self.preamble(&prompts[0][..shared], hooks, unembed)?;
        let how = PassKind::From(start, &own);
        self.own_tokens(&preamble, prompts, shared, hooks, unembed, how)
            .map(|(out, _)| out)
    }

    /// [`Transformer::prefill`] computing the first `shared` tokens, which every prompt must
    /// have in common, once (as [`Transformer::forward_chunked_shared`]): the prompts' own
    /// tokens run right-padded after the preamble's cache, which is then left-aligned so that
    /// decode steps append after every row's real keys. Falls back to the full prefill where
    /// sharing cannot give the same output ([`Transformer::can_share`]), and where the
    /// prefill reads the file's K-quant blocks (the shared start's passes are f32).
    pub(crate) fn prefill_shared(
        &self,
        prompts: &[Vec<u32>],
        shared: usize,
        hooks: &Hooks,
        cache: &mut Option<KvCache>,
    ) -> Result<ForwardOutput, RunError> {
        // A prefill that reads the file's blocks runs whole: a shared start's passes are f32.
        let blocks = self.reads_file_blocks() && !cache.as_ref().is_some_and(|c| c.f32_decode);
        if blocks || !self.can_share(prompts, shared, hooks) {
            return self.prefill(prompts, hooks, cache);
        }
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        self.check_lengths(&lengths)?;
        self.validate(hooks)?;
        let preamble = self.preamble(&prompts[0][..shared], hooks, Unembed::Last)?;
        let (out, mut filled) = self.own_tokens(
            &preamble,
            prompts,
            shared,
            hooks,
            Unembed::Last,
            PassKind::Plain,
        )?;
        // Set after the prefill, which runs in f32 (the file's blocks were ruled out above).
        filled.f32_decode = cache.as_ref().is_some_and(|c| c.f32_decode);
        filled.left_align()?;
        *cache = Some(filled);
        Ok(out)
    }

    /// Whether every prompt starts with the same `shared` tokens and has more, and `hooks`
    /// leave those positions alone: whether [`Transformer::forward_shared`] shares the start.
    /// A measure that compares two passes (a KL divergence) should run both the same way.
    pub fn can_share(&self, prompts: &[Vec<u32>], shared: usize, hooks: &Hooks) -> bool {
        let Some(first) = prompts.first() else {
            return false;
        };
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
        if shared == 0 || shortest <= shared {
            return false;
        }
        let start = &first[..shared];
        if prompts.iter().any(|p| &p[..shared] != start) {
            return false;
        }
        let own = (shortest - shared) as i64;
        let shareable = |i: &Intervention| match &i.positions {
            Positions::All => same_for_every_row(i),
            Positions::Last => true,
            Positions::Indices(ix) => {
                ix.iter()
                    .all(|&i| if i < 0 { -i <= own } else { i >= shared as i64 })
            }
        };
        let patterns = hooks
            .capture
            .iter()
            .chain(hooks.interventions.iter().map(|i| &i.hook))
            .any(|h| matches!(h, HookPoint::AttnPattern(_)));
        !patterns && hooks.interventions.iter().all(shareable)
    }

    /// The shared start alone, with the captures of `hooks` and those of its interventions
    /// that edit every position (the others touch none of its positions), and, when every
    /// position is unembedded, its logits.
    fn preamble(&self, ids: &[u32], hooks: &Hooks, unembed: Unembed) -> Result<Preamble, RunError> {
        // Logits of the preamble's positions only where the caller reads some of them; else a
        // pass through every block that the prompts' passes go through, for the cache.
        let (run_unembed, keep_logits) = match unembed {
            Unembed::All => (Unembed::All, true),
            Unembed::From(n) if n < ids.len() => (Unembed::From(n), true),
            Unembed::None => (Unembed::None, false),
            _ => (Unembed::Last, false),
        };
        let mut own_hooks = Hooks {
            capture: hooks.capture.clone(),
            interventions: hooks
                .interventions
                .iter()
                .filter(|i| i.positions == Positions::All)
                .cloned()
                .collect(),
        };
        // A pass that stops early must stop where the prompts' passes will.
        if let (Unembed::None, Some(h)) = (unembed, hooks.deepest()) {
            own_hooks = own_hooks.capture(h);
        }
        let layout = BatchLayout::new(vec![ids.len()], Padding::Right);
        let mut cache = Some(KvCache::new(true));
        let out = self.run(
            &[ids.to_vec()],
            &layout,
            &own_hooks,
            run_unembed,
            &mut cache,
        )?;
        let logits = if keep_logits { out.logits } else { None };
        let captures = out
            .captures
            .into_iter()
            .filter(|(h, _)| hooks.capture.contains(h))
            .collect();
        Ok(Preamble {
            cache: cache.expect("filled by the pass"),
            captures,
            logits,
        })
    }

    /// The first `shared` tokens of `prompts`, which [`Transformer::can_share`] must let
    /// them share under `hooks`, as one pass for [`Transformer::forward_after`]: a measure
    /// over many micro-batches computes the preamble once for all of them. `None` where they
    /// cannot share it.
    pub fn shared_start(
        &self,
        prompts: &[Vec<u32>],
        shared: usize,
        hooks: &Hooks,
        unembed: Unembed,
    ) -> Result<Option<SharedStart>, RunError> {
        if !self.can_share(prompts, shared, hooks) {
            return Ok(None);
        }
        self.validate(hooks)?;
        let preamble = self.preamble(&prompts[0][..shared], hooks, unembed)?;
        Ok(Some(SharedStart {
            ids: prompts[0][..shared].to_vec(),
            preamble,
            edited: hooks
                .interventions
                .iter()
                .any(|i| i.positions == Positions::All),
        }))
    }

    /// Whether `prompts` start with `start` and `hooks` can run after it: they leave the start
    /// alone ([`Transformer::can_share`]), and edit it only if it was computed with edits
    /// (which must then be theirs).
    fn check_after(
        &self,
        start: &SharedStart,
        prompts: &[Vec<u32>],
        hooks: &Hooks,
    ) -> Result<(), RunError> {
        let shared = start.ids.len();
        let edits = hooks
            .interventions
            .iter()
            .any(|i| i.positions == Positions::All);
        if !self.can_share(prompts, shared, hooks)
            || prompts.iter().any(|p| p[..shared] != start.ids[..])
            || (edits && !start.edited)
        {
            return Err(RunError::Batch(
                "the prompts or hooks do not fit the shared start they are run after".into(),
            ));
        }
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        self.check_lengths(&lengths)
    }

    /// [`Transformer::forward_after`] from the residual stream at `at`, as
    /// [`Transformer::forward_shared_from`] runs: `x` is the full pass's activation there,
    /// `[batch, positions, d_model]`, of which only the prompts' own positions are read.
    pub fn forward_from_after(
        &self,
        start: &SharedStart,
        prompts: &[Vec<u32>],
        at: HookPoint,
        x: &Tensor,
        hooks: &Hooks,
        unembed: Unembed,
    ) -> Result<ForwardOutput, RunError> {
        self.check_after(start, prompts, hooks)?;
        let layout = BatchLayout::new(prompts.iter().map(Vec::len).collect(), Padding::Right);
        self.check_start(&layout, at, x, hooks)?;
        let shared = start.ids.len();
        let own = x
            .narrow(1, shared, layout.seq_len - shared)
            .run_ctx("the prompts' own positions")?;
        let how = PassKind::From(at, &own);
        self.own_pass(&start.preamble, prompts, shared, hooks, unembed, how)
            .map(|(out, _)| out)
    }

    /// The prompts' own tokens after `start`, which `unembed` must be that of, and `hooks`
    /// too where they edit every position (hooks that leave the start alone may run after a
    /// start computed without them):
    /// their captures and logits at their own positions only, `[batch, own positions, ..]`
    /// right-padded, with the layout of their own tokens. The same bits as those positions of
    /// [`Transformer::forward_shared`].
    pub fn forward_after(
        &self,
        start: &SharedStart,
        prompts: &[Vec<u32>],
        hooks: &Hooks,
        unembed: Unembed,
    ) -> Result<ForwardOutput, RunError> {
        self.check_after(start, prompts, hooks)?;
        let shared = start.ids.len();
        self.own_pass(
            &start.preamble,
            prompts,
            shared,
            hooks,
            unembed,
            PassKind::Plain,
        )
        .map(|(out, _)| out)
    }

    /// One micro-batch's own tokens after the preamble: their output, at their own positions,
    /// and the cache (the preamble's keys and values, then their own).
    fn own_pass(
        &self,
        preamble: &Preamble,
        chunk: &[Vec<u32>],
        shared: usize,
        hooks: &Hooks,
        unembed: Unembed,
        how: PassKind<'_>,
    ) -> Result<(ForwardOutput, KvCache), RunError> {
        let own: Vec<Vec<u32>> = chunk.iter().map(|p| p[shared..].to_vec()).collect();
        let layout = BatchLayout::new(own.iter().map(Vec::len).collect(), Padding::Right);
        let mut cache = Some(preamble.cache.repeat_row(chunk.len())?);
        let own_unembed = match unembed {
            Unembed::From(n) => Unembed::From(n.saturating_sub(shared)),
            u => u,
        };
        let (out, _) = self.run_pass(&own, &layout, hooks, own_unembed, &mut cache, how)?;
        Ok((out, cache.expect("filled by the pass")))
    }

    /// One micro-batch's own tokens after the preamble: its output stitched to the shape of
    /// the full pass, and its cache (the preamble's keys and values, then its own).
    fn own_tokens(
        &self,
        preamble: &Preamble,
        chunk: &[Vec<u32>],
        shared: usize,
        hooks: &Hooks,
        unembed: Unembed,
        how: PassKind<'_>,
    ) -> Result<(ForwardOutput, KvCache), RunError> {
        let b = chunk.len();
        let (out, cache) = self.own_pass(preamble, chunk, shared, hooks, unembed, how)?;
        let stitch = |start: &Tensor, rest: &Tensor| -> candle_core::Result<Tensor> {
            let mut dims = start.dims().to_vec();
            dims[0] = b;
            Tensor::cat(&[&start.broadcast_as(dims)?.contiguous()?, rest], 1)
        };
        let mut captures = BTreeMap::new();
        for (h, rest) in out.captures {
            let start = preamble.captures.get(&h).ok_or_else(|| {
                RunError::Batch(format!("`{h}` was not captured in the preamble"))
            })?;
            captures.insert(h, stitch(start, &rest).run_ctx("shared preamble captures")?);
        }
        let logits = match (unembed, out.logits, &preamble.logits) {
            (Unembed::All | Unembed::From(_), Some(rest), Some(start)) => {
                Some(stitch(start, &rest).run_ctx("shared preamble logits")?)
            }
            (_, l, _) => l,
        };
        let out = ForwardOutput {
            logits,
            captures,
            layout: BatchLayout::new(chunk.iter().map(Vec::len).collect(), Padding::Right),
        };
        Ok((out, cache))
    }
}

/// A shared start computed once ([`Transformer::shared_start`]).
pub struct SharedStart {
    ids: Vec<u32>,
    preamble: Preamble,
    /// Whether its pass edited every position.
    edited: bool,
}

impl SharedStart {
    /// Its tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Its logits `[1, len, vocab]` where it was run with every position unembedded.
    pub fn logits(&self) -> Option<&Tensor> {
        self.preamble.logits.as_ref()
    }

    /// Its activations `[1, len, ..]` at `hook`, where it was computed capturing it.
    pub fn captures(&self, hook: HookPoint) -> Option<&Tensor> {
        self.preamble.captures.get(&hook)
    }
}

/// Whether an edit of every position does the same to the shared start of every row, so that
/// the start can be computed once with it: adding a vector and ablating a direction act on
/// each position alone, and so does a replacement that says it does ([`Edit::ReplaceEach`]);
/// any other replacement may be a function of the whole batch (an SAE splice is not, but a
/// per-row patch is), so it is never shared.
fn same_for_every_row(i: &Intervention) -> bool {
    matches!(
        i.edit,
        Edit::Add { .. } | Edit::Ablate { .. } | Edit::ReplaceEach(_)
    )
}
