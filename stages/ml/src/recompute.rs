//! Activation checkpointing: decoder layers run forward without a graph, keeping only each
//! layer's input, and are recomputed with a graph during the backward pass.
//!
//! libtorch's `torch.utils.checkpoint` is Python; `tch` has none. A [`Tape`] does it by hand:
//!
//! 1. [`Tape::forward`] (called by the model for a forward with gradient) runs the layers under
//!    `no_grad`, saving each layer's input, and returns the last layer's output as a fresh leaf
//!    that requires grad, so the rest of the model (final norm, LM head, log-probs, loss) builds
//!    a graph from it as usual.
//! 2. The caller runs `loss.backward()`: gradients reach that leaf (and everything after it).
//! 3. [`Tape::finish_backward`] walks every recorded forward's layers backwards: layer `i` is
//!    recomputed from its saved input (a detached leaf requiring grad) with a graph, and
//!    `(y · g).sum()` is back-propagated, where `g` is the gradient arriving at the layer's
//!    output; that accumulates the layer's parameter gradients (whatever requires grad in it:
//!    full weights or adapters) and leaves the gradient of its input, which the layer below
//!    receives. The first layer's input keeps its graph to the embedding, so the embedding gets
//!    its gradient when it is trained.
//!
//! A forward may hold several [`Segment`]s that run through the layers side by side: a shared
//! prompt and the continuations that attend to its keys and values (`Network::shared_forward`).
//! Layer `i` then runs on every segment at once, both when recording and when recomputing, so
//! a continuation's recomputed attention reads the prompt's recomputed keys and values and its
//! gradient flows into the prompt's layer input. Segments without gradient (KTO's KL partners
//! continuing from the policy's prompt) run in the recorded forward only, and nothing of them
//! is kept.
//!
//! A microbatch may run several forwards with gradient (DPO's chosen and rejected rows, PPO's
//! policy and value head), so the tape keeps a list; every one is finished by the one
//! `finish_backward` after the loss's backward. The recomputation is exact: the layers are
//! deterministic functions of their inputs (no dropout in the model), so the gradients equal
//! those of the ordinary graph up to float summation order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// What a layer is called with besides its input: rotary cos/sin and the attention masks.
#[derive(Debug)]
pub struct LayerArgs {
    /// Rotary cos, `(B, 1, T, head_dim)`.
    pub cos: Tensor,
    /// Rotary sin, `(B, 1, T, head_dim)`.
    pub sin: Tensor,
    /// Gemma 3's cos and sin of the sliding-window layers' RoPE base.
    pub local: Option<(Tensor, Tensor)>,
    /// Boolean attention mask, when the forward had one.
    pub mask: Option<Tensor>,
    /// The sliding-window layers' mask, when it hides a key.
    pub window_mask: Option<Tensor>,
}

/// One sequence batch of a forward through the layers.
#[derive(Debug)]
pub struct Segment {
    /// Its rotary tables and masks.
    pub args: LayerArgs,
    /// For a continuation, the rows of the forward's first segment (the prompt) whose keys and
    /// values each of its rows attends to before its own (`(G,)` indices); `None` for the
    /// first segment or a lone batch.
    pub continues: Option<Tensor>,
    /// Whether the segment keeps a graph (false: it runs under no-grad, as KTO's KL partners).
    pub grad: bool,
}

impl Segment {
    /// A lone batch with gradient.
    pub fn alone(args: LayerArgs) -> Segment {
        Segment { args, continues: None, grad: true }
    }
}

/// One checkpointed forward: per layer the inputs of the segments with gradient, those
/// segments and the leaves the rest of the graph grew from.
#[derive(Debug)]
struct Record {
    inputs: Vec<Vec<Tensor>>,
    outputs: Vec<Tensor>,
    segments: Vec<Segment>,
}

/// The checkpointed forwards of a model since the last [`Tape::finish_backward`].
#[derive(Debug, Default)]
pub struct Tape {
    enabled: AtomicBool,
    records: Mutex<Vec<Record>>,
}

