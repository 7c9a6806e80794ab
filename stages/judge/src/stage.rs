//! The judge stage: read the inputs, judge every pair, write the judgments, the summary and the
//! report (with alpaca_eval's `annotations.json`), and fail when too many requests got no answer.

use anyhow::{bail, Result};

use crate::alpaca_eval;
use crate::backends;
use crate::cache::{self, Cache};
use crate::cli::{self, JudgeArgs};
use crate::inputs;
use crate::judge;
use crate::report;
use crate::stats::{self, JudgeInfo, Summary, Tally};
use crate::table;
use crate::templates::Template;

/// Runs the stage.
pub fn run(args: &JudgeArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.max_failed_fraction) {
        bail!("--max-failed-fraction must be within [0, 1], found {}", args.max_failed_fraction);
    }
    let template = match &args.template_file {
        Some(path) => Template::from_file(path)?,
        None => Template::builtin(&args.template)?,
    };
    tracing::info!(template = %template.name, "{}", template.description);
    let backend = backends::build(args, &template)?;
    let inputs = inputs::load(&args.candidate, &args.baseline, args.prompts.as_deref())?;
    let cache_dir = cache::dir(args.cache_dir.as_deref());
    tracing::info!(cache = %cache_dir.display(), "answer cache");
    let mut cache = Cache::open(&cache_dir)?;
    let (judgments, run) = judge::run(&inputs.pairs, &template, backend.as_ref(), &mut cache, args.order, args.seed)?;
    tracing::info!(
        requests = run.requests,
        asked = run.asked,
        failed = run.failed,
        seconds = %format!("{:.2}", run.seconds),
        per_s = %format!("{:.1}", run.asked as f64 / run.seconds.max(1e-9)),
        "judged"
    );
    let verdicts = judge::pair_verdicts(inputs.pairs.len(), &judgments);
    let (weighted_win_rate, weighted_from, weighted_requests) = stats::weighted_win_rate(&judgments);
    let summary = Summary {
        candidate: args.candidate_name.clone().unwrap_or(inputs.candidate_name),
        baseline: args.baseline_name.clone().unwrap_or(inputs.baseline_name),
        judge: JudgeInfo {
            backend: cli::value_name(&args.backend),
            model: backend.model(),
            template: backend.uses_template().then(|| template.name.clone()),
            order: cli::value_name(&args.order),
            seed: args.seed,
        },
        overall: Tally::of(verdicts.iter().copied()),
        weighted_win_rate,
        weighted_from: weighted_from.to_string(),
        weighted_requests,
        length_controlled: stats::length_controlled(&inputs.pairs, &verdicts),
        lengths: stats::lengths(&inputs.pairs),
        judgments: stats::judgment_stats(inputs.pairs.len(), &judgments),
        by_category: stats::by_category(&inputs.pairs, &verdicts),
        unmatched_candidates: inputs.unmatched,
        methods: stats::methods(),
    };
    table::write(&args.judgments, &inputs.pairs, &judgments, &verdicts)?;
    haloflow::io::write_json(&args.summary, &summary)?;
    report::write(&args.report, &summary, &inputs.pairs, &judgments)?;
    let annotations = alpaca_eval::annotations(&summary, &inputs.pairs, &judgments, &verdicts);
    haloflow::io::write_json(&args.report.join("annotations.json"), &annotations)?;
    track(&summary)?;
    let t = &summary.overall;
    tracing::info!(
        pairs = t.n,
        wins = t.wins,
        losses = t.losses,
        ties = t.ties,
        invalid = t.invalid,
        win_rate = %report::fmt_rate(t.win_rate, t.win_rate_ci95),
        "summary"
    );
    let failed = summary.judgments.failed;
    if failed as f64 > args.max_failed_fraction * run.requests as f64 {
        let first = judgments.iter().find_map(|j| j.outcome.as_ref().err()).map_or("", |f| f.reason.as_str());
        bail!(
            "{failed} of {} judge requests got no answer (more than --max-failed-fraction {}); first error: {first}. \
             The answers received are cached in {}: a rerun asks only for the rest",
            run.requests,
            args.max_failed_fraction,
            cache_dir.display()
        );
    }
    Ok(())
}

/// Streams the verdict counts and win rates to the run's tracking directory when the runner
/// gives one (`HALO_TRACKING_DIR`; see `haloflow::tracking`), as scalars at step 0 with the
/// judge's settings as hyperparameters.
fn track(summary: &Summary) -> Result<()> {
    let Some(dir) = std::env::var_os(haloflow::tracking::TRACKING_DIR_ENV) else { return Ok(()) };
    let info = &summary.judge;
    let hparams = serde_json::json!({"candidate": summary.candidate, "baseline": summary.baseline, "backend": info.backend, "model": info.model, "order": info.order, "seed": info.seed});
    let mut tracker = haloflow::tracking::Tracker::create(std::path::Path::new(&dir), hparams.as_object().expect("an object"))?;
    let t = &summary.overall;
    let mut values = vec![("judge/wins".to_string(), t.wins as f64), ("judge/losses".into(), t.losses as f64), ("judge/ties".into(), t.ties as f64)];
    let optional = [("judge/win_rate", t.win_rate), ("judge/sign_test_p_value", t.sign_test_p_value), ("judge/weighted_win_rate", summary.weighted_win_rate), ("judge/length_controlled_win_rate", summary.length_controlled.as_ref().map(|l| l.win_rate))];
    values.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))));
    tracker.log(0, &values)
}
