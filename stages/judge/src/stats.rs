//! Summary statistics: counts, the win rate with its Wilson interval and a paired sign test, a
//! length-controlled win rate, the weighted win rate, mean lengths, and position-bias
//! diagnostics. The formulas are in the crate's README and
//! in [`METHODS`], which every summary carries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::inputs::Pair;
use crate::judge::Judgment;
use crate::verdict::{Shown, Verdict};

/// The normal quantile of a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// How the summary's numbers are computed (written into every summary).
pub const METHODS: &[(&str, &str)] = &[
    ("win_rate", "(wins + ties/2) / (wins + losses + ties): invalid pairs are left out"),
    (
        "weighted_win_rate",
        "AlpacaEval 2.0's weighted win rate: mean, over the answered requests whose answer carries \
         the verdict labels' probabilities (weighted_requests of them; both orders), of the \
         probability the judge gives the candidate: its label's probability plus half the tie \
         label's. The local judge scores every label; the openai judge reads the first answer \
         token's top_logprobs, normalised over the labels found there (an absent label counts 0). \
         Null, with weighted_from = verdicts, when no answer carries them: use win_rate",
    ),
    (
        "sign_test_p_value",
        "two-sided exact sign test of wins against losses (ties and invalid pairs left out): \
         2·P(X ≤ min(wins, losses)) for X ~ Binomial(wins + losses, 1/2), at most 1; the exact \
         McNemar test of the paired outcomes",
    ),
    (
        "win_rate_ci95",
        "Wilson score interval at z = 1.96 with n = wins + losses + ties and p = win_rate: \
         (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)",
    ),
    (
        "length_controlled",
        "logistic regression of the pair outcome (1 win, 0.5 tie, 0 loss) on x = tanh(d/s), d = \
         candidate chars - baseline chars, s = standard deviation of d over valid pairs: \
         logit P(win) = b0 + b1·x, fitted by Newton's method; the length-controlled win rate is \
         sigmoid(b0), the predicted win rate at equal lengths, its interval sigmoid(b0 ± 1.96·se(b0))",
    ),
    ("pairs", "orders that disagree count as a tie; a pair with an invalid order is invalid"),
];

/// Verdict counts and the win rate of a set of pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Pairs.
    pub n: usize,
    /// Pairs the candidate won.
    pub wins: usize,
    /// Pairs the baseline won.
    pub losses: usize,
    /// Tied pairs (judged ties and orders that disagree).
    pub ties: usize,
    /// Pairs without a valid verdict.
    pub invalid: usize,
    /// Win rate with ties as half, over valid pairs; null without valid pairs.
    pub win_rate: Option<f64>,
    /// 95% Wilson interval of the win rate.
    pub win_rate_ci95: Option<[f64; 2]>,
    /// Two-sided exact sign test of wins against losses; null without wins or losses.
    #[serde(default)]
    pub sign_test_p_value: Option<f64>,
}

impl Tally {
    /// Counts `verdicts`.
    pub fn of(verdicts: impl IntoIterator<Item = Verdict>) -> Tally {
        let mut t =
            Tally { n: 0, wins: 0, losses: 0, ties: 0, invalid: 0, win_rate: None, win_rate_ci95: None, sign_test_p_value: None };
        for v in verdicts {
            t.n += 1;
            match v {
                Verdict::Candidate => t.wins += 1,
                Verdict::Baseline => t.losses += 1,
                Verdict::Tie => t.ties += 1,
                Verdict::Invalid => t.invalid += 1,
            }
        }
        let valid = (t.wins + t.losses + t.ties) as f64;
        if valid > 0.0 {
            let score = t.wins as f64 + t.ties as f64 / 2.0;
            t.win_rate = Some(score / valid);
            t.win_rate_ci95 = Some(wilson(score, valid, Z95));
        }
        t.sign_test_p_value = sign_test(t.wins, t.losses);
        t
    }
}

/// The two-sided exact sign test of `wins` against `losses`: 2·P(X ≤ min) for X ~ Bin(n, 1/2),
/// n = wins + losses, capped at 1; `None` when n = 0. Summed in log space, so any n works.
pub fn sign_test(wins: usize, losses: usize) -> Option<f64> {
    let n = wins + losses;
    if n == 0 {
        return None;
    }
    let (k, n) = (wins.min(losses), n as f64);
    // ln C(n, i) - n ln 2, for i = 0..=k.
    let mut ln_term = -n * std::f64::consts::LN_2;
    let mut terms = vec![ln_term];
    for i in 1..=k {
        ln_term += (n - i as f64 + 1.0).ln() - (i as f64).ln();
        terms.push(ln_term);
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
    Some((2.0 * tail).min(1.0))
}

/// The length-controlled win rate (see [`METHODS`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthControlled {
    /// sigmoid(b0): the predicted win rate at equal lengths.
    pub win_rate: f64,
    /// sigmoid(b0 ± 1.96·se(b0)).
    pub ci95: [f64; 2],
    /// b1: how much a longer candidate output raises the log-odds of a win.
    pub length_coefficient: f64,
    /// s: the scale of the length difference, in characters.
    pub length_scale_chars: f64,
}

