//! `halo`: runs haloflow pipelines. See `halo --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
