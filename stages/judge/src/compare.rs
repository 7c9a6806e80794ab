//! `halo-judge compare`: several candidates' summaries (e.g. KTO, DPO, SFT against the same
//! baseline) in one Markdown table (`compare.md`) and one bar chart with intervals
//! (`win_rates.svg`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use haloflow::plot;

use crate::cli::CompareArgs;
use crate::report::{cell, fmt_rate, rate_bar};
use crate::stats::Summary;

/// Reads a summary written by the judge stage.
pub fn read_summary(path: &Path) -> Result<Summary> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a halo-judge summary", path.display()))
}

/// The comparison's Markdown for `(name, summary)` rows.
pub fn markdown(rows: &[(String, Summary)]) -> String {
    let mut baselines: Vec<&str> = rows.iter().map(|(_, s)| s.baseline.as_str()).collect();
    baselines.dedup();
    let names: Vec<String> = baselines.iter().map(|b| cell(b)).collect();
    let mut md = format!("# Win rates against `{}`\n\n", names.join("`, `"));
    if baselines.len() > 1 {
        md += "**Warning:** the summaries do not share one baseline; their win rates are not comparable.\n\n";
    }
    md += "Win rate: ties as half, over valid pairs, with its 95% Wilson interval. Sign test: the exact \
           two-sided p-value of wins against losses. Length-controlled: the predicted win rate at equal \
           lengths (see each summary's `methods`).\n\n";
    md += "| candidate | pairs | wins | losses | ties | invalid | win rate [95% CI] | sign test p | length-controlled [95% CI] | mean chars (candidate / baseline) | judge |\n\
           |---|---|---|---|---|---|---|---|---|---|---|\n";
    for (name, s) in rows {
        let t = &s.overall;
        let lc = s.length_controlled.as_ref();
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} / {:.0} | {} {} ({}) |\n",
            cell(name),
            t.n,
            t.wins,
            t.losses,
            t.ties,
            t.invalid,
            fmt_rate(t.win_rate, t.win_rate_ci95),
            t.sign_test_p_value.map_or("n/a".to_string(), |p| format!("{p:.4}")),
            fmt_rate(lc.map(|l| l.win_rate), lc.map(|l| l.ci95)),
            s.lengths.candidate_chars,
            s.lengths.baseline_chars,
            s.judge.backend,
            cell(s.judge.model.as_deref().unwrap_or("")),
            s.judge.template.as_deref().unwrap_or("-"),
        );
    }
    md + "\n![win rates](win_rates.svg)\n"
}

/// Runs the subcommand.
pub fn run(args: &CompareArgs) -> Result<()> {
    if !args.name.is_empty() && args.name.len() != args.summary.len() {
        bail!("{} --name given for {} --summary; give one per summary, or none", args.name.len(), args.summary.len());
    }
    let mut rows = Vec::with_capacity(args.summary.len());
    for (i, path) in args.summary.iter().enumerate() {
        let summary = read_summary(path)?;
        rows.push((args.name.get(i).cloned().unwrap_or_else(|| summary.candidate.clone()), summary));
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let bars: Vec<plot::Bar> = rows.iter().map(|(n, s)| rate_bar(n, s.overall.win_rate, s.overall.win_rate_ci95)).collect();
    let title = format!("Win rate vs {}", rows[0].1.baseline);
    let svg = plot::bar_chart(&title, "win rate (95% CI)", &bars, Some((0.0, 1.0)), Some(0.5))?;
    plot::write_svg(&args.out.join("win_rates.svg"), &svg)?;
    let md = markdown(&rows);
    haloflow::io::write_atomic(&args.out.join("compare.md"), |w| Ok(std::io::Write::write_all(w, md.as_bytes())?))?;
    tracing::info!(candidates = rows.len(), out = %args.out.display(), "comparison written");
    Ok(())
}
