//! Summed completion log-probabilities of tokenized examples, the quantity every HALO uses.
//!
//! Sequences are right-padded into a batch; with causal attention, padding after a sequence
//! cannot change its hidden states, so no attention mask is needed. Position `t` contributes
//! `log p(ids[t] | ids[<t])` when `t ≥ completion_start`.
//!
//! Only completion positions reach the LM head ([`completion_logps`]): their hidden states are
//! gathered, then the LM head, log-softmax and the target's gather run in chunks of `chunk`
//! positions, so `(B, T, vocab)` logits are never held. Without gradient the LM head's memory
//! is bounded by `chunk × vocab`; with gradient autograd keeps each chunk's logits for the
//! backward pass (tch has no custom autograd function to recompute them there), so it is
//! bounded by completion positions × vocab instead of batch × length × vocab.

use tch::{Device, Kind, Tensor};

use crate::network::{Continuation, Network};
use crate::recompute::grad_if;

/// Default number of positions whose logits are computed at once ([`completion_logps`]).
pub const LOGITS_CHUNK: usize = 1024;

/// A tokenized example: ids (prompt + completion + EOS) and where the completion starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<i64>,
    /// Index of the first completion token (≥ 1).
    pub completion_start: usize,
}

/// A right-padded batch and its completion positions.
pub struct Batch {
    /// `(B, T)` token ids, padded with `pad_id`.
    pub input_ids: Tensor,
    /// `(B, T-1)` float mask of target positions that belong to the completion.
    pub target_mask: Tensor,
    /// `(N,)` for each completion token, its predicting position (the one before it) as an
    /// index into the flattened `(B·T)` positions.
    pub predictors: Tensor,
    /// `(N,)` the completion tokens, in the order of `predictors`.
    pub targets: Tensor,
    /// `(N,)` the row of each completion token.
    pub rows: Tensor,
    /// Tokens of the sequences (without padding).
    pub tokens: usize,
}

