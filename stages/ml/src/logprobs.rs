//! Summed completion log-probabilities of tokenized examples, the quantity every HALO uses.
//!
//! Sequences are right-padded into a batch; with causal attention, padding after a sequence
//! cannot change its logits, so no attention mask is needed. Position `t` contributes
//! `log p(ids[t] | ids[<t])` when `t ≥ completion_start`.

use tch::{Device, Kind, Tensor};

use crate::llama::Llama;

/// A tokenized example: ids (prompt + completion + EOS) and where the completion starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<i64>,
    /// Index of the first completion token (≥ 1).
    pub completion_start: usize,
}

/// A right-padded batch.
pub struct Batch {
    /// `(B, T)` token ids, padded with `pad_id`.
    pub input_ids: Tensor,
    /// `(B, T-1)` float mask of target positions that belong to the completion.
    pub target_mask: Tensor,
}

impl Batch {
    /// Pads `seqs` to their longest length.
    pub fn new(seqs: &[&Sequence], pad_id: i64, device: Device) -> Batch {
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut mask = Vec::with_capacity(seqs.len() * (t - 1));
        for s in seqs {
            ids.extend(s.ids.iter().copied().chain(std::iter::repeat(pad_id)).take(t));
            // Target position p predicts ids[p + 1].
            mask.extend((0..t - 1).map(|p| if p + 1 >= s.completion_start && p + 1 < s.ids.len() { 1f32 } else { 0f32 }));
        }
        let b = seqs.len() as i64;
        Batch {
            input_ids: Tensor::from_slice(&ids).view([b, t as i64]).to_device(device),
            target_mask: Tensor::from_slice(&mask).view([b, t as i64 - 1]).to_device(device),
        }
    }
}

/// Per-token log-probs `(B, T-1)` of each next token (f32), zero outside the completion.
pub fn token_logps(net: &Llama, batch: &Batch) -> Tensor {
    target_logps(&net.forward(&batch.input_ids), batch)
}

/// Per-token log-probs `(B, T-1)` of each next token given the batch's logits `(B, T, V)`,
/// zero outside the completion.
pub fn target_logps(logits: &Tensor, batch: &Batch) -> Tensor {
    let t = logits.size()[1];
    let logits = logits.narrow(1, 0, t - 1).to_kind(Kind::Float);
    let targets = batch.input_ids.narrow(1, 1, t - 1).unsqueeze(-1);
    let picked = logits.gather(-1, &targets, false).squeeze_dim(-1);
    (picked - logits.logsumexp([-1].as_slice(), false)) * &batch.target_mask
}

