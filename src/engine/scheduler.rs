//! Admission and step planning as pure functions over plain numbers: the batcher carries out
//! what these decide. Nothing here touches a channel, a tensor or a clock.
//!
//! The memory bound is a KV-token budget, as TGI's `max_batch_total_tokens`: every sequence
//! reserves its whole prompt plus `max_tokens` when it is admitted (each `n`/`best_of` copy
//! included, before it is forked), so the caches of the running batch can never outgrow it.

use std::time::{Duration, Instant};

/// What the running batch may hold (from the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Sequences decoded together, every `n`/`best_of` copy counted (`--max-batch-size`).
    pub max_sequences: usize,
    /// KV positions reserved across the batch (`--max-batch-total-tokens`).
    pub max_tokens: usize,
    /// What one step takes in.
    pub step: StepBudget,
}

/// What one prompt of a request reserves once admitted: all its copies, each for its prompt
/// and its longest completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    pub sequences: usize,
    pub tokens: usize,
}

impl Demand {
    /// `copies` sequences of `prompt_len + max_tokens` positions; `None` on overflow.
    pub fn of_prompt(prompt_len: usize, max_tokens: usize, copies: usize) -> Option<Self> {
        let per_sequence = prompt_len.checked_add(max_tokens)?;
        Some(Self {
            sequences: copies,
            tokens: per_sequence.checked_mul(copies)?,
        })
    }

    /// Both together (saturating).
    pub fn plus(self, other: Demand) -> Demand {
        Demand {
            sequences: self.sequences.saturating_add(other.sequences),
            tokens: self.tokens.saturating_add(other.tokens),
        }
    }
}

/// Why a prompt can never run, whatever else is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Sequences { need: usize, limit: usize },
    Tokens { need: usize, limit: usize },
}

/// Checks that `demand` fits the budget of an empty batch.
pub fn fits_alone(budget: &Budget, demand: Demand) -> Result<(), Refusal> {
    if demand.sequences > budget.max_sequences {
        return Err(Refusal::Sequences {
            need: demand.sequences,
            limit: budget.max_sequences,
        });
    }
    if demand.tokens > budget.max_tokens {
        return Err(Refusal::Tokens {
            need: demand.tokens,
            limit: budget.max_tokens,
        });
    }
    Ok(())
}

/// How many of `waiting` (prompt groups in arrival order) join a batch that already reserves
/// `reserved`. Strictly first come, first served: a group that does not fit yet stops the
/// ones behind it, so a large request is never starved by a stream of small ones.
pub fn admit_in_order(budget: &Budget, reserved: Demand, waiting: &[Demand]) -> usize {
    let mut total = reserved;
    for (i, d) in waiting.iter().enumerate() {
        let next = total.plus(*d);
        if next.sequences > budget.max_sequences || next.tokens > budget.max_tokens {
            return i;
        }
        total = next;
    }
    waiting.len()
}

/// A waiting request as the queue orders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueKey {
    /// The request's `priority`: lower goes first (vLLM's convention), whatever else.
    pub priority: i32,
    /// Its arrival plus a slack for its size (see [`due`]): among equal priorities, the
    /// earliest due goes first.
    pub due: Instant,
    /// Arrival order: the earlier of two equally due.
    pub seq: u64,
}

/// When a request of `tokens` KV positions (every prompt and copy, with its completion) that
/// arrived at `arrived` is due: `slack_per_token` per position later. Earliest due first is
/// shortest first among requests that arrived close together (a short request does not
/// queue behind long ones), while a long request waits at most its own slack longer than
/// first come, first served would make it: each arrival after `arrived + slack` is due
/// after it. A zero slack is first come, first served.
pub fn due(arrived: Instant, tokens: usize, slack_per_token: Duration) -> Instant {
    let slack = slack_per_token.saturating_mul(u32::try_from(tokens).unwrap_or(u32::MAX));
    arrived.checked_add(slack).unwrap_or(arrived)
}

/// Which waiting request to admit next: the least [`QueueKey`].
pub fn next_in_queue(waiting: &[QueueKey]) -> Option<usize> {
    (0..waiting.len()).min_by_key(|&i| waiting[i])
}

