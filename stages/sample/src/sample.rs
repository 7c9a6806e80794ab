//! The sample run: read prompts, draw samples (in-process with libtorch, or from a server:
//! [`crate::api`]), write the `samples` table and the summary.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arrow_array::{Int64Array, RecordBatch, StringArray};
use haloflow::records::{messages_array, messages_at, Columns, Message};
use haloflow::schema;
use haloflow_ml::device::{parse_device, parse_dtype};
use haloflow_ml::generate::{FinishReason, GenerateOptions, Generator, PromptIds, Sample};
use haloflow_ml::model::CausalLm;
use haloflow_dist::Dist;
use serde_json::{json, Value};

use crate::{shard, Args, Backend};

/// Skipped prompts listed by id in the summary (the count covers all).
const SKIPPED_EXAMPLES: usize = 20;

/// A row of the input `prompts` table.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    /// Its `prompt_id`.
    pub prompt_id: String,
    /// Its messages.
    pub prompt: Vec<Message>,
}

/// One sample, whichever backend drew it: a row of the `samples` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    /// Index of its prompt in the input.
    pub prompt: usize,
    /// Index among the samples of its prompt.
    pub sample_index: usize,
    /// The completion.
    pub text: String,
    /// Tokens of the rendered prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

impl From<&Sample> for Drawn {
    fn from(s: &Sample) -> Drawn {
        Drawn {
            prompt: s.prompt,
            sample_index: s.sample_index,
            text: s.text.clone(),
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.token_ids.len(),
            finish_reason: s.finish_reason,
        }
    }
}

/// Runs the stage.
pub fn run(args: &Args) -> Result<()> {
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        n: args.n,
        seed: args.seed,
        stop: stop_strings(&args.stop)?,
        batch_size: args.batch_size,
    };
    options.validate()?;
    let rows = read_prompts(&args.prompts)?;
    if rows.is_empty() {
        bail!("{}: no prompts to sample from", args.prompts.display());
    }
    match args.backend {
        Backend::Local => run_local(args, &rows, &options),
        Backend::Openai => crate::api::run(args, &rows, &options),
    }
}

/// The local backend: every rank generates its share, rank 0 writes the outputs.
fn run_local(args: &Args, rows: &[PromptRow], options: &GenerateOptions) -> Result<()> {
    let model_dir = args.model.as_deref().context("--backend local needs --model (a Hugging Face model directory)")?;
    haloflow_ml::device::init_process(args.threads);
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype, device)?;
    let model_id = match &args.model_id {
        Some(id) => id.clone(),
        None => model_name(model_dir)?,
    };
    let tok = args.format.tokenizer(model_dir)?;
    let prompts = rows
        .iter()
        .map(|r| {
            let ids = tok.encode_prompt(&r.prompt).with_context(|| format!("tokenizing prompt {}", r.prompt_id))?;
            Ok(PromptIds { key: r.prompt_id.clone(), ids })
        })
        .collect::<Result<Vec<_>>>()?;
    let dist = Dist::from_env("gloo", Duration::from_secs_f64(args.dist_timeout_s))?;
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank(), d.world_size()));
    let device = dist.as_ref().map_or(device, |d| d.rank_device(device));
    let mine = shard::share(prompts.len(), rank, world);
    let my_prompts: Vec<PromptIds> = mine.iter().map(|&i| prompts[i].clone()).collect();
    let model = CausalLm::load(model_dir, device, kind)?;
    tracing::info!(model = %model_id, device = ?device, dtype = ?kind, prompts = my_prompts.len(), of = rows.len(), rank, world, n = options.n, "sampling");

    let bar = haloflow::stage_cli::progress((my_prompts.len() * options.n * options.max_new_tokens) as u64, "sampling tokens");
    let started = Instant::now();
    let generation = Generator::new(&model, &tok).generate(&my_prompts, options, |p| {
        bar.set_length(p.token_bound);
        bar.set_position(p.tokens);
    })?;
    bar.finish_and_clear();
    // Every rank's samples reach rank 0, which alone writes the outputs.
    let generation = match &dist {
        None => generation,
        Some(d) => shard::merge(&d.all_gather_bytes(&shard::encode(&generation, &mine)?)?)?,
    };
    let seconds = started.elapsed().as_secs_f64();
    if rank != 0 {
        tracing::info!(rank, prompts = mine.len(), "samples handed to rank 0");
        return Ok(());
    }

    if let Some(first) = generation.skipped.first() {
        tracing::warn!(skipped = generation.skipped.len(), first = %rows[first.prompt].prompt_id, reason = %first.reason, "prompts skipped");
    }
    if generation.samples.is_empty() {
        bail!("no sample generated: all {} prompts were skipped ({})", rows.len(), generation.skipped[0].reason);
    }
    let drawn: Vec<Drawn> = generation.samples.iter().map(Drawn::from).collect();
    let tokens: usize = drawn.iter().map(|s| s.completion_tokens).sum();
    let skipped_examples: Vec<_> = generation
        .skipped
        .iter()
        .take(SKIPPED_EXAMPLES)
        .map(|s| json!({"prompt_id": rows[s.prompt].prompt_id, "reason": s.reason}))
        .collect();
    let mut summary = summary(rows, &drawn, &model_id, options, "local");
    let extra = json!({
        "prompts_sampled": rows.len() - generation.skipped.len(),
        "skipped": generation.skipped.len(),
        "skipped_examples": skipped_examples,
        "tokens_per_s": tokens as f64 / seconds.max(1e-9),
        "seconds": seconds,
        "device": haloflow_ml::device::device_name(device),
        "dtype": haloflow_ml::device::dtype_name(kind),
        "ranks": world,
    });
    extend(&mut summary, extra);
    write_outputs(args, rows, &drawn, &model_id, &summary)
}

