//! The bound on requests waiting for the batch (`--max-queued-requests`): a place is taken at
//! submission and given back once the batcher has admitted the request (or ended it). The
//! batcher drains the channel into its own order (by `priority`), so the channel's capacity
//! cannot be the bound.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct QueuePlaces {
    taken: AtomicUsize,
    max: usize,
}

impl QueuePlaces {
    pub fn new(max: usize) -> Self {
        Self {
            taken: AtomicUsize::new(0),
            max: max.max(1),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes a place; false when all are taken.
    pub fn take(&self) -> bool {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn give_back(&self) {
        let _ = self
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_up_to_the_bound_and_given_back() {
        let q = QueuePlaces::new(2);
        assert!(q.take() && q.take());
        assert!(!q.take());
        q.give_back();
        assert!(q.take());
        q.give_back();
        q.give_back();
        q.give_back(); // never below zero
        assert!(q.take() && q.take() && !q.take());
    }
}
