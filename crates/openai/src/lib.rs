//! Talking to OpenAI-compatible APIs (OpenAI, vLLM, llama.cpp's `llama-server`, TGI), as
//! halo-judge and halo-sample both do:
//!
//! * [`client`]: the command-line flags ([`client::ClientArgs`]) and a [`client::Client`] that
//!   POSTs JSON with retries (429, 5xx, timeouts; honouring `Retry-After`) and keeps the API key
//!   out of everything it returns;
//! * [`redact`]: removing the key, whole or in pieces, from text;
//! * [`pool`]: running requests on a bounded number of threads, results handled on the caller's;
//! * [`cache`]: the resumable on-disk answer cache (one JSON line per answer) and its keys.
//!
//! With the `fake-server` feature, [`fake`] is a small OpenAI-compatible server for tests.

pub mod cache;
pub mod client;
#[cfg(feature = "fake-server")]
pub mod fake;
pub mod pool;
pub mod redact;
