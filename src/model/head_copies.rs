//! A step's head products on their way to the host: copied all at once when the pass ends
//! on the batched path, with the choices, margins, DoLa candidates, log-probabilities and
//! SLED scores a sequence reads made where the logits are (`kernels::greedy`,
//! `kernels::sample`, `kernels::logprob`, `kernels::sled`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::error::Result;
use super::mode::{ContrastRule, DeviceChoice};
use super::step::{Logits, LogprobRead, LogprobTargets};
use crate::kernels::logprob::{self, RowLogprobs};
use crate::kernels::sled::{self, SledRule};
use crate::kernels::{greedy, sample};

/// The step's head products on their way to the host. On the batched attention path (a
/// GPU's) they are copied all at once when the pass ends: a copy to the host waits for
/// everything queued before it, so a copy per head would stall the device once per head
/// (contrast's two, inspection's every exit). Held back at most [`HELD_LOGITS_BYTES`], so a
/// step scoring long prompts at many heads holds no second copy of them all. A sequence that
/// reads only its choice (`SeqStep::choice`: greedy or drawn) gets it computed there
/// (`kernels::greedy`, `kernels::sample`) and copied as one index, and one that reads rows
/// only as log-probabilities (`SeqStep::logprobs`, `SeqStep::choice_logprobs`) gets those
/// (`kernels::logprob`), and SLED its candidates and their logits (`SeqStep::sled`,
/// `kernels::sled`). On the CPU's own path each head is copied when made (nothing to stall,
/// and no concatenation to pay).
pub(super) struct HeadCopies {
    vocab: usize,
    defer: bool,
    /// Each product `(rows, vocab)`, with its users.
    pending: Vec<(Tensor, Vec<HeadUser>)>,
    bytes: usize,
    /// [`HELD_LOGITS_BYTES`] but in tests.
    held_bytes: usize,
}

/// A sequence reading a head product: the next `rows` of it, in its row order.
pub(super) struct HeadUser {
    /// Its index in the step list.
    seq: usize,
    /// Its index in the sequence's head list.
    head: usize,
    rows: usize,
    /// Only the choice of its one row is wanted, made thus (from this head and, for a
    /// contrast, the sequence's other head: DoLa's, its mature head and chosen candidate).
    choice: Option<DeviceChoice>,
    /// DoLa whose candidate the copy may choose (`SeqStep::select_premature`): the number of
    /// the sequence's heads (head 0 the mature one, the rest candidates).
    premature_of: Option<usize>,
    /// Of its rows, the first `targets.len()` are read only as their log-probabilities
    /// (`SeqStep::logprobs`): the targets, and what is read.
    logprobs: Option<(Vec<u32>, LogprobRead)>,
    /// With its choice, the chosen token's log-probabilities, the top this many
    /// (`SeqStep::choice_logprobs`).
    choice_top: Option<usize>,
    /// SLED whose scores the copy may compute (`SeqStep::sled`): its rule and the number of
    /// the sequence's heads (head 0 the mature one, the rest its premature layers).
    sled: Option<(SledRule, usize)>,
    /// Not wanted after all: an early exit the token went on from, a DoLa candidate not chosen
    /// (left empty).
    dropped: bool,
}

/// What a sequence reads of its heads' rows besides the rows (`SeqStep`'s `choice`,
/// `select_premature`: the number of its heads, `logprobs`, `choice_logprobs` and `sled`:
/// its rule and the number of its heads), as far as the step serves them.
#[derive(Clone, Copy, Default)]
pub(super) struct Reads<'a> {
    pub choice: Option<DeviceChoice>,
    pub premature_of: Option<usize>,
    pub logprobs: Option<LogprobTargets<'a>>,
    pub choice_top: Option<usize>,
    pub sled: Option<(SledRule, usize)>,
}

impl HeadUser {
    pub(super) fn new(seq: usize, head: usize, rows: usize, r: Reads<'_>) -> Self {
        Self {
            seq,
            head,
            rows,
            choice: r.choice,
            premature_of: r.premature_of,
            logprobs: r.logprobs.map(|l| (l.targets.to_vec(), l.read)),
            choice_top: r.choice_top,
            sled: r.sled,
            dropped: false,
        }
    }
}

/// The choices a copy makes of its rows, each list by the rows' indices in the copy; their
/// ids come back in this order (argmaxes, contrasts, draws, contrast draws).
#[derive(Default)]
struct Choices {
    argmax: Vec<u32>,
    contrast: Vec<ContrastRows>,
    drawn: Vec<(u32, sample::Draw)>,
    contrast_drawn: Vec<(ContrastRows, sample::Draw)>,
}

/// The rows of a copy read as log-probabilities, by their distribution and their targets:
/// one head's log-softmax at targets the host knows (`HeadUser::logprobs`: the row in the copy
/// and its target), a contrast's log q at such targets (its pair of rows and rule), one head's
/// at its choice (`HeadUser::choice_top`: the row, and which choice), a contrast's at its
/// choice; they come back in this order. `top`: the largest any of them asks for (a smaller
/// top is a prefix of it).
#[derive(Default)]
struct LogprobReads {
    head: Vec<(u32, u32)>,
    contrast: Vec<(ContrastRows, u32)>,
    head_chosen: Vec<(u32, Chosen)>,
    contrast_chosen: Vec<(ContrastRows, Chosen)>,
    top: usize,
}

/// Where a read lies among a copy's: its list ([`LogprobReads`]' order) and its index there.
#[derive(Clone, Copy)]
struct ReadAt(usize, usize);

impl LogprobReads {
    fn counts(&self) -> [usize; 4] {
        [
            self.head.len(),
            self.contrast.len(),
            self.head_chosen.len(),
            self.contrast_chosen.len(),
        ]
    }

    /// Its index among all the copy's reads.
    fn index(&self, at: ReadAt) -> usize {
        self.counts()[..at.0].iter().sum::<usize>() + at.1
    }

    fn len(&self) -> usize {
        self.counts().iter().sum()
    }

    /// A user's first `targets.len()` rows from `start` read from its own head.
    fn of_head(&mut self, start: u32, targets: &[u32], top: usize) -> ReadAt {
        self.top = self.top.max(top);
        let first = self.head.len();
        self.head.extend(
            targets
                .iter()
                .enumerate()
                .map(|(r, &t)| (start + r as u32, t)),
        );
        ReadAt(0, first)
    }

    /// A contrast's rows read as its log-distribution by `rule` at `targets`: the upper
    /// head's from `upper` on, and at each the lower row of `lower`.
    fn of_contrast(
        &mut self,
        upper: u32,
        lower: &[u32],
        rule: ContrastRule,
        targets: &[u32],
        top: usize,
    ) -> ReadAt {
        self.top = self.top.max(top);
        let first = self.contrast.len();
        self.contrast.extend(
            targets
                .iter()
                .zip(lower)
                .enumerate()
                .map(|(r, (&t, &lower))| {
                    let rows = ContrastRows {
                        upper: upper + r as u32,
                        lower,
                        rule,
                    };
                    (rows, t)
                }),
        );
        ReadAt(1, first)
    }

    /// A user's choice `c` of its head's row at `row`, read at the choice.
    fn of_head_choice(&mut self, row: u32, c: Chosen, top: usize) -> ReadAt {
        self.top = self.top.max(top);
        self.head_chosen.push((row, c));
        ReadAt(2, self.head_chosen.len() - 1)
    }

    /// A contrast's choice `c` of `pair`, read at the choice.
    fn of_contrast_choice(&mut self, pair: ContrastRows, c: Chosen, top: usize) -> ReadAt {
        self.top = self.top.max(top);
        self.contrast_chosen.push((pair, c));
        ReadAt(3, self.contrast_chosen.len() - 1)
    }
}

/// `read` with its top cut to `top`.
fn cut(read: &RowLogprobs, top: usize) -> RowLogprobs {
    RowLogprobs {
        target: read.target,
        top: read.top[..top.min(read.top.len())].to_vec(),
    }
}

/// What a copy brings to the host: the rows copied whole, the log-probabilities read, SLED's
/// candidates and their logits, the ids chosen.
struct Copied {
    rows: Vec<f32>,
    logprobs: Vec<RowLogprobs>,
    sled: Vec<Vec<(u32, f32)>>,
    ids: Vec<u32>,
}

/// The DoLa candidates a copy chose (`HeadCopies::select_premature`): the sequences whose
/// last row's candidate it chose (the others dropped), and for echo's scoring, each
/// sequence's mature head's first row and the chosen candidate's row at each position read.
#[derive(Default)]
struct PrematureChosen {
    at_last_row: HashSet<usize>,
    at_positions: HashMap<usize, (u32, Vec<u32>)>,
}