/// The summary fields both backends write: counts, tokens, finish reasons and the options.
pub fn summary(rows: &[PromptRow], drawn: &[Drawn], model_id: &str, options: &GenerateOptions, backend: &str) -> Value {
    let mut finish_reasons: BTreeMap<&str, usize> =
        [FinishReason::Eos, FinishReason::Stop, FinishReason::Length].iter().map(|r| (r.as_str(), 0)).collect();
    for s in drawn {
        *finish_reasons.entry(s.finish_reason.as_str()).or_default() += 1;
    }
    json!({
        "backend": backend,
        "model": model_id,
        "prompts": rows.len(),
        "samples": drawn.len(),
        "prompt_tokens": drawn.iter().map(|s| s.prompt_tokens).sum::<usize>(),
        "tokens_generated": drawn.iter().map(|s| s.completion_tokens).sum::<usize>(),
        "finish_reasons": finish_reasons,
        "options": options,
    })
}

/// Adds the fields of `extra` (an object) to `summary` (an object).
pub fn extend(summary: &mut Value, extra: Value) {
    if let (Some(summary), Value::Object(extra)) = (summary.as_object_mut(), extra) {
        summary.extend(extra);
    }
}

/// Writes the `samples` table and the summary (each to a temporary file renamed into place).
pub fn write_outputs(args: &Args, rows: &[PromptRow], drawn: &[Drawn], model_id: &str, summary: &Value) -> Result<()> {
    let batch = samples_batch(rows, drawn, model_id)?;
    haloflow::io::write_arrow(&args.samples, &batch.schema(), &[batch], Default::default())?;
    haloflow::io::write_json(&args.summary, summary)?;
    tracing::info!(samples = drawn.len(), tokens = %summary["tokens_generated"], tokens_per_s = %summary["tokens_per_s"], "samples written");
    Ok(())
}

/// The stop strings of the `--stop` values: each value is one stop string, except a JSON array
/// of strings (how the pipeline runner passes a list param), which gives its elements.
fn stop_strings(values: &[String]) -> Result<Vec<String>> {
    let mut stops = Vec::new();
    for value in values {
        match serde_json::from_str::<Vec<String>>(value) {
            Ok(list) => stops.extend(list),
            Err(_) => stops.push(value.clone()),
        }
    }
    if stops.iter().any(String::is_empty) {
        bail!("--stop: stop strings must not be empty");
    }
    Ok(stops)
}

/// The name of the model directory (`--model-id` default), also for `.` or a trailing slash.
fn model_name(dir: &Path) -> Result<String> {
    let full = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    full.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no directory name; pass --model-id", full.display()))
}