/// Mean output lengths over all pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lengths {
    /// Mean characters of the candidate outputs.
    pub candidate_chars: f64,
    /// Mean characters of the baseline outputs.
    pub baseline_chars: f64,
    /// Mean tokens of the candidate outputs, when every one is known.
    pub candidate_tokens: Option<f64>,
    /// Mean tokens of the baseline outputs, when every one is known.
    pub baseline_tokens: Option<f64>,
}

/// Per-request diagnostics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgmentStats {
    /// Judge requests (pairs × orders).
    pub n: usize,
    /// Requests whose verdict is invalid (unreadable answers and failed requests).
    pub invalid: usize,
    /// Requests that got no answer at all.
    pub failed: usize,
    /// Of the pairs judged in both orders with valid verdicts, the fraction whose orders agree.
    pub position_consistency: Option<f64>,
    /// Of the valid, non-tie verdicts, the fraction that preferred the output shown first
    /// (0.5 = no position bias).
    pub first_position_preferred: Option<f64>,
}

/// Who judged, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeInfo {
    /// Backend name.
    pub backend: String,
    /// Judge model, if the backend has one.
    pub model: Option<String>,
    /// Template name (or file); null for a backend that uses none.
    pub template: Option<String>,
    /// `both` or `random` (single order).
    pub order: String,
    /// Seed of the order and of the judge's sampling.
    pub seed: u64,
}

/// The stage's summary (`summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The candidate's model name.
    pub candidate: String,
    /// The baseline's model name (`chosen` for a paired baseline).
    pub baseline: String,
    /// The judge.
    pub judge: JudgeInfo,
    /// Counts and win rate over all pairs.
    #[serde(flatten)]
    pub overall: Tally,
    /// AlpacaEval-style weighted win rate: the mean probability the judge gives the candidate
    /// over the answers that carry label probabilities; null when none does.
    #[serde(default)]
    pub weighted_win_rate: Option<f64>,
    /// `label_probabilities` when the weighted win rate comes from them, `verdicts` when no
    /// answer carried any (the weighted win rate is null: read `win_rate`).
    #[serde(default)]
    pub weighted_from: String,
    /// Answered requests whose answer carried label probabilities.
    #[serde(default)]
    pub weighted_requests: usize,
    /// The length-controlled win rate; null when it cannot be estimated (fewer than two valid
    /// pairs, or all outcomes equal).
    pub length_controlled: Option<LengthControlled>,
    /// Mean output lengths.
    pub lengths: Lengths,
    /// Per-request diagnostics.
    pub judgments: JudgmentStats,
    /// Counts and win rate per prompt category (when the prompts have categories).
    pub by_category: BTreeMap<String, Tally>,
    /// Candidate samples left out for lack of a baseline reply.
    pub unmatched_candidates: usize,
    /// How the numbers are computed.
    pub methods: BTreeMap<String, String>,
}

/// The Wilson score interval of `successes` out of `n` at normal quantile `z`; `successes` may
/// be fractional (ties as half).
pub fn wilson(successes: f64, n: f64, z: f64) -> [f64; 2] {
    let p = successes / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    [(center - half).max(0.0), (center + half).min(1.0)]
}

fn sigmoid(t: f64) -> f64 {
    1.0 / (1.0 + (-t).exp())
}

/// A fitted `logit P(y) = b0 + b1·x`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Logistic {
    /// Intercept.
    pub b0: f64,
    /// Slope.
    pub b1: f64,
    /// Standard error of the intercept (from the inverse Fisher information).
    pub se_b0: f64,
}