/// A SLED sequence's rows in a copy and its rule: at each of its positions, the mature
/// head's row and each premature layer's.
struct SledGroup {
    /// The mature head's rows, a position each.
    mature: Vec<u32>,
    /// Position by position, each premature layer's row, in order.
    premature: Vec<u32>,
    layers: usize,
    rule: SledRule,
}

/// A user's rows in a copy: its index among the copy's users, and where its rows lie.
#[derive(Clone, Copy)]
struct PendingHead {
    user: usize,
    start: u32,
    rows: usize,
}

/// The sequences among `users` (each with the row its rows start at in the copy, `starts`)
/// whose heads read together (`heads_of`: how many a sequence reads so, None for a user not one of them)
/// are all in this copy, in sequence order: each one's users in head order. A sequence whose
/// heads went in two copies is left out (it reads its rows), and so are dropped users.
fn whole_groups(
    users: &[&HeadUser],
    starts: &[u32],
    heads_of: impl Fn(&HeadUser) -> Option<usize>,
) -> Vec<(usize, Vec<PendingHead>)> {
    let mut found: HashMap<usize, Vec<Option<PendingHead>>> = HashMap::new();
    for (user, (u, &start)) in users.iter().zip(starts).enumerate() {
        if let (Some(heads), false) = (heads_of(u), u.dropped) {
            let rows = u.rows;
            found.entry(u.seq).or_insert_with(|| vec![None; heads])[u.head] =
                Some(PendingHead { user, start, rows });
        }
    }
    let mut whole: Vec<(usize, Vec<PendingHead>)> = found
        .into_iter()
        .filter_map(|(seq, heads)| Some((seq, heads.into_iter().collect::<Option<_>>()?)))
        .collect();
    whole.sort_unstable_by_key(|g| g.0);
    whole
}

/// The SLED sequences among `users` (each with the row its rows start at in the copy,
/// `starts`) whose heads are all in this copy, reading the same positions, by sequence, and
/// each one's index among them (a sequence whose heads went in two copies reads its rows).
fn sled_groups(users: &[&HeadUser], starts: &[u32]) -> (Vec<SledGroup>, HashMap<usize, usize>) {
    let (mut groups, mut index) = (Vec::new(), HashMap::new());
    for (seq, heads) in whole_groups(users, starts, |u| u.sled.map(|s| s.1)) {
        let n = heads[0].rows;
        if n == 0 || heads.iter().any(|h| h.rows != n) {
            continue;
        }
        let positions = 0..n as u32;
        index.insert(seq, groups.len());
        groups.push(SledGroup {
            mature: positions.clone().map(|p| heads[0].start + p).collect(),
            premature: positions
                .flat_map(|p| heads[1..].iter().map(move |h| h.start + p))
                .collect(),
            layers: heads.len() - 1,
            rule: users[heads[0].user].sled.expect("a SLED user").0,
        });
    }
    (groups, index)
}

/// A contrast's pair of rows in a copy and its rule.
#[derive(Clone, Copy)]
struct ContrastRows {
    upper: u32,
    lower: u32,
    rule: ContrastRule,
}

impl Choices {
    /// Where choice `c` lies among the ids.
    fn id_at(&self, c: Chosen) -> usize {
        let (a, n, d) = (self.argmax.len(), self.contrast.len(), self.drawn.len());
        match c {
            Chosen::Argmax(k) => k,
            Chosen::Contrast(k) => a + k,
            Chosen::Sample(k) => a + n + k,
            Chosen::ContrastSample(k) => a + n + d + k,
        }
    }
}

/// What a user gets of a copy: its rows, a choice made of them (and the chosen token's
/// log-probabilities: that read, `top` of them), or nothing.
enum Read {
    Rows,
    /// Its first `rows` rows as the log-probabilities from `first` on in the copy's
    /// (`top` of them each), then the rest whole.
    Logprobs {
        first: ReadAt,
        rows: usize,
        top: usize,
    },
    Chosen(Chosen, Option<(ReadAt, usize)>),
    /// The strategy's scores, the `k`-th SLED group's.
    Scores(usize),
    Nothing,
}

/// The `k`-th of the copy's head argmaxes, contrasts, draws or contrast draws.
#[derive(Clone, Copy)]
enum Chosen {
    Argmax(usize),
    Contrast(usize),
    Sample(usize),
    ContrastSample(usize),
}

/// Logits a pass holds back before copying them to the host.
const HELD_LOGITS_BYTES: usize = 64 << 20;

impl HeadCopies {
    pub(super) fn new(vocab: usize, defer: bool) -> Self {
        Self {
            vocab,
            defer,
            pending: Vec::new(),
            bytes: 0,
            held_bytes: HELD_LOGITS_BYTES,
        }
    }

    pub(super) fn push(
        &mut self,
        logits: Tensor,
        users: Vec<HeadUser>,
        outputs: &mut [Vec<Logits>],
    ) -> Result<()> {
        self.bytes += logits.elem_count() * std::mem::size_of::<f32>();
        self.pending.push((logits, users));
        if !self.defer || self.bytes >= self.held_bytes {
            self.flush(outputs)?;
        }
        Ok(())
    }

