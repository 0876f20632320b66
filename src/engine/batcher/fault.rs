//! The phases of a step, as named in error messages, and the fault-injection hook the tests
//! use to make one of them panic. The hook itself exists only with the `fault-injection`
//! feature (on for the tests); without it `inject` is empty and compiles away.

/// The phases of the batcher's work, as named by fault injection and in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The step's own bookkeeping, around the phases below.
    Step,
    Admit,
    Plan,
    Forward,
    Score,
    Sample,
    Emit,
    Fork,
}

/// Test hook: panic in `phase` while handling a sequence whose prompt holds `token`.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub phase: Phase,
    pub token: u32,
}

/// Panics when `fault` targets `phase` and `tokens` hold its token. A free function so that
/// it can be called while a sequence is borrowed.
#[cfg(feature = "fault-injection")]
pub(super) fn inject(fault: Option<Fault>, phase: Phase, tokens: &[u32]) {
    if let Some(f) = fault {
        if f.phase == phase && tokens.contains(&f.token) {
            panic!("injected fault in {phase:?}");
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(super) fn inject(_: Option<Fault>, _: Phase, _: &[u32]) {}
