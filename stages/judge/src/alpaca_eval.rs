//! alpaca_eval's files: `model_outputs.json` to and from a `samples` table (`halo-judge
//! alpaca-eval export|import`), and `annotations.json` written from a judged run.
//!
//! `model_outputs.json` is a JSON list of objects with `instruction`, `output` and `generator`
//! (and optionally `dataset`, and `input`, which alpaca_eval appends to the instruction after a
//! blank line). An export adds haloflow's columns as extra keys (`prompt_id`, `sample_index`,
//! `prompt_tokens`, `completion_tokens`, `finish_reason`, and `messages` when the prompt is
//! more than one user message), which alpaca_eval ignores and an import reads back, so samples →
//! model_outputs.json → samples is exact. A file from alpaca_eval has none of them: the prompt
//! is the instruction as one user message, the id its hash, samples of a prompt are numbered in
//! file order, and the token counts (which alpaca_eval does not record) are written as 0 with
//! finish_reason [`UNKNOWN_FINISH`], which the judge reads as "token count unknown".
//!
//! `annotations.json` follows alpaca_eval's annotations: one object per pair with
//! `instruction`, `output_1` and `generator_1` (the baseline, alpaca_eval's reference),
//! `output_2` and `generator_2` (the candidate), `annotator` and `preference`: 1 when output_1
//! is preferred, 2 when output_2 is, 1.5 for a tie, null when the pair has no valid verdict;
//! with label probabilities, 1 + the mean probability the judge gave the candidate over the
//! pair's orders (alpaca_eval's weighted annotators write 2 − P(output_1)), so the mean of
//! `preference − 1` is the weighted win rate.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use haloflow::records::{self, Message};
use serde::{Deserialize, Serialize};

use crate::cli::{AlpacaEvalArgs, AlpacaEvalCommand};
use crate::inputs::{self, Pair, SampleRow};
use crate::judge::Judgment;
use crate::stats::{self, Summary};
use crate::templates;
use crate::verdict::Verdict;

/// `finish_reason` of samples imported without one: their token counts are unknown (0).
pub const UNKNOWN_FINISH: &str = "unknown";

/// One object of `model_outputs.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOutput {
    /// The prompt as alpaca_eval shows it to its judge.
    pub instruction: String,
    /// alpaca_eval's optional second part of the instruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The model's reply.
    pub output: String,
    /// The model's name.
    pub generator: String,
    /// alpaca_eval's subset name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// haloflow: the prompt's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    /// haloflow: the sample's index among its prompt's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_index: Option<i64>,
    /// haloflow: tokens of the rendered prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<i64>,
    /// haloflow: tokens of the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<i64>,
    /// haloflow: why generation stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// haloflow: the prompt's messages, when they are more than one user message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
}

/// Whether `prompt` is exactly one user message.
fn single_user_message(prompt: &[Message]) -> bool {
    matches!(prompt, [only] if only.role == "user")
}

/// The model outputs of `samples`.
pub fn to_model_outputs(samples: &[SampleRow], dataset: Option<&str>) -> Vec<ModelOutput> {
    samples
        .iter()
        .map(|s| ModelOutput {
            instruction: templates::question(&s.prompt),
            input: None,
            output: s.completion.clone(),
            generator: s.model.clone(),
            dataset: dataset.map(str::to_string),
            prompt_id: Some(s.prompt_id.clone()),
            sample_index: Some(s.sample_index),
            prompt_tokens: Some(s.prompt_tokens),
            completion_tokens: Some(s.completion_tokens),
            finish_reason: Some(s.finish_reason.clone()),
            messages: (!single_user_message(&s.prompt)).then(|| s.prompt.clone()),
        })
        .collect()
}

