//! The report directory: `report.md` (counts, win rates with intervals, the sign test, the
//! weighted win rate, lengths, position-bias diagnostics, categories, examples of invalid
//! answers) and `win_rate.svg`. The stage adds alpaca_eval's `annotations.json`.

use std::path::Path;

use anyhow::{Context, Result};
use haloflow::plot::{self, Bar};

use crate::inputs::Pair;
use crate::judge::Judgment;
use crate::stats::Summary;
use crate::verdict::Verdict;

/// Invalid judgments shown as examples in the report.
const INVALID_EXAMPLES: usize = 10;
/// Characters of a raw answer shown in a table cell.
const CELL_CHARS: usize = 160;

/// A bar of a win-rate chart (no bar when the rate is unknown).
pub fn rate_bar(label: &str, rate: Option<f64>, ci: Option<[f64; 2]>) -> Bar {
    Bar { label: label.to_string(), value: rate.unwrap_or(f64::NAN), low: ci.map(|c| c[0]), high: ci.map(|c| c[1]) }
}

/// `0.625 [0.512, 0.726]`, or `n/a`.
pub fn fmt_rate(rate: Option<f64>, ci: Option<[f64; 2]>) -> String {
    match (rate, ci) {
        (Some(r), Some([lo, hi])) => format!("{r:.3} [{lo:.3}, {hi:.3}]"),
        (Some(r), None) => format!("{r:.3}"),
        (None, _) => "n/a".to_string(),
    }
}

/// Text made safe for one Markdown table cell, shortened.
pub fn cell(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|");
    let mut short: String = flat.chars().take(CELL_CHARS).collect();
    if short.len() < flat.len() {
        short.push('…');
    }
    short
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"))
}

/// The report's Markdown.
pub fn markdown(summary: &Summary, pairs: &[Pair], judgments: &[Judgment]) -> String {
    let s = summary;
    let t = &s.overall;
    let judge = match &s.judge.model {
        Some(model) => format!("`{}` (`{model}`)", s.judge.backend),
        None => format!("`{}`", s.judge.backend),
    };
    let mut md = format!("# Judge report: `{}` vs `{}`\n\n", cell(&s.candidate), cell(&s.baseline));
    let template = s.judge.template.as_deref().map_or(String::new(), |t| format!(", template `{t}`"));
    md += &format!("Judge {judge}{template}, order `{}`, seed {}.\n\n", s.judge.order, s.judge.seed);
    md += "| pairs | count |\n|---|---|\n";
    for (name, n) in [("candidate wins", t.wins), ("baseline wins", t.losses), ("ties", t.ties), ("invalid", t.invalid), ("total", t.n)] {
        md += &format!("| {name} | {n} |\n");
    }
    md += &format!(
        "\n**Win rate** (ties as half, over {} valid pairs, 95% Wilson interval): **{}**\n\n",
        t.wins + t.losses + t.ties,
        fmt_rate(t.win_rate, t.win_rate_ci95)
    );
    md += &format!(
        "**Sign test** (paired, exact, two-sided; {} wins vs {} losses, ties left out): p = {}\n\n",
        t.wins,
        t.losses,
        fmt_opt(t.sign_test_p_value, 4)
    );
    md += &match s.weighted_win_rate {
        Some(w) => format!(
            "**Weighted win rate** (AlpacaEval 2.0: mean probability the judge gives the candidate, over {} requests with label probabilities): {w:.3}\n\n",
            s.weighted_requests
        ),
        None => "**Weighted win rate**: n/a (no answer carried label probabilities; the win rate above counts verdicts)\n\n".to_string(),
    };
    md += &match &s.length_controlled {
        Some(lc) => format!(
            "**Length-controlled win rate** (at equal lengths, 95% interval): {} (length coefficient {:.3}, scale {:.0} chars)\n\n",
            fmt_rate(Some(lc.win_rate), Some(lc.ci95)),
            lc.length_coefficient,
            lc.length_scale_chars
        ),
        None => "**Length-controlled win rate**: n/a (fewer than two valid pairs, or all outcomes equal)\n\n".to_string(),
    };
    md += "![win rate](win_rate.svg)\n\n## Lengths\n\n| mean | candidate | baseline |\n|---|---|---|\n";
    md += &format!("| characters | {:.1} | {:.1} |\n", s.lengths.candidate_chars, s.lengths.baseline_chars);
    md += &format!("| tokens | {} | {} |\n", fmt_opt(s.lengths.candidate_tokens, 1), fmt_opt(s.lengths.baseline_tokens, 1));
    let j = &s.judgments;
    md += &format!(
        "\n## Judge requests and position bias\n\n- {} requests, {} with an invalid verdict, {} without an answer\n\
         - orders agree on {} of the pairs judged in both orders with valid verdicts\n\
         - the output shown first is preferred in {} of the decided verdicts (0.5 = no position bias)\n",
        j.n,
        j.invalid,
        j.failed,
        fmt_opt(j.position_consistency, 3),
        fmt_opt(j.first_position_preferred, 3)
    );
    if s.unmatched_candidates > 0 {
        md += &format!("- {} candidate samples had no baseline reply and were left out\n", s.unmatched_candidates);
    }
    if !s.by_category.is_empty() {
        md += "\n## By category\n\n| category | pairs | wins | losses | ties | invalid | win rate [95% CI] |\n|---|---|---|---|---|---|---|\n";
        for (c, t) in &s.by_category {
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                cell(c),
                t.n,
                t.wins,
                t.losses,
                t.ties,
                t.invalid,
                fmt_rate(t.win_rate, t.win_rate_ci95)
            );
        }
    }
    let invalid: Vec<&Judgment> = judgments.iter().filter(|j| j.verdict() == Verdict::Invalid).take(INVALID_EXAMPLES).collect();
    if !invalid.is_empty() {
        md += &format!("\n## Invalid verdicts (first {})\n\n", invalid.len());
        md += "| prompt_id | shown first | answer or error |\n|---|---|---|\n";
        for j in invalid {
            let text = match &j.outcome {
                Ok(a) => format!("answer: {}", a.raw),
                Err(f) => format!("error: {}", f.reason),
            };
            md += &format!("| {} | {} | {} |\n", pairs[j.pair].prompt_id, j.first.as_str(), cell(&text));
        }
    }
    md
}

