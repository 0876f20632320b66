//! The compute threads besides ours: candle 0.11 runs its element-wise ops on tensors of 64K
//! elements and more (a prompt's residual adds, its bias and activation passes) on a pool of
//! its own, one worker fewer than the cores, whose workers spin up to
//! `CANDLE_BARRIER_POOL_SPIN_LIMIT` times (25,000 by default) after each op before they sleep.
//! Our own kernels run on rayon's pool of one thread per core, so each spin takes a core from
//! them: on 512-token echo scoring of GPT-Neo-125M's shape (int8, 2 cores of an AMD Zen 4) the
//! spinning worker was 6 % of the samples (`perf`) and ~10 % of the process's CPU time. With a
//! limit of 100 it sleeps after a few microseconds: its CPU time fell 150 -> 32 cs and the
//! process's for the same scoring work 10.0-10.8 -> 8.7-9.5 s (three runs each; throughput
//! moved within this VM's noise). A limit the operator sets is kept.

use std::ffi::OsStr;

/// The variable candle's pool reads when it starts.
pub const CANDLE_SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The spin limit set where the operator set none.
pub const CANDLE_SPIN_LIMIT: &str = "100";

/// Sets candle's spin limit unless the environment has one. Call it first in `main`, before
/// any thread exists (the environment is process-wide) and before candle's pool starts.
pub fn quiet_candle_pool() {
    if let Some(limit) = spin_limit_to_set(std::env::var_os(CANDLE_SPIN_LIMIT_VAR).as_deref()) {
        std::env::set_var(CANDLE_SPIN_LIMIT_VAR, limit);
    }
}

/// The limit to set given the variable's current value: ours where it is unset.
fn spin_limit_to_set(current: Option<&OsStr>) -> Option<&'static str> {
    match current {
        None => Some(CANDLE_SPIN_LIMIT),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operators_spin_limit_is_kept_and_ours_fills_a_gap() {
        assert_eq!(spin_limit_to_set(None), Some("100"));
        assert_eq!(spin_limit_to_set(Some(OsStr::new("25000"))), None);
        assert_eq!(spin_limit_to_set(Some(OsStr::new(""))), None);
    }
}
