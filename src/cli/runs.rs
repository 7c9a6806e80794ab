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

/// What a table shows of a stage that follows a sweep.
enum Shown {
    /// A train stage: its final loss and eval loss.
    Train,
    /// A judge stage: its win rate with the 95% interval (and a bar in the plot).
    Judge,
}

/// The stage (its name without the point's suffix) and what is shown of it.
struct Part {
    stage: String,
    shown: Shown,
}

impl Part {
    fn headers(&self) -> Vec<String> {
        match self.shown {
            Shown::Train => vec![format!("{} loss", self.stage), format!("{} eval/loss", self.stage)],
            Shown::Judge => vec![format!("{} win rate (95% CI)", self.stage)],
        }
    }

    /// The cells of one instance from its summary ("—" where a value is missing).
    fn cells(&self, summary: Option<&Value>) -> Vec<String> {
        let fmt = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |x| format!("{x:.4}"));
        let get = |f: fn(&Value) -> Option<f64>| fmt(summary.and_then(f));
        match self.shown {
            Shown::Train => vec![get(|s| s["last"]["loss"].as_f64()), get(|s| s["last"]["eval/loss"].as_f64())],
            Shown::Judge => {
                let ci = summary.and_then(ci95).map(|(lo, hi)| format!(" ({lo:.3}–{hi:.3})")).unwrap_or_default();
                vec![get(|s| s["win_rate"].as_f64()) + &ci]
            }
        }
    }
}

/// A judge summary's 95% interval of the win rate.
fn ci95(summary: &Value) -> Option<(f64, f64)> {
    let c = summary["win_rate_ci95"].as_array()?;
    Some((c.first()?.as_f64()?, c.get(1)?.as_f64()?))
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
    let mut line = |cells: &[String]| {
        println!("| {} |", cells.join(" | "));
        csv += &(cells.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(",") + "\n");
    };
    let mut bars = Vec::new();
    for sweep in &pipeline.sweeps {
        let first = &sweep.points[0].suffix;
        let mut parts = Vec::new();
        for base in &sweep.stages {
            let shown = match &pipeline.stage(&format!("{base}{first}"))?.kind {
                StageKind::Builtin(b) if b == "train" => Shown::Train,
                StageKind::Builtin(b) if b == "judge" => Shown::Judge,
                _ => continue,
            };
            parts.push(Part { stage: base.clone(), shown });
        }
        let keys = sweep.points[0].params.iter().map(|(k, _)| k.clone());
        let header: Vec<String> = std::iter::once(sweep.stage().to_string()).chain(keys).chain(parts.iter().flat_map(Part::headers)).collect();
        let columns = header.len();
        line(&header);
        println!("|{}", "---|".repeat(columns));
        for point in &sweep.points {
            let mut row = vec![format!("{}{}", sweep.stage(), point.suffix)];
            row.extend(point.params.iter().map(|(_, v)| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())));
            for part in &parts {
                let found = summary(&format!("{}{}", part.stage, point.suffix));
                row.extend(part.cells(found.as_ref()));
                if let (Shown::Judge, Some(s)) = (&part.shown, &found) {
                    let ci = ci95(s);
                    bars.push(Bar { label: format!("{} {}", part.stage, point.suffix), value: s["win_rate"].as_f64().unwrap_or(f64::NAN), low: ci.map(|c| c.0), high: ci.map(|c| c.1) });
                }
            }
            line(&row);
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
