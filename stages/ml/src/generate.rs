//! Batched text generation with a KV cache.
//!
//! # Decoding a batch
//!
//! Prompts of different lengths are **left-padded** into one batch, so every row's last prompt
//! token sits in the last column and the next token of every row is predicted from the same
//! position. A row's position ids count its real tokens (0, 1, 2, ... from its first real
//! token; padding gets 0), and a boolean attention mask combines causality with padding:
//! a query attends to earlier real tokens only. (A padding query attends to itself alone, so
//! its softmax never sees an all-masked row and never produces NaN.) After this prefill,
//! [`Decoder::step`] feeds one token per row, reusing the keys and values of the
//! [`KvCache`]. Finished rows leave the batch ([`KvCache::select`]), so they cost nothing
//! afterwards. Sliding-window layers (Mistral, Qwen2/Qwen3, Gemma) keep only the keys and values the next
//! query can see ([`Network::bound_cache`]: the last `window − 1` columns, which in a
//! left-padded batch are the same columns for every row), so their cache stays bounded
//! however long the generation.
//!
//! # Choosing tokens
//!
//! `temperature = 0` decodes greedily (argmax, ties to the lowest id, as `torch.argmax`).
//! Otherwise the logits are divided by the temperature, turned into probabilities, cut to the
//! nucleus (the most likely tokens whose probabilities first reach `top_p`; at least one), and
//! one token is drawn. All of this runs on the CPU copy of the row's logits in f64, and the draw
//! uses a random stream of its own per sample (splitmix64 seeded from `seed`, the prompt's key
//! and the sample index), never torch's global generator. The same seed therefore gives the
//! same samples whatever the batch size, the batch's other rows, the order of the prompts or
//! the device (up to floating-point differences in the logits themselves).
//!
//! # Stopping
//!
//! A sample ends with finish reason `eos` when it generates one of the tokenizer's
//! [`Tokenizer::stop_ids`] (the token is kept in the ids, left out of the text), `stop` when its
//! text contains one of the stop strings or of its prompt format's (a transcript's next
//! `"\n\nHuman:"`; the text is cut before the first occurrence; the ids keep every generated
//! token), or `length` after `max_new_tokens` tokens.
//!
//! # Completion text
//!
//! The text of a completion is the decoded text of (the prompt's last tokens + the completion)
//! minus the decoded text of those prompt tokens. Decoding the completion ids alone, as
//! transformers' examples do, drops the leading space of the first word with SentencePiece
//! tokenizers (`"▁there"` decodes to `"there"`); this way `prompt text + completion` is the
//! generated text, which is what the tokenization contract of [`crate::tokenize`] tokenizes
//! when the samples are scored or trained on. In a transcript, the space the format puts
//! before a reply is not part of the reply's text.
//!
//! # Prompts that do not fit
//!
//! A prompt longer than `max_position_embeddings − max_new_tokens` tokens is **skipped** (and
//! counted with its reason in [`Generation::skipped`]), as is a prompt with no tokens at all.
//! Truncating it from the left would silently drop its beginning (the system prompt, the
//! question) and generate a reply to a different prompt.

use std::cmp::Reverse;
use std::fmt;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::network::{KvCache, Network};
use crate::model::CausalLm;
use crate::tokenize::Tokenizer;

/// Prompt tokens decoded in front of a completion to give its first token its context (see
/// the module documentation).
const CONTEXT_TOKENS: usize = 16;

/// Token id in padding positions; they are never attended to, any valid id would do.
const PAD_ID: i64 = 0;

/// How to generate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerateOptions {
    /// Most tokens generated per sample (at least 1).
    pub max_new_tokens: usize,
    /// Softmax temperature (≥ 0); 0 decodes greedily.
    pub temperature: f64,
    /// Nucleus sampling: draw from the most likely tokens whose probabilities first reach
    /// `top_p`, in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// Samples per prompt (at least 1).
    pub n: usize,
    /// Seed of the samples' random streams.
    pub seed: u64,
    /// Strings that end a sample; the text is cut before the first one. Must not be empty.
    pub stop: Vec<String>,
    /// Samples decoded together (at least 1).
    pub batch_size: usize,
}

