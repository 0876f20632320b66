//! The bound on requests waiting for the batch (`--max-queued-requests`): a place is taken at
//! submission and given back once the batcher has admitted the request (or ended it). The
//! batcher drains the channel into its own order (by `priority`), so the channel's capacity
//! cannot be the bound.
//!
//! Priority holds at the bound too: when every place is taken, a request of a higher priority
//! than the lowest that waits is let in over the bound, and the batcher turns the waiting
//! request that would be served last away with a 429 as soon as it drains the channel
//! (`batcher/admit.rs`), so the queue is back at its bound before anything is admitted. How far
//! over the bound the channel may go between two drains is bounded too (another `max`).

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

#[derive(Debug)]
pub struct QueuePlaces {
    taken: AtomicUsize,
    max: usize,
    /// The largest `priority` (the lowest in rank) among the requests waiting, as the batcher
    /// last saw them; `i32::MIN` when none waits.
    lowest_waiting: AtomicI32,
}

impl QueuePlaces {
    pub fn new(max: usize) -> Self {
        Self {
            taken: AtomicUsize::new(0),
            max: max.max(1),
            lowest_waiting: AtomicI32::new(i32::MIN),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// What the submission channel must hold: the places, and as many over them.
    pub fn capacity(&self) -> usize {
        self.max * 2
    }

    /// Takes a place for a request of `priority`; false when all are taken by requests of the
    /// same or a higher priority.
    pub fn take(&self, priority: i32) -> bool {
        let displaces = priority < self.lowest_waiting.load(Ordering::Acquire);
        let bound = if displaces { self.capacity() } else { self.max };
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < bound).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn give_back(&self) {
        let _ = self
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// The batcher's view of the lowest priority waiting (None: nothing waits).
    pub fn set_lowest_waiting(&self, priority: Option<i32>) {
        self.lowest_waiting
            .store(priority.unwrap_or(i32::MIN), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_up_to_the_bound_and_given_back() {
        let q = QueuePlaces::new(2);
        assert!(q.take(0) && q.take(0));
        assert!(!q.take(0));
        q.give_back();
        assert!(q.take(0));
        q.give_back();
        q.give_back();
        q.give_back(); // never below zero
        assert!(q.take(0) && q.take(0) && !q.take(0));
    }

    #[test]
    fn a_higher_priority_goes_over_the_bound_while_a_lower_one_waits() {
        let q = QueuePlaces::new(2);
        assert!(q.take(1) && q.take(1));
        q.set_lowest_waiting(Some(1));
        assert!(!q.take(1), "an equal priority does not");
        assert!(!q.take(5));
        assert!(
            q.take(0) && q.take(-3),
            "higher ones do, up to twice the bound"
        );
        assert!(!q.take(-10));
        q.set_lowest_waiting(None);
        q.give_back();
        assert!(!q.take(-10), "nothing below it waits: the bound holds");
    }
}
