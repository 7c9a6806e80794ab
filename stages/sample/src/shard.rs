//! Sampling on several ranks: prompt `i` goes to rank `i % world`, each rank generates its
//! share, and rank 0 merges every rank's samples back into input order. Since each sample draws
//! from its own (seed, prompt_id, index) random stream, the merged result is the one a single
//! process produces.

use anyhow::{bail, Context, Result};
use haloflow_ml::generate::{FinishReason, Generation, Sample, Skip, Skipped};
use serde_json::{json, Value};

/// The input indices of the prompts rank `rank` of `world` samples.
pub fn share(prompts: usize, rank: usize, world: usize) -> Vec<usize> {
    (rank..prompts).step_by(world.max(1)).collect()
}

/// A rank's generation as bytes for the gather, its prompt numbers mapped back to input
/// indices through `indices` (the rank's [`share`]).
pub fn encode(generation: &Generation, indices: &[usize]) -> Result<Vec<u8>> {
    let samples: Vec<Value> = generation
        .samples
        .iter()
        .map(|s| {
            json!({
                "prompt": indices[s.prompt], "sample_index": s.sample_index, "text": s.text,
                "token_ids": s.token_ids, "prompt_tokens": s.prompt_tokens, "finish_reason": s.finish_reason,
            })
        })
        .collect();
    let skipped: Vec<Value> = generation
        .skipped
        .iter()
        .map(|s| Ok(json!({ "prompt": indices[s.prompt], "skip": serde_json::to_value(&s.reason)? })))
        .collect::<Result<_>>()?;
    Ok(serde_json::to_vec(&json!({ "samples": samples, "skipped": skipped }))?)
}

/// Every rank's [`encode`]d part, merged into one generation in input order (by prompt, then
/// sample index).
pub fn merge(parts: &[Vec<u8>]) -> Result<Generation> {
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for (rank, bytes) in parts.iter().enumerate() {
        let part: Value = serde_json::from_slice(bytes).with_context(|| format!("the samples of rank {rank}"))?;
        for s in part["samples"].as_array().into_iter().flatten() {
            samples.push(decode_sample(s).with_context(|| format!("a sample of rank {rank}: {s}"))?);
        }
        for s in part["skipped"].as_array().into_iter().flatten() {
            skipped.push(decode_skipped(s).with_context(|| format!("a skipped prompt of rank {rank}: {s}"))?);
        }
    }
    samples.sort_by_key(|s| (s.prompt, s.sample_index));
    skipped.sort_by_key(|s| s.prompt);
    Ok(Generation { samples, skipped })
}

fn number(v: &Value, key: &str) -> Result<usize> {
    v[key].as_u64().map(|n| n as usize).with_context(|| format!("no number `{key}`"))
}

fn decode_sample(v: &Value) -> Result<Sample> {
    let finish_reason = match v["finish_reason"].as_str() {
        Some("eos") => FinishReason::Eos,
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        other => bail!("unknown finish reason {other:?}"),
    };
    let token_ids = v["token_ids"].as_array().context("no `token_ids`")?.iter().map(|t| t.as_i64().context("a token id")).collect::<Result<_>>()?;
    Ok(Sample {
        prompt: number(v, "prompt")?,
        sample_index: number(v, "sample_index")?,
        text: v["text"].as_str().context("no `text`")?.to_string(),
        token_ids,
        prompt_tokens: number(v, "prompt_tokens")?,
        finish_reason,
    })
}

fn decode_skipped(v: &Value) -> Result<Skipped> {
    let skip = &v["skip"];
    let reason = match skip["reason"].as_str() {
        Some("empty") => Skip::Empty,
        Some("too_long") => Skip::TooLong { tokens: number(skip, "tokens")?, limit: number(skip, "limit")? },
        other => bail!("unknown skip reason {other:?}"),
    };
    Ok(Skipped { prompt: number(v, "prompt")?, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prompt: usize, sample_index: usize, finish_reason: FinishReason) -> Sample {
        Sample { prompt, sample_index, text: format!("p{prompt} s{sample_index} \"é\"\n"), token_ids: vec![1, -2, prompt as i64], prompt_tokens: 4 + prompt, finish_reason }
    }

    #[test]
    fn shares_cover_every_prompt_once() {
        for (n, world) in [(0, 2), (1, 2), (7, 3), (8, 1), (5, 8)] {
            let mut all: Vec<usize> = (0..world).flat_map(|r| share(n, r, world)).collect();
            all.sort();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} world {world}");
        }
        assert_eq!(share(7, 1, 3), [1, 4]);
    }

    #[test]
    fn the_shards_merge_into_the_single_process_generation() {
        // The whole: prompts 0..5, two samples each, prompt 3 skipped (too long), prompt 4 empty.
        let whole = Generation {
            samples: [0, 1, 2].iter().flat_map(|&p| [sample(p, 0, FinishReason::Eos), sample(p, 1, FinishReason::Length)]).collect(),
            skipped: vec![
                Skipped { prompt: 3, reason: Skip::TooLong { tokens: 90, limit: 64 } },
                Skipped { prompt: 4, reason: Skip::Empty },
            ],
        };
        // Each rank numbers its prompts 0.. within its share.
        let parts: Vec<Vec<u8>> = (0..2)
            .map(|rank| {
                let indices = share(5, rank, 2);
                let local = |p: usize| indices.iter().position(|&i| i == p);
                let part = Generation {
                    samples: whole.samples.iter().filter_map(|s| Some(Sample { prompt: local(s.prompt)?, ..s.clone() })).collect(),
                    skipped: whole.skipped.iter().filter_map(|s| Some(Skipped { prompt: local(s.prompt)?, ..s.clone() })).collect(),
                };
                encode(&part, &indices).unwrap()
            })
            .collect();
        assert_eq!(merge(&parts).unwrap(), whole);
        assert!(merge(&[b"{\"samples\": [{\"prompt\": 0}]}".to_vec()]).unwrap_err().to_string().contains("rank 0"));
    }
}
