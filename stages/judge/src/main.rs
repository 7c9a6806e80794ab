//! `halo-judge`: pairwise LLM-as-a-judge evaluation of a candidate against a baseline, through
//! an OpenAI-compatible API or a rule verifier, with win rates, intervals and a report; and
//! `halo-judge compare` for several candidates side by side, and `halo-judge alpaca-eval` to
//! convert to and from alpaca_eval's files. See `halo-judge --help`.

mod alpaca_eval;
mod backends;
mod cache;
mod cli;
mod compare;
mod inputs;
mod judge;
mod report;
mod stage;
mod stats;
mod table;
mod templates;
mod verdict;

use clap::Parser;

fn main() {
    haloflow::stage_cli::main(|| {
        let mut argv: Vec<String> = std::env::args().collect();
        match argv.get(1).map(String::as_str) {
            Some("compare") => {
                argv.remove(1);
                compare::run(&cli::CompareArgs::parse_from(argv))
            }
            Some("alpaca-eval") => {
                argv.remove(1);
                alpaca_eval::run(&cli::AlpacaEvalArgs::parse_from(argv))
            }
            _ => stage::run(&cli::JudgeArgs::parse_from(argv)),
        }
    });
}