/// One running sequence as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqView {
    /// Prompt tokens not yet in its cache (0 once it decodes).
    pub prompt_left: usize,
    /// False while its client has not read what it was sent (a paused stream).
    pub can_emit: bool,
    /// Most prompt tokens it may feed in one step (an inspection of every position keeps
    /// its chunks small: each position's logits are kept for every head).
    pub max_chunk: usize,
    /// What one of its prompt tokens costs of the prefill budget: 1, or more where each
    /// position also evaluates vocabulary heads (echo with logprobs, an inspection of every
    /// position: `model::cost::scored_position_cost`), so that such work cannot crowd out the
    /// others' prefill.
    pub cost_per_token: usize,
    /// Its request's `priority` (lower goes first).
    pub priority: i32,
    /// The step at which it last took part (or joined the batch): beside a sequence of a
    /// higher priority, the one that waited longest goes first.
    pub turn: u64,
}

/// What one step takes in (`--max-prefill-tokens`, `--max-prefill-tokens-beside-priority`,
/// `--max-sequences-beside-priority`). On a CPU a step's time grows with every row and prompt
/// token in it, so work of a lower priority than another sequence of the step is capped: a
/// request of a higher priority is slowed by at most that much per step it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget {
    /// Prompt tokens across the batch.
    pub prefill: usize,
    /// Prompt tokens of sequences of a lower priority than another sequence in the step.
    pub prefill_beside_higher: usize,
    /// Sequences of a lower priority than another sequence in the step that take part in it
    /// (decoding or feeding a prompt chunk); the others sit the step out, taking turns.
    pub sequences_beside_higher: usize,
}

/// A planned step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Who takes part, in running order.
    pub slots: Vec<Slot>,
    /// Sequences that sat the step out for their turn beside a higher priority.
    pub yielded: usize,
}

/// What one sequence feeds this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index into the running sequences.
    pub index: usize,
    /// Prompt tokens fed (a chunk of the prompt), or 0: the sequence decodes one token.
    pub prompt_take: usize,
}

