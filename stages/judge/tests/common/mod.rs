//! Shared by the integration tests: the fake OpenAI-compatible server and table fixtures.

pub mod fixtures;
pub mod server;