impl GenerateOptions {
    /// Checks the ranges documented on each field.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.max_new_tokens >= 1, "max_new_tokens must be at least 1");
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a finite number ≥ 0, found {}",
            self.temperature
        );
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "top_p must be in (0, 1], found {}", self.top_p);
        ensure!(self.n >= 1, "n (samples per prompt) must be at least 1");
        ensure!(self.batch_size >= 1, "batch_size must be at least 1");
        ensure!(self.stop.iter().all(|s| !s.is_empty()), "stop strings must not be empty");
        Ok(())
    }
}

/// A tokenized prompt to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIds {
    /// Key of the prompt's random streams (the `prompt_id`): equal keys give equal samples.
    pub key: String,
    /// Token ids (from [`Tokenizer::encode_prompt`]).
    pub ids: Vec<i64>,
}

/// Why a sample ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// It generated a stop token (EOS).
    Eos,
    /// Its text reached a stop string.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

impl FinishReason {
    /// `eos`, `stop` or `length`, as in the `samples` schema.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index of its prompt in the input.
    pub prompt: usize,
    /// Index among the samples of that prompt (`0..n`).
    pub sample_index: usize,
    /// The completion's text (see the module documentation).
    pub text: String,
    /// Every generated token id, a final stop token included.
    pub token_ids: Vec<i64>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Why a prompt got no samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Skip {
    /// The prompt has no tokens.
    Empty,
    /// The prompt is longer than `limit` = `max_position_embeddings − max_new_tokens`.
    TooLong {
        /// Tokens of the prompt.
        tokens: usize,
        /// The longest prompt that fits.
        limit: usize,
    },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Empty => write!(f, "the prompt has no tokens"),
            Skip::TooLong { tokens, limit } => write!(
                f,
                "the prompt has {tokens} tokens, more than the {limit} that leave room for max_new_tokens"
            ),
        }
    }
}

/// A prompt that got no samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Index of the prompt in the input.
    pub prompt: usize,
    /// Why.
    #[serde(flatten)]
    pub reason: Skip,
}

/// What [`Generator::generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The samples, ordered by prompt, then sample index.
    pub samples: Vec<Sample>,
    /// Prompts that got no samples, in input order.
    pub skipped: Vec<Skipped>,
}

/// Counts reported after every decoding step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Tokens generated so far.
    pub tokens: u64,
    /// Most tokens the whole run can generate: `tokens` plus the budget of unfinished samples.
    pub token_bound: u64,
    /// Samples finished so far.
    pub samples: u64,
}

/// Incremental decoding of a left-padded batch (see the module documentation).
pub struct Decoder<'a> {
    net: &'a Network,
    cache: KvCache,
    /// `(B, T_total)` bool: which cached positions hold real tokens.
    keys: Tensor,
    /// `(B,)` i64: position id of each row's next token.
    positions: Tensor,
}

impl<'a> Decoder<'a> {
    /// Runs `prompts` (at least one, none empty), left-padded into one batch on `device`,
    /// through `net`. Returns the decoder and the f32 logits `(B, vocab)` that predict each
    /// prompt's next token.
    pub fn prefill(net: &'a Network, prompts: &[&[i64]], device: Device) -> (Decoder<'a>, Tensor) {
        assert!(!prompts.is_empty() && prompts.iter().all(|p| !p.is_empty()), "prefill needs prompts with at least one token");
        let (b, t) = (prompts.len(), prompts.iter().map(|p| p.len()).max().unwrap_or(0));
        let (mut ids, mut real, mut positions) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for p in prompts {
            let pad = t - p.len();
            ids.extend(std::iter::repeat_n(PAD_ID, pad).chain(p.iter().copied()));
            real.extend((0..t).map(|i| i >= pad));
            positions.extend((0..t).map(|i| i.saturating_sub(pad) as i64));
        }
        let shape = [b as i64, t as i64];
        let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
        let keys = Tensor::from_slice(&real).view(shape).to_device(device);
        let positions = Tensor::from_slice(&positions).view(shape).to_device(device);
        let causal = Tensor::ones([t as i64, t as i64], (Kind::Bool, device)).tril(0);
        let mask = causal
            .logical_and(&keys.view([b as i64, 1, 1, t as i64]))
            .logical_or(&Tensor::eye(t as i64, (Kind::Bool, device)));
        let mut cache = KvCache::new();
        let hidden = net.hidden_states(&ids, &positions, Some(&mask), Some(&mut cache));
        net.bound_cache(&mut cache);
        let logits = net.logits(&hidden.narrow(1, t as i64 - 1, 1)).squeeze_dim(1).to_kind(Kind::Float);
        let lengths: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
        let next_positions = Tensor::from_slice(&lengths).to_device(device);
        (Decoder { net, cache, keys, positions: next_positions }, logits)
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.keys.size()[0] as usize
    }

