//! One forward step of a batch: what each sequence brings (`SeqStep`), how their rows are
//! packed into one matrix (`Segment`, `Packed`), and what comes back (`StepLogits`).

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::kv_cache::KvCache;
use super::mode::{DeviceChoice, EarlyExitParams, Head};
use crate::kernels::greedy::ContrastRule;
use crate::kernels::logprob::RowLogprobs;
use crate::kernels::sled::SledRule;

/// One sequence's part of a forward step.
pub struct SeqStep<'a> {
    /// New tokens: a prompt chunk, or the one token sampled last step.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Blocks to run (the mode's depth); the cache of layers above stays empty.
    pub depth: usize,
    /// Heads wanted at the last new position; empty in the middle of a chunked prefill.
    pub heads: &'a [Head],
    /// Evaluate the heads at every new position, not just the last (prompt logprobs).
    pub all_positions: bool,
    /// A draft of self-speculative decoding: it may read the draft copies of the weights
    /// (`DraftWeights`).
    pub draft: bool,
    /// The verifying pass of self-speculative decoding (or a preempted sequence recomputing
    /// its cache): each of its positions is computed as a decode step computes its one
    /// position (attention query by query), so that the verdicts see exactly the numbers
    /// decoding without drafts would.
    pub verify: bool,
    /// Confidence-based early exit, decided in the step for a decode position (one token,
    /// heads at its last row): at each exit of `heads` (ascending) whose head is confident,
    /// the row leaves the step, the heads above stay empty, and the blocks above get its keys
    /// and values from its hidden state there. On the batched path the margins are computed
    /// where the logits are, and the exits the row went on from come back empty too (only the
    /// head it left at is copied). Ignored for prompt chunks and verifying passes.
    pub early_exit: Option<EarlyExitParams>,
    /// The caller reads only the choice of its next token, made from its heads' rows at its
    /// last position thus (`DeviceChoice::HeadArgmax` or `HeadSample` of one head or of the
    /// one a per-token exit leaves at, `Contrast` of two: upper, lower), and nothing else of
    /// the logits: on the batched path the step computes it where the logits are and copies that
    /// index alone (`Logits::chosen`, for each head handed over); elsewhere the logits come as
    /// usual.
    pub choice: Option<DeviceChoice>,
    /// DoLa (`Mode::selects_premature`): its first head is the mature one, the rest premature
    /// candidates of which its scores read only the one farthest from the mature head. On the
    /// batched path the step chooses that candidate where the logits are (at the last row)
    /// and hands over only its rows and the mature head's (the others left empty); elsewhere
    /// every candidate's come.
    pub select_premature: bool,
    /// Echo's scoring (with `all_positions`): of its heads' rows, the first `targets.len()`
    /// are read only as their log-distribution at each one's target (the prompt's next
    /// token) and its `top` largest values: the log-softmax of its one head, or of a contrast
    /// of its heads (`LogprobRead`). On the batched path the step computes those where the logits
    /// are and copies them alone (`Logits::logprobs_at`, on each head; the rows after them
    /// come as usual); elsewhere every row comes.
    pub logprobs: Option<LogprobTargets<'a>>,
    /// With a `choice`, the caller reads the chosen token's log-probability and the top this
    /// many of the distribution it was chosen from too (`logprobs`, `best_of`'s ranking: the
    /// head's log-softmax, the contrast's log q): the step reads them where the logits are,
    /// beside the choice (`Logits::logprobs_at(0)`). A step that cannot read them there makes
    /// no choice there either: the rows come as usual.
    pub choice_logprobs: Option<usize>,
    /// SLED (`Mode::device_scores`): the caller reads only the strategy's scores at the
    /// positions its heads are evaluated at (the last, or with `all_positions` every one),
    /// made thus from its heads there (head 0 the mature one, the rest its premature layers,
    /// in order). On the batched path the step computes them where the logits are
    /// (`kernels::sled`: the candidates and their logits) and hands over only those, as rows
    /// of scores on head 0 (`Logits::are_scores`; the others left empty); elsewhere every
    /// head's rows come.
    pub sled: Option<SledRule>,
}

/// See `SeqStep::logprobs`.
#[derive(Debug, Clone, Copy)]
pub struct LogprobTargets<'a> {
    pub targets: &'a [u32],
    pub read: LogprobRead,
}

