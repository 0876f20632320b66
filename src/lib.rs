//! exitserve: an OpenAI-compatible inference server for multi-exit language models.
//!
//! Dependencies point one way: [`http`] -> [`engine`] -> [`model`]; [`server`] wires them up.

#[doc(hidden)]
pub mod bench;
pub mod config;
pub mod engine;
pub mod http;
pub mod kernels;
pub mod model;
pub mod server;