    /// Appends one token per row; returns the f32 logits `(B, vocab)` that predict the next.
    pub fn step(&mut self, tokens: &[i64]) -> Tensor {
        assert_eq!(tokens.len(), self.rows(), "one token per row");
        let device = self.keys.device();
        let b = tokens.len() as i64;
        let ids = Tensor::from_slice(tokens).view([b, 1]).to_device(device);
        self.keys = Tensor::cat(&[&self.keys, &Tensor::ones([b, 1], (Kind::Bool, device))], 1);
        let mask = self.keys.view([b, 1, 1, -1]);
        let hidden = self.net.hidden_states(&ids, &self.positions.view([b, 1]), Some(&mask), Some(&mut self.cache));
        self.net.bound_cache(&mut self.cache);
        self.positions = &self.positions + 1;
        self.net.logits(&hidden).squeeze_dim(1).to_kind(Kind::Float)
    }

    /// The cache (to see how much it holds).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Keeps only the rows `rows` (indices into the current batch), in that order.
    pub fn retain(&mut self, rows: &[i64]) {
        let index = Tensor::from_slice(rows).to_device(self.keys.device());
        self.cache.select(&index);
        self.keys = self.keys.index_select(0, &index);
        self.positions = self.positions.index_select(0, &index);
    }
}

/// splitmix64 (Steele, Lea and Flood, 2014): a small portable random stream, one per sample.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream of sample `sample_index` of the prompt with key `key` under `seed`.
    fn for_sample(seed: u64, key: &str, sample_index: usize) -> SplitMix64 {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&seed.to_le_bytes());
        hasher.update(&(key.len() as u64).to_le_bytes());
        hasher.update(key.as_bytes());
        hasher.update(&(sample_index as u64).to_le_bytes());
        let bytes: [u8; 8] = hasher.finalize().as_bytes()[..8].try_into().expect("8 bytes");
        SplitMix64(u64::from_le_bytes(bytes))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest logit, the lowest on ties.
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// Indices of the nucleus: the most likely tokens (by `weights`, unnormalised probabilities
/// whose largest is 1) whose weights first reach `top_p` of the total, most likely first
/// (ties: lowest id first). Every token, in id order, when `top_p` is 1.
fn nucleus(weights: &[f64], top_p: f64) -> Vec<usize> {
    if top_p >= 1.0 {
        return (0..weights.len()).collect();
    }
    let target = top_p * weights.iter().sum::<f64>();
    // Sorting the whole vocabulary for every token is slow. Every token at or above a cut
    // comes before every token below it in the sorted order, so once the tokens at or above
    // the cut reach the target mass, the nucleus is among them: start high, lower if needed.
    let mut cut = 1e-4;
    let mut candidates = loop {
        let above: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] >= cut).collect();
        if cut == 0.0 || above.iter().map(|&i| weights[i]).sum::<f64>() >= target {
            break above;
        }
        cut = if cut > 1e-280 { cut * 1e-8 } else { 0.0 };
    };
    candidates.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut mass = 0.0;
    let keep = candidates
        .iter()
        .position(|&i| {
            mass += weights[i];
            mass >= target
        })
        .map_or(candidates.len(), |last| last + 1);
    candidates.truncate(keep);
    candidates
}