    /// Copies what is pending to the host, in one copy, and hands each user its rows (or
    /// its choice).
    pub(super) fn flush(&mut self, outputs: &mut [Vec<Logits>]) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut flat = self
            .pending
            .iter()
            .map(|(t, _)| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let all = if flat.len() == 1 {
            flat.pop().expect("one")
        } else {
            Tensor::cat(&flat, 0)?
        };
        // Where each user's rows start in `all`.
        let pending_users = || self.pending.iter().flat_map(|(_, users)| users);
        let starts: Vec<u32> = pending_users()
            .scan(0u32, |row, u| {
                let start = *row;
                *row += u.rows as u32;
                Some(start)
            })
            .collect();
        let rows = pending_users().map(|u| u.rows).sum::<usize>();
        let premature_chosen = self.select_premature(&all, rows, &starts)?;
        let pending = std::mem::take(&mut self.pending);
        self.bytes = 0;
        let users = || pending.iter().flat_map(|(_, users)| users);
        // A contrast's choice or log q needs both its heads' rows in this copy: a sequence
        // whose other head went (or goes) in another copy (the held bytes ran out between its
        // heads) reads its rows instead, as does DoLa whose candidate was not chosen here.
        let mut contrast_halves: HashMap<usize, [Option<u32>; 2]> = HashMap::new();
        for (u, &start) in users().zip(&starts) {
            let contrast_read = u.logprobs.as_ref().is_some_and(|l| l.1.contrast.is_some());
            let unchosen =
                u.premature_of.is_some() && !premature_chosen.at_last_row.contains(&u.seq);
            if (u.choice.is_some_and(|c| c.rule().is_some()) || contrast_read)
                && !u.dropped
                && !unchosen
            {
                // head 0 upper (DoLa's mature head); the other lower (DoLa's candidate)
                contrast_halves.entry(u.seq).or_default()[(u.head > 0) as usize] = Some(start);
            }
        }
        let pair_of = |seq: usize, rule: ContrastRule| match contrast_halves.get(&seq) {
            Some(&[Some(upper), Some(lower)]) => Some(ContrastRows { upper, lower, rule }),
            _ => None,
        };
        let (sled, sled_of) = sled_groups(&users().collect::<Vec<_>>(), &starts);
        let (mut full, mut wanted) = (Vec::new(), Choices::default());
        let mut logprobs = LogprobReads::default();
        // per contrast sequence: its choice, the read at it, the reads of its prompt rows
        let mut contrast_of: HashMap<usize, usize> = HashMap::new();
        let mut contrast_read_of: HashMap<usize, ReadAt> = HashMap::new();
        let reads: Vec<Read> = users()
            .zip(&starts)
            .map(|(u, &start)| match u.choice {
                _ if u.dropped => Read::Nothing,
                // SLED's scores, handed over on its mature head
                _ if sled_of.contains_key(&u.seq) => match u.head {
                    0 => Read::Scores(sled_of[&u.seq]),
                    _ => Read::Nothing,
                },
                Some(DeviceChoice::HeadArgmax) => {
                    wanted.argmax.push(start);
                    let c = Chosen::Argmax(wanted.argmax.len() - 1);
                    let read = u
                        .choice_top
                        .map(|top| (logprobs.of_head_choice(start, c, top), top));
                    Read::Chosen(c, read)
                }
                Some(DeviceChoice::HeadSample(draw)) => {
                    wanted.drawn.push((start, draw));
                    let c = Chosen::Sample(wanted.drawn.len() - 1);
                    let read = u
                        .choice_top
                        .map(|top| (logprobs.of_head_choice(start, c, top), top));
                    Read::Chosen(c, read)
                }
                // a contrast's, autocontrast or DoLa
                Some(c) => match c.rule().and_then(|rule| pair_of(u.seq, rule)) {
                    Some(pair) => {
                        let draw = c.draw();
                        let k = *contrast_of.entry(u.seq).or_insert_with(|| match draw {
                            None => {
                                wanted.contrast.push(pair);
                                wanted.contrast.len() - 1
                            }
                            Some(d) => {
                                wanted.contrast_drawn.push((pair, d));
                                wanted.contrast_drawn.len() - 1
                            }
                        });
                        let c = match draw {
                            None => Chosen::Contrast(k),
                            Some(_) => Chosen::ContrastSample(k),
                        };
                        let read = u.choice_top.map(|top| {
                            let at = *contrast_read_of
                                .entry(u.seq)
                                .or_insert_with(|| logprobs.of_contrast_choice(pair, c, top));
                            (at, top)
                        });
                        Read::Chosen(c, read)
                    }
                    None => {
                        full.extend(start..start + u.rows as u32);
                        Read::Rows
                    }
                },
                None => {
                    let (targets, read) = match &u.logprobs {
                        Some((targets, read)) if !targets.is_empty() => (targets, *read),
                        _ => {
                            full.extend(start..start + u.rows as u32);
                            return Read::Rows;
                        }
                    };
                    let first = match read.contrast {
                        None => logprobs.of_head(start, targets, read.top),
                        Some(rule) => {
                            // the upper head's first row, and the lower row at each position:
                            // the other head's, or DoLa's candidate chosen there
                            let n = targets.len() as u32;
                            let rows = match premature_chosen.at_positions.get(&u.seq) {
                                Some((upper, lower)) => Some((*upper, lower.clone())),
                                None => pair_of(u.seq, rule)
                                    .map(|p| (p.upper, (p.lower..p.lower + n).collect())),
                            };
                            match rows {
                                // every head hands over the contrast's reads
                                Some((upper, lower)) => {
                                    *contrast_read_of.entry(u.seq).or_insert_with(|| {
                                        logprobs.of_contrast(upper, &lower, rule, targets, read.top)
                                    })
                                }
                                None => {
                                    full.extend(start..start + u.rows as u32);
                                    return Read::Rows;
                                }
                            }
                        }
                    };
                    let n = targets.len();
                    full.extend(start + n as u32..start + u.rows as u32);
                    Read::Logprobs {
                        first,
                        rows: n,
                        top: read.top,
                    }
                }
            })
            .collect();
        let copied = if full.len() == rows {
            // every row, nothing chosen
            Copied {
                rows: all.to_vec1::<f32>()?,
                logprobs: Vec::new(),
                sled: Vec::new(),
                ids: Vec::new(),
            }
        } else {
            self.copy_with_choices(&all, rows, &full, (&wanted, &logprobs, &sled))?
        };
        let (data, ids) = (Arc::new(copied.rows), copied.ids);
        let mut at = 0;
        for (u, read) in users().zip(reads) {
            outputs[u.seq][u.head] = match read {
                Read::Nothing => Logits::default(),
                Read::Rows => {
                    let range = at..at + u.rows * self.vocab;
                    at = range.end;
                    Logits::shared(self.vocab, Arc::clone(&data), range)
                }
                Read::Logprobs { first, rows, top } => {
                    let range = at..at + (u.rows - rows) * self.vocab;
                    at = range.end;
                    let first = logprobs.index(first);
                    let read = copied.logprobs[first..first + rows]
                        .iter()
                        .map(|r| cut(r, top))
                        .collect();
                    Logits::with_logprobs(self.vocab, read, Arc::clone(&data), range)
                }
                Read::Chosen(c, read) => {
                    let read = read.map(|(k, top)| cut(&copied.logprobs[logprobs.index(k)], top));
                    Logits::chosen(self.vocab, ids[wanted.id_at(c)], read)
                }
                Read::Scores(k) => {
                    // the group's positions among the copy's
                    let first: usize = sled[..k].iter().map(|g| g.mature.len()).sum();
                    let rule = sled[k].rule;
                    let scores = copied.sled[first..first + sled[k].mature.len()]
                        .iter()
                        .flat_map(|c| rule.scores(c, self.vocab))
                        .collect();
                    Logits::strategy_scores(self.vocab, scores)
                }
            };
        }
        Ok(())
    }

    /// For each DoLa sequence whose heads are all pending (`HeadUser::premature_of`), its
    /// candidate farthest from its mature head (`kernels::greedy::divergence_rows`, computed
    /// where the logits are, the first largest as the host chooses), at its last row or, for
    /// echo's scoring, at each position read (`HeadUser::logprobs`). At a last row the others
    /// are dropped, their rows left out of the copy. `all`: the pending products, `rows`
    /// rows, each user's starting at `starts`.
    fn select_premature(
        &mut self,
        all: &Tensor,
        rows: usize,
        starts: &[u32],
    ) -> Result<PrematureChosen> {
        let mut users: Vec<&mut HeadUser> = self.pending.iter_mut().flat_map(|(_, u)| u).collect();
        // (sequence, its mature head's user, then its candidates' in head order: the order
        // the host chooses in), of more than one candidate
        // and the positions chosen at, from its first row: echo's read ones, or the last
        let groups: Vec<(usize, Vec<PendingHead>, std::ops::Range<u32>)> = {
            let users: Vec<&HeadUser> = users.iter().map(|u| &**u).collect();
            whole_groups(&users, starts, |u| u.premature_of)
                .into_iter()
                .filter(|(_, heads)| heads.len() > 2)
                .map(|(seq, heads)| {
                    let u = users[heads[0].user];
                    let at = match &u.logprobs {
                        Some((targets, _)) => 0..targets.len() as u32,
                        None => u.rows as u32 - 1..u.rows as u32,
                    };
                    (seq, heads, at)
                })
                .collect()
        };
        let mut chosen = PrematureChosen::default();
        let pairs: Vec<(u32, u32)> = groups
            .iter()
            .flat_map(|(_, heads, at)| {
                let (m, cs) = (heads[0].start, &heads[1..]);
                at.clone()
                    .flat_map(move |p| cs.iter().map(move |c| (m + p, c.start + p)))
            })
            .collect();
        if pairs.is_empty() {
            return Ok(chosen);
        }
        let matrix = all.reshape((rows, self.vocab))?;
        let pick = |ix: Vec<u32>| -> Result<Tensor> {
            Ok(matrix.index_select(&Tensor::new(ix, matrix.device())?, 0)?)
        };
        let (mature, premature): (Vec<u32>, Vec<u32>) = pairs.into_iter().unzip();
        let d = greedy::divergence_rows(&pick(mature)?, &pick(premature)?)?.to_vec1::<f64>()?;
        let mut d = d.into_iter();
        for (seq, heads, at) in &groups {
            let (mature, candidates) = (heads[0], &heads[1..]);
            let echo = users[mature.user].logprobs.is_some();
            let mut lower = Vec::new();
            for p in at.clone() {
                let mut best = (0, f64::NEG_INFINITY);
                for (k, dk) in d.by_ref().take(candidates.len()).enumerate() {
                    if dk > best.1 {
                        best = (k, dk);
                    }
                }
                if echo {
                    lower.push(candidates[best.0].start + p);
                } else {
                    for (k, c) in candidates.iter().enumerate() {
                        users[c.user].dropped = k != best.0;
                    }
                }
            }
            if echo {
                chosen.at_positions.insert(*seq, (mature.start, lower));
            } else {
                chosen.at_last_row.insert(*seq);
            }
        }
        Ok(chosen)
    }

    /// The softmax margins (`kernels::greedy::margin_rows`) of the one row each user
    /// `(seq, head)` reads of a product still pending, computed where the logits are and
    /// copied alone; None for a user whose rows went to the host already.
    pub(super) fn margins(&self, wanted: &[(usize, usize)]) -> Result<Vec<Option<f32>>> {
        // (index in `wanted`, product, row in it)
        let mut found: Vec<(usize, usize, u32)> = Vec::new();
        for (p, (_, users)) in self.pending.iter().enumerate() {
            let mut row = 0;
            for u in users {
                if let Some(w) = wanted.iter().position(|&w| w == (u.seq, u.head)) {
                    found.push((w, p, row + u.rows as u32 - 1));
                }
                row += u.rows as u32;
            }
        }
        let mut out = vec![None; wanted.len()];
        if found.is_empty() {
            return Ok(out);
        }
        // in product order, one gather per product
        let mut picked = Vec::new();
        for (p, (t, _)) in self.pending.iter().enumerate() {
            let rows: Vec<u32> = found.iter().filter(|f| f.1 == p).map(|f| f.2).collect();
            if !rows.is_empty() {
                picked.push(t.index_select(&Tensor::new(rows, t.device())?, 0)?);
            }
        }
        let margins = greedy::margin_rows(&Tensor::cat(&picked, 0)?)?.to_vec1::<f32>()?;
        found.sort_by_key(|f| f.1);
        for (f, m) in found.iter().zip(margins) {
            out[f.0] = Some(m);
        }
        Ok(out)
    }