/// The samples of model outputs (see the module's doc for what a file without haloflow's keys
/// becomes), and how many lacked token counts. `file` names the source in errors.
pub fn to_samples(outputs: &[ModelOutput], file: &Path) -> Result<(Vec<SampleRow>, usize)> {
    let mut next_index: HashMap<(String, String), i64> = HashMap::new();
    let mut unknown_tokens = 0;
    let mut rows = Vec::with_capacity(outputs.len());
    for (i, o) in outputs.iter().enumerate() {
        let at = || format!("{}: object {i}", file.display());
        let instruction = match o.input.as_deref() {
            Some(input) if !input.is_empty() => format!("{}\n\n{input}", o.instruction),
            _ => o.instruction.clone(),
        };
        let prompt = match &o.messages {
            Some(messages) if messages.is_empty() => bail!("{}: `messages` is empty", at()),
            Some(messages) => messages.clone(),
            None => vec![Message::new("user", instruction)],
        };
        if records::is_empty_prompt(&prompt) {
            bail!("{}: the instruction is empty", at());
        }
        let prompt_id = o.prompt_id.clone().unwrap_or_else(|| records::prompt_id(&prompt));
        let counter = next_index.entry((prompt_id.clone(), o.generator.clone())).or_insert(0);
        let sample_index = o.sample_index.unwrap_or(*counter);
        *counter = sample_index + 1;
        let tokens = match (o.prompt_tokens, o.completion_tokens, &o.finish_reason) {
            (Some(p), Some(c), Some(f)) => (p, c, f.clone()),
            _ => {
                unknown_tokens += 1;
                (0, 0, UNKNOWN_FINISH.to_string())
            }
        };
        rows.push(SampleRow {
            prompt_id,
            prompt,
            sample_index,
            completion: o.output.clone(),
            model: o.generator.clone(),
            prompt_tokens: tokens.0,
            completion_tokens: tokens.1,
            finish_reason: tokens.2,
        });
    }
    Ok((rows, unknown_tokens))
}

/// Reads a `model_outputs.json`.
pub fn read_model_outputs(path: &Path) -> Result<Vec<ModelOutput>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("{}: not alpaca_eval model outputs (a JSON list of objects with instruction, output, generator)", path.display())
    })
}

/// One object of `annotations.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    /// The prompt as alpaca_eval shows it.
    pub instruction: String,
    /// The baseline's output (alpaca_eval's reference).
    pub output_1: String,
    /// The baseline's name.
    pub generator_1: String,
    /// The candidate's output.
    pub output_2: String,
    /// The candidate's name.
    pub generator_2: String,
    /// Who judged.
    pub annotator: String,
    /// 1: output_1 preferred, 2: output_2 preferred, 1.5: tie, between: weighted; null: no
    /// valid verdict.
    pub preference: Option<f64>,
    /// Seconds the judge spent on the pair (all its orders).
    pub time_per_example: f64,
    /// The judge's raw answers, one per order, in the order judged.
    pub raw_completion: Vec<String>,
    /// haloflow: the prompt's id.
    pub prompt_id: String,
    /// haloflow: the candidate sample's index.
    pub sample_index: i64,
    /// haloflow: the pair's verdict (candidate, baseline, tie or invalid).
    pub verdict: String,
}

/// The annotations of a judged run, one per pair.
pub fn annotations(summary: &Summary, pairs: &[Pair], judgments: &[Judgment], verdicts: &[Verdict]) -> Vec<Annotation> {
    let j = &summary.judge;
    let annotator = format!(
        "halo-judge {}{}{}",
        j.backend,
        j.model.as_ref().map_or(String::new(), |m| format!(" {m}")),
        j.template.as_ref().map_or(String::new(), |t| format!(" ({t})"))
    );
    let mut probs: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    for (pair, p) in stats::candidate_preferences(judgments) {
        probs[pair].push(p);
    }
    let mut per_pair: Vec<Vec<&Judgment>> = vec![Vec::new(); pairs.len()];
    for judgment in judgments {
        per_pair[judgment.pair].push(judgment);
    }
    pairs
        .iter()
        .enumerate()
        .map(|(i, pair)| {
            let preference = if probs[i].is_empty() {
                match verdicts[i] {
                    Verdict::Candidate => Some(2.0),
                    Verdict::Baseline => Some(1.0),
                    Verdict::Tie => Some(1.5),
                    Verdict::Invalid => None,
                }
            } else {
                Some(1.0 + probs[i].iter().sum::<f64>() / probs[i].len() as f64)
            };
            let latency_ms: f64 = per_pair[i].iter().map(|j| j.latency_ms()).sum();
            Annotation {
                instruction: templates::question(&pair.prompt),
                output_1: pair.baseline.clone(),
                generator_1: summary.baseline.clone(),
                output_2: pair.candidate.clone(),
                generator_2: summary.candidate.clone(),
                annotator: annotator.clone(),
                preference,
                time_per_example: latency_ms / 1000.0,
                raw_completion: per_pair[i].iter().map(|j| j.outcome.as_ref().map_or(String::new(), |a| a.raw.clone())).collect(),
                prompt_id: pair.prompt_id.clone(),
                sample_index: pair.sample_index,
                verdict: verdicts[i].as_str().to_string(),
            }
        })
        .collect()
}

