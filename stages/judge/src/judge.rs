//! The judging run: plan one request per pair and order, answer each from the cache or from the
//! backend (a [`haloflow_openai::pool`] of [`Backend::concurrency`] threads), and gather one
//! [`Judgment`] per request.
//!
//! Workers only call the backend; the calling thread appends each answer to the cache the moment
//! it arrives (and then passes the `after_judgments` fault point, for crash tests), so a killed
//! run loses at most the requests in flight. Identical requests are asked once.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use anyhow::Result;
use haloflow::records::Message;

use crate::backends::{Backend, JudgeAnswer, JudgeRequest};
use crate::cache::{Cache, KeyParts};
use crate::cli::Order;
use crate::inputs::Pair;
use crate::templates::{self, Fields, Template};
use crate::verdict::{Side, Verdict};

/// One judge request's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    /// Index of the pair in the input order.
    pub pair: usize,
    /// Which output was shown first.
    pub first: Side,
    /// The answer, or why there is none.
    pub outcome: std::result::Result<JudgeAnswer, Failed>,
}

/// A request that got no answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    /// The last error (free of secrets).
    pub reason: String,
    /// Time spent on it, retries included, in milliseconds.
    pub latency_ms: f64,
}

impl Judgment {
    /// The verdict about the outputs (`invalid` for a failed request).
    pub fn verdict(&self) -> Verdict {
        match &self.outcome {
            Ok(answer) => answer.verdict.resolve(self.first),
            Err(_) => Verdict::Invalid,
        }
    }

    /// Milliseconds spent on the request: the answered attempt, or every attempt of a failure.
    pub fn latency_ms(&self) -> f64 {
        match &self.outcome {
            Ok(answer) => answer.latency_ms,
            Err(failed) => failed.latency_ms,
        }
    }
}

/// What a run did, for the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunStats {
    /// Judge requests of the run (pairs × orders).
    pub requests: usize,
    /// Distinct requests sent to the backend.
    pub asked: usize,
    /// Of those, the ones that got no answer.
    pub failed: usize,
    /// Wall time of the asking, in seconds.
    pub seconds: f64,
}

/// The orders a pair is judged in.
pub fn orders(pair: &Pair, order: Order, seed: u64, position_sensitive: bool) -> Vec<Side> {
    match (position_sensitive, order) {
        (false, _) => vec![Side::Candidate],
        (true, Order::Both) => vec![Side::Candidate, Side::Baseline],
        (true, Order::Random) => {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&seed.to_le_bytes());
            hasher.update(&pair.sample_index.to_le_bytes());
            hasher.update(pair.prompt_id.as_bytes());
            vec![if hasher.finalize().as_bytes()[0] & 1 == 0 { Side::Candidate } else { Side::Baseline }]
        }
    }
}

/// A planned request.
struct Planned {
    pair: usize,
    first: Side,
    key: String,
    messages: Vec<Message>,
}

impl Planned {
    fn outputs<'a>(&self, pair: &'a Pair) -> (&'a str, &'a str) {
        match self.first {
            Side::Candidate => (&pair.candidate, &pair.baseline),
            Side::Baseline => (&pair.baseline, &pair.candidate),
        }
    }
}

fn plan(pairs: &[Pair], template: &Template, backend: &dyn Backend, order: Order, seed: u64) -> Result<Vec<Planned>> {
    let fingerprint = backend.fingerprint();
    let uses_template = backend.uses_template();
    let mut planned = Vec::with_capacity(pairs.len() * 2);
    for (i, pair) in pairs.iter().enumerate() {
        let (question, conversation) = (templates::question(&pair.prompt), templates::conversation(&pair.prompt));
        for first in orders(pair, order, seed, backend.position_sensitive()) {
            let mut p = Planned { pair: i, first, key: String::new(), messages: Vec::new() };
            let (answer_a, answer_b) = p.outputs(pair);
            let reference = pair.reference.as_deref();
            if uses_template {
                let fields = Fields { question: &question, conversation: &conversation, answer_a, answer_b, reference };
                p.messages = template.render(&fields).map_err(|e| e.context(format!("prompt {}", pair.prompt_id)))?;
            }
            let template = if uses_template { template.text.as_str() } else { "" };
            p.key = KeyParts { fingerprint: &fingerprint, template, prompt: &pair.prompt, answer_a, answer_b, first, reference }.key();
            planned.push(p);
        }
    }
    Ok(planned)
}