/// What is read of a row as log-probabilities: the `top` best (at most
/// `kernels::logprob::MAX_TOP`) of its one head's log-softmax, or of a contrast of its heads by
/// `contrast`'s rule: autocontrast's log q of its two (upper, lower), or the log-softmax of
/// DoLa's logits over its mature head and, at each position, the candidate farthest from it
/// (its only one, or chosen there as `SeqStep::select_premature` chooses at one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogprobRead {
    pub top: usize,
    pub contrast: Option<ContrastRule>,
}

impl LogprobRead {
    /// Whether it reads a sequence of `heads` heads.
    pub fn reads(&self, heads: usize) -> bool {
        match self.contrast {
            None => heads == 1,
            Some(ContrastRule::Autocontrast { .. }) => heads == 2,
            Some(ContrastRule::Dola { .. }) => heads >= 2,
        }
    }
}

/// A sequence's rows in the packed matrix, with its cache.
pub(super) struct Segment<'s> {
    pub start: usize,
    pub len: usize,
    pub cache: &'s mut KvCache,
    /// Attend query by query, as decode steps do (a verifying pass: `SeqStep::verify`).
    pub per_query: bool,
}

/// The packed layout of a step, in depth order (deepest first).
pub(super) struct Packed<'p> {
    pub starts: &'p [usize],
    pub lens: &'p [usize],
    pub heads: &'p [&'p [Head]],
    pub all_positions: &'p [bool],
    /// See `SeqStep::choice` (None where the step cannot make it: see `forward_pass`).
    pub choices: &'p [Option<DeviceChoice>],
    /// See `SeqStep::select_premature` (false where the step cannot: see `forward_pass`).
    pub select_premature: &'p [bool],
    /// See `SeqStep::logprobs` (None where the step cannot: see `forward_pass`).
    pub logprobs: &'p [Option<LogprobTargets<'p>>],
    /// See `SeqStep::choice_logprobs` (None without a choice).
    pub choice_logprobs: &'p [Option<usize>],
    /// See `SeqStep::sled` (None where the step cannot: see `forward_pass`).
    pub sled: &'p [Option<SledRule>],
    /// Packed slot -> index of the sequence in the caller's step list.
    pub order: &'p [usize],
}

/// Counters used by tests and metrics to check the work skipped by early exits.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Block evaluations, counted once per sequence per block.
    pub block_evals: AtomicU64,
}

/// One head's logits for one sequence in a step: `rows` positions of `vocab` floats each
/// (one row, the last new position, unless the step asked for all positions). The sequences
/// that share a head in a step share the one buffer its product filled, each with its range
/// of it: no per-sequence copy of the vocabulary.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    vocab: usize,
    data: Arc<Vec<f32>>,
    range: Range<usize>,
    /// The choice (greedy or drawn) of the one row, computed where the logits were (no rows
    /// held): see `SeqStep::choice`.
    chosen: Option<u32>,
    /// The first rows, of which only their log-probabilities came back (`SeqStep::logprobs`);
    /// the rows of `data` follow them.
    logprobs: Vec<RowLogprobs>,
    /// The rows are the strategy's scores, computed where the logits were, not a head's
    /// logits (`SeqStep::sled`).
    scores: bool,
}

impl Logits {
    /// All of `data`.
    pub fn new(vocab: usize, data: Vec<f32>) -> Self {
        let range = 0..data.len();
        Self::shared(vocab, Arc::new(data), range)
    }

    /// The rows of `data` in `range`.
    pub fn shared(vocab: usize, data: Arc<Vec<f32>>, range: Range<usize>) -> Self {
        debug_assert!(vocab > 0 && range.len().is_multiple_of(vocab) && range.end <= data.len());
        Self {
            vocab,
            data,
            range,
            chosen: None,
            logprobs: Vec::new(),
            scores: false,
        }
    }

    /// Rows of which only `logprobs` came back, then the rows of `data` in `range`.
    pub fn with_logprobs(
        vocab: usize,
        logprobs: Vec<RowLogprobs>,
        data: Arc<Vec<f32>>,
        range: Range<usize>,
    ) -> Self {
        Self {
            logprobs,
            ..Self::shared(vocab, data, range)
        }
    }