/// Chooses the next token from one row's logits (see the module documentation).
fn pick_token(logits: &[f32], temperature: f64, top_p: f64, rng: &mut SplitMix64) -> i64 {
    let best = argmax(logits);
    if temperature == 0.0 {
        return best as i64;
    }
    let max = f64::from(logits[best]);
    let weights: Vec<f64> = logits.iter().map(|&l| ((f64::from(l) - max) / temperature).exp()).collect();
    let kept = nucleus(&weights, top_p);
    let mut u = rng.next_f64() * kept.iter().map(|&i| weights[i]).sum::<f64>();
    for &i in &kept {
        u -= weights[i];
        if u < 0.0 {
            return i as i64;
        }
    }
    kept[kept.len() - 1] as i64
}

/// Byte offset of the first occurrence of any of `stops` in `text`.
fn first_stop(text: &str, stops: &[&str]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s)).min()
}

/// A sample being decoded.
struct Row<'p> {
    /// Index of the sample in the output.
    output: usize,
    prompt: usize,
    sample_index: usize,
    prompt_ids: &'p [i64],
    /// The decoded text of the prompt's last [`CONTEXT_TOKENS`] tokens.
    context_text: String,
    generated: Vec<i64>,
    rng: SplitMix64,
}

/// Generates completions with a loaded model and its tokenizer.
pub struct Generator<'a> {
    model: &'a CausalLm,
    tokenizer: &'a Tokenizer,
}

