//! The refcache run: tokenize, bucket, score under no-grad, keep chunks for resumption, and
//! write the Parquet file keyed by example id with the fingerprint in its metadata.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arrow_array::builder::{Float32Builder, ListBuilder};
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::Schema;
use haloflow::schema::{self, REF_FINGERPRINT};
use haloflow_dist::Dist;
use haloflow_ml::dataset::{self, DataKind, EncodedRow};
use haloflow_ml::device::{parse_device, parse_dtype};
use haloflow_ml::fingerprint::Fingerprint;
use haloflow_ml::logprobs::{self, Batch, Sequence};
use haloflow_ml::model::CausalLm;
use serde_json::json;
use tch::{Device, Kind};

use crate::buckets;
use crate::scratch::{Scratch, SeqResult};
use crate::Args;

/// Key of the Parquet metadata that says whether rows are `plan` or `paired` rows.
pub const DATA_KIND: &str = "haloflow.data_kind";

/// Runs the stage.
pub fn run(args: &Args) -> Result<()> {
    haloflow_ml::device::init_process(args.threads);
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype, device)?;
    let (data_kind, rows) = dataset::read_rows(&args.data)?;
    if rows.is_empty() {
        bail!("{}: no rows to score", args.data.display());
    }
    let tok = args.format.tokenizer(&args.model)?;
    let (encoded, stats) = dataset::encode_rows(&tok, &rows, args.max_prompt_length, args.max_length)?;
    if stats.skipped > 0 {
        tracing::warn!(skipped = stats.skipped, first = ?stats.skipped_examples.first(), "rows skipped (empty completion after truncation)");
    }
    if encoded.is_empty() {
        bail!("no row left to score: all {} rows were skipped (e.g. {:?})", stats.rows, stats.skipped_examples.first());
    }
    let fingerprint = Fingerprint::compute(&args.model, &tok, &args.data, args.max_prompt_length, args.max_length)?;
    let dist = Dist::from_env("gloo", Duration::from_secs_f64(args.dist_timeout_s))?;
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank(), d.world_size()));
    let device = dist.as_ref().map_or(device, |d| d.rank_device(device));
    let model = CausalLm::load(&args.model, device, kind)?;

    // Rows are the unit of work: both sequences of a row share the prompt, which is computed
    // once (see `logprobs::shared_prefix_logps`). Sequence 2r is row r's first, 2r+1 its second.
    // Each row costs its shared prefix once and its two suffixes: sort by (prefix, suffix) so
    // rows in a batch are alike in both, and pad each batch to (max prefix + 2 × max suffix).
    let shape: Vec<(usize, usize)> = encoded.iter().map(|r| row_shape(&r.seqs)).collect();
    let order = buckets::sorted_desc(encoded.len(), |r| shape[r]);
    let cost = |batch: &[usize]| {
        let (l, s) = batch.iter().fold((0, 0), |(l, s), &r| (l.max(shape[r].0), s.max(shape[r].1)));
        batch.len() * (l + 2 * s)
    };
    // The same on every rank (each rank's own GPU is left out), so all ranks share one scratch.
    let run_id = haloflow::hashing::hash_json(&json!({
        "cuda": device.is_cuda(),
        "fingerprint": fingerprint, "chunk_size": args.chunk_size, "token_budget": args.token_budget,
        "per_token": args.per_token, "kind": format!("{kind:?}"),
    }));
    let scratch_dir = args
        .scratch
        .clone()
        .unwrap_or_else(|| args.logps.with_extension("partial"));
    let scratch = open_scratch(&scratch_dir, &run_id, dist.as_ref())?;

    let row_tokens = |r: usize| encoded[r].seqs.iter().map(|s| s.ids.len()).sum::<usize>();
    let total_tokens: usize = (0..encoded.len()).map(row_tokens).sum();
    let chunks: Vec<&[usize]> = order.chunks(args.chunk_size.max(1)).collect();
    // Chunk c is scored by rank c % world (chunks go longest first, so each rank gets a like
    // share of the work); batches never cross chunks, so every sequence is scored in the same
    // batch as in a single process.
    let mine = |c: usize| c % world == rank;
    let my_tokens: usize = chunks.iter().enumerate().filter(|(c, _)| mine(*c)).flat_map(|(_, chunk)| chunk.iter().map(|&r| row_tokens(r))).sum();
    let bar = haloflow::stage_cli::progress(my_tokens as u64, "refcache tokens");
    let started = Instant::now();
    let mut results: Vec<Option<SeqResult>> = vec![None; 2 * encoded.len()];
    let (mut resumed, mut computed_tokens, mut real_tokens, mut padded_tokens) = (0usize, 0usize, 0usize, 0usize);
    let _no_grad = tch::no_grad_guard();
    for (c, chunk) in chunks.iter().enumerate().filter(|(c, _)| mine(*c)) {
        let chunk_tokens: usize = chunk.iter().map(|&r| row_tokens(r)).sum();
        if let Some(done) = scratch.read(c)? {
            for (i, r) in done {
                results[i] = Some(r);
            }
            resumed += 1;
            bar.inc(chunk_tokens as u64);
            continue;
        }
        let mut chunk_results = Vec::with_capacity(2 * chunk.len());
        for batch in buckets::batches(chunk, args.token_budget, cost) {
            let (scored, padded) = score_rows(&model, &encoded, &batch, device, args.per_token, args.token_budget)?;
            padded_tokens += padded;
            real_tokens += batch.iter().map(|&r| shape[r].0 + encoded[r].seqs.iter().map(|q| q.ids.len() - shape[r].0).sum::<usize>()).sum::<usize>();
            chunk_results.extend(scored);
            let tokens: usize = batch.iter().map(|&r| row_tokens(r)).sum();
            computed_tokens += tokens;
            bar.inc(tokens as u64);
        }
        scratch.write(c, &chunk_results)?;
        for (i, r) in chunk_results {
            results[i] = Some(r);
        }
        haloflow::stage_cli::fault_point("after_chunks", c / world + 1 - resumed);
    }
    bar.finish_and_clear();
    if let Some(dist) = &dist {
        // The gather returns once every rank has stored its chunks in the scratch directory.
        let counts = json!([resumed, computed_tokens, real_tokens, padded_tokens]).to_string();
        let all = dist.all_gather_bytes(counts.as_bytes())?;
        if rank != 0 {
            tracing::info!(rank, "chunks scored; rank 0 writes the output");
            return Ok(());
        }
        let mut sums = [0usize; 4];
        for (r, bytes) in all.iter().enumerate() {
            let counts: [usize; 4] = serde_json::from_slice(bytes).with_context(|| format!("the counts of rank {r}"))?;
            for (sum, n) in sums.iter_mut().zip(counts) {
                *sum += n;
            }
        }
        [resumed, computed_tokens, real_tokens, padded_tokens] = sums;
        for (c, _) in chunks.iter().enumerate().filter(|(c, _)| !mine(*c)) {
            let done = scratch.read(c)?.with_context(|| format!("chunk {c} of rank {} is missing from the scratch directory", c % world))?;
            for (i, r) in done {
                results[i] = Some(r);
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let results: Vec<SeqResult> = results.into_iter().map(|r| r.expect("every chunk scored")).collect();

    let batch = output_batch(data_kind, &encoded, &results, args.per_token)?;
    let metadata = HashMap::from([
        (REF_FINGERPRINT.to_string(), serde_json::to_string(&fingerprint)?),
        (DATA_KIND.to_string(), serde_json::to_value(data_kind)?.as_str().unwrap_or_default().to_string()),
    ]);
    haloflow::io::write_parquet(&args.logps, &batch.schema(), &[batch], metadata)?;
    let summary = json!({
        "data_kind": data_kind,
        "rows": stats.rows,
        "rows_written": encoded.len(),
        "skipped": stats.skipped,
        "skipped_examples": stats.skipped_examples,
        "truncated_prompts": stats.truncated_prompts,
        "truncated_completions": stats.truncated_completions,
        "sequences": 2 * encoded.len(),
        "tokens": total_tokens,
        "tokens_computed": computed_tokens,
        "forward_tokens_computed": real_tokens,
        "padded_tokens_computed": padded_tokens,
        "prefix_sharing_saving": if computed_tokens > 0 { 1.0 - real_tokens as f64 / computed_tokens as f64 } else { 0.0 },
        "padding_waste": if padded_tokens > 0 { 1.0 - real_tokens as f64 / padded_tokens as f64 } else { 0.0 },
        "seconds": seconds,
        "tokens_per_s": computed_tokens as f64 / seconds.max(1e-9),
        "chunks": chunks.len(),
        "chunks_resumed": resumed,
        "ranks": world,
        "device": haloflow_ml::device::device_name(device),
        "dtype": haloflow_ml::device::dtype_name(kind),
        "fingerprint": fingerprint,
    });
    tracing::info!(rows = encoded.len(), skipped = stats.skipped, tokens_per_s = %format!("{:.0}", summary["tokens_per_s"].as_f64().unwrap_or(0.0)), resumed, "reference log-probs written");
    haloflow::io::write_json(&args.summary, &summary)?;
    scratch.remove()
}

/// Opens the scratch directory: rank 0 first (it clears a directory left by another run), then,
/// once it has, the other ranks.
fn open_scratch(dir: &std::path::Path, run_id: &str, dist: Option<&Dist>) -> Result<Scratch> {
    let Some(dist) = dist else { return Scratch::open(dir, run_id) };
    let first = if dist.rank() == 0 { Some(Scratch::open(dir, run_id)?) } else { None };
    dist.barrier()?;
    match first {
        Some(scratch) => Ok(scratch),
        None => Scratch::open(dir, run_id),
    }
}

/// Scores the rows of one batch: pairs sharing at least their first token through the shared
/// prefix path, the others sequence by sequence. Returns (sequence index, result) pairs and the
/// padded tokens the forward passes computed.
fn score_rows(model: &CausalLm, rows: &[EncodedRow], batch: &[usize], device: Device, per_token: bool, suffix_budget: usize) -> Result<(Vec<(usize, SeqResult)>, usize)> {
    let (shared, separate): (Vec<usize>, Vec<usize>) =
        batch.iter().partition(|&&r| logprobs::shareable_prefix(&rows[r].seqs[0], &rows[r].seqs[1]) >= 1);
    let mut out = Vec::with_capacity(2 * batch.len());
    let mut padded = 0;
    if !shared.is_empty() {
        let pairs: Vec<(&Sequence, &Sequence)> = shared.iter().map(|&r| (&rows[r].seqs[0], &rows[r].seqs[1])).collect();
        let (scored, computed) = logprobs::shared_prefix_logps(&model.net, &pairs, device, per_token, suffix_budget);
        padded += computed;
        for (&r, scored) in shared.iter().zip(scored) {
            for (k, s) in scored.into_iter().enumerate() {
                out.push((2 * r + k, SeqResult { logp: checked(s.logp, &rows[r].seqs[k])?, n_tokens: s.n_tokens as i64, tokens: s.tokens }));
            }
        }
    }
    if !separate.is_empty() {
        let seqs: Vec<(usize, &Sequence)> = separate.iter().flat_map(|&r| [(2 * r, &rows[r].seqs[0]), (2 * r + 1, &rows[r].seqs[1])]).collect();
        let members: Vec<&Sequence> = seqs.iter().map(|(_, s)| *s).collect();
        let batch = Batch::new(&members, 0, device);
        padded += batch.input_ids.numel();
        let token_logps = logprobs::token_logps(&model.net, &batch, logprobs::LOGITS_CHUNK).to_device(Device::Cpu).to_kind(Kind::Double);
        for (row, (i, s)) in seqs.iter().enumerate() {
            let n = s.ids.len() - s.completion_start;
            let values = Vec::<f64>::try_from(&token_logps.get(row as i64).narrow(0, s.completion_start as i64 - 1, n as i64)).context("log-probs")?;
            let tokens = per_token.then(|| values.iter().map(|&v| v as f32).collect());
            out.push((*i, SeqResult { logp: checked(values.iter().sum(), s)?, n_tokens: n as i64, tokens }));
        }
    }
    Ok((out, padded))
}

/// A row's (shared prefix, longest suffix) in tokens; the prefix is 0 when the two sequences
/// cannot share one.
fn row_shape(seqs: &[Sequence; 2]) -> (usize, usize) {
    let l = logprobs::shareable_prefix(&seqs[0], &seqs[1]);
    (l, seqs.iter().map(|s| s.ids.len() - l).max().unwrap_or(0))
}

/// A finite summed log-prob, or an error naming the sequence length.
fn checked(logp: f64, s: &Sequence) -> Result<f64> {
    if !logp.is_finite() {
        bail!("non-finite reference log-prob ({logp}) for a sequence of {} tokens", s.ids.len());
    }
    Ok(logp)
}

fn token_lists<'a>(values: impl Iterator<Item = &'a SeqResult>) -> ArrayRef {
    let mut builder = ListBuilder::new(Float32Builder::new());
    for r in values {
        builder.values().append_slice(r.tokens.as_deref().unwrap_or_default());
        builder.append(true);
    }
    Arc::new(builder.finish())
}

/// The `ref_logps` table: one row per scored row, in input order.
fn output_batch(kind: DataKind, rows: &[EncodedRow], results: &[SeqResult], per_token: bool) -> Result<RecordBatch> {
    let second = match kind {
        DataKind::Plan => "kl",
        DataKind::Paired => "rejected",
    };
    let first_of = |i: usize| &results[2 * i];
    let second_of = |i: usize| &results[2 * i + 1];
    let n = rows.len();
    let mut columns: Vec<(String, ArrayRef)> = vec![
        ("example_id".into(), Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.id.as_str())))),
        ("logp".into(), Arc::new((0..n).map(|i| first_of(i).logp).collect::<Float64Array>())),
        ("n_tokens".into(), Arc::new((0..n).map(|i| first_of(i).n_tokens).collect::<Int64Array>())),
        (format!("{second}_logp"), Arc::new((0..n).map(|i| second_of(i).logp).collect::<Float64Array>())),
        (format!("{second}_n_tokens"), Arc::new((0..n).map(|i| second_of(i).n_tokens).collect::<Int64Array>())),
    ];
    if per_token {
        columns.push(("token_logps".into(), token_lists((0..n).map(first_of))));
        columns.push((format!("{second}_token_logps"), token_lists((0..n).map(second_of))));
    }
    let def = schema::by_name(schema::REF_LOGPS)?.arrow_schema();
    let fields = columns
        .iter()
        .map(|(name, _)| def.field_with_name(name).cloned().with_context(|| format!("column {name} is not in the ref_logps schema")))
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns.into_iter().map(|(_, a)| a).collect())?)
}