/// Plans one step: every decoding sequence feeds its token; prompts are fed lowest priority
/// value first (in running order among equals), chunked under the prefill budget. Sequences of
/// a lower priority than another sequence of the step take part only under the budget's
/// `*_beside_higher` caps, the one whose turn came longest ago first. A sequence whose client
/// stopped reading sits out.
pub fn plan_step(budget: StepBudget, seqs: &[SeqView]) -> Plan {
    let highest = seqs.iter().filter(|s| s.can_emit).map(|s| s.priority).min();
    let beside = |s: &SeqView| highest.is_some_and(|p| p < s.priority);
    let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].can_emit).collect();
    // The highest priority in running order, then the others by priority and turn.
    order.sort_by_key(|&i| {
        let s = &seqs[i];
        (s.priority, if beside(s) { s.turn } else { 0 }, i)
    });
    let mut takes: Vec<Option<usize>> = vec![None; seqs.len()];
    let mut left = budget.prefill;
    let mut beside_left = budget.prefill_beside_higher;
    let mut rows_beside = budget.sequences_beside_higher;
    let mut yielded = 0;
    for (at, &i) in order.iter().enumerate() {
        let s = &seqs[i];
        let beside = beside(s);
        if beside && rows_beside == 0 {
            // the rest are all beside: they sit this step out
            yielded = order.len() - at;
            break;
        }
        if s.prompt_left == 0 {
            takes[i] = Some(0);
        } else {
            let room = if beside { left.min(beside_left) } else { left };
            let cost = s.cost_per_token.max(1);
            let mut take = s.prompt_left.min(room / cost).min(s.max_chunk);
            let untouched =
                left == budget.prefill && (!beside || beside_left == budget.prefill_beside_higher);
            if take == 0 && untouched {
                // A position dearer than the whole budget still goes, alone, when nothing
                // else has spent any: else it would never run.
                take = 1;
            }
            if take == 0 {
                continue; // the budget is spent: this prompt waits a step
            }
            left = left.saturating_sub(take * cost);
            if beside {
                beside_left = beside_left.saturating_sub(take * cost);
            }
            takes[i] = Some(take);
        }
        if beside {
            rows_beside -= 1;
        }
    }
    let slots = (0..seqs.len())
        .filter_map(|index| takes[index].map(|prompt_take| Slot { index, prompt_take }))
        .collect();
    Plan { slots, yielded }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget {
        max_sequences: 8,
        max_tokens: 1000,
        step: plain(100),
    };

    /// A sequence that may emit, with no chunk cap, whose prompt tokens cost 1.
    const PLAIN: SeqView = SeqView {
        prompt_left: 0,
        can_emit: true,
        max_chunk: usize::MAX,
        cost_per_token: 1,
        priority: 0,
        turn: 0,
    };

    /// A budget of `prefill` tokens with no cap beside a sequence of higher priority.
    const fn plain(prefill: usize) -> StepBudget {
        StepBudget {
            prefill,
            prefill_beside_higher: prefill,
            sequences_beside_higher: usize::MAX,
        }
    }

    /// A plain sequence with `left` prompt tokens to feed.
    fn prompt(left: usize) -> SeqView {
        SeqView {
            prompt_left: left,
            ..PLAIN
        }
    }

    /// A plan as `(index, prompt tokens fed)`.
    fn takes(plan: &Plan) -> Vec<(usize, usize)> {
        plan.slots
            .iter()
            .map(|s| (s.index, s.prompt_take))
            .collect()
    }

    fn d(sequences: usize, tokens: usize) -> Demand {
        Demand { sequences, tokens }
    }

    #[test]
    fn demand_counts_every_copy_and_refuses_overflow() {
        assert_eq!(Demand::of_prompt(10, 90, 4), Some(d(4, 400)));
        assert_eq!(Demand::of_prompt(usize::MAX, 1, 1), None);
        assert_eq!(Demand::of_prompt(usize::MAX / 2, 1, 3), None);
    }

    #[test]
    fn a_prompt_that_can_never_fit_is_refused_with_both_numbers() {
        assert_eq!(fits_alone(&BUDGET, d(8, 1000)), Ok(()));
        assert_eq!(
            fits_alone(&BUDGET, d(9, 10)),
            Err(Refusal::Sequences { need: 9, limit: 8 })
        );
        assert_eq!(
            fits_alone(&BUDGET, d(1, 1001)),
            Err(Refusal::Tokens {
                need: 1001,
                limit: 1000
            })
        );
    }

    #[test]
    fn admission_stops_at_either_edge_exactly() {
        // tokens: 600 + 400 = 1000 fits, one more token does not
        assert_eq!(admit_in_order(&BUDGET, d(1, 600), &[d(1, 400)]), 1);
        assert_eq!(admit_in_order(&BUDGET, d(1, 601), &[d(1, 400)]), 0);
        // sequences: copies count before they exist (7 + 1 fits, 7 + 2 does not)
        assert_eq!(admit_in_order(&BUDGET, d(7, 0), &[d(1, 1)]), 1);
        assert_eq!(admit_in_order(&BUDGET, d(7, 0), &[d(2, 1)]), 0);
        // an empty batch takes whatever fits alone
        assert_eq!(admit_in_order(&BUDGET, d(0, 0), &[d(8, 1000)]), 1);
    }

    #[test]
    fn admission_is_first_come_first_served() {
        // the second group does not fit; the small third one must not overtake it
        let waiting = [d(2, 200), d(4, 900), d(1, 10)];
        assert_eq!(admit_in_order(&BUDGET, d(0, 0), &waiting), 1);
        assert_eq!(admit_in_order(&BUDGET, d(0, 0), &[]), 0);
        // groups of one request are admitted together as far as they fit
        let groups = [d(2, 100); 5];
        assert_eq!(admit_in_order(&BUDGET, d(3, 0), &groups), 2);
    }

    #[test]
    fn prefill_is_chunked_in_order_and_decodes_always_run() {
        let seqs = [PLAIN, prompt(70), prompt(50), prompt(20), PLAIN];
        let got = takes(&plan_step(plain(100), &seqs));
        // 70 + 30 of the 50: the budget is spent; the 20-token prompt waits; decodes run
        assert_eq!(got, vec![(0, 0), (1, 70), (2, 30), (4, 0)]);
    }

    #[test]
    fn prompts_of_a_lower_priority_get_only_the_budget_beside_a_higher_one() {
        let at = |priority, v: SeqView| SeqView { priority, ..v };
        let budget = StepBudget {
            prefill_beside_higher: 16,
            ..plain(100)
        };
        // a decoding sequence of priority -1: the two priority-0 prompts share 16 tokens
        let seqs = [prompt(70), at(-1, PLAIN), prompt(50)];
        assert_eq!(
            takes(&plan_step(budget, &seqs)),
            vec![(0, 16), (1, 0)],
            "the second prompt waits"
        );
        // a prompt of priority -1 goes first, whole, wherever it runs; the other gets 16
        let seqs = [prompt(70), at(-1, prompt(60)), at(-1, PLAIN)];
        assert_eq!(
            takes(&plan_step(budget, &seqs)),
            vec![(0, 16), (1, 60), (2, 0)]
        );
        // its budget is the whole one's too: 90 of 100 leave 10 for the others
        let seqs = [prompt(70), at(-1, prompt(90))];
        assert_eq!(takes(&plan_step(budget, &seqs)), vec![(0, 10), (1, 90)]);
        // equal priorities, however high: the whole budget in running order
        let seqs = [at(-1, prompt(70)), at(-1, PLAIN), at(-1, prompt(50))];
        assert_eq!(
            takes(&plan_step(budget, &seqs)),
            vec![(0, 70), (1, 0), (2, 30)]
        );
        // a paused sequence of a higher priority does not run, so it caps nothing
        let paused = SeqView {
            can_emit: false,
            ..at(-1, PLAIN)
        };
        assert_eq!(
            takes(&plan_step(budget, &[prompt(70), paused])),
            vec![(0, 70)]
        );
        // a position dearer than the cap still goes alone beside a higher priority
        let dear = SeqView {
            cost_per_token: 40,
            ..prompt(10)
        };
        assert_eq!(
            takes(&plan_step(budget, &[dear, at(-1, PLAIN)])),
            vec![(0, 1), (1, 0)]
        );
    }

    #[test]
    fn sequences_of_a_lower_priority_take_turns_beside_a_higher_one() {
        let at = |priority, turn, v: SeqView| SeqView {
            priority,
            turn,
            ..v
        };
        let budget = StepBudget {
            sequences_beside_higher: 2,
            ..plain(100)
        };
        // beside the priority -1 sequence, the two priority-0 ones whose turn came longest
        // ago go; the third sits out
        let seqs = [
            at(0, 7, PLAIN),
            at(0, 5, PLAIN),
            at(-1, 9, PLAIN),
            at(0, 6, PLAIN),
        ];
        let plan = plan_step(budget, &seqs);
        assert_eq!(takes(&plan), vec![(1, 0), (2, 0), (3, 0)]);
        assert_eq!(plan.yielded, 1);
        // priority before turn among the lower ones; a prompt counts as a sequence too
        let seqs = [
            at(1, 0, PLAIN),
            at(0, 8, prompt(30)),
            at(-1, 9, PLAIN),
            at(0, 9, PLAIN),
        ];
        assert_eq!(
            takes(&plan_step(budget, &seqs)),
            vec![(1, 30), (2, 0), (3, 0)]
        );
        // a prompt that gets no token this step leaves its turn to the next
        let spent = StepBudget {
            prefill_beside_higher: 10,
            ..budget
        };
        let seqs = [
            at(0, 1, prompt(30)),
            at(0, 2, prompt(30)),
            at(0, 3, PLAIN),
            at(-1, 9, PLAIN),
        ];
        assert_eq!(
            takes(&plan_step(spent, &seqs)),
            vec![(0, 10), (2, 0), (3, 0)]
        );
        // equal priorities, however many: no cap
        let seqs = [at(0, 3, PLAIN); 6];
        assert_eq!(plan_step(budget, &seqs).slots.len(), 6);
        // a cap of one (the least the settings allow): the next priority first, whatever
        // its turn
        let one = StepBudget {
            sequences_beside_higher: 1,
            ..budget
        };
        let seqs = [at(-1, 0, PLAIN), at(3, 4, PLAIN), at(2, 8, PLAIN)];
        assert_eq!(takes(&plan_step(one, &seqs)), vec![(0, 0), (2, 0)]);
    }

    #[test]
    fn a_chunk_cap_leaves_the_rest_of_the_budget_to_others() {
        let seqs = [
            SeqView {
                max_chunk: 32,
                ..prompt(100)
            },
            prompt(100),
        ];
        let got = takes(&plan_step(plain(100), &seqs));
        assert_eq!(got, vec![(0, 32), (1, 68)]);
    }

    #[test]
    fn a_paused_sequence_sits_out_and_leaves_its_budget() {
        let seqs = [
            SeqView {
                can_emit: false,
                ..prompt(80)
            },
            SeqView {
                can_emit: false,
                ..PLAIN
            },
            prompt(90),
        ];
        let plan = plan_step(plain(100), &seqs);
        assert_eq!(
            plan.slots,
            vec![Slot {
                index: 2,
                prompt_take: 90
            }]
        );
        assert_eq!(plan.yielded, 0, "paused, not yielding");
    }

    #[test]
    fn positions_that_evaluate_every_head_are_charged_for_them() {
        let seqs = [
            SeqView {
                max_chunk: 32,
                cost_per_token: 9,
                ..prompt(100)
            },
            prompt(100),
            prompt(5),
        ];
        let got = takes(&plan_step(plain(100), &seqs));
        // 11 inspected positions take 99 of the 100; one token is left for the next prompt
        assert_eq!(got, vec![(0, 11), (1, 1)]);
        // dearer than the whole budget: one position, alone
        let alone = [SeqView {
            cost_per_token: 500,
            ..seqs[0]
        }];
        assert_eq!(plan_step(plain(100), &alone).slots[0].prompt_take, 1);
        let behind = [seqs[1], alone[0]];
        let got = takes(&plan_step(plain(100), &behind));
        assert_eq!(got, vec![(0, 100)]);
    }

    #[test]
    fn the_lowest_priority_value_goes_first_then_the_earliest_due() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let key = |priority, due_ms, seq| QueueKey {
            priority,
            due: t0 + ms(due_ms),
            seq,
        };
        assert_eq!(next_in_queue(&[]), None);
        assert_eq!(
            next_in_queue(&[key(0, 5, 0), key(0, 3, 1), key(0, 9, 2)]),
            Some(1)
        );
        // priority first, however late its due
        assert_eq!(
            next_in_queue(&[key(0, 1, 0), key(-1, 70, 1), key(3, 0, 2)]),
            Some(1)
        );
        // equally due: arrival order
        assert_eq!(next_in_queue(&[key(2, 4, 1), key(2, 4, 0)]), Some(1));
    }

    #[test]
    fn a_short_request_passes_a_long_one_only_within_the_long_ones_slack() {
        let t0 = Instant::now();
        let slack = Duration::from_millis(1);
        // arrived first, 400 positions: due at 400 ms
        let long = due(t0, 400, slack);
        // a 20-position request arriving 100 ms later is due at 120 ms: it goes first
        let short = due(t0 + Duration::from_millis(100), 20, slack);
        assert!(short < long);
        // one arriving after the long one's slack ran out is due after it
        let late = due(t0 + Duration::from_millis(390), 20, slack);
        assert!(late > long);
        // no slack: first come, first served whatever the sizes
        let zero = Duration::ZERO;
        assert!(due(t0, 400, zero) < due(t0 + Duration::from_millis(1), 1, zero));
        // sizes beyond u32 saturate instead of wrapping
        assert!(due(t0, usize::MAX, slack) > due(t0, 400, slack));
    }
}