/// Reads a `prompts` table (Arrow IPC or Parquet), checked against the schema.
fn read_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let def = schema::by_name(schema::PROMPTS)?;
    let table = haloflow::io::read_table(path)?;
    def.check_schema(&table.schema).with_context(|| format!("{}: not a `prompts` table", path.display()))?;
    let mut rows = Vec::with_capacity(table.num_rows());
    for batch in &table.batches {
        def.check_batch(batch, rows.len()).with_context(|| path.display().to_string())?;
        let cols = Columns::new(batch);
        let (ids, messages) = (cols.str("prompt_id")?, cols.messages("prompt")?);
        for i in 0..batch.num_rows() {
            let prompt = messages_at(messages, i).with_context(|| format!("{}: row {}", path.display(), rows.len()))?;
            rows.push(PromptRow { prompt_id: ids.value(i).to_string(), prompt });
        }
    }
    Ok(rows)
}

/// The `samples` table: one row per sample, in the order given (by prompt in input order, then
/// sample index).
fn samples_batch(rows: &[PromptRow], samples: &[Drawn], model_id: &str) -> Result<RecordBatch> {
    let row = |s: &Drawn| &rows[s.prompt];
    Ok(RecordBatch::try_new(
        schema::by_name(schema::SAMPLES)?.arrow_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(samples.iter().map(|s| row(s).prompt_id.as_str()))),
            messages_array(samples.iter().map(|s| row(s).prompt.as_slice())),
            Arc::new(samples.iter().map(|s| s.sample_index as i64).collect::<Int64Array>()),
            Arc::new(StringArray::from_iter_values(samples.iter().map(|s| s.text.as_str()))),
            Arc::new(StringArray::from_iter_values(samples.iter().map(|_| model_id))),
            Arc::new(samples.iter().map(|s| s.prompt_tokens as i64).collect::<Int64Array>()),
            Arc::new(samples.iter().map(|s| s.completion_tokens as i64).collect::<Int64Array>()),
            Arc::new(StringArray::from_iter_values(samples.iter().map(|s| s.finish_reason.as_str()))),
        ],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_values_are_strings_or_json_lists() {
        let values = ["User:".to_string(), r#"["\n\n", "***"]"#.to_string(), "[not json".to_string()];
        assert_eq!(stop_strings(&values).unwrap(), ["User:", "\n\n", "***", "[not json"]);
        assert_eq!(stop_strings(&["[]".to_string()]).unwrap(), Vec::<String>::new());
        assert!(stop_strings(&[String::new()]).is_err());
        assert!(stop_strings(&[r#"["a", ""]"#.to_string()]).is_err());
    }

    #[test]
    fn the_model_id_defaults_to_the_directory_name() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny-llama");
        std::fs::create_dir(&model).unwrap();
        assert_eq!(model_name(&model.join(".")).unwrap(), "tiny-llama");
        assert!(model_name(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn samples_follow_the_schema_in_order() {
        let rows = vec![
            PromptRow { prompt_id: "a".into(), prompt: vec![Message::new("user", "hi")] },
            PromptRow { prompt_id: "b".into(), prompt: vec![Message::new("system", "s"), Message::new("user", "yo")] },
        ];
        let sample = |prompt, sample_index, finish_reason| Sample {
            prompt,
            sample_index,
            text: format!("{prompt}/{sample_index}"),
            token_ids: vec![5; sample_index + 1],
            prompt_tokens: 3,
            finish_reason,
        };
        let drawn: Vec<Drawn> = [sample(1, 0, FinishReason::Eos), sample(1, 1, FinishReason::Stop)].iter().map(Drawn::from).collect();
        let batch = samples_batch(&rows, &drawn, "m").unwrap();
        schema::by_name(schema::SAMPLES).unwrap().check_batch(&batch, 0).unwrap();
        let cols = Columns::new(&batch);
        assert_eq!(cols.str("prompt_id").unwrap().value(1), "b");
        assert_eq!(messages_at(cols.messages("prompt").unwrap(), 0).unwrap(), rows[1].prompt);
        assert_eq!(cols.i64("completion_tokens").unwrap().values().to_vec(), [1, 2]);
        assert_eq!(cols.str("finish_reason").unwrap().value(1), "stop");
    }
}
