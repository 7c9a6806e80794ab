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
    let logits = net.forward(&batch.input_ids);
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
