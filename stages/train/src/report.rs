//! The training report: `report.md` with SVG curves (loss, rewards, margin, accuracy,
//! log-probs, KL, PPO's parts, gradient norm, learning rate; training and held-out
//! evaluation) and a table of first and last values. [`write`] serves both a training run and
//! `halo-train report`, which re-renders a report from an existing `metrics.parquet`.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use haloflow::plot::{self, Mark, Series};

use crate::metrics::Row;
use crate::ReportArgs;

/// One chart: file stem, title, y label and the training metrics it draws; each metric's
/// `eval/` counterpart, when present, is drawn beside it with markers.
struct Chart {
    stem: &'static str,
    title: &'static str,
    y: &'static str,
    metrics: &'static [&'static str],
}

const CHARTS: &[Chart] = &[
    Chart { stem: "loss", title: "Loss", y: "loss", metrics: &["loss"] },
    Chart { stem: "rewards", title: "Implied rewards (β·r), mean per class", y: "reward", metrics: &["rewards/chosen", "rewards/rejected"] },
    Chart { stem: "margins", title: "Reward margin (chosen − rejected)", y: "margin", metrics: &["rewards/margins"] },
    Chart { stem: "accuracies", title: "Reward accuracy (pairs whose margin exceeds the tolerance)", y: "accuracy", metrics: &["rewards/accuracies"] },
    Chart { stem: "logps", title: "Policy log-probs (summed over the completion)", y: "log-prob", metrics: &["logps/chosen", "logps/rejected"] },
    Chart { stem: "kl", title: "KTO reference point z0 (kl)", y: "z0", metrics: &["kl"] },
    Chart { stem: "ppo", title: "PPO loss parts", y: "value", metrics: &["ppo/policy", "ppo/critic", "ppo/kl"] },
    Chart { stem: "grad_norm", title: "Gradient norm (before clipping)", y: "norm", metrics: &["grad_norm"] },
    Chart { stem: "lr", title: "Learning rate", y: "lr", metrics: &["lr"] },
];

/// Metrics drawn without smoothing: they are not noisy.
const UNSMOOTHED: &[&str] = &["lr"];

/// The `(step, value)` points of `name`.
fn points(rows: &[Row], name: &str) -> Vec<(f64, f64)> {
    rows.iter().filter_map(|r| r.get(name).map(|v| (r.step as f64, v))).collect()
}

/// The series of one chart: per metric its raw curve (faded, under its EMA when `smoothing`
/// is above 0), then the evaluations with markers. Metrics without values are left out.
fn series(chart: &Chart, rows: &[Row], smoothing: f64) -> Vec<Series> {
    let mut lines = Vec::new();
    let mut color = 0;
    for &name in chart.metrics {
        let raw = points(rows, name);
        if raw.is_empty() {
            continue;
        }
        if smoothing > 0.0 && !UNSMOOTHED.contains(&name) {
            lines.push(Series::new(name, raw.clone(), color).with_mark(Mark::Faded));
            lines.push(Series::new(format!("{name} (EMA {smoothing})"), plot::ema(&raw, smoothing), color));
        } else {
            lines.push(Series::new(name, raw, color));
        }
        color += 1;
    }
    for &name in chart.metrics {
        let name = format!("eval/{name}");
        let eval = points(rows, &name);
        if !eval.is_empty() {
            lines.push(Series::new(name, eval, color).with_mark(Mark::Markers));
            color += 1;
        }
    }
    lines
}

/// Writes the report directory: `report.md` and one SVG per chart with data. `smoothing`
/// is the EMA weight of the training curves (TensorBoard's; 0: none), in `[0, 1)`.
pub fn write(dir: &Path, loss: &str, rows: &[Row], smoothing: f64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let steps = rows.iter().map(|r| r.step).max().unwrap_or(0);
    let mut md = format!("# Training report: `{loss}`\n\n{steps} optimizer steps.");
    if smoothing > 0.0 {
        md.push_str(&format!(" Training curves are smoothed by an exponential moving average of weight {smoothing} (TensorBoard's, debiased), drawn over the faded raw values; evaluations are the marked points."));
    }
    md.push_str("\n\n");
    for chart in CHARTS {
        let lines = series(chart, rows, smoothing);
        if lines.is_empty() {
            continue;
        }
        let svg = plot::line_chart(chart.title, "step", chart.y, &lines)?;
        plot::write_svg(&dir.join(format!("{}.svg", chart.stem)), &svg)?;
        md.push_str(&format!("## {}\n\n![{}]({}.svg)\n\n", chart.title, chart.title, chart.stem));
    }
    md.push_str("## First and last values\n\n| metric | first | last |\n|---|---|---|\n");
    let names: std::collections::BTreeSet<&String> = rows.iter().flat_map(|r| r.values.keys()).collect();
    for name in names {
        let first = rows.iter().find_map(|r| r.get(name));
        let last = rows.iter().rev().find_map(|r| r.get(name));
        let fmt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_else(|| "-".into());
        md.push_str(&format!("| {name} | {} | {} |\n", fmt(first), fmt(last)));
    }
    haloflow::io::write_atomic(&dir.join("report.md"), |w| Ok(std::io::Write::write_all(w, md.as_bytes())?))
}

