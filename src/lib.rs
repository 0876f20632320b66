//! exitserve: an OpenAI-compatible inference server for multi-exit language models.
//!
//! Dependencies point one way: [`http`] -> [`engine`] -> [`model`] -> [`kernels`]; [`server`]
//! wires them up. Every `unsafe` line lives in [`kernels`], the one module allowed it.
#![deny(unsafe_code)]

pub mod config;
pub mod engine;
pub mod http;
#[allow(unsafe_code)]
pub mod kernels;
pub mod model;
pub mod server;