/// Summed completion log-probs `(B,)` (f32) and completion token counts `(B,)`.
pub fn sequence_logps(net: &Llama, batch: &Batch) -> (Tensor, Tensor) {
    let per_token = token_logps(net, batch);
    (per_token.sum_dim_intlist([-1].as_slice(), false, Kind::Float), batch.target_mask.sum_dim_intlist([-1].as_slice(), false, Kind::Float))
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

/// Scores pairs of sequences that share a prompt (a completion and its KL partner, or a
/// chosen and a rejected reply) computing the shared prefix once: the prefixes run as one
/// batch whose keys and values are cached; then the suffixes, sorted by length and grouped so
/// each group stays within `suffix_budget` padded tokens and holds suffixes of similar length, continue from the cached rows of
/// their prefixes with a mask that hides the prefix padding. Every pair must share at least
/// one token ([`shareable_prefix`] ≥ 1). Results equal [`token_logps`] on each sequence up to
/// float rounding. Also returns the padded token positions the passes computed.
pub fn shared_prefix_logps(net: &Llama, pairs: &[(&Sequence, &Sequence)], device: Device, per_token: bool, suffix_budget: usize) -> (Vec<[Scored; 2]>, usize) {
    let b = pairs.len() as i64;
    let prefix: Vec<usize> = pairs.iter().map(|(x, y)| shareable_prefix(x, y)).collect();
    assert!(prefix.iter().all(|&l| l >= 1), "every pair must share its first token");
    let lmax = *prefix.iter().max().expect("at least one pair");

    // Prefix pass: causal, right-padded, keys and values cached.
    let prefix_ids: Vec<i64> = pairs.iter().zip(&prefix).flat_map(|((x, _), &l)| x.ids[..l].iter().copied().chain(std::iter::repeat(0)).take(lmax)).collect();
    let prefix_ids = Tensor::from_slice(&prefix_ids).view([b, lmax as i64]).to_device(device);
    let positions = Tensor::arange(lmax as i64, (Kind::Int64, device)).unsqueeze(0).expand([b, lmax as i64], false);
    let mut cache = crate::llama::KvCache::new();
    let hidden = net.hidden_states(&prefix_ids, &positions, None, Some(&mut cache));
    let last: Vec<i64> = prefix.iter().map(|&l| l as i64 - 1).collect();
    let width = hidden.size()[2];
    let index = Tensor::from_slice(&last).to_device(device).view([b, 1, 1]).expand([b, 1, width], false);
    let last_logits = net.logits(&hidden.gather(1, &index, false)); // (b, 1, V)
    let mut padded = b as usize * lmax;

    // Suffix passes: sequence q = 2·pair + side, longest suffixes first.
    let seqs: Vec<&Sequence> = pairs.iter().flat_map(|(x, y)| [*x, *y]).collect();
    let suffix_len = |q: usize| seqs[q].ids.len() - prefix[q / 2];
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by(|&a, &c| suffix_len(c).cmp(&suffix_len(a)).then(a.cmp(&c)));
    let mut scored: Vec<Option<Scored>> = vec![None; seqs.len()];
    let mut start = 0;
    while start < order.len() {
        // A group ends at the budget, or where suffixes get shorter than 3/4 of its longest
        // (so little of it is padding).
        let longest = suffix_len(order[start]);
        let fits = (suffix_budget / longest.max(1)).max(1);
        let n = order[start..].iter().take(fits).take_while(|&&q| 4 * suffix_len(q) >= 3 * longest).count().max(1);
        let group = &order[start..start + n];
        start += n;
        padded += n * longest;
        let rows = group.len() as i64;
        let pair_index: Vec<i64> = group.iter().map(|&q| (q / 2) as i64).collect();
        let pair_index = Tensor::from_slice(&pair_index).to_device(device);
        let mut group_cache = cache.selected(&pair_index);
        let suffix_ids: Vec<i64> = group.iter().flat_map(|&q| seqs[q].ids[prefix[q / 2]..].iter().copied().chain(std::iter::repeat(0)).take(longest)).collect();
        let suffix_ids = Tensor::from_slice(&suffix_ids).view([rows, longest as i64]).to_device(device);
        let positions: Vec<i64> = group.iter().flat_map(|&q| (prefix[q / 2]..prefix[q / 2] + longest).map(|p| p as i64)).collect();
        let positions = Tensor::from_slice(&positions).view([rows, longest as i64]).to_device(device);
        let keys = lmax + longest;
        let mut mask = vec![false; group.len() * longest * keys];
        for (g, &q) in group.iter().enumerate() {
            for j in 0..longest {
                let row = &mut mask[(g * longest + j) * keys..(g * longest + j + 1) * keys];
                row[..prefix[q / 2]].iter_mut().for_each(|m| *m = true);
                row[lmax..=lmax + j].iter_mut().for_each(|m| *m = true);
            }
        }
        let mask = Tensor::from_slice(&mask).view([rows, 1, longest as i64, keys as i64]).to_device(device);
        let logits = net.logits(&net.hidden_states(&suffix_ids, &positions, Some(&mask), Some(&mut group_cache)));
        // Suffix token j is predicted by the prefix's last logits (j = 0) or suffix logits j − 1.
        let first = last_logits.index_select(0, &pair_index);
        let predict = Tensor::cat(&[first, logits.narrow(1, 0, longest as i64 - 1)], 1).to_kind(Kind::Float);
        let picked = predict.gather(-1, &suffix_ids.unsqueeze(-1), false).squeeze_dim(-1) - predict.logsumexp([-1].as_slice(), false);
        let values = Vec::<f64>::try_from(picked.to_device(Device::Cpu).to_kind(Kind::Double).view([-1])).expect("f64 log-probs");
        for (g, &q) in group.iter().enumerate() {
            let from = seqs[q].completion_start - prefix[q / 2];
            let row = &values[g * longest + from..g * longest + suffix_len(q)];
            scored[q] = Some(Scored { logp: row.iter().sum(), n_tokens: row.len(), tokens: per_token.then(|| row.iter().map(|&v| v as f32).collect()) });
        }
    }
    let scored: Vec<Scored> = scored.into_iter().map(|s| s.expect("every suffix scored")).collect();
    (scored.chunks(2).map(|c| [c[0].clone(), c[1].clone()]).collect(), padded)
}