/// Fits a logistic regression of outcomes `y` in [0, 1] (fractional outcomes allowed) on one
/// covariate `x` by Newton's method (IRLS). `None` when it does not converge (e.g. every
/// outcome is the same, where the maximum-likelihood intercept is infinite).
pub fn fit_logistic(x: &[f64], y: &[f64]) -> Option<Logistic> {
    // A vanishing ridge keeps the 2x2 system invertible when x has no spread.
    const RIDGE: f64 = 1e-9;
    let (mut b0, mut b1) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (-RIDGE * b0, -RIDGE * b1, RIDGE, 0.0, RIDGE);
        for (&xi, &yi) in x.iter().zip(y) {
            let p = sigmoid(b0 + b1 * xi);
            let w = p * (1.0 - p);
            g0 += yi - p;
            g1 += (yi - p) * xi;
            h00 += w;
            h01 += w * xi;
            h11 += w * xi * xi;
        }
        let det = h00 * h11 - h01 * h01;
        if !(det.is_finite() && det > 0.0) {
            return None;
        }
        let (d0, d1) = ((h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det);
        b0 += d0;
        b1 += d1;
        if !(b0.is_finite() && b1.is_finite()) || b0.abs() > 30.0 {
            return None;
        }
        if d0.abs().max(d1.abs()) < 1e-10 {
            return Some(Logistic { b0, b1, se_b0: (h11 / det).sqrt() });
        }
    }
    None
}

