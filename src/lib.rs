//! haloflow: a workflow engine for aligning language models with human-aware losses.
//!
//! This crate holds the core library shared by the `halo` runner and the stage binaries:
//! the Arrow [`schema`] contract, typed [`records`], atomic Arrow/Parquet [`io`], the
//! [`pipeline`] format, content [`hashing`], the stage [`cache`], run [`manifest`]s, the
//! built-in [`stages`] registry and the [`runner`].

pub mod io;
pub mod records;
pub mod schema;
pub mod shared;
pub mod stage_cli;
pub mod stages;
pub mod sweep;
pub mod tracking;
pub mod cache;
pub mod hashing;
pub mod export;
pub mod manifest;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod runner;
pub mod slurm;