/// Parses `--smoothing`: an EMA weight in `[0, 1)`.
pub fn smoothing_weight(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if (0.0..1.0).contains(&w) => Ok(w),
        _ => Err(format!("`{s}` is not an EMA weight in [0, 1) (0: no smoothing; TensorBoard's default is 0.6)")),
    }
}

/// `halo-train report`: re-renders a report from an existing `metrics.parquet`.
pub fn rerender(args: &ReportArgs) -> Result<()> {
    let rows = crate::metrics::read(&args.metrics)?;
    ensure!(!rows.is_empty(), "{}: no metrics rows", args.metrics.display());
    write(&args.report, &args.loss, &rows, args.smoothing)?;
    tracing::info!(rows = rows.len(), report = %args.report.display(), "report written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of a 3-step KTO run with an evaluation before and after.
    fn rows() -> Vec<Row> {
        let mut out = Vec::new();
        for step in 0..=3 {
            let mut row = Row::new(step, 0);
            let mut set = |k: &str, v: f64| {
                row.values.insert(k.to_string(), v);
            };
            if step > 0 {
                let s = step as f64;
                for (k, v) in [("loss", 0.5 - 0.01 * s), ("lr", 1e-4), ("grad_norm", 2.0 + s), ("kl", 0.01 * s)] {
                    set(k, v);
                }
                for (k, v) in [("rewards/chosen", 0.1 * s), ("rewards/rejected", -0.1 * s), ("rewards/margins", 0.2 * s)] {
                    set(k, v);
                }
            }
            if step == 0 || step == 3 {
                set("eval/loss", 0.5 - 0.02 * step as f64);
                set("eval/rewards/margins", 0.1 * step as f64);
            }
            out.push(row);
        }
        out
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn charts_are_drawn_from_the_metrics_that_exist() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "kto", &rows(), 0.6).unwrap();
        // KTO logs no accuracy: no accuracy chart, and no title promising one.
        assert!(!dir.path().join("accuracies.svg").exists());
        let md = read(dir.path(), "report.md");
        assert!(!md.to_lowercase().contains("accuracy"), "{md}");
        // The learning rate has its own chart, not the gradient norm's axis.
        assert!(read(dir.path(), "lr.svg").contains("Learning rate"));
        assert!(!read(dir.path(), "grad_norm.svg").contains("\nlr\n"));
        // The loss: raw faded under its EMA, evaluations with markers.
        let loss = read(dir.path(), "loss.svg");
        assert!(loss.contains("loss (EMA 0.6)") && loss.contains("eval/loss"));
        assert!(loss.matches("<circle").count() >= 2, "eval points have markers");
        assert!(dir.path().join("margins.svg").exists() && dir.path().join("kl.svg").exists());
    }

    #[test]
    fn no_smoothing_draws_the_raw_curves_only() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "kto", &rows(), 0.0).unwrap();
        assert!(!read(dir.path(), "loss.svg").contains("EMA"));
        assert_eq!(smoothing_weight("0.6"), Ok(0.6));
        assert!(smoothing_weight("1").is_err() && smoothing_weight("-0.1").is_err() && smoothing_weight("x").is_err());
    }

    #[test]
    fn a_report_rerenders_from_the_metrics_file() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.parquet");
        crate::metrics::write(&metrics, &rows(), &serde_json::Map::new()).unwrap();
        write(&dir.path().join("direct"), "kto", &rows(), 0.6).unwrap();
        let args = ReportArgs { metrics, report: dir.path().join("again"), loss: "kto".into(), smoothing: 0.6 };
        rerender(&args).unwrap();
        for name in ["report.md", "loss.svg", "rewards.svg", "margins.svg", "kl.svg", "grad_norm.svg", "lr.svg"] {
            assert_eq!(read(&dir.path().join("direct"), name), read(&dir.path().join("again"), name), "{name}");
        }
    }
}