/// The length-controlled win rate of the valid pairs (see [`METHODS`]).
pub fn length_controlled(pairs: &[Pair], verdicts: &[Verdict]) -> Option<LengthControlled> {
    let (d, y): (Vec<f64>, Vec<f64>) = pairs
        .iter()
        .zip(verdicts)
        .filter_map(|(p, v)| {
            let outcome = match v {
                Verdict::Candidate => 1.0,
                Verdict::Tie => 0.5,
                Verdict::Baseline => 0.0,
                Verdict::Invalid => return None,
            };
            Some((p.candidate.chars().count() as f64 - p.baseline.chars().count() as f64, outcome))
        })
        .unzip();
    if d.len() < 2 {
        return None;
    }
    let mean = d.iter().sum::<f64>() / d.len() as f64;
    let scale = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
    let x: Vec<f64> = d.iter().map(|v| if scale > 0.0 { (v / scale).tanh() } else { 0.0 }).collect();
    let fit = fit_logistic(&x, &y)?;
    Some(LengthControlled {
        win_rate: sigmoid(fit.b0),
        ci95: [sigmoid(fit.b0 - Z95 * fit.se_b0), sigmoid(fit.b0 + Z95 * fit.se_b0)],
        length_coefficient: fit.b1,
        length_scale_chars: scale,
    })
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// Mean lengths of both sides.
pub fn lengths(pairs: &[Pair]) -> Lengths {
    let tokens = |get: fn(&Pair) -> Option<i64>| -> Option<f64> {
        let all: Option<Vec<i64>> = pairs.iter().map(get).collect();
        all.map(|t| mean(t.into_iter().map(|v| v as f64)))
    };
    Lengths {
        candidate_chars: mean(pairs.iter().map(|p| p.candidate.chars().count() as f64)),
        baseline_chars: mean(pairs.iter().map(|p| p.baseline.chars().count() as f64)),
        candidate_tokens: tokens(|p| p.candidate_tokens),
        baseline_tokens: tokens(|p| p.baseline_tokens),
    }
}

/// Per-request diagnostics of `judgments` for `n_pairs` pairs.
pub fn judgment_stats(n_pairs: usize, judgments: &[Judgment]) -> JudgmentStats {
    let per_pair = crate::judge::verdicts_per_pair(n_pairs, judgments);
    let compared: Vec<&Vec<Verdict>> =
        per_pair.iter().filter(|v| v.len() > 1 && !v.contains(&Verdict::Invalid)).collect();
    let consistent = compared.iter().filter(|v| v.iter().all(|x| *x == v[0])).count();
    let decided: Vec<Shown> = judgments
        .iter()
        .filter_map(|j| j.outcome.as_ref().ok().map(|a| a.verdict))
        .filter(|v| matches!(v, Shown::A | Shown::B))
        .collect();
    let ratio = |num: usize, den: usize| (den > 0).then(|| num as f64 / den as f64);
    JudgmentStats {
        n: judgments.len(),
        invalid: judgments.iter().filter(|j| j.verdict() == Verdict::Invalid).count(),
        failed: judgments.iter().filter(|j| j.outcome.is_err()).count(),
        position_consistency: ratio(consistent, compared.len()),
        first_position_preferred: ratio(decided.iter().filter(|v| **v == Shown::A).count(), decided.len()),
    }
}

/// Counts per prompt category.
pub fn by_category(pairs: &[Pair], verdicts: &[Verdict]) -> BTreeMap<String, Tally> {
    let mut groups: BTreeMap<String, Vec<Verdict>> = BTreeMap::new();
    for (p, v) in pairs.iter().zip(verdicts) {
        if let Some(c) = &p.category {
            groups.entry(c.clone()).or_default().push(*v);
        }
    }
    groups.into_iter().map(|(c, v)| (c, Tally::of(v))).collect()
}

/// The probability the judge gives the candidate in each judgment whose answer carries label
/// probabilities, as `(pair, probability)`.
pub fn candidate_preferences(judgments: &[Judgment]) -> Vec<(usize, f64)> {
    judgments
        .iter()
        .filter_map(|j| {
            let p = j.outcome.as_ref().ok()?.preference_first?;
            Some((j.pair, if j.first == crate::verdict::Side::Candidate { p } else { 1.0 - p }))
        })
        .collect()
}

/// The weighted win rate (see [`METHODS`]): its value, where it comes from, and how many
/// requests it averages.
pub fn weighted_win_rate(judgments: &[Judgment]) -> (Option<f64>, &'static str, usize) {
    let prefs = candidate_preferences(judgments);
    let rate = (!prefs.is_empty()).then(|| prefs.iter().map(|(_, p)| p).sum::<f64>() / prefs.len() as f64);
    (rate, if rate.is_some() { "label_probabilities" } else { "verdicts" }, prefs.len())
}

/// The methods table as a map.
pub fn methods() -> BTreeMap<String, String> {
    METHODS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use haloflow::records::Message;

    /// A summary of 7 wins, 2 losses and 1 tie between `candidate` and `baseline`.
    pub fn summary(candidate: &str, baseline: &str) -> Summary {
        use Verdict::*;
        let verdicts = [[Candidate; 7].as_slice(), &[Baseline; 2], &[Tie]].concat();
        Summary {
            candidate: candidate.into(),
            baseline: baseline.into(),
            judge: JudgeInfo { backend: "rule".into(), model: None, template: None, order: "both".into(), seed: 0 },
            overall: Tally::of(verdicts),
            weighted_win_rate: None,
            weighted_from: "verdicts".into(),
            weighted_requests: 0,
            length_controlled: None,
            lengths: Lengths { candidate_chars: 1.0, baseline_chars: 1.0, candidate_tokens: None, baseline_tokens: None },
            judgments: JudgmentStats { n: 10, invalid: 0, failed: 0, position_consistency: None, first_position_preferred: None },
            by_category: BTreeMap::new(),
            unmatched_candidates: 0,
            methods: methods(),
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn wilson_matches_known_values() {
        // Reference values computed independently from the closed form (and the usual tables).
        let cases = [
            (8.0, 10.0, 0.490162, 0.943318),
            (0.0, 10.0, 0.0, 0.277533),
            (10.0, 10.0, 0.722467, 1.0),
            (50.0, 100.0, 0.403832, 0.596168),
            (3.5, 7.0, 0.202372, 0.797628),
        ];
        for (s, n, lo, hi) in cases {
            let [l, h] = wilson(s, n, Z95);
            assert!(close(l, lo, 1e-6) && close(h, hi, 1e-6), "{s}/{n}: [{l}, {h}]");
        }
    }

    #[test]
    fn sign_test_matches_known_binomial_values() {
        // Two-sided exact binomial tests at p = 1/2 (R: binom.test(x, n)$p.value).
        let cases = [
            (7, 2, 0.1796875),          // 2 * 46/512
            (2, 7, 0.1796875),          // symmetric
            (10, 0, 0.001953125),       // 2 / 2^10
            (5, 5, 1.0),                // capped at 1
            (1, 0, 1.0),
            (60, 40, 0.05688793364098), // binom.test(60, 100)
        ];
        for (w, l, p) in cases {
            let got = sign_test(w, l).unwrap();
            assert!(close(got, p, 1e-10), "{w} wins, {l} losses: {got}");
        }
        assert_eq!(sign_test(0, 0), None);
        // binom.test(4800, 10000): 2^-10000 underflows, the log-space sum does not.
        let big = sign_test(5200, 4800).unwrap();
        assert!(close(big / 6.593515598672442e-5, 1.0, 1e-8), "large n: {big}");
    }

    #[test]
    fn tally_counts_ties_as_half_and_skips_invalid() {
        use Verdict::*;
        let t = Tally::of([Candidate, Candidate, Candidate, Baseline, Tie, Invalid, Invalid]);
        assert_eq!((t.n, t.wins, t.losses, t.ties, t.invalid), (7, 3, 1, 1, 2));
        assert_eq!(t.wins + t.losses + t.ties + t.invalid, t.n);
        assert_eq!(t.win_rate, Some(0.7));
        assert_eq!(t.win_rate_ci95, Some(wilson(3.5, 5.0, Z95)));
        assert_eq!(t.sign_test_p_value, sign_test(3, 1));
        let none = Tally::of([Invalid]);
        assert_eq!((none.win_rate, none.win_rate_ci95), (None, None));
    }

    /// A deterministic uniform stream (splitmix64) for synthetic data.
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform().max(1e-12), self.uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    fn pair(candidate_chars: usize, baseline_chars: usize) -> Pair {
        Pair {
            prompt_id: "p".into(),
            sample_index: 0,
            prompt: vec![Message::new("user", "q")],
            candidate: "c".repeat(candidate_chars),
            baseline: "b".repeat(baseline_chars),
            candidate_tokens: None,
            baseline_tokens: None,
            reference: None,
            category: None,
        }
    }

    #[test]
    fn logistic_fit_recovers_known_coefficients() {
        let mut rng = Rng(2);
        let x: Vec<f64> = (0..20_000).map(|_| rng.normal()).collect();
        let y: Vec<f64> = x.iter().map(|&xi| if rng.uniform() < sigmoid(-0.5 + 1.5 * xi) { 1.0 } else { 0.0 }).collect();
        let fit = fit_logistic(&x, &y).unwrap();
        assert!(close(fit.b0, -0.5, 0.05) && close(fit.b1, 1.5, 0.07), "{fit:?}");
        assert!(fit.se_b0 > 0.0 && fit.se_b0 < 0.05);
        assert!(fit_logistic(&x, &vec![1.0; x.len()]).is_none(), "all wins: no finite intercept");
    }

    #[test]
    fn length_control_removes_a_length_bias() {
        // A judge that likes length: the candidate is longer on average and wins more often
        // because of it; at equal lengths it would win sigmoid(0.3) = 0.574 of the time.
        let mut rng = Rng(7);
        let diffs: Vec<f64> = (0..4000).map(|_| 150.0 + 300.0 * rng.normal()).collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let s = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / diffs.len() as f64).sqrt();
        let (mut pairs, mut verdicts) = (Vec::new(), Vec::new());
        for d in &diffs {
            let d = d.round() as i64;
            let (c, b) = if d >= 0 { (500 + d as usize, 500) } else { (500, 500 + (-d) as usize) };
            pairs.push(pair(c, b));
            let p = sigmoid(0.3 + 2.0 * (d as f64 / s).tanh());
            verdicts.push(if rng.uniform() < p { Verdict::Candidate } else { Verdict::Baseline });
        }
        pairs.push(pair(10, 10));
        verdicts.push(Verdict::Invalid);
        let raw = Tally::of(verdicts.iter().copied()).win_rate.unwrap();
        let lc = length_controlled(&pairs, &verdicts).unwrap();
        assert!(raw > sigmoid(0.3) + 0.08, "raw win rate {raw}");
        assert!(close(lc.win_rate, sigmoid(0.3), 0.03), "{lc:?}");
        assert!(lc.ci95[0] < lc.win_rate && lc.win_rate < lc.ci95[1] && lc.ci95[1] - lc.ci95[0] < 0.1, "{lc:?}");
        assert!(close(lc.length_coefficient, 2.0, 0.2), "{lc:?}");
    }

    #[test]
    fn length_control_without_a_length_effect_is_the_win_rate() {
        // Equal lengths everywhere: the covariate is zero and sigmoid(b0) is the plain rate.
        let pairs: Vec<Pair> = (0..10).map(|_| pair(5, 5)).collect();
        let verdicts = [[Verdict::Candidate; 6].as_slice(), &[Verdict::Baseline; 2], &[Verdict::Tie; 2]].concat();
        let lc = length_controlled(&pairs, &verdicts).unwrap();
        assert!(close(lc.win_rate, 0.7, 1e-9), "{lc:?}");
        assert_eq!(lc.length_scale_chars, 0.0);
        assert!(length_controlled(&pairs[..1], &verdicts[..1]).is_none());
    }

    #[test]
    fn lengths_average_chars_and_known_tokens() {
        let mut pairs = vec![pair(4, 10), pair(6, 20)];
        pairs[0].candidate_tokens = Some(2);
        pairs[1].candidate_tokens = Some(4);
        let l = lengths(&pairs);
        assert_eq!((l.candidate_chars, l.baseline_chars, l.candidate_tokens, l.baseline_tokens), (5.0, 15.0, Some(3.0), None));
    }
}
