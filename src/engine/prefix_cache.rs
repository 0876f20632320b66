//! Prefix caching: the keys and values of prompts computed before, kept in blocks of
//! [`BLOCK`] tokens so that a later prompt starting with the same tokens skips them.
//!
//! Layout: a block is keyed by its parent block (or the root of its `cache_salt`) and its own
//! tokens, so a chain of blocks is a path in a tree of shared prefixes (vLLM's block hashes,
//! with exact keys instead of hashes: no collision can hand a prompt another's keys). A hit
//! copies the chain's keys and values into the new sequence's cache (copy on hit: sequences
//! go on writing their caches in place, and a block outlives the sequence that made it).
//!
//! Modes: the trunk's keys and values of layers 1..L do not depend on the head read, so a
//! block serves every mode whose depth its keys cover: one made by a request through all
//! layers serves every mode, one made at exit L serves the modes of depth <= L, and a deeper
//! request that finds only shallower blocks computes the prefix again and deepens them.
//! Echo scoring needs each prompt token's logprob in the request's mode: a block keeps those
//! of every (mode, `logprobs`) that scored it, and a scoring request reuses a block only when
//! its own mode scored it with at least as many top entries.
//!
//! Eviction: least recently used first. A lookup or insertion stamps its whole chain, so a
//! parent is never older than its child and, deeper blocks going first among equals, no
//! block is evicted before the blocks below it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::request::TokenLogprob;
use crate::model::{KvRun, Mode};

/// Tokens per block: the granularity of reuse.
pub const BLOCK: usize = 16;

/// What a block hangs from: the root of a salt (no salt is a root of its own) or a block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Parent {
    Root(Option<Arc<str>>),
    Block(u64),
}

type Key = (Parent, [u32; BLOCK]);

/// The prompt logprobs of a block's tokens in one mode.
#[derive(Debug, Clone)]
struct Scores {
    mode: Mode,
    /// Top alternatives kept per token.
    top: usize,
    /// One per token of the block from its first (the prompt's first token has none).
    logprobs: Vec<TokenLogprob>,
}

struct Block {
    key: Key,
    /// Index in its chain (block `i` holds prompt positions `i·BLOCK ..`).
    index: usize,
    kv: KvRun,
    scores: Vec<Scores>,
    last_used: u64,
}

impl Block {
    /// Its tokens' logprobs in `mode` with at least `top` alternatives, if it has them.
    fn scores_for(&self, mode: Mode, top: usize) -> Option<&Scores> {
        self.scores.iter().find(|s| s.mode == mode && s.top >= top)
    }
}

/// What a prompt asks of the cache.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    pub prompt: &'a [u32],
    pub salt: Option<&'a Arc<str>>,
    /// Layers whose keys and values the request needs.
    pub depth: usize,
    /// Echo scoring: the mode and the top alternatives per prompt token it reports.
    pub scoring: Option<(Mode, usize)>,
}

/// A prompt's reusable prefix: positions `0..len` of `runs`, and for a scoring request the
/// logprobs of prompt tokens `1..=len`.
pub struct Hit {
    pub runs: Vec<KvRun>,
    pub len: usize,
    pub logprobs: Vec<TokenLogprob>,
}

/// What a finished prefill gives the cache.
pub struct Publication<'a> {
    pub lookup: Lookup<'a>,
    /// The prompt logprobs it computed (tokens `1..`), with `lookup.scoring`.
    pub logprobs: &'a [TokenLogprob],
}

pub struct PrefixCache {
    ids: HashMap<Key, u64>,
    blocks: HashMap<u64, Block>,
    /// `(last_used, deeper first, id)`: the eviction order.
    lru: BTreeSet<(u64, std::cmp::Reverse<usize>, u64)>,
    next_id: u64,
    clock: u64,
    /// `--prefix-cache-max-tokens`.
    max_tokens: usize,
}

impl PrefixCache {
    pub fn new(max_tokens: usize) -> Self {
        Self {
            ids: HashMap::new(),
            blocks: HashMap::new(),
            lru: BTreeSet::new(),
            next_id: 0,
            clock: 0,
            max_tokens,
        }
    }

    /// Positions held (whole blocks).
    pub fn tokens(&self) -> usize {
        self.blocks.len() * BLOCK
    }

    /// The chain of blocks that `l.prompt` starts with and that serve `l` (depth, scores),
    /// stopping short of the prompt's last token, which is always computed (its logits
    /// choose the first token).
    fn chain(&self, l: &Lookup) -> Vec<u64> {
        let usable = l.prompt.len().saturating_sub(1) / BLOCK;
        let mut parent = Parent::Root(l.salt.cloned());
        let mut chain = Vec::new();
        for tokens in l.prompt.chunks_exact(BLOCK).take(usable) {
            let key = (parent, tokens.try_into().expect("whole block"));
            let Some(&id) = self.ids.get(&key) else {
                break;
            };
            let b = &self.blocks[&id];
            let scored = l
                .scoring
                .is_none_or(|(mode, top)| b.scores_for(mode, top).is_some());
            if b.kv.depth() < l.depth || !scored {
                break;
            }
            chain.push(id);
            parent = Parent::Block(id);
        }
        chain
    }

    /// Full blocks of `l.prompt` this cache would serve now.
    pub fn served_blocks(&self, l: &Lookup) -> usize {
        self.chain(l).len()
    }