/// Runs `halo-judge alpaca-eval`.
pub fn run(args: &AlpacaEvalArgs) -> Result<()> {
    match &args.command {
        AlpacaEvalCommand::Export { samples, out, dataset } => {
            let rows = inputs::read_sample_rows(samples)?;
            haloflow::io::write_json(out, &to_model_outputs(&rows, dataset.as_deref()))?;
            tracing::info!(outputs = rows.len(), out = %out.display(), "model outputs written");
        }
        AlpacaEvalCommand::Import { model_outputs, out } => {
            let (rows, unknown_tokens) = to_samples(&read_model_outputs(model_outputs)?, model_outputs)?;
            if rows.is_empty() {
                bail!("{}: no model outputs", model_outputs.display());
            }
            if unknown_tokens > 0 {
                tracing::warn!(
                    "{unknown_tokens} of {} outputs carry no token counts (alpaca_eval records none): written as 0 \
                     with finish_reason `{UNKNOWN_FINISH}`",
                    rows.len()
                );
            }
            inputs::write_sample_rows(out, &rows)?;
            tracing::info!(samples = rows.len(), out = %out.display(), "samples written");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prompt: Vec<Message>, index: i64, text: &str) -> SampleRow {
        SampleRow {
            prompt_id: records::prompt_id(&prompt),
            prompt,
            sample_index: index,
            completion: text.into(),
            model: "kto".into(),
            prompt_tokens: 7,
            completion_tokens: 3,
            finish_reason: "eos".into(),
        }
    }

    #[test]
    fn samples_survive_a_round_trip_and_multi_turn_prompts_keep_their_messages() {
        let single = vec![Message::new("user", "What is 2+2?")];
        let multi = vec![Message::new("system", "Be brief."), Message::new("user", "Hi"), Message::new("assistant", "Hello"), Message::new("user", "Bye?")];
        let rows = vec![sample(single.clone(), 0, "4"), sample(single, 1, "four"), sample(multi, 0, "Bye.")];
        let outputs = to_model_outputs(&rows, Some("mine"));
        assert_eq!(outputs[0].instruction, "What is 2+2?");
        assert!(outputs[0].messages.is_none() && outputs[2].messages.is_some());
        let json = serde_json::to_string(&outputs).unwrap();
        let back: Vec<ModelOutput> = serde_json::from_str(&json).unwrap();
        assert_eq!(to_samples(&back, Path::new("f.json")).unwrap(), (rows, 0));
    }

    #[test]
    fn an_alpaca_eval_file_becomes_samples_with_unknown_token_counts() {
        let json = r#"[
            {"instruction": "Name a color.", "output": "Blue", "generator": "gpt4", "dataset": "helpful_base"},
            {"instruction": "Name a color.", "output": "Red", "generator": "gpt4"},
            {"instruction": "Translate", "input": "bonjour", "output": "hello", "generator": "gpt4", "extra": 1}
        ]"#;
        let outputs: Vec<ModelOutput> = serde_json::from_str(json).unwrap();
        let (rows, unknown) = to_samples(&outputs, Path::new("f.json")).unwrap();
        assert_eq!(unknown, 3);
        assert_eq!((rows[0].sample_index, rows[1].sample_index, rows[2].sample_index), (0, 1, 0), "numbered per prompt");
        assert_eq!(rows[0].prompt_id, records::prompt_id(&[Message::new("user", "Name a color.")]));
        assert_eq!(rows[2].prompt, [Message::new("user", "Translate\n\nbonjour")], "input joins the instruction");
        assert_eq!((rows[2].completion_tokens, rows[2].finish_reason.as_str()), (0, UNKNOWN_FINISH));
        let empty: Vec<ModelOutput> = serde_json::from_str(r#"[{"instruction": " ", "output": "x", "generator": "g"}]"#).unwrap();
        let err = to_samples(&empty, Path::new("f.json")).unwrap_err().to_string();
        assert!(err.contains("f.json: object 0: the instruction is empty"), "{err}");
    }
}