impl<'a> Generator<'a> {
    /// A generator for `model` (on its device) with `tokenizer`.
    pub fn new(model: &'a CausalLm, tokenizer: &'a Tokenizer) -> Generator<'a> {
        Generator { model, tokenizer }
    }

    /// Generates `options.n` samples for every prompt that fits, in batches of
    /// `options.batch_size` samples (the longest prompts first, so a batch holds prompts of
    /// similar lengths). `progress` is called after every decoding step.
    pub fn generate(&self, prompts: &[PromptIds], options: &GenerateOptions, mut progress: impl FnMut(&Progress)) -> Result<Generation> {
        options.validate()?;
        let positions = self.model.config.max_position_embeddings;
        ensure!(
            options.max_new_tokens < positions,
            "max_new_tokens {} leaves no room for a prompt: the model has {positions} positions",
            options.max_new_tokens
        );
        let limit = positions - options.max_new_tokens;
        let mut skipped = Vec::new();
        let mut rows = Vec::new();
        for (p, prompt) in prompts.iter().enumerate() {
            let tokens = prompt.ids.len();
            if tokens == 0 || tokens > limit {
                let reason = if tokens == 0 { Skip::Empty } else { Skip::TooLong { tokens, limit } };
                skipped.push(Skipped { prompt: p, reason });
                continue;
            }
            let context_text = self.tokenizer.decode(&prompt.ids[tokens.saturating_sub(CONTEXT_TOKENS)..])?;
            for sample_index in 0..options.n {
                rows.push(Row {
                    output: rows.len(),
                    prompt: p,
                    sample_index,
                    prompt_ids: &prompt.ids,
                    context_text: context_text.clone(),
                    generated: Vec::with_capacity(options.max_new_tokens),
                    rng: SplitMix64::for_sample(options.seed, &prompt.key, sample_index),
                });
            }
        }
        rows.sort_by_key(|r| Reverse(r.prompt_ids.len()));

        let mut samples: Vec<Option<Sample>> = vec![None; rows.len()];
        let mut counts = Progress { token_bound: (rows.len() * options.max_new_tokens) as u64, ..Progress::default() };
        let _no_grad = tch::no_grad_guard();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let batch: Vec<Row> = rows.by_ref().take(options.batch_size).collect();
            for (output, sample) in self.decode_batch(batch, options, &mut counts, &mut progress)? {
                samples[output] = Some(sample);
            }
        }
        Ok(Generation { samples: samples.into_iter().map(|s| s.expect("every sample decoded")).collect(), skipped })
    }

    /// Decodes one batch to the end; returns (output index, sample) pairs.
    fn decode_batch(&self, mut active: Vec<Row>, options: &GenerateOptions, counts: &mut Progress, progress: &mut impl FnMut(&Progress)) -> Result<Vec<(usize, Sample)>> {
        let prompts: Vec<&[i64]> = active.iter().map(|r| r.prompt_ids).collect();
        let (mut decoder, mut logits) = Decoder::prefill(&self.model.net, &prompts, self.model.vs.device());
        let mut done = Vec::with_capacity(active.len());
        loop {
            let logits_cpu = Vec::<f32>::try_from(logits.to_device(Device::Cpu).flatten(0, -1)).context("copying logits to the CPU")?;
            ensure!(!logits_cpu.iter().any(|l| l.is_nan()), "the model produced NaN logits");
            let vocab = logits_cpu.len() / active.len();
            let (mut keep, mut next, mut still) = (Vec::new(), Vec::new(), Vec::new());
            for (i, mut row) in active.into_iter().enumerate() {
                let token = pick_token(&logits_cpu[i * vocab..(i + 1) * vocab], options.temperature, options.top_p, &mut row.rng);
                row.generated.push(token);
                counts.tokens += 1;
                match self.finish(&row, options)? {
                    Some((finish_reason, text)) => {
                        counts.samples += 1;
                        counts.token_bound -= (options.max_new_tokens - row.generated.len()) as u64;
                        let sample = Sample {
                            prompt: row.prompt,
                            sample_index: row.sample_index,
                            text,
                            prompt_tokens: row.prompt_ids.len(),
                            token_ids: row.generated,
                            finish_reason,
                        };
                        done.push((row.output, sample));
                    }
                    None => {
                        keep.push(i as i64);
                        next.push(token);
                        still.push(row);
                    }
                }
            }
            progress(counts);
            active = still;
            if active.is_empty() {
                return Ok(done);
            }
            if keep.len() < decoder.rows() {
                decoder.retain(&keep);
            }
            logits = decoder.step(&next);
        }
    }

    /// Whether `row` ends with its newest token: why, and its final text.
    fn finish(&self, row: &Row, options: &GenerateOptions) -> Result<Option<(FinishReason, String)>> {
        let eos = row.generated.last().is_some_and(|t| self.tokenizer.stop_ids().contains(t));
        let at_length = row.generated.len() >= options.max_new_tokens;
        let format = self.tokenizer.prompt_format();
        let stops: Vec<&str> = options.stop.iter().map(String::as_str).chain(format.stop_strings().iter().copied()).collect();
        if !eos && !at_length && stops.is_empty() {
            return Ok(None);
        }
        let ids = if eos { &row.generated[..row.generated.len() - 1] } else { &row.generated[..] };
        let text = self.completion_text(row, ids)?;
        let reply = |text: &str| format.strip_reply(text).to_string();
        Ok(match first_stop(&text, &stops) {
            Some(cut) => Some((FinishReason::Stop, reply(&text[..cut]))),
            None if eos => Some((FinishReason::Eos, reply(&text))),
            None if at_length => Some((FinishReason::Length, reply(&text))),
            None => None,
        })
    }

    /// The text of `ids` as a continuation of the row's prompt (see the module documentation);
    /// the plain decoding of `ids` if the context's text is not a prefix of the joint text.
    fn completion_text(&self, row: &Row, ids: &[i64]) -> Result<String> {
        let start = row.prompt_ids.len().saturating_sub(CONTEXT_TOKENS);
        let joint = self.tokenizer.decode(&[&row.prompt_ids[start..], ids].concat())?;
        match joint.strip_prefix(row.context_text.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => self.tokenizer.decode(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> GenerateOptions {
        GenerateOptions { max_new_tokens: 8, temperature: 0.7, top_p: 0.9, n: 1, seed: 0, stop: vec![], batch_size: 8 }
    }

    #[test]
    fn splitmix64_matches_the_reference_stream() {
        // First outputs of the reference C implementation seeded with 1234567.
        let mut rng = SplitMix64(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        let u = SplitMix64(7).next_f64();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn sample_streams_depend_on_seed_key_and_index_only() {
        let first = |seed, key, index| SplitMix64::for_sample(seed, key, index).next_u64();
        assert_eq!(first(0, "p1", 0), first(0, "p1", 0));
        assert_ne!(first(0, "p1", 0), first(1, "p1", 0));
        assert_ne!(first(0, "p1", 0), first(0, "p2", 0));
        assert_ne!(first(0, "p1", 0), first(0, "p1", 1));
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = SplitMix64(0);
        assert_eq!(pick_token(&[0.5, 2.0, 2.0, -1.0], 0.0, 0.9, &mut rng), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -3.0]), 1);
    }

    #[test]
    fn a_tiny_nucleus_is_the_argmax() {
        let logits = [0.1f32, 1.5, 1.4, -2.0, 1.5];
        let mut rng = SplitMix64(3);
        for _ in 0..50 {
            assert_eq!(pick_token(&logits, 1.0, 1e-9, &mut rng), 1);
        }
    }

    #[test]
    fn nucleus_keeps_the_smallest_top_set_reaching_top_p() {
        let weights = [0.1, 1.0, 0.5, 0.4];
        // Total 2.0: 1.0 is half, 1.5 is 75%.
        assert_eq!(nucleus(&weights, 0.5), vec![1]);
        assert_eq!(nucleus(&weights, 0.6), vec![1, 2]);
        assert_eq!(nucleus(&weights, 0.76), vec![1, 2, 3]);
        assert_eq!(nucleus(&weights, 1.0), vec![0, 1, 2, 3]);
        // A long flat tail below the first cut: the cut is lowered until the mass is reached.
        // Total ≈ 2.0, so 75% needs the top token and 50,000 of the tail, the lowest ids first.
        let mut flat = vec![1e-5; 100_000];
        flat[0] = 1.0;
        let kept = nucleus(&flat, 0.75);
        assert_eq!(kept, (0..=50_000).collect::<Vec<_>>());
    }

    #[test]
    fn sampling_follows_the_probabilities() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1.
        let logits: Vec<f32> = [0.5f64, 0.3, 0.2].iter().map(|p| p.ln() as f32).collect();
        let mut rng = SplitMix64(42);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[pick_token(&logits, 1.0, 1.0, &mut rng) as usize] += 1;
        }
        for (count, p) in counts.iter().zip([0.5, 0.3, 0.2]) {
            assert!((*count as f64 / 20_000.0 - p).abs() < 0.015, "{counts:?}");
        }
        // top_p 0.6 keeps the two most likely tokens only.
        let mut counts = [0usize; 3];
        for _ in 0..10_000 {
            counts[pick_token(&logits, 1.0, 0.6, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!((counts[0] as f64 / 10_000.0 - 0.625).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn first_stop_finds_the_earliest_of_any() {
        let stops = ["User:", "\n\n"];
        assert_eq!(first_stop("Hi there.\n\nUser: more", &stops), Some(9));
        assert_eq!(first_stop("Hi User: x\n\n", &stops), Some(3));
        assert_eq!(first_stop("nothing", &stops), None);
    }

    #[test]
    fn options_are_checked() {
        assert!(options().validate().is_ok());
        let bad = [
            GenerateOptions { max_new_tokens: 0, ..options() },
            GenerateOptions { temperature: -1.0, ..options() },
            GenerateOptions { temperature: f64::NAN, ..options() },
            GenerateOptions { top_p: 0.0, ..options() },
            GenerateOptions { top_p: 1.5, ..options() },
            GenerateOptions { n: 0, ..options() },
            GenerateOptions { batch_size: 0, ..options() },
            GenerateOptions { stop: vec![String::new()], ..options() },
        ];
        for o in bad {
            assert!(o.validate().is_err(), "{o:?} should be refused");
        }
    }

    #[test]
    fn reasons_and_skips_read_well() {
        assert_eq!(FinishReason::Length.as_str(), "length");
        assert_eq!(serde_json::to_value(FinishReason::Eos).unwrap(), "eos");
        let skipped = Skipped { prompt: 3, reason: Skip::TooLong { tokens: 600, limit: 384 } };
        assert_eq!(serde_json::to_value(&skipped).unwrap(), serde_json::json!({"prompt": 3, "reason": "too_long", "tokens": 600, "limit": 384}));
        assert!(skipped.reason.to_string().contains("600 tokens"));
    }
}