    /// Leaves user `(seq, head)`'s rows out of the copy, if still pending (its logits then come
    /// back empty).
    pub(super) fn drop_user(&mut self, seq: usize, head: usize) {
        for (_, users) in &mut self.pending {
            for u in users.iter_mut().filter(|u| (u.seq, u.head) == (seq, head)) {
                u.dropped = true;
            }
        }
    }

    /// `all`'s rows `full`, the log-probabilities `logprobs` of its rows (at known targets, and
    /// at choices) and the choices `wanted` of them, in one copy to the host (rows none of
    /// them names are not copied).
    fn copy_with_choices(
        &self,
        all: &Tensor,
        rows: usize,
        full: &[u32],
        (wanted, logprobs, sled): (&Choices, &LogprobReads, &[SledGroup]),
    ) -> Result<Copied> {
        let Choices {
            argmax,
            contrast,
            drawn,
            contrast_drawn,
        } = wanted;
        let matrix = all.reshape((rows, self.vocab))?;
        let device = matrix.device();
        let pick = |ix: &[u32]| -> candle_core::Result<Tensor> {
            match ix.first() {
                // a run of rows (a prompt's, every row): a view, no gather
                Some(&a) if ix.iter().copied().eq(a..a + ix.len() as u32) => {
                    matrix.narrow(0, a as usize, ix.len())
                }
                _ => matrix.index_select(&Tensor::new(ix, device)?, 0),
            }
        };
        let mut ids = Vec::new();
        if !argmax.is_empty() {
            ids.push(greedy::argmax_rows(&pick(argmax)?)?);
        }
        // each contrast's upper rows and lower rows
        let pairs = |c: &[ContrastRows]| -> candle_core::Result<(Tensor, Tensor)> {
            let column = |f: fn(&ContrastRows) -> u32| c.iter().map(f).collect::<Vec<_>>();
            Ok((pick(&column(|p| p.upper))?, pick(&column(|p| p.lower))?))
        };
        if !contrast.is_empty() {
            let (upper, lower) = pairs(contrast)?;
            let rules: Vec<ContrastRule> = contrast.iter().map(|p| p.rule).collect();
            ids.push(greedy::contrast_rows(
                &upper,
                &lower,
                &greedy::contrast_rules(&rules, device)?,
            )?);
        }
        if !drawn.is_empty() {
            let at: Vec<u32> = drawn.iter().map(|d| d.0).collect();
            let draws: Vec<sample::Draw> = drawn.iter().map(|d| d.1).collect();
            ids.push(sample::sample_rows(
                &pick(&at)?,
                &sample::draw_params(&draws, device)?,
            )?);
        }
        if !contrast_drawn.is_empty() {
            let rows: Vec<ContrastRows> = contrast_drawn.iter().map(|c| c.0).collect();
            let (upper, lower) = pairs(&rows)?;
            let draws: Vec<(sample::Draw, ContrastRule)> =
                contrast_drawn.iter().map(|(p, d)| (*d, p.rule)).collect();
            ids.push(sample::contrast_sample_rows(
                &upper,
                &lower,
                &sample::contrast_draw_params(&draws, device)?,
            )?);
        }
        let ids = match ids.len() {
            0 => None,
            _ => Some(Tensor::cat(&ids, 0)?),
        };
        // the reads, in `LogprobReads`' order
        let top = logprobs.top;
        let mut read = Vec::new();
        let head_read = |rows: &[u32], targets: &Tensor| -> candle_core::Result<Tensor> {
            logprob::logprob_rows(&pick(rows)?, targets, top)?.flatten_all()
        };
        let contrast_read = |pairs_: &[ContrastRows], targets: &Tensor| -> Result<Tensor> {
            let (upper, lower) = pairs(pairs_)?;
            let rules: Vec<ContrastRule> = pairs_.iter().map(|p| p.rule).collect();
            let params = logprob::contrast_params(&rules, targets)?;
            Ok(logprob::contrast_logprob_rows(&upper, &lower, &params, top)?.flatten_all()?)
        };
        // the targets of reads at choices: the ids, where they were made
        let chosen = |at: Vec<u32>| -> Result<Tensor> {
            let ids = ids.as_ref().expect("reads at choices come with choices");
            Ok(ids.index_select(&Tensor::new(at, device)?, 0)?)
        };
        if !logprobs.head.is_empty() {
            let (rows, targets): (Vec<u32>, Vec<u32>) = logprobs.head.iter().copied().unzip();
            read.push(head_read(&rows, &Tensor::new(targets, device)?)?);
        }
        if !logprobs.contrast.is_empty() {
            let (pairs_, targets): (Vec<ContrastRows>, Vec<u32>) =
                logprobs.contrast.iter().copied().unzip();
            read.push(contrast_read(&pairs_, &Tensor::new(targets, device)?)?);
        }
        if !logprobs.head_chosen.is_empty() {
            let (rows, at): (Vec<u32>, Vec<u32>) = logprobs
                .head_chosen
                .iter()
                .map(|&(row, c)| (row, wanted.id_at(c) as u32))
                .unzip();
            read.push(head_read(&rows, &chosen(at)?)?);
        }
        if !logprobs.contrast_chosen.is_empty() {
            let (pairs_, at): (Vec<ContrastRows>, Vec<u32>) = logprobs
                .contrast_chosen
                .iter()
                .map(|&(p, c)| (p, wanted.id_at(c) as u32))
                .unzip();
            read.push(contrast_read(&pairs_, &chosen(at)?)?);
        }
        // SLED's candidates at each position: the mature rows, and each position's premature
        // layers' rows after each other
        let sled_params: Vec<sled::SledParams> = sled
            .iter()
            .flat_map(|g| std::iter::repeat_n((g.rule, g.layers), g.mature.len()))
            .scan(0, |first, (rule, layers)| {
                let p = sled::SledParams {
                    rule,
                    first: *first,
                    layers,
                };
                *first += layers;
                Some(p)
            })
            .collect();
        let sled_width = sled::width(&sled_params);
        let sled_part = match sled {
            [] => None,
            _ => {
                let mature: Vec<u32> = sled.iter().flat_map(|g| g.mature.clone()).collect();
                let premature: Vec<u32> = sled.iter().flat_map(|g| g.premature.clone()).collect();
                let out = sled::sled_rows(&pick(&mature)?, &pick(&premature)?, &sled_params)?;
                Some(out.flatten_all()?)
            }
        };
        if let (true, true, None, Some(ids)) = (full.is_empty(), read.is_empty(), &sled_part, &ids)
        {
            // only choices
            return Ok(Copied {
                rows: Vec::new(),
                logprobs: Vec::new(),
                sled: Vec::new(),
                ids: ids.to_vec1::<u32>()?,
            });
        }
        // One copy: the rows, then the log-probabilities, then SLED's candidates, then the ids
        // (as floats: exact below 2^24).
        let mut parts = Vec::new();
        if !full.is_empty() {
            parts.push(pick(full)?.flatten_all()?);
        }
        parts.extend(read);
        parts.extend(sled_part);
        if let Some(ids) = &ids {
            parts.push(ids.to_dtype(DType::F32)?);
        }
        let mut data = match parts.len() {
            0 => Vec::new(),
            1 => parts[0].to_vec1::<f32>()?,
            _ => Tensor::cat(&parts, 0)?.to_vec1::<f32>()?,
        };
        let width = 1 + 2 * logprobs.top;
        let rows_len = full.len() * self.vocab;
        let read_len = logprobs.len() * width;
        let ids = data.split_off(rows_len + read_len + sled_params.len() * 2 * sled_width);
        let sled_read = data.split_off(rows_len + read_len);
        let read = data.split_off(rows_len);
        Ok(Copied {
            rows: data,
            logprobs: logprob::read_rows(&read, logprobs.top),
            sled: sled::read_rows(&sled_read, sled_width),
            ids: ids.into_iter().map(|id| id as u32).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One product's rows and users: `(seq, head, choice)`, a row each.
    type Users = Vec<(usize, usize, Option<DeviceChoice>)>;

    /// Pushes two products as a step would (the lower exit's first, the upper head's after),
    /// holding back at most `held_bytes`, and returns what each sequence's heads got.
    fn copied(
        held_bytes: usize,
        products: &[(Tensor, Users)],
        heads: &[usize],
    ) -> Result<Vec<Vec<Logits>>> {
        let vocab = products[0].0.dim(1)?;
        let mut copies = HeadCopies {
            held_bytes,
            ..HeadCopies::new(vocab, true)
        };
        let mut outputs: Vec<Vec<Logits>> =
            heads.iter().map(|&n| vec![Logits::default(); n]).collect();
        for (t, users) in products {
            let users = users
                .iter()
                .map(|&(seq, head, choice)| {
                    HeadUser::new(
                        seq,
                        head,
                        1,
                        Reads {
                            choice,
                            ..Reads::default()
                        },
                    )
                })
                .collect();
            copies.push(t.clone(), users, &mut outputs)?;
        }
        copies.flush(&mut outputs)?;
        Ok(outputs)
    }

    /// An early exit's margins are read from the rows still pending; the rows of the exits a
    /// token went on from are left out of the copy, whether the others come as rows or as
    /// choices.
    #[test]
    fn margins_of_pending_rows_and_rows_dropped_from_the_copy() -> Result<()> {
        let vocab = 40;
        let t = Tensor::arange(0f32, (3 * vocab) as f32, &Device::Cpu)?;
        let product = (t * 0.61)?.cos()?.reshape((3, vocab))?;
        let row = |r: usize| -> Result<Vec<f32>> { Ok(product.get(r)?.to_vec1()?) };
        for choice in [None, Some(DeviceChoice::HeadArgmax)] {
            let mut copies = HeadCopies::new(vocab, true);
            let mut outputs = vec![vec![Logits::default()]; 3];
            let users = (0..3)
                .map(|seq| {
                    HeadUser::new(
                        seq,
                        0,
                        1,
                        Reads {
                            choice: choice.filter(|_| seq == 2),
                            ..Reads::default()
                        },
                    )
                })
                .collect();
            copies.push(product.clone(), users, &mut outputs)?;
            let margins = copies.margins(&[(2, 0), (1, 0), (7, 0)])?;
            let want = [2, 1].map(|r| greedy::softmax_margin(&row(r).unwrap()));
            assert_eq!(margins, [Some(want[0]), Some(want[1]), None]);
            copies.drop_user(1, 0);
            copies.flush(&mut outputs)?;
            assert_eq!(outputs[0][0].last(), Some(&row(0)?[..]));
            assert!(outputs[1][0].is_empty());
            match choice {
                None => assert_eq!(outputs[2][0].last(), Some(&row(2)?[..])),
                Some(_) => assert_eq!(outputs[2][0].choice(), Some(greedy::argmax(&row(2)?))),
            }
        }
        Ok(())
    }

    /// DoLa: the copy hands over the mature head's row and the candidate farthest from it
    /// (the first largest divergence), the others left empty; a sequence whose heads are not
    /// all in the copy gets every row.
    #[test]
    fn the_copy_chooses_dola_s_candidate_and_leaves_the_others_out() -> Result<()> {
        let vocab = 30;
        let rows = |phase: f64, n: usize| -> Result<Tensor> {
            let t = Tensor::arange(0f32, (n * vocab) as f32, &Device::Cpu)?;
            Ok(((t * 0.23)? + phase)?
                .sin()?
                .affine(3.0, 0.0)?
                .reshape((n, vocab))?)
        };
        // three candidates (heads 1..=3, one product each, two sequences a row each), then
        // the mature head (head 0)
        let products: Vec<Tensor> = [0.1, 1.7, 0.1, 4.0]
            .iter()
            .map(|&p| rows(p, 2))
            .collect::<Result<_>>()?;
        for held in [1 << 20, 2 * vocab * 4 * 3] {
            let mut copies = HeadCopies {
                held_bytes: held,
                ..HeadCopies::new(vocab, true)
            };
            let mut outputs = vec![vec![Logits::default(); 4]; 2];
            for (k, t) in [1, 2, 3, 0].into_iter().zip(&products) {
                let users = (0..2)
                    .map(|seq| {
                        HeadUser::new(
                            seq,
                            k,
                            1,
                            Reads {
                                premature_of: Some(4),
                                ..Reads::default()
                            },
                        )
                    })
                    .collect();
                copies.push(t.clone(), users, &mut outputs)?;
            }
            copies.flush(&mut outputs)?;
            let row =
                |p: usize, r: usize| -> Result<Vec<f32>> { Ok(products[p].get(r)?.to_vec1()?) };
            for (seq, got) in outputs.iter().enumerate() {
                let mature = row(3, seq)?;
                assert_eq!(got[0].last(), Some(&mature[..]));
                let d: Vec<f64> = (0..3)
                    .map(|p| Ok(greedy::dola_divergence(&mature, &row(p, seq)?)))
                    .collect::<Result<_>>()?;
                let best = (0..3).fold(0, |b, k| if d[k] > d[b] { k } else { b });
                for k in 0..3 {
                    let handed = got[k + 1].last();
                    if held == 1 << 20 && k != best {
                        assert_eq!(handed, None, "seq {seq} candidate {k} of {d:?}");
                    } else {
                        // chosen, or every row where the heads went in two copies
                        assert_eq!(handed, Some(&row(k, seq)?[..]));
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn choices_are_made_in_the_copy_and_a_contrast_split_between_copies_reads_its_rows(
    ) -> Result<()> {
        let (vocab, dev) = (50, Device::Cpu);
        let product = |phase: f64| -> Result<Tensor> {
            let t = Tensor::arange(0f32, (3 * vocab) as f32, &dev)?;
            Ok(((t * 0.37)? + phase)?.sin()?.reshape((3, vocab))?)
        };
        let (lower, upper) = (product(0.5)?, product(2.0)?);
        let contrast = Some(DeviceChoice::Contrast {
            alpha: 0.1,
            minimum_candidates: 1,
            draw: None,
        });
        let argmax = Some(DeviceChoice::HeadArgmax);
        // sequences 0 and 1 contrast the upper head over the lower exit; 2 reads the lower
        // exit's argmax; 3 the upper head's rows.
        let products = [
            (
                lower.clone(),
                vec![(0, 1, contrast), (1, 1, contrast), (2, 0, argmax)],
            ),
            (
                upper.clone(),
                vec![(0, 0, contrast), (1, 0, contrast), (3, 0, None)],
            ),
        ];
        let heads = [2, 2, 1, 1];
        let row = |t: &Tensor, r: usize| -> Result<Vec<f32>> { Ok(t.get(r)?.to_vec1()?) };
        let product_bytes = 3 * vocab * 4;
        for held in [1 << 20, product_bytes] {
            let split = held == product_bytes; // copied after each product
            let out = copied(held, &products, &heads)?;
            for (s, got) in out[..2].iter().enumerate() {
                let (u, l) = (row(&upper, s)?, row(&lower, s)?);
                if split {
                    assert_eq!(got[0].choice(), None);
                    assert_eq!(got[0].last(), Some(&u[..]));
                    assert_eq!(got[1].last(), Some(&l[..]));
                } else {
                    let want = greedy::contrast_choice(&u, &l, 0.1f32.ln(), 1);
                    assert_eq!(got[0].choice(), Some(want));
                    assert_eq!(got[1].choice(), Some(want));
                }
            }
            assert_eq!(out[2][0].choice(), Some(greedy::argmax(&row(&lower, 2)?)));
            assert_eq!(out[3][0].last(), Some(&row(&upper, 2)?[..]));
        }
        Ok(())
    }

    /// Echo's rows read as log-probabilities in the copy (each row's log-softmax at its
    /// target and its top, cut to what each user asked for), the rows after them whole,
    /// beside greedy choices and draws with and without their log-probabilities and a user
    /// reading rows, in one copy.
    #[test]
    fn rows_are_read_as_log_probabilities_in_the_copy() -> Result<()> {
        let (vocab, dev) = (70, Device::Cpu);
        let t = Tensor::arange(0f32, (11 * vocab) as f32, &dev)?;
        let product = ((t * 0.29)?.sin()? * 3.0)?.reshape((11, vocab))?;
        let row = |r: usize| -> Result<Vec<f32>> { Ok(product.get(r)?.to_vec1()?) };
        let mut copies = HeadCopies::new(vocab, true);
        let mut outputs: Vec<Vec<Logits>> = vec![vec![Logits::default()]; 6];
        // 0: 4 rows, the first 3 read (top 5), its last whole; 1: 3 rows all read (top 2);
        // 2: an argmax with its log-probabilities (top 3); 3: a row whole; 4: a draw with
        // them (top 0); 5: a draw alone
        const T0: [u32; 3] = [3, 9, 69];
        const T1: [u32; 3] = [0, 1, 2];
        let (t0, t1) = (T0, T1);
        let targets = |targets: &'static [u32], top| LogprobTargets {
            targets,
            read: LogprobRead {
                top,
                contrast: None,
            },
        };
        let draw = sample::Draw {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            u: 0.61,
        };
        let users = vec![
            HeadUser::new(
                0,
                0,
                4,
                Reads {
                    logprobs: Some(targets(&T0, 5)),
                    ..Reads::default()
                },
            ),
            HeadUser::new(
                1,
                0,
                3,
                Reads {
                    logprobs: Some(targets(&T1, 2)),
                    ..Reads::default()
                },
            ),
            HeadUser::new(
                2,
                0,
                1,
                Reads {
                    choice: Some(DeviceChoice::HeadArgmax),
                    choice_top: Some(3),
                    ..Reads::default()
                },
            ),
            HeadUser::new(3, 0, 1, Reads::default()),
            HeadUser::new(
                4,
                0,
                1,
                Reads {
                    choice: Some(DeviceChoice::HeadSample(draw)),
                    choice_top: Some(0),
                    ..Reads::default()
                },
            ),
            HeadUser::new(
                5,
                0,
                1,
                Reads {
                    choice: Some(DeviceChoice::HeadSample(draw)),
                    ..Reads::default()
                },
            ),
        ];
        copies.push(product.clone(), users, &mut outputs)?;
        copies.flush(&mut outputs)?;
        for (r, &target) in t0.iter().enumerate() {
            let want = logprob::row_logprobs(&row(r)?, target, 5);
            assert_eq!(outputs[0][0].logprobs_at(r), Some(&want));
        }
        assert_eq!(outputs[0][0].rows(), 4);
        assert_eq!(outputs[0][0].last(), Some(&row(3)?[..]));
        assert_eq!(outputs[0][0].row(3), &row(3)?[..]);
        for (r, &target) in t1.iter().enumerate() {
            let want = logprob::row_logprobs(&row(4 + r)?, target, 2);
            assert_eq!(outputs[1][0].logprobs_at(r), Some(&want));
        }
        assert_eq!((outputs[1][0].rows(), outputs[1][0].last()), (3, None));
        let argmax = greedy::argmax(&row(7)?);
        assert_eq!(outputs[2][0].choice(), Some(argmax));
        let want = logprob::row_logprobs(&row(7)?, argmax, 3);
        assert_eq!(outputs[2][0].logprobs_at(0), Some(&want));
        assert_eq!(outputs[3][0].last(), Some(&row(8)?[..]));
        let drawn = sample::draw_from_logits(&row(9)?, &draw);
        assert_eq!(outputs[4][0].choice(), Some(drawn));
        let want = logprob::row_logprobs(&row(9)?, drawn, 0);
        assert_eq!(outputs[4][0].logprobs_at(0), Some(&want));
        let drawn = sample::draw_from_logits(&row(10)?, &draw);
        assert_eq!(outputs[5][0].choice(), Some(drawn));
        assert_eq!(outputs[5][0].logprobs_at(0), None);
        Ok(())
    }

    /// A contrast's rows read as its log q in the copy, both heads handing over the pair's
    /// reads: a prompt's (their last row whole), and a choice's with and without its
    /// log-probabilities; a contrast split between copies reads its rows.
    #[test]
    fn contrasts_are_read_as_log_probabilities_in_the_copy() -> Result<()> {
        let (vocab, dev) = (90, Device::Cpu);
        let product = |phase: f64| -> Result<Tensor> {
            let t = Tensor::arange(0f32, (5 * vocab) as f32, &dev)?;
            Ok((((t * 0.31)? + phase)?.sin()? * 4.0)?.reshape((5, vocab))?)
        };
        let (lower, upper) = (product(0.5)?, product(2.0)?);
        let row = |t: &Tensor, r: usize| -> Result<Vec<f32>> { Ok(t.get(r)?.to_vec1()?) };
        const TARGETS: [u32; 2] = [4, 89];
        let (alpha, floor) = (0.2f32, 2usize);
        let echo = LogprobTargets {
            targets: &TARGETS,
            read: LogprobRead {
                top: 4,
                contrast: Some(ContrastRule::Autocontrast {
                    ln_alpha: alpha.ln(),
                    minimum_candidates: floor,
                }),
            },
        };
        let choice = Some(DeviceChoice::Contrast {
            alpha,
            minimum_candidates: floor,
            draw: None,
        });
        // sequence 0: an echoed prompt of 3 rows; 1: a choice with its logprobs (top 2);
        // 2: a choice alone. Each product: the lower exit's rows, then the upper head's.
        let users = |head: usize| {
            vec![
                HeadUser::new(
                    0,
                    head,
                    3,
                    Reads {
                        logprobs: Some(echo),
                        ..Reads::default()
                    },
                ),
                HeadUser::new(
                    1,
                    head,
                    1,
                    Reads {
                        choice,
                        choice_top: Some(2),
                        ..Reads::default()
                    },
                ),
                HeadUser::new(
                    2,
                    head,
                    1,
                    Reads {
                        choice,
                        ..Reads::default()
                    },
                ),
            ]
        };
        let product_bytes = 5 * vocab * 4;
        for held in [1 << 20, product_bytes] {
            let mut copies = HeadCopies {
                held_bytes: held,
                ..HeadCopies::new(vocab, true)
            };
            let mut outputs: Vec<Vec<Logits>> = vec![vec![Logits::default(); 2]; 3];
            copies.push(lower.clone(), users(1), &mut outputs)?;
            copies.push(upper.clone(), users(0), &mut outputs)?;
            copies.flush(&mut outputs)?;
            let ln_alpha = alpha.ln();
            let rule = ContrastRule::Autocontrast {
                ln_alpha,
                minimum_candidates: floor,
            };
            if held == product_bytes {
                // each head copied alone: rows, as the host reads them
                for (s, first) in [(0, 0), (1, 3), (2, 4)] {
                    assert_eq!(outputs[s][0].row(0), &row(&upper, first)?[..]);
                    assert_eq!(outputs[s][1].row(0), &row(&lower, first)?[..]);
                    assert_eq!(outputs[s][0].choice(), None);
                }
                continue;
            }
            for (head, got) in outputs[0].iter().enumerate() {
                for (r, &target) in TARGETS.iter().enumerate() {
                    let (u, l) = (row(&upper, r)?, row(&lower, r)?);
                    let want = logprob::contrast_row_logprobs(&u, &l, rule, target, 4);
                    assert_eq!(got.logprobs_at(r), Some(&want), "head {head} row {r}");
                }
                assert_eq!(got.rows(), 3);
            }
            assert_eq!(outputs[0][0].last(), Some(&row(&upper, 2)?[..]));
            assert_eq!(outputs[0][1].last(), Some(&row(&lower, 2)?[..]));
            for (s, r) in [(1, 3), (2, 4)] {
                let (u, l) = (row(&upper, r)?, row(&lower, r)?);
                let id = greedy::contrast_choice(&u, &l, ln_alpha, floor);
                let want = logprob::contrast_row_logprobs(&u, &l, rule, id, 2);
                for (head, got) in outputs[s].iter().enumerate() {
                    assert_eq!(got.choice(), Some(id));
                    let read = got.logprobs_at(0);
                    assert_eq!(read, (s == 1).then_some(&want), "sequence {s} head {head}");
                }
            }
        }
        Ok(())
    }

    /// A sampled sequence's draw is made in the copy from its row's log-softmax, beside rows
    /// and greedy choices of the same product.
    #[test]
    fn draws_are_made_in_the_copy_from_the_rows_log_softmax() -> Result<()> {
        let (vocab, dev) = (300, Device::Cpu);
        let t = Tensor::arange(0f32, (4 * vocab) as f32, &dev)?;
        let product = ((t * 0.113)?.sin()? * 4.0)?.reshape((4, vocab))?;
        let draw = |top_k, top_p, u| sample::Draw {
            temperature: 0.9,
            top_k,
            top_p,
            u,
        };
        let draws = [draw(0, 1.0, 0.37), draw(20, 0.8, 0.91)];
        let users = vec![
            (0, 0, Some(DeviceChoice::HeadSample(draws[0]))),
            (1, 0, None),
            (2, 0, Some(DeviceChoice::HeadArgmax)),
            (3, 0, Some(DeviceChoice::HeadSample(draws[1]))),
        ];
        let out = copied(1 << 20, &[(product.clone(), users)], &[1; 4])?;
        let row = |r: usize| -> Result<Vec<f32>> { Ok(product.get(r)?.to_vec1()?) };
        assert_eq!(
            out[0][0].choice(),
            Some(sample::draw_from_logits(&row(0)?, &draws[0]))
        );
        assert_eq!(out[1][0].last(), Some(&row(1)?[..]));
        assert_eq!(out[2][0].choice(), Some(greedy::argmax(&row(2)?)));
        assert_eq!(
            out[3][0].choice(),
            Some(sample::draw_from_logits(&row(3)?, &draws[1]))
        );
        // the draws differ from the greedy choice somewhere across the numbers
        let (first, best) = (row(0)?, greedy::argmax(&row(0)?));
        let picks: Vec<u32> = (0..20)
            .map(|k| sample::draw_from_logits(&first, &draw(0, 1.0, k as f64 / 20.0)))
            .collect();
        assert!(picks.iter().any(|&p| p != best), "{picks:?}");
        Ok(())
    }

    /// DoLa's token is chosen in the copy, greedy or drawn, from its mature head and the
    /// candidate the copy chose (or its only one), with the token's logprobs read there: the
    /// host's choice from DoLa's scores over all its candidates. A DoLa whose heads went in
    /// separate copies reads every row.
    #[test]
    fn dola_s_token_is_chosen_in_the_copy_from_its_chosen_candidate() -> Result<()> {
        use crate::model::mode::Mode;
        let (vocab, dev) = (120, Device::Cpu);
        let mode: Mode = "dola:1-2-3,relative_top=0.3".parse().expect("a DoLa flag");
        let greedy_choice = mode.device_choice().expect("DoLa chooses in the step");
        let draw = sample::Draw {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            u: 0.61,
        };
        let drawn = greedy_choice.drawn(draw);
        let rule = greedy_choice.rule().expect("a contrast's rule");
        // sequences 0 (greedy) and 1 (drawn, with logprobs) read three candidates, chosen in
        // the copy; 2 (greedy, with logprobs) reads one. Products: candidates 1..=3, then the
        // mature head; a row per user.
        let seqs: [(usize, DeviceChoice, Option<usize>, Option<usize>); 3] = [
            (0, greedy_choice, Some(4), None),
            (1, drawn, Some(4), Some(3)),
            (2, greedy_choice, None, Some(2)),
        ];
        let readers = |head: usize| -> Vec<usize> {
            (0..3)
                .filter(|&s| head == 0 || head == 1 || s < 2)
                .collect()
        };
        let products: Vec<(usize, Tensor)> = [1usize, 2, 3, 0]
            .into_iter()
            .map(|head| {
                let n = readers(head).len();
                let t = Tensor::arange(0f32, (n * vocab) as f32, &dev)?;
                let phase = [4.0, 0.3, 1.9, 0.8][head];
                let spread = if head == 0 { 6.0 } else { 3.0 };
                Ok((
                    head,
                    (((t * 0.29)? + phase)?.sin()? * spread)?.reshape((n, vocab))?,
                ))
            })
            .collect::<Result<_>>()?;
        let row = |head: usize, seq: usize| -> Result<Vec<f32>> {
            let (_, t) = products
                .iter()
                .find(|(h, _)| *h == head)
                .expect("a product");
            let r = readers(head)
                .iter()
                .position(|&s| s == seq)
                .expect("a reader");
            Ok(t.get(r)?.to_vec1()?)
        };
        // each product copied alone; candidates 1 and 2 in one copy, 3 with the mature head
        // in another (not a choice of 3 from 1)
        let (one_product, two_copies) = (3 * vocab * 4, 5 * vocab * 4);
        for held in [1 << 20, one_product, two_copies] {
            let mut copies = HeadCopies {
                held_bytes: held,
                ..HeadCopies::new(vocab, true)
            };
            let mut outputs = vec![vec![Logits::default(); 4], vec![Logits::default(); 4]];
            outputs.push(vec![Logits::default(); 2]);
            for (head, t) in &products {
                let users = readers(*head)
                    .into_iter()
                    .map(|s| {
                        let (seq, choice, of, top) = seqs[s];
                        HeadUser::new(
                            seq,
                            *head,
                            1,
                            Reads {
                                choice: Some(choice),
                                premature_of: of,
                                choice_top: top,
                                ..Reads::default()
                            },
                        )
                    })
                    .collect();
                copies.push(t.clone(), users, &mut outputs)?;
            }
            copies.flush(&mut outputs)?;
            for &(seq, choice, of, top) in &seqs {
                let heads = of.unwrap_or(2);
                let rows: Vec<Vec<f32>> = (0..heads).map(|h| row(h, seq)).collect::<Result<_>>()?;
                if held != 1 << 20 {
                    // heads in separate copies: rows, as the host reads them
                    for (h, r) in rows.iter().enumerate() {
                        assert_eq!(outputs[seq][h].last(), Some(&r[..]), "seq {seq} head {h}");
                    }
                    continue;
                }
                let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
                let scores = mode.scores(&refs);
                let want = sample::draw(
                    &scores,
                    &choice.draw().unwrap_or(sample::Draw {
                        temperature: 0.0,
                        ..draw
                    }),
                );
                // the candidate the host chooses: the one handed over besides the mature head
                let handed: Vec<usize> = (1..heads)
                    .filter(|&h| outputs[seq][h].choice().is_some())
                    .collect();
                let [chosen] = handed[..] else {
                    panic!("seq {seq}: one candidate handed over, not {handed:?}")
                };
                let empty: Vec<usize> =
                    (1..heads).filter(|&h| outputs[seq][h].is_empty()).collect();
                assert_eq!(empty.len(), heads - 2, "seq {seq}: the others left out");
                assert_eq!(scores, rule.scores(&rows[0], &rows[chosen]), "seq {seq}");
                for h in std::iter::once(0).chain([chosen]) {
                    let got = &outputs[seq][h];
                    assert_eq!(got.choice(), Some(want), "seq {seq} head {h}");
                    let read = top.map(|top| {
                        logprob::contrast_row_logprobs(&rows[0], &rows[chosen], rule, want, top)
                    });
                    assert_eq!(got.logprobs_at(0), read.as_ref(), "seq {seq} head {h}");
                }
                if let Some(top) = top {
                    // the host's report: the log-softmax of DoLa's logits
                    let lp = crate::model::mode::log_softmax(&scores);
                    let read = outputs[seq][0].logprobs_at(0).expect("read");
                    assert_eq!(read.target, lp[want as usize]);
                    assert_eq!(read.top.len(), top);
                }
            }
        }
        Ok(())
    }

    /// SLED's scores are computed in the copy from its mature head's row and each premature
    /// layer's, in head order, at each position it reads (the last, or every one), and handed
    /// over on the mature head (the others empty), beside rows copied whole and choices made
    /// there; a SLED whose heads went in separate copies reads every row.
    #[test]
    fn sled_s_scores_are_computed_in_the_copy() -> Result<()> {
        let (vocab, dev) = (70, Device::Cpu);
        let rule = SledRule {
            evolution_scale: 4,
            evolution_rate: 0.3,
            lower_bound: -10.0,
            alpha: 0.5,
        };
        let wide = SledRule {
            evolution_scale: 9,
            alpha: 0.0,
            ..rule
        };
        let product = |phase: f64, n: usize| -> Result<Tensor> {
            let t = Tensor::arange(0f32, (n * vocab) as f32, &dev)?;
            Ok((((t * 0.41)? + phase)?.sin()? * 5.0)?.reshape((n, vocab))?)
        };
        let sled = |r: SledRule, heads: usize| Reads {
            sled: Some((r, heads)),
            ..Reads::default()
        };
        let argmax = Reads {
            choice: Some(DeviceChoice::HeadArgmax),
            ..Reads::default()
        };
        // Products: premature layers 1 and 2, then the mature head (head 0). Users (sequence,
        // head, rows): 0 SLED over both layers; 1 SLED over layer 2 alone (its head 1); 2 an
        // argmax of the mature head; 3 the mature head's row; 4 SLED over both layers at
        // each of 3 positions (echo's scoring).
        type Users = Vec<(usize, usize, usize, Reads<'static>)>;
        let users: [Users; 3] = [
            vec![(0, 1, 1, sled(rule, 3)), (4, 1, 3, sled(rule, 3))],
            vec![
                (0, 2, 1, sled(rule, 3)),
                (1, 1, 1, sled(wide, 2)),
                (4, 2, 3, sled(rule, 3)),
            ],
            vec![
                (0, 0, 1, sled(rule, 3)),
                (1, 0, 1, sled(wide, 2)),
                (2, 0, 1, argmax),
                (3, 0, 1, Reads::default()),
                (4, 0, 3, sled(rule, 3)),
            ],
        ];
        let products: Vec<Tensor> = users
            .iter()
            .zip([0.3, 1.1, 2.0])
            .map(|(u, phase)| product(phase, u.iter().map(|u| u.2).sum()))
            .collect::<Result<_>>()?;
        // (product, sequence) -> its rows
        let rows_of = |p: usize, seq: usize| -> Result<Vec<Vec<f32>>> {
            let first: usize = users[p]
                .iter()
                .take_while(|u| u.0 != seq)
                .map(|u| u.2)
                .sum();
            let n = users[p].iter().find(|u| u.0 == seq).expect("a user").2;
            (first..first + n)
                .map(|r| Ok(products[p].get(r)?.to_vec1()?))
                .collect()
        };
        for held in [1 << 20, vocab * 4] {
            let mut copies = HeadCopies {
                held_bytes: held,
                ..HeadCopies::new(vocab, true)
            };
            let mut outputs = vec![
                vec![Logits::default(); 3],
                vec![Logits::default(); 2],
                vec![Logits::default()],
                vec![Logits::default()],
                vec![Logits::default(); 3],
            ];
            for (t, users) in products.iter().zip(&users) {
                let users = users
                    .iter()
                    .map(|&(seq, head, rows, reads)| HeadUser::new(seq, head, rows, reads))
                    .collect();
                copies.push(t.clone(), users, &mut outputs)?;
            }
            copies.flush(&mut outputs)?;
            let (m0, l1, l2) = (rows_of(2, 0)?, rows_of(0, 0)?, rows_of(1, 0)?);
            if held != 1 << 20 {
                // each product copied alone: rows
                assert_eq!(outputs[0][0].last(), Some(&m0[0][..]));
                assert_eq!(outputs[0][1].last(), Some(&l1[0][..]));
                assert_eq!(outputs[4][2].rows(), 3);
                assert!(!outputs[0][0].are_scores() && !outputs[4][0].are_scores());
                continue;
            }
            let mode: crate::model::mode::Mode = "sled".parse().expect("a SLED flag");
            let want0 = sled::sled_scores(&m0[0], &[&l1[0], &l2[0]], &rule);
            let (m1, l2b) = (rows_of(2, 1)?, rows_of(1, 1)?);
            let want1 = sled::sled_scores(&m1[0], &[&l2b[0]], &wide);
            assert!(outputs[0][0].are_scores());
            assert_eq!(outputs[0][0].last(), Some(&want0[..]));
            assert!(outputs[0][1].is_empty() && outputs[0][2].is_empty());
            assert_eq!(outputs[1][0].last(), Some(&want1[..]));
            assert!(outputs[1][1].is_empty());
            assert_ne!(want0, want1);
            // every position of the echoed prompt, which the strategy reads as they are
            let (m4, a4, b4) = (rows_of(2, 4)?, rows_of(0, 4)?, rows_of(1, 4)?);
            assert_eq!(outputs[4][0].rows(), 3);
            for p in 0..3 {
                let want = sled::sled_scores(&m4[p], &[&a4[p], &b4[p]], &rule);
                assert_eq!(outputs[4][0].row(p), &want[..], "position {p}");
                assert_eq!(mode.scores_at(&outputs[4], p), want, "position {p}");
            }
            assert!(outputs[4][1].is_empty() && outputs[4][2].is_empty());
            assert_eq!(
                outputs[2][0].choice(),
                Some(greedy::argmax(&rows_of(2, 2)?[0]))
            );
            assert_eq!(outputs[3][0].last(), Some(&rows_of(2, 3)?[0][..]));
            assert!(!outputs[3][0].are_scores());
        }
        Ok(())
    }

    /// Echo's scoring in DoLa reads each position as the log-softmax of DoLa's logits over
    /// the mature head and the candidate farthest from it there (chosen in the copy, at each
    /// position), as the host scores it from every candidate's rows; the last row (which the
    /// first token is chosen from) comes whole for every head. One candidate: no choosing.
    #[test]
    fn dola_s_echo_is_read_in_the_copy_with_a_candidate_per_position() -> Result<()> {
        use crate::model::mode::Mode;
        let (vocab, dev) = (90, Device::Cpu);
        let mode: Mode = "dola:1-2-3,relative_top=0.2".parse().expect("a DoLa flag");
        let rule = ContrastRule::Dola {
            ln_relative_top: 0.2f32.ln(),
        };
        const TARGETS: [u32; 3] = [5, 88, 41];
        let read = LogprobTargets {
            targets: &TARGETS,
            read: LogprobRead {
                top: 3,
                contrast: Some(rule),
            },
        };
        // sequence 0: 4 rows (3 read), three candidates; 1: 4 rows, one candidate (heads
        // 0 and 1). Products: candidates 1..=3, then the mature head.
        let heads_of = [4usize, 2];
        // at position r the candidate (r % 3) + 1 strays far from the mature head, the others
        // stay near it: the copy must choose per position
        let values = |head: usize, seq: usize, r: usize| -> Vec<f32> {
            let wave = |phase: f32, spread: f32| -> Vec<f32> {
                (0..vocab)
                    .map(|i| (i as f32 * 0.37 + phase).sin() * spread)
                    .collect()
            };
            let mature = wave(1.3 + r as f32 + seq as f32, 6.0);
            match head {
                0 => mature,
                h if h == r % 3 + 1 => wave(0.4 * h as f32, 5.0),
                h => mature.iter().map(|&m| 0.8 * m + 0.05 * h as f32).collect(),
            }
        };
        let readers =
            |head: usize| -> Vec<usize> { (0..2).filter(|&s| head < heads_of[s]).collect() };
        let products: Vec<(usize, Tensor)> = [1usize, 2, 3, 0]
            .into_iter()
            .map(|head| {
                let rows: Vec<f32> = readers(head)
                    .into_iter()
                    .flat_map(|seq| (0..4).flat_map(move |r| values(head, seq, r)))
                    .collect();
                let n = rows.len() / vocab;
                Ok((head, Tensor::new(rows, &dev)?.reshape((n, vocab))?))
            })
            .collect::<Result<_>>()?;
        let row = |head: usize, seq: usize, r: usize| -> Result<Vec<f32>> {
            let (_, t) = products
                .iter()
                .find(|(h, _)| *h == head)
                .expect("a product");
            let at = readers(head)
                .iter()
                .position(|&s| s == seq)
                .expect("a reader");
            Ok(t.get(4 * at + r)?.to_vec1()?)
        };
        for held in [1 << 20, 8 * vocab * 4] {
            let mut copies = HeadCopies {
                held_bytes: held,
                ..HeadCopies::new(vocab, true)
            };
            let mut outputs = vec![vec![Logits::default(); 4], vec![Logits::default(); 2]];
            for (head, t) in &products {
                let users = readers(*head)
                    .into_iter()
                    .map(|seq| {
                        let premature_of = (heads_of[seq] > 2).then_some(heads_of[seq]);
                        let reads = Reads {
                            logprobs: Some(read),
                            premature_of,
                            ..Reads::default()
                        };
                        HeadUser::new(seq, *head, 4, reads)
                    })
                    .collect();
                copies.push(t.clone(), users, &mut outputs)?;
            }
            copies.flush(&mut outputs)?;
            for (seq, &heads) in heads_of.iter().enumerate() {
                let got = &outputs[seq];
                if held != 1 << 20 {
                    // the heads in separate copies: rows
                    assert_eq!(got[0].logprobs_at(0), None, "seq {seq}");
                    assert_eq!(got[0].rows(), 4);
                    continue;
                }
                for (r, &target) in TARGETS.iter().enumerate() {
                    let rows: Vec<Vec<f32>> =
                        (0..heads).map(|h| row(h, seq, r)).collect::<Result<_>>()?;
                    let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
                    // the host's: DoLa's scores from every candidate, their log-softmax
                    let lp = mode.logprobs(&mode.scores(&refs)).into_owned();
                    let want = logprob::RowLogprobs {
                        target: lp[target as usize],
                        top: logprob::top_ids(&lp, 3)
                            .into_iter()
                            .map(|i| (i, lp[i as usize]))
                            .collect(),
                    };
                    for (h, got) in got.iter().enumerate() {
                        assert_eq!(
                            got.logprobs_at(r),
                            Some(&want),
                            "seq {seq} head {h} row {r}"
                        );
                    }
                }
                for (h, got) in got.iter().enumerate() {
                    assert_eq!(got.last(), Some(&row(h, seq, 3)?[..]), "seq {seq} head {h}");
                }
            }
        }
        Ok(())
    }
}
