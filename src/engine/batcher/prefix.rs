//! The batcher's side of prefix caching (`engine/prefix_cache.rs`): a prompt joining the batch
//! starts from its cached prefix; a prompt whose prefill ends gives its whole blocks to the
//! cache; admission evicts cached blocks before a request waits; a prompt that shares blocks
//! with one still in its prefill waits for them instead of computing them too (the choices of
//! a multiple-choice question sent together compute their context once).

use super::Batcher;
use crate::engine::prefix_cache::{self, Lookup, Publication, BLOCK};
use crate::engine::request::TokenLogprob;
use crate::engine::scheduler::Demand;
use crate::engine::sequence::{RequestState, Sequence};

/// What `prompt` of the request in `r` is to the cache: its salt, depth and scoring.
fn key<'a>(r: &'a RequestState, prompt: &'a [u32]) -> Lookup<'a> {
    Lookup {
        prompt,
        salt: r.req.cache_salt.as_ref(),
        depth: r.depth,
        scoring: scoring(r),
    }
}

/// What `prompt` asks of the cache; None when it cannot start from a cached prefix (an
/// inspection of every position evaluates every head there).
fn lookup<'a>(r: &'a RequestState, prompt: &'a [u32]) -> Option<Lookup<'a>> {
    let inspects_all = r.req.inspect.as_ref().is_some_and(|i| i.all_positions);
    (!inspects_all).then(|| key(r, prompt))
}

/// The prompt logprobs a request reports (echo with logprobs): its mode and top entries.
fn scoring(r: &RequestState) -> Option<(crate::model::Mode, usize)> {
    let req = &r.req;
    match (req.echo, req.logprobs, &req.inspect) {
        (true, Some(top), None) => Some((req.mode, top)),
        _ => None,
    }
}

impl Batcher {
    /// Positions held by the prefix cache.
    pub(super) fn cached_positions(&self) -> usize {
        self.prefix.as_ref().map_or(0, |c| c.tokens())
    }

    /// What the batch reserves with the prefix cache's positions.
    pub(super) fn reserved_with_cache(&self) -> Demand {
        let r = self.reserved();
        Demand {
            tokens: r.tokens + self.cached_positions(),
            ..r
        }
    }

    /// Evicts cached blocks until `need` more positions fit in the budget beside what the
    /// batch reserves.
    pub(super) fn evict_for(&mut self, need: usize) {
        let reserved = self.reserved().tokens;
        let room = self.cfg.budget.max_tokens.saturating_sub(reserved + need);
        if let Some(cache) = self.prefix.as_mut() {
            cache.shrink_to(room);
        }
        self.publish_cache_size();
    }

    /// Whether `prompt` should wait to join: a running sequence of the same depth, still in its
    /// prefill, will give the cache whole blocks of it that the cache does not serve yet. (A
    /// shallower request does not wait for a deeper one: computing its own fewer layers beside
    /// it gives its first token sooner than waiting for all of the deeper one's.)
    pub(super) fn waits_for_prefix(&self, r: &RequestState, prompt: &[u32]) -> bool {
        let (Some(cache), Some(l)) = (self.prefix.as_ref(), lookup(r, prompt)) else {
            return false;
        };
        let usable = prompt.len().saturating_sub(1) / BLOCK;
        let served = cache.served_blocks(&l);
        if served >= usable {
            return false;
        }
        self.running.iter().any(|s| {
            if !s.in_prefill() {
                return false;
            }
            let other = s.request.borrow();
            // a sharer whose client is not reading sits its steps out: nobody waits on it
            let gives = other.can_emit()
                && other.req.cache_salt == r.req.cache_salt
                && other.depth == r.depth
                && match (scoring(r), scoring(&other)) {
                    (None, _) => true,
                    (Some((mode, top)), Some((m, t))) => mode == m && t >= top,
                    (Some(_), None) => false,
                };
            gives && prefix_cache::shared_blocks(prompt, &s.prompt).min(usable) > served
        })
    }

    /// Looks `seq`'s prompt up in the cache and imports the hit's keys and values into its
    /// cache: the positions imported and their prompt logprobs. None: no hit, or one that could
    /// not be imported (the cache is an optimisation: the sequence computes its prompt).
    fn import_cached(&mut self, seq: &mut Sequence) -> Option<(usize, Vec<TokenLogprob>)> {
        let prompt = std::rc::Rc::clone(&seq.prompt);
        let hit = {
            let r = seq.request.borrow();
            match (self.prefix.as_mut(), lookup(&r, &prompt)) {
                (Some(cache), Some(l)) => cache.lookup(&l),
                _ => None,
            }
        }?;
        let depth = seq.request.borrow().depth;
        let runs: Vec<_> = hit.runs.iter().collect();
        match seq.cache.import(&runs, hit.len, depth) {
            Ok(()) => Some((hit.len, hit.logprobs)),
            Err(e) => {
                tracing::warn!(error = %e, "prefix cache hit not imported");
                seq.cache = self.model.new_cache_for(seq.reserved);
                None
            }
        }
    }

    /// A sequence joining the batch takes its cached prefix: keys and values into its cache,
    /// the prompt logprobs it reports, and the count in its request's usage.
    pub(super) fn take_cached_prefix(&mut self, seq: &mut Sequence) {
        let hit_len = match self.import_cached(seq) {
            Some((len, logprobs)) => {
                seq.prefilled = len;
                seq.prompt_logprobs = logprobs;
                len
            }
            None => 0,
        };
        if self.prefix.is_some() {
            self.metrics.prefix_cache_hits.increment(hit_len as u64);
            self.metrics
                .prefix_cache_misses
                .increment((seq.prompt.len() - hit_len) as u64);
            seq.request.borrow_mut().usage.cached_tokens += hit_len;
        }
    }

    /// A preempted sequence coming back takes what the cache holds of its prompt (keys and
    /// values its own prompt chunks would compute, to the bit) instead of recomputing it.
    pub(super) fn resume_from_cache(&mut self, seq: &mut Sequence) {
        if let Some((len, _)) = self.import_cached(seq) {
            if let Some(resume) = seq.resume.as_mut() {
                resume.done = len;
            }
            self.metrics.prefix_cache_hits.increment(len as u64);
        }
    }

    /// The running sequence at `i` has its whole prompt in its cache: its whole blocks go to
    /// the prefix cache, within the budget the batch leaves.
    pub(super) fn publish_prefix(&mut self, i: usize) {
        let room = self
            .cfg
            .budget
            .max_tokens
            .saturating_sub(self.reserved_with_cache().tokens);
        let Some(cache) = self.prefix.as_mut() else {
            return;
        };
        let seq = &self.running[i];
        let r = seq.request.borrow();
        let p = Publication {
            lookup: key(&r, &seq.prompt),
            logprobs: &seq.prompt_logprobs,
        };
        let depth = r.depth;
        let start = std::time::Instant::now();
        let mut exported = 0;
        let published = cache.publish(&p, room, |block| {
            exported += 1;
            seq.cache.export(block * BLOCK, BLOCK, depth)
        });
        match published {
            Ok(blocks) => tracing::debug!(
                blocks,
                exported,
                us = start.elapsed().as_micros() as u64,
                "prompt given to the prefix cache"
            ),
            Err(e) => tracing::warn!(error = %e, "prompt not given to the prefix cache"),
        }
        self.publish_cache_size();
    }

    fn publish_cache_size(&self) {
        self.metrics
            .prefix_cache_tokens
            .set(self.cached_positions() as f64);
    }
}