/// Writes `report.md` and `win_rate.svg` into `dir`.
pub fn write(dir: &Path, summary: &Summary, pairs: &[Pair], judgments: &[Judgment]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut bars = vec![rate_bar("win rate", summary.overall.win_rate, summary.overall.win_rate_ci95)];
    if let Some(lc) = &summary.length_controlled {
        bars.push(rate_bar("length-controlled", Some(lc.win_rate), Some(lc.ci95)));
    }
    bars.extend(summary.by_category.iter().map(|(c, t)| rate_bar(c, t.win_rate, t.win_rate_ci95)));
    let title = format!("Win rate of {} vs {}", summary.candidate, summary.baseline);
    let svg = plot::bar_chart(&title, "win rate (95% CI)", &bars, Some((0.0, 1.0)), Some(0.5))?;
    plot::write_svg(&dir.join("win_rate.svg"), &svg)?;
    let md = markdown(summary, pairs, judgments);
    haloflow::io::write_atomic(&dir.join("report.md"), |w| Ok(std::io::Write::write_all(w, md.as_bytes())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_title_names_the_candidate_and_baseline() {
        let summary = crate::stats::tests::summary("kto", "base");
        let md = markdown(&summary, &[], &[]);
        assert!(md.starts_with("# Judge report: `kto` vs `base`\n"), "{md}");
        assert!(md.contains("**Sign test** (paired, exact, two-sided; 7 wins vs 2 losses, ties left out): p = 0.1797"), "{md}");
        assert!(md.contains("**Weighted win rate**: n/a"), "{md}");
    }

    #[test]
    fn cells_are_flat_escaped_and_short() {
        assert_eq!(cell("a |b\n\nc"), "a \\|b c");
        assert_eq!(cell(&"x".repeat(500)).chars().count(), CELL_CHARS + 1);
        assert_eq!(fmt_rate(Some(0.5), Some([0.25, 0.75])), "0.500 [0.250, 0.750]");
        assert_eq!(fmt_rate(None, None), "n/a");
        assert!(rate_bar("x", None, None).value.is_nan());
    }
}
