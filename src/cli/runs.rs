//! `halo runs`: the sweep table.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use haloflow::manifest::{Manifest, Status};
use haloflow::pipeline::StageKind;
use haloflow::plot::{self, Bar};
use serde_json::Value;

use super::PipelineArgs;

/// Arguments of `halo runs`.
#[derive(Args)]
pub struct RunsArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Also write the table as CSV here.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Also draw the judges' win rates per sweep point (SVG) here.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

/// A cell: a final metric of a train instance or a judge instance's win rate.
struct Column {
    header: String,
    /// The stage name without the point's suffix, and how to read a value from its summary.
    stage: String,
    read: fn(&Value) -> Option<String>,
}

fn fmt(v: Option<f64>) -> Option<String> {
    v.map(|x| format!("{x:.4}"))
}

/// Prints one row per sweep point of the last run: the point's params, each train instance's
/// final loss (and eval loss) and each judge instance's win rate with its 95% interval.
pub fn runs(args: &RunsArgs) -> Result<bool> {
    let pipeline = args.pipeline.load_as_last_run()?;
    if pipeline.sweeps.is_empty() {
        bail!("pipeline {} has no sweep: give a stage a `matrix = {{ PARAM = [values] }}`", pipeline.name);
    }
    let manifest = Manifest::load_lock(&pipeline.work_dir, &pipeline.name)?;
    let summary = |stage: &str| -> Option<Value> {
        let record = manifest.as_ref()?.stage(stage)?;
        if !matches!(record.status, Status::Ran | Status::Cached | Status::NotRun) {
            return None;
        }
        let path = &record.outputs.get("summary")?.path;
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    };
    let mut csv = String::new();
    let mut bars = Vec::new();
    for sweep in &pipeline.sweeps {
        let first = &sweep.points[0].suffix;
        let mut columns = Vec::new();
        for base in &sweep.stages {
            let stage = pipeline.stage(&format!("{base}{first}"))?;
            let base = base.clone();
            match &stage.kind {
                StageKind::Builtin(b) if b == "train" => {
                    columns.push(Column { header: format!("{base} loss"), stage: base.clone(), read: |s| fmt(s["last"]["loss"].as_f64()) });
                    columns.push(Column { header: format!("{base} eval/loss"), stage: base, read: |s| fmt(s["last"]["eval/loss"].as_f64()) });
                }
                StageKind::Builtin(b) if b == "judge" => {
                    columns.push(Column {
                        header: format!("{base} win rate (95% CI)"),
                        stage: base,
                        read: |s| {
                            let ci = s["win_rate_ci95"].as_array().map(|c| format!(" ({:.3}–{:.3})", c[0].as_f64().unwrap_or(f64::NAN), c[1].as_f64().unwrap_or(f64::NAN)));
                            fmt(s["win_rate"].as_f64()).map(|w| w + &ci.unwrap_or_default())
                        },
                    });
                }
                _ => {}
            }
        }
        let keys: Vec<&str> = sweep.points[0].params.iter().map(|(k, _)| k.as_str()).collect();
        let header: Vec<String> = std::iter::once(sweep.stage.clone()).chain(keys.iter().map(|k| k.to_string())).chain(columns.iter().map(|c| c.header.clone())).collect();
        println!("| {} |", header.join(" | "));
        println!("|{}", "---|".repeat(header.len()));
        csv += &(header.iter().map(|h| csv_field(h)).collect::<Vec<_>>().join(",") + "\n");
        for point in &sweep.points {
            let mut row = vec![format!("{}{}", sweep.stage, point.suffix)];
            row.extend(point.params.iter().map(|(_, v)| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())));
            for c in &columns {
                let instance = format!("{}{}", c.stage, point.suffix);
                let value = summary(&instance).and_then(|s| (c.read)(&s));
                if c.header.contains("win rate") {
                    if let Some(s) = summary(&instance) {
                        let ci = s["win_rate_ci95"].as_array().and_then(|c| Some((c[0].as_f64()?, c[1].as_f64()?)));
                        bars.push(Bar { label: format!("{} {}", c.stage, point.suffix), value: s["win_rate"].as_f64().unwrap_or(f64::NAN), low: ci.map(|c| c.0), high: ci.map(|c| c.1) });
                    }
                }
                row.push(value.unwrap_or_else(|| "—".into()));
            }
            println!("| {} |", row.join(" | "));
            csv += &(row.iter().map(|h| csv_field(h)).collect::<Vec<_>>().join(",") + "\n");
        }
        println!();
    }
    if let Some(path) = &args.csv {
        haloflow::io::write_atomic(path, |w| Ok(std::io::Write::write_all(w, csv.as_bytes())?))?;
    }
    if let Some(path) = &args.plot {
        let svg = plot::bar_chart(&format!("{}: win rate per sweep point", pipeline.name), "win rate (95% CI)", &bars, Some((0.0, 1.0)), Some(0.5))?;
        plot::write_svg(path, &svg)?;
    }
    Ok(true)
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}
