//! The training report: `report.md` with SVG curves (loss, rewards, margins, KL, gradient
//! norm, learning rate, and the held-out evaluation) and a table of first and last values.

use std::path::Path;

use anyhow::{Context, Result};
use haloflow::plot::{self, Series};

use crate::metrics::Row;

/// Charts: file stem, title, y label, metric names.
const CHARTS: &[(&str, &str, &str, &[&str])] = &[
    ("loss", "Training loss", "loss", &["loss", "eval/loss"]),
    ("rewards", "Implied rewards (β·r)", "reward", &["rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected"]),
    ("margins", "Reward margin and accuracy", "value", &["rewards/margins", "eval/rewards/margins", "rewards/accuracies", "eval/rewards/accuracies"]),
    ("kl", "KTO reference point z0", "kl", &["kl"]),
    ("optimizer", "Gradient norm and learning rate", "value", &["grad_norm", "lr"]),
];

fn series(rows: &[Row], name: &str) -> Series {
    Series { name: name.to_string(), points: rows.iter().filter_map(|r| r.get(name).map(|v| (r.step as f64, v))).collect() }
}

/// Writes the report directory (replacing an old one).
pub fn write(dir: &Path, loss: &str, rows: &[Row]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut md = format!("# Training report: `{loss}`\n\n{} optimizer steps.\n\n", rows.iter().map(|r| r.step).max().unwrap_or(0));
    for (stem, title, y, names) in CHARTS {
        let lines: Vec<Series> = names.iter().map(|n| series(rows, n)).filter(|s| !s.points.is_empty()).collect();
        if lines.is_empty() {
            continue;
        }
        let svg = plot::line_chart(title, "step", y, &lines)?;
        plot::write_svg(&dir.join(format!("{stem}.svg")), &svg)?;
        md.push_str(&format!("## {title}\n\n![{title}]({stem}.svg)\n\n"));
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