    /// The reusable prefix of `l.prompt`, stamped as used; None when no whole block is.
    pub fn lookup(&mut self, l: &Lookup) -> Option<Hit> {
        let chain = self.chain(l);
        if chain.is_empty() {
            return None;
        }
        self.stamp(&chain);
        let runs = chain.iter().map(|id| self.blocks[id].kv.clone()).collect();
        let Some((mode, top)) = l.scoring else {
            return Some(Hit {
                runs,
                len: chain.len() * BLOCK,
                logprobs: Vec::new(),
            });
        };
        // Prompt token `i`'s logprob comes from position `i - 1`'s logits: the chain scores
        // tokens 1 .. its end, and the token after it is scored by computing the chain's last
        // position again, so a scoring request reuses one position less.
        let logprobs = chain
            .iter()
            .flat_map(|id| {
                let s = self.blocks[id]
                    .scores_for(mode, top)
                    .expect("the chain serves this scoring");
                s.logprobs.iter().map(move |lp| TokenLogprob {
                    top: lp.top[..lp.top.len().min(top)].to_vec(),
                    ..lp.clone()
                })
            })
            .collect();
        Some(Hit {
            runs,
            len: chain.len() * BLOCK - 1,
            logprobs,
        })
    }

    /// Adds the whole blocks of a prefilled prompt (their keys and values from `export`,
    /// called only for blocks that are new or deeper than the cached ones), within
    /// `room` more positions and the cache's own cap, evicting the least recently used
    /// blocks of other prompts first. Returns the blocks now held for the prompt.
    pub fn publish(
        &mut self,
        p: &Publication,
        room: usize,
        mut export: impl FnMut(usize) -> candle_core::Result<KvRun>,
    ) -> candle_core::Result<usize> {
        let l = &p.lookup;
        self.clock += 1;
        let stamp = self.clock;
        let mut parent = Parent::Root(l.salt.cloned());
        let limit = self.max_tokens.min(self.tokens().saturating_add(room));
        let mut held = 0;
        for (index, tokens) in l.prompt.chunks_exact(BLOCK).enumerate() {
            let key: Key = (parent, tokens.try_into().expect("whole block"));
            let id = match self.ids.get(&key) {
                Some(&id) => {
                    if self.blocks[&id].kv.depth() < l.depth {
                        let kv = export(index)?;
                        self.blocks.get_mut(&id).expect("listed").kv = kv;
                    }
                    id
                }
                None => {
                    if !self.make_room(limit, stamp) {
                        break;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let kv = export(index)?;
                    self.ids.insert(key.clone(), id);
                    self.blocks.insert(
                        id,
                        Block {
                            key,
                            index,
                            kv,
                            scores: Vec::new(),
                            last_used: 0,
                        },
                    );
                    self.lru.insert((0, std::cmp::Reverse(index), id));
                    id
                }
            };
            self.stamp_one(id, stamp);
            if let Some((mode, top)) = l.scoring {
                self.add_scores(id, index, mode, top, p.logprobs);
            }
            held += 1;
            parent = Parent::Block(id);
        }
        Ok(held)
    }

    /// Block `id` (number `index` of its chain) keeps its tokens' logprobs in `mode`
    /// (`logprobs[i]` is prompt token `i + 1`'s).
    fn add_scores(&mut self, id: u64, index: usize, mode: Mode, top: usize, all: &[TokenLogprob]) {
        let b = self.blocks.get_mut(&id).expect("listed");
        if b.scores_for(mode, top).is_some() {
            return;
        }
        let first = (index * BLOCK).max(1) - 1;
        let last = (index + 1) * BLOCK - 1;
        if all.len() < last {
            return; // not scored this far (cannot happen for a whole prompt block)
        }
        b.scores.retain(|s| s.mode != mode);
        b.scores.push(Scores {
            mode,
            top,
            logprobs: all[first..last].to_vec(),
        });
    }

    /// Evicts the least recently used blocks (none stamped `keep`) until one more block fits
    /// under `limit`; false when it cannot.
    fn make_room(&mut self, limit: usize, keep: u64) -> bool {
        while self.tokens() + BLOCK > limit {
            match self.lru.first().copied() {
                Some((used, _, id)) if used < keep => self.remove(id),
                _ => return false,
            }
        }
        true
    }

    /// Evicts least recently used blocks until at most `tokens` positions are held.
    pub fn shrink_to(&mut self, tokens: usize) {
        while self.tokens() > tokens {
            let Some(&(_, _, id)) = self.lru.first() else {
                return;
            };
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(b) = self.blocks.remove(&id) {
            self.lru
                .remove(&(b.last_used, std::cmp::Reverse(b.index), id));
            self.ids.remove(&b.key);
        }
    }

    fn stamp(&mut self, chain: &[u64]) {
        self.clock += 1;
        let stamp = self.clock;
        for &id in chain {
            self.stamp_one(id, stamp);
        }
    }

    fn stamp_one(&mut self, id: u64, stamp: u64) {
        let b = self.blocks.get_mut(&id).expect("listed");
        self.lru
            .remove(&(b.last_used, std::cmp::Reverse(b.index), id));
        b.last_used = stamp;
        self.lru.insert((stamp, std::cmp::Reverse(b.index), id));
    }
}

/// Whole blocks that `a` and `b` start with (the blocks one's prefill would give the other).
pub fn shared_blocks(a: &[u32], b: &[u32]) -> usize {
    a.chunks_exact(BLOCK)
        .zip(b.chunks_exact(BLOCK))
        .take_while(|(x, y)| x == y)
        .count()
}
