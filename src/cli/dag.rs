//! `halo dag`.

use anyhow::Result;
use clap::Args;
use haloflow::pipeline::{InputRef, Pipeline, StageKind};

use super::PipelineArgs;

/// Arguments of `halo dag`.
#[derive(Args)]
pub struct DagArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Print Graphviz DOT instead of text.
    #[arg(long)]
    dot: bool,
}

/// Prints the stage graph.
pub fn dag(args: &DagArgs) -> Result<bool> {
    let pipeline = args.pipeline.load()?;
    print!("{}", if args.dot { dot(&pipeline) } else { text(&pipeline) });
    Ok(true)
}

fn program(kind: &StageKind) -> String {
    match kind {
        StageKind::Builtin(name) => format!("halo-{name}"),
        StageKind::Command(argv) => argv.join(" "),
    }
}

fn text(pipeline: &Pipeline) -> String {
    let mut out = String::new();
    for stage in &pipeline.stages {
        out.push_str(&format!("{} ({})\n", stage.name, program(&stage.kind)));
        for (name, input) in &stage.inputs {
            out.push_str(&format!("  <- {name}: {input}\n"));
        }
        for (name, schema) in &stage.outputs {
            out.push_str(&format!("  -> {name}: {}\n", schema.name));
        }
    }
    out
}

fn dot(pipeline: &Pipeline) -> String {
    let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n", pipeline.name);
    for stage in &pipeline.stages {
        out.push_str(&format!("  \"{}\" [label=\"{}\\n{}\"];\n", stage.name, stage.name, program(&stage.kind).replace('"', "'")));
        for (name, input) in &stage.inputs {
            match input {
                InputRef::Stage { stage: from, output } => {
                    out.push_str(&format!("  \"{from}\" -> \"{}\" [label=\"{output} → {name}\"];\n", stage.name))
                }
                InputRef::File(path) => {
                    let file = path.display().to_string();
                    out.push_str(&format!("  \"{file}\" [shape=note];\n  \"{file}\" -> \"{}\" [label=\"{name}\"];\n", stage.name));
                }
            }
        }
    }
    out.push_str("}\n");
    out
}
