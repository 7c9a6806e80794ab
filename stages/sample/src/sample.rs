//! The sample run: read prompts, tokenize them, generate, write the `samples` table and the
//! summary.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arrow_array::{Int64Array, RecordBatch, StringArray};
use haloflow::records::{messages_array, messages_at, Columns, Message};
use haloflow::schema;
use haloflow_ml::device::{parse_device, parse_dtype};
use haloflow_ml::generate::{FinishReason, GenerateOptions, Generation, Generator, PromptIds, Sample};
use haloflow_ml::model::CausalLm;
use haloflow_dist::Dist;
use serde_json::json;

use crate::{shard, Args};

/// Skipped prompts listed by id in the summary (the count covers all).
const SKIPPED_EXAMPLES: usize = 20;

/// A row of the input `prompts` table.
#[derive(Debug, Clone, PartialEq)]
struct PromptRow {
    prompt_id: String,
    prompt: Vec<Message>,
}

/// Runs the stage.
pub fn run(args: &Args) -> Result<()> {
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
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
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype, device)?;
    let model_id = match &args.model_id {
        Some(id) => id.clone(),
        None => model_name(&args.model)?,
    };

    let rows = read_prompts(&args.prompts)?;
    if rows.is_empty() {
        bail!("{}: no prompts to sample from", args.prompts.display());
    }
    let tok = args.format.tokenizer(&args.model)?;
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
    let model = CausalLm::load(&args.model, device, kind)?;
    tracing::info!(model = %model_id, device = ?device, dtype = ?kind, prompts = my_prompts.len(), of = rows.len(), rank, world, n = options.n, "sampling");

    let bar = haloflow::stage_cli::progress((my_prompts.len() * options.n * options.max_new_tokens) as u64, "sampling tokens");
    let started = Instant::now();
    let generation = Generator::new(&model, &tok).generate(&my_prompts, &options, |p| {
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
    let batch = samples_batch(&rows, &generation, &model_id)?;
    haloflow::io::write_arrow(&args.samples, &batch.schema(), &[batch], Default::default())?;

    let tokens: usize = generation.samples.iter().map(|s| s.token_ids.len()).sum();
    let mut finish_reasons: BTreeMap<&str, usize> =
        [FinishReason::Eos, FinishReason::Stop, FinishReason::Length].iter().map(|r| (r.as_str(), 0)).collect();
    for s in &generation.samples {
        *finish_reasons.entry(s.finish_reason.as_str()).or_default() += 1;
    }
    let tokens_per_s = tokens as f64 / seconds.max(1e-9);
    let skipped_examples: Vec<_> = generation
        .skipped
        .iter()
        .take(SKIPPED_EXAMPLES)
        .map(|s| json!({"prompt_id": rows[s.prompt].prompt_id, "reason": s.reason}))
        .collect();
    let summary = json!({
        "model": model_id,
        "prompts": rows.len(),
        "prompts_sampled": rows.len() - generation.skipped.len(),
        "samples": generation.samples.len(),
        "skipped": generation.skipped.len(),
        "skipped_examples": skipped_examples,
        "prompt_tokens": generation.samples.iter().map(|s| s.prompt_tokens).sum::<usize>(),
        "tokens_generated": tokens,
        "tokens_per_s": tokens_per_s,
        "seconds": seconds,
        "finish_reasons": finish_reasons,
        "device": haloflow_ml::device::device_name(device),
        "dtype": haloflow_ml::device::dtype_name(kind),
        "ranks": world,
        "options": options,
    });
    haloflow::io::write_json(&args.summary, &summary)?;
    tracing::info!(samples = generation.samples.len(), skipped = generation.skipped.len(), tokens, tokens_per_s = %format!("{tokens_per_s:.0}"), "samples written");
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

/// The `samples` table: one row per sample, by prompt in input order, then sample index.
fn samples_batch(rows: &[PromptRow], generation: &Generation, model_id: &str) -> Result<RecordBatch> {
    let samples = &generation.samples;
    let row = |s: &Sample| &rows[s.prompt];
    Ok(RecordBatch::try_new(
        schema::by_name(schema::SAMPLES)?.arrow_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(samples.iter().map(|s| row(s).prompt_id.as_str()))),
            messages_array(samples.iter().map(|s| row(s).prompt.as_slice())),
            Arc::new(samples.iter().map(|s| s.sample_index as i64).collect::<Int64Array>()),
            Arc::new(StringArray::from_iter_values(samples.iter().map(|s| s.text.as_str()))),
            Arc::new(StringArray::from_iter_values(samples.iter().map(|_| model_id))),
            Arc::new(samples.iter().map(|s| s.prompt_tokens as i64).collect::<Int64Array>()),
            Arc::new(samples.iter().map(|s| s.token_ids.len() as i64).collect::<Int64Array>()),
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
        let generation = Generation {
            samples: vec![sample(1, 0, FinishReason::Eos), sample(1, 1, FinishReason::Stop)],
            skipped: vec![],
        };
        let batch = samples_batch(&rows, &generation, "m").unwrap();
        schema::by_name(schema::SAMPLES).unwrap().check_batch(&batch, 0).unwrap();
        let cols = Columns::new(&batch);
        assert_eq!(cols.str("prompt_id").unwrap().value(1), "b");
        assert_eq!(messages_at(cols.messages("prompt").unwrap(), 0).unwrap(), rows[1].prompt);
        assert_eq!(cols.i64("completion_tokens").unwrap().values().to_vec(), [1, 2]);
        assert_eq!(cols.str("finish_reason").unwrap().value(1), "stop");
    }
}
