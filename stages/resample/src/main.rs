//! `halo-resample`: the built-in `resample` stage of haloflow.
//!
//! Reads a `binary` table, keeps a seeded fraction of each class, sets the KTO class weights
//! λ_D/λ_U (the paper's Eq. 8 unless given), and writes the stratified batch plan (`plan`
//! schema, with λ and the plan settings in its schema metadata) and a JSON summary.
//! `halo-resample --help` documents the arguments.

mod batch_plan;
mod cli;
mod kl_pairs;
mod lambda;
mod rng;
mod stage;
mod subset;
mod summary;
#[cfg(test)]
mod test_rows;

use clap::Parser;

fn main() {
    let args = cli::Args::parse();
    haloflow::stage_cli::main(|| stage::run(&args).map(|_| ()));
}
