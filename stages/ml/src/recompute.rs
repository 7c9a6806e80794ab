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

/// One checkpointed forward: the layer inputs and the leaf the rest of the graph grew from.
#[derive(Debug)]
struct Record {
    inputs: Vec<Tensor>,
    output: Tensor,
    args: LayerArgs,
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

impl Tape {
    /// Turns checkpointing on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether a forward now should be checkpointed: checkpointing is on and autograd records.
    /// Whether checkpointing is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether a forward now would be checkpointed: on, and autograd recording.
    pub fn applies(&self) -> bool {
        self.enabled.load(Ordering::Relaxed) && grad_enabled()
    }

    /// Runs `layers` layers on `x` (the embedding output, with its graph if the embedding is
    /// trained) without a graph, records the forward, and returns the last layer's output as a
    /// leaf requiring grad. `layer(i, x, args)` runs layer `i`.
    pub fn forward(&self, x: Tensor, layers: usize, args: LayerArgs, layer: impl Fn(usize, &Tensor, &LayerArgs) -> Tensor) -> Tensor {
        let mut inputs = Vec::with_capacity(layers);
        let mut h = x.shallow_clone();
        inputs.push(x);
        tch::no_grad(|| {
            for i in 0..layers {
                h = layer(i, &h, &args);
                if i + 1 < layers {
                    inputs.push(h.shallow_clone());
                }
            }
        });
        let output = h.detach().set_requires_grad(true);
        self.records.lock().expect("tape lock").push(Record { inputs, output: output.shallow_clone(), args });
        output
    }

    /// Number of forwards waiting for [`Tape::finish_backward`].
    pub fn pending(&self) -> usize {
        self.records.lock().expect("tape lock").len()
    }

    /// After the loss's `backward()`: recomputes every recorded forward layer by layer, from
    /// the last layer down, back-propagating the gradient that reached its output, so every
    /// tensor that requires grad inside the layers (and the embedding) gets its gradient
    /// accumulated. Empties the tape. A forward whose output received no gradient (the loss
    /// did not depend on it) contributes nothing. Errors if a recomputed layer's output does
    /// not have the shape of the gradient that reached it.
    pub fn finish_backward(&self, layer: impl Fn(usize, &Tensor, &LayerArgs) -> Tensor) -> Result<()> {
        let records = std::mem::take(&mut *self.records.lock().expect("tape lock"));
        for record in records.into_iter().rev() {
            let mut grad = record.output.grad();
            if !grad.defined() {
                continue;
            }
            for i in (0..record.inputs.len()).rev() {
                let input = record.inputs[i].detach().set_requires_grad(true);
                let y = tch::with_grad(|| layer(i, &input, &record.args));
                ensure!(y.size() == grad.size(), "activation checkpointing: layer {i} recomputed shape {:?}, gradient shape {:?}", y.size(), grad.size());
                tch::with_grad(|| (y * &grad).sum(grad.kind())).f_backward()?;
                grad = input.grad();
            }
            let first = &record.inputs[0];
            if first.requires_grad() {
                tch::with_grad(|| (first * &grad).sum(grad.kind())).f_backward()?;
            }
        }
        Ok(())
    }
}