    /// One row of which only its choice `id` came back, and, where they were read there, its
    /// log-probabilities at `id` (`SeqStep::choice_logprobs`).
    pub fn chosen(vocab: usize, id: u32, read: Option<RowLogprobs>) -> Self {
        Self {
            vocab,
            chosen: Some(id),
            logprobs: read.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Rows that are the strategy's scores, computed where the logits were (`SeqStep::sled`).
    pub fn strategy_scores(vocab: usize, scores: Vec<f32>) -> Self {
        Self {
            scores: true,
            ..Self::new(vocab, scores)
        }
    }

    /// Whether its rows are the strategy's scores, which alone came back (`SeqStep::sled`).
    pub fn are_scores(&self) -> bool {
        self.scores
    }

    /// The choice, when that alone came back (then no row can be read).
    pub fn choice(&self) -> Option<u32> {
        self.chosen
    }

    fn values(&self) -> &[f32] {
        &self.data[self.range.clone()]
    }

    pub fn rows(&self) -> usize {
        match self.chosen {
            Some(_) => 1,
            None => self.logprobs.len() + self.range.len().checked_div(self.vocab).unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rows() == 0
    }

    /// Row `i`'s logits (panics for logits of which only the choice came back, and for a row
    /// of which only its log-probabilities did).
    pub fn row(&self, i: usize) -> &[f32] {
        assert!(self.chosen.is_none(), "only the choice came back");
        let i = i
            .checked_sub(self.logprobs.len())
            .expect("only the row's log-probabilities came back");
        &self.values()[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Row `i`'s log-probabilities, where only they came back (`SeqStep::logprobs`), or came
    /// with the choice (`SeqStep::choice_logprobs`).
    pub fn logprobs_at(&self, i: usize) -> Option<&RowLogprobs> {
        self.logprobs.get(i)
    }

    /// The last position's row (the next token's logits); None where only its choice or its
    /// log-probabilities came back.
    pub fn last(&self) -> Option<&[f32]> {
        if self.chosen.is_some() || self.range.is_empty() {
            return None;
        }
        Some(self.row(self.rows() - 1))
    }

    /// The last row, owned (the next token's logits).
    pub fn into_last(self) -> Vec<f32> {
        self.last().map(<[f32]>::to_vec).unwrap_or_default()
    }
}

impl PartialEq for Logits {
    fn eq(&self, other: &Self) -> bool {
        self.rows() == other.rows()
            && self.values() == other.values()
            && self.chosen == other.chosen
            && self.logprobs == other.logprobs
            && self.scores == other.scores
    }
}

/// What a forward step returns: per sequence (in the order of the step list), per head of
/// its `SeqStep::heads` (in that order), the logits.
#[derive(Debug, Default)]
pub struct StepLogits {
    pub(super) per_seq: Vec<Vec<Logits>>,
}

impl StepLogits {
    /// Sequence `seq`'s logits, one entry per head it asked for.
    pub fn seq(&self, seq: usize) -> &[Logits] {
        &self.per_seq[seq]
    }

    /// Hands over every sequence's head logits.
    pub fn into_per_seq(self) -> Vec<Vec<Logits>> {
        self.per_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_rows_and_the_last_row() {
        let l = Logits::new(3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(l.rows(), 2);
        assert_eq!(l.row(0), &[1.0, 2.0, 3.0]);
        assert_eq!(l.last(), Some(&[4.0, 5.0, 6.0][..]));
        let none = Logits::default();
        assert!(none.is_empty());
        assert_eq!((none.rows(), none.last()), (0, None));
        // a range of a shared buffer: its rows only
        let buf = Arc::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        let mid = Logits::shared(3, Arc::clone(&buf), 3..9);
        assert_eq!(
            (mid.rows(), mid.row(0), mid.last()),
            (2, &[4.0, 5.0, 6.0][..], Some(&[7.0, 8.0, 9.0][..]))
        );
        assert_eq!(mid, Logits::new(3, vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0]));
        assert_eq!(mid.into_last(), vec![7.0, 8.0, 9.0]);
        assert!(Logits::default().into_last().is_empty());
    }

    #[test]
    fn rows_read_as_log_probabilities_come_first() {
        let read = |target| RowLogprobs {
            target,
            top: vec![(2, -0.5)],
        };
        let buf = Arc::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let l = Logits::with_logprobs(3, vec![read(-1.0), read(-2.0)], Arc::clone(&buf), 3..6);
        assert_eq!(l.rows(), 3);
        assert_eq!(l.logprobs_at(1).map(|r| r.target), Some(-2.0));
        assert_eq!(l.logprobs_at(2), None);
        assert_eq!(
            (l.row(2), l.last()),
            (&[4.0, 5.0, 6.0][..], Some(&[4.0, 5.0, 6.0][..]))
        );
        // every row read: no last row to choose from, and not empty
        let only = Logits::with_logprobs(3, vec![read(-1.0)], buf, 0..0);
        assert_eq!(
            (only.rows(), only.last(), only.is_empty()),
            (1, None, false)
        );
    }
}