impl Batch {
    /// Pads `seqs` to their longest length.
    pub fn new(seqs: &[&Sequence], pad_id: i64, device: Device) -> Batch {
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut mask = Vec::with_capacity(seqs.len() * (t - 1));
        let (mut predictors, mut targets, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for (b, s) in seqs.iter().enumerate() {
            ids.extend(s.ids.iter().copied().chain(std::iter::repeat(pad_id)).take(t));
            // Target position p predicts ids[p + 1].
            mask.extend((0..t - 1).map(|p| if p + 1 >= s.completion_start && p + 1 < s.ids.len() { 1f32 } else { 0f32 }));
            for p in s.completion_start - 1..s.ids.len() - 1 {
                predictors.push((b * t + p) as i64);
                targets.push(s.ids[p + 1]);
                rows.push(b as i64);
            }
        }
        let b = seqs.len() as i64;
        let on_device = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        Batch {
            input_ids: Tensor::from_slice(&ids).view([b, t as i64]).to_device(device),
            target_mask: Tensor::from_slice(&mask).view([b, t as i64 - 1]).to_device(device),
            predictors: on_device(&predictors),
            targets: on_device(&targets),
            rows: on_device(&rows),
            tokens: seqs.iter().map(|s| s.ids.len()).sum(),
        }
    }

    /// Padded positions of the batch (B·T), what a forward pass over it computes.
    pub fn padded(&self) -> usize {
        self.input_ids.numel()
    }

    /// Final hidden states `(B, T, hidden)` of the batch (causal, positions `0..T`).
    pub fn hidden_states(&self, net: &Network) -> Tensor {
        let (b, t) = self.input_ids.size2().expect("input ids are (B, T)");
        let positions = Tensor::arange(t, (Kind::Int64, self.input_ids.device())).unsqueeze(0).expand([b, t], false);
        net.hidden_states(&self.input_ids, &positions, None, None)
    }

    /// Completion log-probs `(N,)` (f32) from the batch's hidden states, in chunks of `chunk`
    /// positions ([`completion_logps`]).
    pub fn completion_logps(&self, net: &Network, hidden: &Tensor, chunk: usize) -> Tensor {
        completion_logps(net, hidden, &self.predictors, &self.targets, chunk)
    }

    /// Per-token log-probs `(B, T-1)` from completion log-probs `(N,)`, zero outside the
    /// completion.
    pub fn dense(&self, values: &Tensor) -> Tensor {
        let (b, t) = self.input_ids.size2().expect("input ids are (B, T)");
        // Row r's position p is r·T + p in (B·T) and r·(T−1) + p in (B·(T−1)).
        let index = &self.predictors - &self.rows;
        Tensor::zeros([b * (t - 1)], (Kind::Float, values.device())).index_put(&[Some(index)], values, false).view([b, t - 1])
    }

    /// Per-row sums `(B,)` (f32) of completion log-probs `(N,)`.
    pub fn sums(&self, values: &Tensor) -> Tensor {
        let b = self.input_ids.size()[0];
        Tensor::zeros([b], (Kind::Float, values.device())).index_add(0, &self.rows, values)
    }

    /// Completion tokens per row `(B,)` (f32).
    pub fn counts(&self) -> Tensor {
        self.target_mask.sum_dim_intlist([-1].as_slice(), false, Kind::Float)
    }
}

/// Log-probs `(N,)` (f32) of `targets (N,)`, each predicted by the hidden state at the
/// matching entry of `predictors (N,)` (indices into the flattened leading dimensions of
/// `hidden (…, H)`): the hidden states are gathered, then the LM head, log-softmax and the
/// target's gather run on `chunk` positions at a time and the chunks are concatenated (with
/// their graph when gradients are on).
pub fn completion_logps(net: &Network, hidden: &Tensor, predictors: &Tensor, targets: &Tensor, chunk: usize) -> Tensor {
    let width = *hidden.size().last().expect("hidden states have a width");
    let picked = hidden.reshape([-1, width]).index_select(0, predictors);
    let n = picked.size()[0];
    let chunk = chunk.max(1) as i64;
    let parts: Vec<Tensor> = (0..n)
        .step_by(chunk as usize)
        .map(|start| {
            let len = chunk.min(n - start);
            let logits = net.logits(&picked.narrow(0, start, len)).to_kind(Kind::Float);
            let target = targets.narrow(0, start, len).unsqueeze(-1);
            logits.gather(-1, &target, false).squeeze_dim(-1) - logits.logsumexp([-1].as_slice(), false)
        })
        .collect();
    if parts.is_empty() {
        Tensor::zeros([0], (Kind::Float, hidden.device()))
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// Per-token log-probs `(B, T-1)` of each next token (f32), zero outside the completion,
/// computed for completion positions only, in chunks of `chunk`.
pub fn token_logps(net: &Network, batch: &Batch, chunk: usize) -> Tensor {
    batch.dense(&batch.completion_logps(net, &batch.hidden_states(net), chunk))
}

/// Per-token log-probs `(B, T-1)` of each next token given the batch's full logits
/// `(B, T, V)`, zero outside the completion: the full-vocabulary path that
/// [`completion_logps`] replaces, kept as the reference of its equality tests and of the
/// LM-head memory benchmark (`ci/bench-lmhead.sh`).
pub fn target_logps(logits: &Tensor, batch: &Batch) -> Tensor {
    let t = logits.size()[1];
    let logits = logits.narrow(1, 0, t - 1).to_kind(Kind::Float);
    let targets = batch.input_ids.narrow(1, 1, t - 1).unsqueeze(-1);
    let picked = logits.gather(-1, &targets, false).squeeze_dim(-1);
    (picked - logits.logsumexp([-1].as_slice(), false)) * &batch.target_mask
}

/// Summed completion log-probs `(B,)` (f32) and completion token counts `(B,)`, computed for
/// completion positions only, in chunks of `chunk`.
pub fn sequence_logps(net: &Network, batch: &Batch, chunk: usize) -> (Tensor, Tensor) {
    let values = batch.completion_logps(net, &batch.hidden_states(net), chunk);
    (batch.sums(&values), batch.counts())
}

/// The log-probs of one scored sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Summed completion log-prob (accumulated in f64).
    pub logp: f64,
    /// Completion tokens.
    pub n_tokens: usize,
    /// Per-token completion log-probs, when asked for.
    pub tokens: Option<Vec<f32>>,
}

/// How many leading tokens two sequences can share: their common prefix, but no further than
/// either completion's start (so every completion token is scored from the suffix pass or
/// from the prefix's last position).
pub fn shareable_prefix(a: &Sequence, b: &Sequence) -> usize {
    let common = a.ids.iter().zip(&b.ids).take_while(|(x, y)| x == y).count();
    common.min(a.completion_start).min(b.completion_start)
}

/// The completion log-probs of pairs of sequences scored by [`shared_prefix_pass`].
pub struct SharedLogps {
    /// Per-token completion log-probs (f32) of every sequence, span after span.
    pub values: Tensor,
    /// `(sequence, offset, count)` of each sequence's span in `values`, in offset order;
    /// sequence `2i + side` is side `side` (0: first, 1: second) of pair `i`.
    pub spans: Vec<(usize, usize, usize)>,
    /// Token positions the passes computed, padding included.
    pub padded: usize,
    /// Token positions the passes computed without padding: each shared prefix once, then the
    /// suffixes.
    pub forward: usize,
    /// Sequences of the pairs (2 · pairs), scored or skipped.
    pub sequences: usize,
}

impl SharedLogps {
    /// Summed completion log-probs `(2·pairs,)` (f32), indexed by sequence (0 for a skipped side).
    pub fn sums(&self) -> Tensor {
        let index: Vec<i64> = self.spans.iter().flat_map(|&(q, _, n)| std::iter::repeat(q as i64).take(n)).collect();
        let index = Tensor::from_slice(&index).to_device(self.values.device());
        Tensor::zeros([self.sequences as i64], (Kind::Float, self.values.device())).index_add(0, &index, &self.values)
    }

    /// Completion tokens `(2·pairs,)` (f32), indexed by sequence (0 for a skipped side).
    pub fn counts(&self) -> Tensor {
        let mut counts = vec![0f32; self.sequences];
        for &(q, _, n) in &self.spans {
            counts[q] = n as f32;
        }
        Tensor::from_slice(&counts).to_device(self.values.device())
    }
}

/// Scores pairs of sequences that share a prompt (a completion and its KL partner, or a
/// chosen and a rejected reply) computing the shared prefix once: the prefixes run as one
/// batch and the suffixes, by side, sorted by length and grouped so each group stays within
/// `suffix_budget` padded tokens and holds suffixes of similar length, continue from their
/// prefixes' keys and values with a mask that hides the prefix padding
/// ([`Network::shared_forward`], layer by layer); completion positions go through
/// [`completion_logps`] in chunks of `chunk`. Every pair must share at least one token
/// ([`shareable_prefix`] ≥ 1). Results equal [`token_logps`] on each sequence up to float
/// rounding.
///
/// `sides[side]` says whether that side is scored (`Some`) and whether its log-probs keep the
/// graph (`Some(true)`, under the caller's grad mode). The prefixes keep the graph when a side
/// does, so gradients of those suffixes flow into the shared prompt computation; a side
/// without gradient runs under no-grad, continuing from keys and values that carry no graph
/// (KTO's KL partners continue from the policy's prompt pass this way, adding nothing to the
/// backward pass). Under activation checkpointing the pass is one checkpointed forward: the
/// prefixes and the sides with gradient are recomputed together, layer by layer, in the
/// backward pass. Groups never mix sides, so a side's results are the same bit for bit
/// whether the other side is scored in the same call or skipped.
pub fn shared_prefix_pass(net: &Network, pairs: &[(&Sequence, &Sequence)], device: Device, suffix_budget: usize, chunk: usize, sides: [Option<bool>; 2]) -> SharedLogps {
    let b = pairs.len() as i64;
    let prefix: Vec<usize> = pairs.iter().map(|(x, y)| shareable_prefix(x, y)).collect();
    assert!(prefix.iter().all(|&l| l >= 1), "every pair must share its first token");
    let lmax = *prefix.iter().max().expect("at least one pair");
    let mut padded = b as usize * lmax;
    let mut forward: usize = prefix.iter().sum();

    // The prefixes: causal, right-padded.
    let prefix_ids: Vec<i64> = pairs.iter().zip(&prefix).flat_map(|((x, _), &l)| x.ids[..l].iter().copied().chain(std::iter::repeat(0)).take(lmax)).collect();
    let prefix_ids = Tensor::from_slice(&prefix_ids).view([b, lmax as i64]).to_device(device);
    let prefix_positions = Tensor::arange(lmax as i64, (Kind::Int64, device)).unsqueeze(0).expand([b, lmax as i64], false);

    // The suffixes, sequence q = 2·pair + side, side by side, longest first, in groups that
    // continue from their prefixes' rows with a mask hiding the prefix padding.
    let seqs: Vec<&Sequence> = pairs.iter().flat_map(|(x, y)| [*x, *y]).collect();
    let suffix_len = |q: usize| seqs[q].ids.len() - prefix[q / 2];
    let mut order: Vec<usize> = (0..seqs.len()).filter(|q| sides[q % 2].is_some()).collect();
    order.sort_by(|&a, &c| (a % 2).cmp(&(c % 2)).then(suffix_len(c).cmp(&suffix_len(a))).then(a.cmp(&c)));
    let (mut groups, mut continuations) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < order.len() {
        // A group ends at the budget, where suffixes get shorter than 3/4 of its longest (so
        // little of it is padding), or at the other side.
        let longest = suffix_len(order[start]);
        let side = order[start] % 2;
        let fits = (suffix_budget / longest.max(1)).max(1);
        let n = order[start..].iter().take(fits).take_while(|&&q| 4 * suffix_len(q) >= 3 * longest && q % 2 == side).count().max(1);
        let group = &order[start..start + n];
        start += n;
        padded += n * longest;
        forward += group.iter().map(|&q| suffix_len(q)).sum::<usize>();
        let rows = group.len() as i64;
        let pair_index: Vec<i64> = group.iter().map(|&q| (q / 2) as i64).collect();
        let suffix_ids: Vec<i64> = group.iter().flat_map(|&q| seqs[q].ids[prefix[q / 2]..].iter().copied().chain(std::iter::repeat(0)).take(longest)).collect();
        let positions: Vec<i64> = group.iter().flat_map(|&q| (prefix[q / 2]..prefix[q / 2] + longest).map(|p| p as i64)).collect();
        let keys = lmax + longest;
        let mut mask = vec![false; group.len() * longest * keys];
        for (g, &q) in group.iter().enumerate() {
            for j in 0..longest {
                let row = &mut mask[(g * longest + j) * keys..(g * longest + j + 1) * keys];
                row[..prefix[q / 2]].iter_mut().for_each(|m| *m = true);
                row[lmax..=lmax + j].iter_mut().for_each(|m| *m = true);
            }
        }
        continuations.push(Continuation {
            ids: Tensor::from_slice(&suffix_ids).view([rows, longest as i64]).to_device(device),
            positions: Tensor::from_slice(&positions).view([rows, longest as i64]).to_device(device),
            mask: Tensor::from_slice(&mask).view([rows, 1, longest as i64, keys as i64]).to_device(device),
            rows: Tensor::from_slice(&pair_index).to_device(device),
            grad: sides[side] == Some(true),
        });
        groups.push((group, longest));
    }

    let (prefix_hidden, hidden) = net.shared_forward(&prefix_ids, &prefix_positions, &continuations);
    // Each prefix's last position predicts its suffixes' first tokens.
    let last_hidden = grad_if(sides.contains(&Some(true)), || {
        let last: Vec<i64> = prefix.iter().map(|&l| l as i64 - 1).collect();
        let width = prefix_hidden.size()[2];
        let index = Tensor::from_slice(&last).to_device(device).view([b, 1, 1]).expand([b, 1, width], false);
        prefix_hidden.gather(1, &index, false) // (b, 1, H)
    });
    let (mut parts, mut spans, mut offset) = (Vec::new(), Vec::with_capacity(seqs.len()), 0);
    for (((group, longest), continuation), hidden) in groups.iter().zip(&continuations).zip(&hidden) {
        parts.push(grad_if(continuation.grad, || {
            // Suffix token j is predicted by the prefix's last position (j = 0) or suffix position j − 1.
            let predict = Tensor::cat(&[last_hidden.index_select(0, &continuation.rows), hidden.narrow(1, 0, *longest as i64 - 1)], 1);
            let (mut predictors, mut targets) = (Vec::new(), Vec::new());
            for (g, &q) in group.iter().enumerate() {
                for j in seqs[q].completion_start - prefix[q / 2]..suffix_len(q) {
                    predictors.push((g * longest + j) as i64);
                    targets.push(seqs[q].ids[prefix[q / 2] + j]);
                }
            }
            let (predictors, targets) = (Tensor::from_slice(&predictors).to_device(device), Tensor::from_slice(&targets).to_device(device));
            completion_logps(net, &predict, &predictors, &targets, chunk)
        }));
        for &q in group.iter() {
            let count = seqs[q].ids.len() - seqs[q].completion_start;
            spans.push((q, offset, count));
            offset += count;
        }
    }
    let values = if parts.is_empty() { Tensor::zeros([0], (Kind::Float, device)) } else { Tensor::cat(&parts, 0) };
    SharedLogps { values, spans, padded, forward, sequences: seqs.len() }
}

/// [`shared_prefix_pass`] without gradient, as f64 results per pair (refcache's scoring; the
/// LM head in chunks of [`LOGITS_CHUNK`]). Also returns the padded token positions computed.
pub fn shared_prefix_logps(net: &Network, pairs: &[(&Sequence, &Sequence)], device: Device, per_token: bool, suffix_budget: usize) -> (Vec<[Scored; 2]>, usize) {
    let pass = shared_prefix_pass(net, pairs, device, suffix_budget, LOGITS_CHUNK, [Some(false), Some(false)]);
    let values = Vec::<f64>::try_from(pass.values.to_device(Device::Cpu).to_kind(Kind::Double)).expect("f64 log-probs");
    let mut scored: Vec<Option<Scored>> = vec![None; 2 * pairs.len()];
    for &(q, offset, n) in &pass.spans {
        let row = &values[offset..offset + n];
        scored[q] = Some(Scored { logp: row.iter().sum(), n_tokens: n, tokens: per_token.then(|| row.iter().map(|&v| v as f32).collect()) });
    }
    let scored: Vec<Scored> = scored.into_iter().map(|s| s.expect("every suffix scored")).collect();
    (scored.chunks(2).map(|c| [c[0].clone(), c[1].clone()]).collect(), pass.padded)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::model::CausalLm;

    /// A random Llama (GQA, 2 layers) with peaked logits, in `kind`.
    fn model(kind: Kind) -> CausalLm {
        tch::manual_seed(7);
        let config: Config = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "initializer_range": 0.3
        }))
        .unwrap();
        CausalLm::random(config, Path::new("."), Device::Cpu, kind).unwrap()
    }

    /// Pairs sharing a prompt of various lengths (and one sharing only its first token).
    fn pairs() -> Vec<(Sequence, Sequence)> {
        let seq = |ids: Vec<i64>, completion_start| Sequence { ids, completion_start };
        let ramp = |from: i64, n: i64| (from..from + n).map(|i| (i * 37) % 300).collect::<Vec<i64>>();
        (0..5)
            .map(|i| {
                let prompt = ramp(i, 3 + 4 * i);
                let p = prompt.len();
                let a = [prompt.clone(), ramp(100 + i, 2 + 3 * i)].concat();
                let b = if i == 4 { seq([vec![prompt[0]], ramp(200, 9)].concat(), 5) } else { seq([prompt, ramp(150 + i, 7 - i)].concat(), p) };
                (seq(a, p), b)
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
    }

    /// Largest difference relative to the largest magnitude of `b` (at least 1).
    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_diff(a, b) / b.abs().max().double_value(&[]).max(1.0)
    }

    /// Gradients of every parameter after `loss.backward()` (and the recomputation of
    /// checkpointed forwards), then zeroed.
    fn grads(m: &CausalLm, loss: Tensor) -> Vec<Tensor> {
        loss.backward();
        m.net.finish_backward().unwrap();
        m.vs.trainable_variables()
            .iter()
            .map(|v| {
                let g = v.grad().copy();
                let _ = v.grad().zero_();
                g
            })
            .collect()
    }

    #[test]
    fn chunked_completion_logps_equal_the_full_logits_with_their_gradients() {
        let pairs = pairs();
        let seqs: Vec<&Sequence> = pairs.iter().flat_map(|(a, b)| [a, b]).collect();
        // f32 to 1e-5; bf16 (logits rounded to bf16 before the f32 log-softmax, as before) to 2e-2.
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2e-2)] {
            let m = model(kind);
            let batch = Batch::new(&seqs, 0, Device::Cpu);
            let full = target_logps(&m.net.forward(&batch.input_ids), &batch);
            let weights = Tensor::arange(seqs.len() as i64, (Kind::Float, Device::Cpu)) - 3.0;
            let full_grads = grads(&m, (full.sum_dim_intlist([-1].as_slice(), false, Kind::Float) * &weights).sum(Kind::Float));
            for chunk in [1, 7, LOGITS_CHUNK] {
                let chunked = token_logps(&m.net, &batch, chunk);
                let diff = max_diff(&chunked, &full);
                eprintln!("{kind:?} chunk {chunk}: per-token max |diff| {diff:.3e}");
                assert!(diff <= tol, "{kind:?} chunk {chunk}: per-token log-probs differ by {diff}");
                let (sums, counts) = sequence_logps(&m.net, &batch, chunk);
                assert!(max_diff(&counts, &batch.target_mask.sum_dim_intlist([-1].as_slice(), false, Kind::Float)) == 0.0);
                for (g, f) in grads(&m, (sums * &weights).sum(Kind::Float)).iter().zip(&full_grads) {
                    let diff = rel_diff(g, f);
                    assert!(diff <= tol, "{kind:?} chunk {chunk}: gradients differ by {diff}");
                }
            }
        }
    }

    #[test]
    fn shared_prefix_pass_equals_separate_passes_with_and_without_gradient() {
        let owned = pairs();
        let pairs: Vec<(&Sequence, &Sequence)> = owned.iter().map(|(a, b)| (a, b)).collect();
        let seqs: Vec<&Sequence> = pairs.iter().flat_map(|(a, b)| [*a, *b]).collect();
        // Relative to the largest magnitude: f32 to 1e-5, bf16 to 3e-2 (bf16 keeps 8 bits of
        // mantissa; the cached keys and values are rounded to bf16 and attention runs in other
        // shapes than the separate pass; measured up to 1.5e-2 on the gradients).
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 3e-2)] {
            let m = model(kind);
            let batch = Batch::new(&seqs, 0, Device::Cpu);
            let weights = Tensor::arange(seqs.len() as i64, (Kind::Float, Device::Cpu)) - 4.0;
            let (separate, counts) = sequence_logps(&m.net, &batch, LOGITS_CHUNK);
            let side0 = Tensor::from_slice(&(0..seqs.len()).map(|q| (q % 2 == 0) as i64 as f32).collect::<Vec<_>>());
            let both_grads = grads(&m, (&separate * &weights).sum(Kind::Float));
            let first_grads = grads(&m, (sequence_logps(&m.net, &batch, LOGITS_CHUNK).0 * &weights * &side0).sum(Kind::Float));
            // Under activation checkpointing too: each pass with gradient is one recorded
            // forward, recomputed prompt and continuations together.
            for (checkpointing, (budget, chunk)) in [false, true].into_iter().flat_map(|c| [(1, 3), (20, LOGITS_CHUNK), (usize::MAX, 5)].map(|b| (c, b))) {
                m.net.set_checkpointing(checkpointing);
                let pass = shared_prefix_pass(&m.net, &pairs, Device::Cpu, budget, chunk, [Some(true), Some(true)]);
                assert_eq!(m.net.pending_backward(), checkpointing as usize);
                let sums = pass.sums();
                let diff = rel_diff(&sums, &separate);
                eprintln!("{kind:?} budget {budget} checkpointing {checkpointing}: shared vs separate sums, max relative diff {diff:.3e}");
                assert!(diff <= tol, "{kind:?} budget {budget}: sums differ by {diff}");
                assert_eq!(max_diff(&pass.counts(), &counts), 0.0);
                assert!(pass.forward < batch.tokens && pass.padded >= pass.forward);
                for (g, f) in grads(&m, (sums * &weights).sum(Kind::Float)).iter().zip(&both_grads) {
                    let diff = rel_diff(g, f);
                    assert!(diff <= tol, "{kind:?} budget {budget} checkpointing {checkpointing}: gradients differ by {diff}");
                }
                assert_eq!(m.net.pending_backward(), 0);
                // Side 1 without gradient: same values, and only side 0's gradient; each side
                // scored alone gives the same values bit for bit.
                let pass = shared_prefix_pass(&m.net, &pairs, Device::Cpu, budget, chunk, [Some(true), Some(false)]);
                let sums = pass.sums();
                assert!(rel_diff(&sums, &separate) <= tol);
                let alone = shared_prefix_pass(&m.net, &pairs, Device::Cpu, budget, chunk, [Some(true), None]).sums() + shared_prefix_pass(&m.net, &pairs, Device::Cpu, budget, chunk, [None, Some(false)]).sums();
                assert_eq!(max_diff(&alone, &sums), 0.0, "{kind:?} budget {budget}: sides scored alone differ");
                for (g, f) in grads(&m, (sums * &weights * &side0).sum(Kind::Float)).iter().zip(&first_grads) {
                    let diff = rel_diff(g, f);
                    assert!(diff <= tol, "{kind:?} budget {budget} checkpointing {checkpointing}, side 1 no-grad: gradients differ by {diff}");
                }
            }
            m.net.set_checkpointing(false);
        }
    }
}
