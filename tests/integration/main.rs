//! The integration tests, in one binary: each test binary links all of candle, so one binary
//! instead of sixteen builds and links faster and takes a fraction of the disk. Each file is
//! a concern; `tests/common` holds what they share (fixtures, the test server, clients).

#[path = "../common/mod.rs"]
mod common;
// The bench's random-checkpoint writer, for a model big enough to be slow (`process.rs`).
#[allow(dead_code)]
#[path = "../../bench/src/checkpoint.rs"]
mod checkpoint;

mod architectures;
mod bad_input;
mod batching;
mod chat;
mod deploy;
mod docs;
mod early_exit;
mod evaluation;
mod gpu_path;
mod hardening;
mod http_api;
mod hub;
mod inspect;
mod openapi;
mod parity;
mod prefix_cache;
mod process;
mod resource_bounds;
mod speculative;
mod strategies;
mod structured;