/// Judges every pair in the requested orders; answers come from `cache` when it has them.
pub fn run(
    pairs: &[Pair],
    template: &Template,
    backend: &dyn Backend,
    cache: &mut Cache,
    order: Order,
    seed: u64,
) -> Result<(Vec<Judgment>, RunStats)> {
    let planned = plan(pairs, template, backend, order, seed)?;
    let mut todo: Vec<usize> = Vec::new();
    let mut queued: HashSet<&str> = HashSet::new();
    for (i, p) in planned.iter().enumerate() {
        if cache.get(&p.key).is_none() && queued.insert(&p.key) {
            todo.push(i);
        }
    }
    tracing::info!(
        requests = planned.len(),
        cached = planned.len() - todo.len(),
        to_ask = todo.len(),
        cache_answers = cache.len(),
        "judging"
    );
    let started = Instant::now();
    let mut failures: HashMap<String, Failed> = HashMap::new();
    let bar = haloflow::stage_cli::progress(todo.len() as u64, "judging");
    let mut appended = 0;
    let asked = haloflow_openai::pool::run(
        todo.len(),
        backend.concurrency(),
        |j| {
            let p = &planned[todo[j]];
            let pair = &pairs[p.pair];
            let (answer_a, answer_b) = p.outputs(pair);
            let request = JudgeRequest { messages: &p.messages, template, answer_a, answer_b, reference: pair.reference.as_deref() };
            let t = Instant::now();
            let result = backend.judge(&request);
            (result, t.elapsed().as_secs_f64() * 1000.0)
        },
        |j, (result, elapsed_ms)| {
            bar.inc(1);
            let key = &planned[todo[j]].key;
            match result {
                Ok(answer) => {
                    cache.append(key, &answer)?;
                    appended += 1;
                    haloflow::stage_cli::fault_point("after_judgments", appended);
                }
                Err(e) => {
                    failures.insert(key.clone(), Failed { reason: format!("{e:#}"), latency_ms: elapsed_ms });
                }
            }
            Ok(())
        },
    );
    bar.finish_and_clear();
    asked?;
    let stats = RunStats { requests: planned.len(), asked: todo.len(), failed: failures.len(), seconds: started.elapsed().as_secs_f64() };
    let judgments = planned
        .iter()
        .map(|p| Judgment {
            pair: p.pair,
            first: p.first,
            outcome: match cache.get(&p.key) {
                Some(answer) => Ok(answer.clone()),
                None => Err(failures[&p.key].clone()),
            },
        })
        .collect();
    Ok((judgments, stats))
}

/// The verdicts of each pair's judgments, indexed by pair.
pub fn verdicts_per_pair(n_pairs: usize, judgments: &[Judgment]) -> Vec<Vec<Verdict>> {
    let mut per_pair: Vec<Vec<Verdict>> = vec![Vec::new(); n_pairs];
    for j in judgments {
        per_pair[j.pair].push(j.verdict());
    }
    per_pair
}

/// The verdict of each pair from its judgments (see [`crate::verdict::combine`]).
pub fn pair_verdicts(n_pairs: usize, judgments: &[Judgment]) -> Vec<Verdict> {
    verdicts_per_pair(n_pairs, judgments).iter().map(|v| crate::verdict::combine(v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::Shown;

    fn pair(id: &str) -> Pair {
        Pair {
            prompt_id: id.into(),
            sample_index: 0,
            prompt: vec![Message::new("user", format!("question {id}"))],
            candidate: format!("cand {id}"),
            baseline: format!("base {id}"),
            candidate_tokens: None,
            baseline_tokens: None,
            reference: None,
            category: None,
        }
    }

    #[test]
    fn random_order_is_seeded_per_pair_and_both_means_two() {
        let pairs: Vec<Pair> = (0..200).map(|i| pair(&format!("p{i}"))).collect();
        let firsts = |seed| pairs.iter().map(|p| orders(p, Order::Random, seed, true)[0]).collect::<Vec<_>>();
        assert_eq!(firsts(7), firsts(7));
        assert_ne!(firsts(7), firsts(8));
        let candidate_first = firsts(7).iter().filter(|s| **s == Side::Candidate).count();
        assert!((70..130).contains(&candidate_first), "{candidate_first} of 200");
        assert_eq!(orders(&pairs[0], Order::Both, 0, true), [Side::Candidate, Side::Baseline]);
        assert_eq!(orders(&pairs[0], Order::Both, 0, false), [Side::Candidate]);
    }

    #[test]
    fn pair_verdicts_combine_orders() {
        let answer = |v| Ok(JudgeAnswer { raw: String::new(), verdict: v, latency_ms: 0.0, prompt_tokens: None, completion_tokens: None, preference_first: None });
        let j = |pair, first, outcome| Judgment { pair, first, outcome };
        let failed = Err(Failed { reason: "HTTP 500".into(), latency_ms: 1.0 });
        let judgments = [
            j(0, Side::Candidate, answer(Shown::A)),
            j(0, Side::Baseline, answer(Shown::B)),
            j(1, Side::Candidate, answer(Shown::A)),
            j(1, Side::Baseline, answer(Shown::A)),
            j(2, Side::Candidate, answer(Shown::B)),
            j(2, Side::Baseline, failed),
        ];
        assert_eq!(pair_verdicts(3, &judgments), [Verdict::Candidate, Verdict::Tie, Verdict::Invalid]);
    }
}