/// Whether autograd records operations here (not inside `tch::no_grad`).
pub fn grad_enabled() -> bool {
    (Tensor::ones([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true) * 1.0).requires_grad()
}

/// Runs `f` keeping its graph when `grad` holds, else under no-grad.
pub fn grad_if<T>(grad: bool, f: impl FnOnce() -> T) -> T {
    if grad {
        f()
    } else {
        tch::no_grad(f)
    }
}

impl Tape {
    /// Turns checkpointing on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether checkpointing is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether a forward now would be checkpointed: on, and autograd recording.
    pub fn applies(&self) -> bool {
        self.enabled() && grad_enabled()
    }

    /// Runs `layers` layers on the segments' inputs `xs` (their embeddings, with a graph if the
    /// embedding is trained) without a graph and records the forward. Returns each segment's
    /// last layer output: for a segment with gradient a leaf requiring grad, for one without
    /// the plain output. `layer(i, xs, segments)` runs layer `i` on every segment.
    pub fn forward(&self, xs: Vec<Tensor>, layers: usize, segments: Vec<Segment>, layer: impl Fn(usize, &[Tensor], &[Segment]) -> Vec<Tensor>) -> Vec<Tensor> {
        let kept: Vec<bool> = segments.iter().map(|s| s.grad).collect();
        let keep = |xs: &[Tensor]| xs.iter().zip(&kept).filter(|(_, k)| **k).map(|(x, _)| x.shallow_clone()).collect::<Vec<_>>();
        let mut inputs = Vec::with_capacity(layers);
        inputs.push(keep(&xs));
        let mut h = xs;
        tch::no_grad(|| {
            for i in 0..layers {
                h = layer(i, &h, &segments);
                if i + 1 < layers {
                    inputs.push(keep(&h));
                }
            }
        });
        let outputs: Vec<Tensor> = h.into_iter().zip(&kept).map(|(y, &k)| if k { y.detach().set_requires_grad(true) } else { y }).collect();
        let record = Record {
            inputs,
            outputs: keep(&outputs),
            segments: segments.into_iter().zip(&kept).filter(|(_, k)| **k).map(|(s, _)| s).collect(),
        };
        if !record.segments.is_empty() {
            self.records.lock().expect("tape lock").push(record);
        }
        outputs
    }

    /// Number of forwards waiting for [`Tape::finish_backward`].
    pub fn pending(&self) -> usize {
        self.records.lock().expect("tape lock").len()
    }

    /// After the loss's `backward()`: recomputes every recorded forward layer by layer, from
    /// the last layer down, back-propagating the gradients that reached its segments' outputs
    /// (zero for a segment the loss did not read, whose keys and values may still have been
    /// read), so every tensor that requires grad inside the layers (and the embedding) gets
    /// its gradient accumulated. Empties the tape. A forward none of whose outputs received a
    /// gradient contributes nothing. Errors if a recomputed layer's output does not have the
    /// shape of the gradient that reached it.
    pub fn finish_backward(&self, layer: impl Fn(usize, &[Tensor], &[Segment]) -> Vec<Tensor>) -> Result<()> {
        let records = std::mem::take(&mut *self.records.lock().expect("tape lock"));
        for record in records.into_iter().rev() {
            if record.outputs.iter().all(|o| !o.grad().defined()) {
                continue;
            }
            let mut grads: Vec<Tensor> = record.outputs.iter().map(|o| o.grad()).collect();
            for i in (0..record.inputs.len()).rev() {
                let inputs: Vec<Tensor> = record.inputs[i].iter().map(|x| x.detach().set_requires_grad(true)).collect();
                let ys = tch::with_grad(|| layer(i, &inputs, &record.segments));
                for (s, (y, g)) in ys.iter().zip(&grads).enumerate() {
                    ensure!(!g.defined() || y.size() == g.size(), "activation checkpointing: layer {i} segment {s} recomputed shape {:?}, gradient shape {:?}", y.size(), g.size());
                }
                backward_products(&ys, &grads)?;
                grads = inputs.iter().map(|x| x.grad()).collect();
            }
            // The embedding, when it is trained, gets its gradient from the first layer's inputs.
            let (firsts, grads): (Vec<Tensor>, Vec<Tensor>) = record.inputs[0].iter().zip(&grads).filter(|(x, _)| x.requires_grad()).map(|(x, g)| (x.shallow_clone(), g.shallow_clone())).unzip();
            backward_products(&firsts, &grads)?;
        }
        Ok(())
    }
}

/// Back-propagates `Σ (y · g).sum()` over the pairs whose gradient is defined, in one pass.
fn backward_products(ys: &[Tensor], grads: &[Tensor]) -> Result<()> {
    let terms: Vec<Tensor> = tch::with_grad(|| ys.iter().zip(grads).filter(|(_, g)| g.defined()).map(|(y, g)| (y * g).sum(g.kind())).collect());
    let Some(total) = tch::with_grad(|| terms.into_iter().reduce(|a, b| a + b)) else { return Ok(()) };
    total.f_backward()?;
    Ok(())
}
