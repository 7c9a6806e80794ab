//! ZeRO-1 (`--shard-optimizer`): the parameters are seen as one flat f32 vector (in the order
//! of the backward pass, [`backward_order`]) cut into windows of `ranks × window` elements
//! (`--grad-bucket-mb` of f32 each), rank r owning the r-th `window` elements of every window;
//! a rank's shard is its parts of all windows, in order. Each rank keeps the AdamW moments of
//! its shard only, and f32 master weights of it when the weights are stored in a narrower type
//! (f32 weights are their own master, as in [`crate::optim::AdamW`]). A step reduce-scatters
//! the gradients window by window (each rank gets its part, summed), clips by the global norm
//! (the parts' squared norms summed), updates its shard and all-gathers the weights window by
//! window, the first layers' windows first. When the parameters share one type (all but PPO's
//! f32 value head beside narrower weights) they live in one flat buffer in this order (as
//! FSDP's flat parameters), so each all-gather writes straight into the parameters, and the
//! all-gathers run on while the next forward pass reaches them: the network waits, before
//! each layer, for the windows holding its weights ([`WeightsGate`]). Otherwise each window
//! is gathered into a buffer and copied into the parameters before the update returns.
//! With `--overlap-grad-sync` the windows are gradient buckets whose reduce-scatters start
//! during the backward pass as soon as their gradients are final (the last layers' windows
//! first).
//! Checkpoints hold one shard file per rank with the layout and the parameters' names in the
//! flat order; a resume with another number of ranks re-slices them, and one whose order
//! differs (an older halo-train's) re-maps them by name.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use haloflow_dist::{GradBuckets, Work};
use haloflow_ml::network::WeightsGate;
use tch::{Kind, Tensor};

use crate::optim::{self, l2_norm, AdamWConfig};
use crate::parallel::{backward_order, defined_grads, Ranks};

/// All-gathers of updated windows running at once when they go through buffers (parameters of
/// several types): each window's runs while the next ones are updated, and the buffers of two
/// windows are all the update holds besides the state.
const GATHERS_IN_FLIGHT: usize = 2;

/// The all-gathers of updated weights written straight into the parameters, in flight until a
/// forward pass reaches their weights (as a [`WeightsGate`]) or the trainer needs them all
/// ([`ShardedAdamW::ready`]).
#[derive(Debug, Default)]
struct Arrivals {
    /// The all-gather in flight into each window (in the flat order).
    pending: Mutex<Vec<Option<Work>>>,
    /// For each stage of a forward, the first window holding weights of it or of an earlier
    /// stage: before that stage the forward waits for this window and every later one (the
    /// flat order runs from the last stage to the first). Set when a network waits on them.
    first_window: OnceLock<Vec<usize>>,
    /// The first all-gather that failed while a forward waited for it (the forward cannot
    /// return an error; [`Arrivals::ready`] does).
    failed: Mutex<Option<anyhow::Error>>,
    /// Windows waited for by a forward, and by [`Arrivals::ready`].
    waited: Mutex<GatherCounts>,
}

/// Where ZeRO-1's all-gathers of updated weights were waited for, over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GatherCounts {
    /// By the next forward pass, just before the layers whose weights they hold.
    pub in_forward: usize,
    /// Before the update returned, or when everything was needed at once (the next step's
    /// gradients, a checkpoint, the output).
    pub at_once: usize,
}

impl Arrivals {
    /// Waits for the all-gathers into windows `first..`, the earliest started first; after a
    /// failure the others are dropped (a lost rank would fail each after a timeout).
    fn wait_from(&self, first: usize) -> Result<usize> {
        let mut pending = self.pending.lock().expect("the arrivals' lock");
        let mut waited = 0;
        for k in (first.min(pending.len())..pending.len()).rev() {
            if let Some(work) = pending[k].take() {
                if let Err(e) = work.wait() {
                    pending.iter_mut().for_each(|w| drop(w.take()));
                    return Err(e);
                }
                waited += 1;
            }
        }
        Ok(waited)
    }

    /// Waits for every all-gather in flight; the first failure, here or in a forward, is the
    /// error.
    fn ready(&self) -> Result<()> {
        let waited = self.wait_from(0).context("waiting for the all-gathers of the updated weights");
        if let Some(e) = self.failed.lock().expect("the arrivals' lock").take() {
            return Err(e.context("all-gathering the updated weights during the forward pass"));
        }
        self.waited.lock().expect("the arrivals' lock").at_once += waited?;
        Ok(())
    }
}

impl WeightsGate for Arrivals {
    fn before(&self, stage: usize) {
        let Some(first) = self.first_window.get().and_then(|f| f.get(stage).or(f.last()).copied()) else { return };
        match self.wait_from(first) {
            Ok(waited) => self.waited.lock().expect("the arrivals' lock").in_forward += waited,
            Err(e) => {
                self.failed.lock().expect("the arrivals' lock").get_or_insert(e);
            }
        }
    }
}

/// A shard's place in the flat parameter vector (its `.json` beside the tensors).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardMeta {
    /// The ranks and elements per rank of a window of the run that wrote it.
    world: i64,
    window: i64,
    total: i64,
    steps: i64,
    config: AdamWConfig,
    /// The parameters in the flat vector's order, with their elements; empty in checkpoints
    /// of a halo-train before they were stored, whose order [`legacy_order`] gives.
    #[serde(default)]
    params: Vec<(String, i64)>,
}

/// The flat order of `params` (name, elements; in today's order) in a checkpoint that does
/// not name them: halo-train then ordered the parameters by the reverse of their names'
/// natural order alone, which put `lm_head` after the trunk instead of first.
fn legacy_order(params: &[(String, i64)]) -> Vec<(String, i64)> {
    let (heads, rest): (Vec<_>, Vec<_>) = params.iter().cloned().partition(|(name, _)| name.starts_with("lm_head."));
    rest.into_iter().chain(heads).collect()
}

/// Which rank holds which elements of the flat vector: windows of `world × window` elements,
/// rank r owning the r-th `window` elements of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    world: i64,
    window: i64,
    /// Windows, the last one padded past the parameters' `total` elements.
    windows: i64,
}

impl Layout {
    /// The layout of `total` elements over `world` ranks, windows of at most `max_window`
    /// elements per rank (fewer for a model smaller than one window, so the shards are not
    /// mostly padding).
    fn new(total: i64, world: i64, max_window: i64) -> Layout {
        let window = max_window.min((total + world - 1) / world).max(1);
        Layout { world, window, windows: ((total + world * window - 1) / (world * window)).max(1) }
    }

    /// Elements of one rank's shard.
    fn shard_len(&self) -> i64 {
        self.windows * self.window
    }

    /// Where window `k` starts in the flat vector.
    fn window_start(&self, k: i64) -> i64 {
        k * self.world * self.window
    }

    /// Where rank `rank`'s part of window `k` starts in the flat vector.
    fn part(&self, k: i64, rank: i64) -> i64 {
        self.window_start(k) + rank * self.window
    }

    /// The flat range `[at, at + n)` by owner: (rank, offset in its shard, offset in the
    /// range, length).
    fn runs(&self, at: i64, n: i64) -> impl Iterator<Item = (i64, i64, i64, i64)> + '_ {
        let span = self.world * self.window;
        let mut f = at;
        std::iter::from_fn(move || {
            (f < at + n).then(|| {
                let (k, within) = (f / span, f % span);
                let (rank, i) = (within / self.window, within % self.window);
                let len = (self.window - i).min(at + n - f);
                let run = (rank, k * self.window + i, f - at, len);
                f += len;
                run
            })
        })
    }
}

/// Tensors seen as one flat vector (each flattened, in order), copied in and out range by range.
struct Flat {
    /// Each tensor's first element in the flat vector.
    offsets: Vec<i64>,
    /// Elements of all tensors.
    total: i64,
}

impl Flat {
    fn new(tensors: &[Tensor]) -> Flat {
        Flat::of_sizes(tensors.iter().map(|t| t.numel() as i64))
    }

    /// The flat vector of tensors of these numbers of elements, in order.
    fn of_sizes(sizes: impl Iterator<Item = i64>) -> Flat {
        let mut total = 0;
        let offsets = sizes
            .map(|n| {
                total += n;
                total - n
            })
            .collect();
        Flat { offsets, total }
    }

    /// The pieces of the range `[at, at + n)`: (tensor, offset in the tensor, offset in the
    /// range, length). Elements past the last tensor (padding) belong to none.
    fn pieces(&self, at: i64, n: i64) -> impl Iterator<Item = (usize, i64, i64, i64)> + '_ {
        let end = at + n;
        let ends = self.offsets.iter().skip(1).copied().chain([self.total]);
        self.offsets.iter().zip(ends).enumerate().filter_map(move |(i, (&lo, hi))| {
            let (a, b) = (lo.max(at), hi.min(end));
            (a < b).then_some((i, a - lo, a - at, b - a))
        })
    }

    /// Copies the range `[at, at + out.numel())` of `tensors` into `out` (f32), zeros past the end.
    fn read(&self, tensors: &[Tensor], at: i64, out: &mut Tensor) {
        let n = out.numel() as i64;
        if at + n > self.total {
            let _ = out.zero_();
        }
        for (i, from, to, len) in self.pieces(at, n) {
            out.narrow(0, to, len).copy_(&tensors[i].view([-1]).narrow(0, from, len));
        }
    }

    /// Copies `src` into the range `[at, at + src.numel())` of `tensors` (padding dropped).
    fn write(&self, tensors: &[Tensor], at: i64, src: &Tensor) {
        for (i, from, to, len) in self.pieces(at, src.numel() as i64) {
            tensors[i].view([-1]).narrow(0, from, len).copy_(&src.narrow(0, to, len));
        }
    }
}

fn shard_file(dir: &Path, rank: usize, ext: &str) -> std::path::PathBuf {
    dir.join(format!("optimizer-shard-{rank}.{ext}"))
}

/// AdamW over this rank's shard of the flattened parameters.
pub struct ShardedAdamW {
    config: AdamWConfig,
    /// Whether the update runs libtorch's fused kernel ([`optim::update_all`]).
    fused: bool,
    /// The parameters in the flat vector's order, and their names.
    params: Vec<Tensor>,
    names: Vec<String>,
    flat: Flat,
    layout: Layout,
    rank: i64,
    m: Tensor,
    v: Tensor,
    /// f32 master weights of the shard when the weights are not f32 (f32 weights are their
    /// own master).
    master: Option<Tensor>,
    /// The shard's reduced gradients in f32, when the weights are not f32 or the gradients are
    /// sharded (else they are put in this rank's part of the f32 gradients).
    reduced: Option<Tensor>,
    /// ZeRO-2: the gradients leave each window once it is copied for its reduce-scatter
    /// during the backward pass, and the sums of every microbatch add up in `reduced`.
    shard_grads: bool,
    /// The factor of the step in progress, 1/examples and the clip in one (set by
    /// [`ShardedAdamW::sync_and_clip`], applied by [`ShardedAdamW::update`]).
    factor: Option<f64>,
    /// Optimizer steps taken.
    steps: i64,
    /// The type the updated weights are all-gathered in: the parameters' when they all have
    /// one (bf16 weights cross the wire in bf16, rounded once as a direct copy would round
    /// them), else f32.
    gather_kind: Kind,
    /// The flat buffer the parameters are views of, windows' padding included, when they
    /// all have one type (else `None`: each window is gathered into a buffer and copied).
    storage: Option<Tensor>,
    /// The all-gathers into `storage` still running.
    arrivals: Arc<Arrivals>,
}

impl ShardedAdamW {
    /// The optimizer of rank `ranks.rank()` over `params` (name → tensor), updating with the
    /// fused kernel when `fused`.
    pub fn new(params: BTreeMap<String, Tensor>, config: AdamWConfig, fused: bool, shard_grads: bool, ranks: &Ranks) -> ShardedAdamW {
        let names: Vec<String> = params.keys().cloned().collect();
        let order = backward_order(&names);
        ShardedAdamW::in_order(order.into_iter().map(|i| (names[i].clone(), params[&names[i]].shallow_clone())).collect(), config, fused, shard_grads, ranks)
    }

    /// The optimizer over `params` (name, tensor) in this flat order.
    fn in_order(params: Vec<(String, Tensor)>, config: AdamWConfig, fused: bool, shard_grads: bool, ranks: &Ranks) -> ShardedAdamW {
        let (names, params): (Vec<String>, Vec<Tensor>) = params.into_iter().unzip();
        let flat = Flat::new(&params);
        let world = ranks.world() as i64;
        let layout = Layout::new(flat.total, world, (ranks.bucket_elements() / world).max(1));
        let gather_kind = if params.iter().all(|p| p.kind() == params[0].kind()) { params[0].kind() } else { Kind::Float };
        let mut zero = ShardedAdamW {
            config,
            fused,
            params,
            names,
            flat,
            layout,
            rank: ranks.rank() as i64,
            m: Tensor::new(),
            v: Tensor::new(),
            master: None,
            reduced: None,
            shard_grads,
            factor: None,
            steps: 0,
            gather_kind,
            storage: None,
            arrivals: Arc::default(),
        };
        zero.set_layout(layout);
        zero
    }

    /// Lays the state out as `layout` says: the parameters moved into one flat buffer when they
    /// share a type, zero moments, master weights from the parameters.
    fn set_layout(&mut self, layout: Layout) {
        self.layout = layout;
        let device = self.params[0].device();
        let one_kind = self.params.iter().all(|p| p.kind() == self.gather_kind);
        self.storage = one_kind.then(|| {
            // Untouched until each parameter is copied in (its old memory freed as it goes);
            // the padding past the last one is zeros.
            let len = layout.windows * layout.world * layout.window;
            let storage = Tensor::empty([len], (self.gather_kind, device));
            tch::no_grad(|| {
                let _ = storage.narrow(0, self.flat.total, len - self.flat.total).zero_();
                for (p, &at) in self.params.iter().zip(&self.flat.offsets) {
                    let mut view = storage.narrow(0, at, p.numel() as i64).view(p.size().as_slice());
                    view.copy_(p);
                    p.shallow_clone().set_data(&view);
                }
            });
            storage
        });
        *self.arrivals.pending.lock().expect("the arrivals' lock") = (0..layout.windows).map(|_| None).collect();
        let zeros = || Tensor::zeros([layout.shard_len()], (Kind::Float, device));
        (self.m, self.v) = (zeros(), zeros());
        self.master = self.params.iter().any(|p| p.kind() != Kind::Float).then(|| self.shard_weights());
        // ZeRO-2's sums exist only from a step's first reduce-scatter to its end
        // (`clear_grads`, `sums`).
        self.reduced = match (self.master.is_some(), self.shard_grads) {
            (_, true) => Some(Tensor::empty([0], (Kind::Float, device))),
            (true, false) => Some(zeros()),
            (false, false) => None,
        };
    }

    /// Makes a forward wait, before each stage of weights (`stage_of` a parameter's name, see
    /// [`haloflow_ml::network::Network::weight_stage`]), for the all-gathers into it, so the
    /// all-gathers of an update run while the next forward starts; `None` when the weights are
    /// copied in before the update returns (parameters of several types). Without a gate,
    /// [`ShardedAdamW::update`] waits for them all.
    pub fn weights_gate(&self, stage_of: impl Fn(&str) -> usize) -> Option<Arc<dyn WeightsGate>> {
        self.storage.as_ref()?;
        let span = self.layout.world * self.layout.window;
        let stages: Vec<usize> = self.names.iter().map(|n| stage_of(n)).collect();
        let mut first = vec![usize::MAX; stages.iter().max().map_or(1, |s| s + 1)];
        for (&stage, &at) in stages.iter().zip(&self.flat.offsets) {
            first[stage] = first[stage].min((at / span) as usize);
        }
        for s in 1..first.len() {
            first[s] = first[s].min(first[s - 1]);
        }
        let _ = self.arrivals.first_window.set(first);
        Some(self.arrivals.clone())
    }

    /// Waits until every updated weight is in the parameters (they are read outside a gated
    /// forward: a checkpoint, the output); reports an all-gather that failed in a forward.
    pub fn ready(&self) -> Result<()> {
        self.arrivals.ready()
    }

    /// Where the all-gathers of updated weights were waited for, so far.
    pub fn gather_counts(&self) -> GatherCounts {
        *self.arrivals.waited.lock().expect("the arrivals' lock")
    }

    /// The windows `(window, offset in the shard, length)` the collectives go through.
    fn windows(&self) -> impl DoubleEndedIterator<Item = (i64, i64, i64)> {
        let Layout { window, windows, .. } = self.layout;
        (0..windows).map(move |k| (k, k * window, window))
    }

    /// This rank's elements of the parameters, in f32 (zeros past the end).
    fn shard_weights(&self) -> Tensor {
        let weights = Tensor::empty([self.layout.shard_len()], (Kind::Float, self.params[0].device()));
        tch::no_grad(|| {
            for (k, o, n) in self.windows() {
                self.flat.read(&self.params, self.layout.part(k, self.rank), &mut weights.narrow(0, o, n));
            }
        });
        weights
    }

    /// The windows as gradient buckets whose reduce-scatters overlap the backward pass
    /// (`None` for one process).
    pub fn grad_buckets(&self, ranks: &Ranks) -> Result<Option<GradBuckets>> {
        let span = self.layout.world * self.layout.window;
        let pieces: Vec<(usize, i64, i64, usize)> =
            self.windows().flat_map(|(k, _, _)| self.flat.pieces(self.layout.window_start(k), span).map(move |(i, from, _, len)| (i, from, len, k as usize))).collect();
        ranks.slice_buckets(&self.params, &pieces, &vec![span; self.layout.windows as usize], self.reduced.as_ref(), self.shard_grads)
    }

    /// Drops every gradient (they are never views into the reduce-scatter windows, which
    /// copy them): its memory is free until the next backward pass. With sharded gradients
    /// also frees the sums the last step's microbatches added up (the first window that lands
    /// in the next backward pass allocates them anew, zeroed).
    pub fn clear_grads(&mut self) {
        crate::grads::release(self.params.iter());
        if let Some(reduced) = self.reduced.as_mut().filter(|_| self.shard_grads) {
            reduced.set_data(&Tensor::empty([0], (Kind::Float, reduced.device())));
        }
    }

    /// The shard's reduced gradients, allocated (zeroed) if no window landed in them yet.
    fn sums(&self) -> Option<&Tensor> {
        let reduced = self.reduced.as_ref()?;
        if reduced.numel() as i64 != self.layout.shard_len() {
            let _ = reduced.shallow_clone().resize_([self.layout.shard_len()]).zero_();
        }
        Some(reduced)
    }

    /// Whether the gradients are sharded (ZeRO-2): every microbatch's backward pass then
    /// reduce-scatters its windows, not only the step's last.
    pub fn shards_gradients(&self) -> bool {
        self.shard_grads
    }

    /// Reduce-scatters the gradients (unless `buckets` did during the backward pass) into the
    /// reduced f32 gradients of the shard (narrow weights) or this rank's part of the f32
    /// gradients, and takes their global norm: the factor that multiplies them by `scale` (the
    /// accumulator's 1/examples) and clips them to `max_norm` (0: no clipping) is applied by
    /// [`ShardedAdamW::update`], as [`optim::scaled_norm_and_factor`] says; returns the norm
    /// of the scaled gradients before clipping.
    pub fn sync_and_clip(&mut self, ranks: &Ranks, scale: Option<f64>, max_norm: f64, buckets: Option<&GradBuckets>) -> Result<f64> {
        ensure!(ranks.world() as i64 == self.layout.world, "ShardedAdamW made for {} ranks, used with {}", self.layout.world, ranks.world());
        // The local gradients, unless every window's sums are in `reduced` already (ZeRO-2
        // dropped them: making zeros of every one here would undo that).
        let grads = if buckets.is_some() && self.reduced.is_some() { Vec::new() } else { defined_grads(&self.params) };
        let device = self.m.device();
        let mut squares = Tensor::zeros([1], (Kind::Float, device));
        for (k, o, n) in self.windows() {
            // This window's sums: where the buckets put them, or reduce-scattered now and put there.
            let sums = match (buckets, self.sums()) {
                (Some(_), Some(reduced)) => reduced.narrow(0, o, n),
                (Some(_), None) => {
                    let mut sums = Tensor::empty([n], (Kind::Float, device));
                    tch::no_grad(|| self.flat.read(&grads, self.layout.part(k, self.rank), &mut sums));
                    sums
                }
                (None, _) => {
                    let mut input = Tensor::empty([self.layout.world * n], (Kind::Float, device));
                    tch::no_grad(|| self.flat.read(&grads, self.layout.window_start(k), &mut input));
                    let sums = ranks.reduce_scatter(&input)?;
                    tch::no_grad(|| match self.sums() {
                        Some(reduced) => reduced.narrow(0, o, n).copy_(&sums),
                        None => self.flat.write(&grads, self.layout.part(k, self.rank), &sums),
                    });
                    sums
                }
            };
            squares += tch::no_grad(|| l2_norm(&sums).square());
        }
        let (norm, factor) = optim::scaled_norm_and_factor(ranks.sum(&squares)?.sqrt().double_value(&[0]), scale, max_norm);
        self.factor = Some(factor);
        Ok(norm)
    }

    /// Updates this rank's shard with the gradient of [`ShardedAdamW::sync_and_clip`] and
    /// all-gathers the weights into the parameters, window by window from the first layers' on,
    /// each window's all-gather running while the next ones are updated. Into the flat storage
    /// they run on after the update returns, for the next forward to wait for (when a network
    /// has the [`ShardedAdamW::weights_gate`]); through buffers (at most [`GATHERS_IN_FLIGHT`]
    /// at once, reused) they have all landed when it returns.
    pub fn update(&mut self, ranks: &Ranks, lr: f64) -> Result<()> {
        let factor = self.factor.take().context("ShardedAdamW::update before sync_and_clip")?;
        // The last update's all-gathers write the parts this one updates in place (they arrived
        // during the forward pass: nothing waits here then).
        self.ready()?;
        self.steps += 1;
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        let device = self.m.device();
        let span = self.layout.world * self.layout.window;
        let mut gathers = VecDeque::with_capacity(GATHERS_IN_FLIGHT);
        let mut spare: Vec<Tensor> = Vec::with_capacity(GATHERS_IN_FLIGHT);
        // Waits for the oldest buffered all-gather and writes its window into the parameters.
        let land = |gathers: &mut VecDeque<(i64, Tensor, Option<Work>)>, spare: &mut Vec<Tensor>| -> Result<()> {
            if let Some((k, all, work)) = gathers.pop_front() {
                if let Some(work) = work {
                    work.wait()?;
                }
                tch::no_grad(|| self.flat.write(&self.params, self.layout.window_start(k), &all));
                spare.push(all);
            }
            Ok(())
        };
        // The last windows hold the first layers (the flat order is the backward pass's).
        for (k, o, n) in self.windows().rev() {
            let own = self.layout.part(k, self.rank);
            let weights = match (&self.master, &self.storage) {
                (Some(master), _) => master.narrow(0, o, n),
                // f32 weights are their own master: updated in place in the storage.
                (None, Some(storage)) => storage.narrow(0, own, n),
                (None, None) => unreachable!("f32 parameters share one type, so they live in the storage"),
            };
            let mut grad = match &self.reduced {
                Some(reduced) => reduced.narrow(0, o, n),
                None => {
                    let mut g = Tensor::empty([n], (Kind::Float, device));
                    tch::no_grad(|| self.flat.read(&grads, own, &mut g));
                    g
                }
            };
            tch::no_grad(|| {
                if factor != 1.0 {
                    grad *= factor;
                }
                optim::update_all(&self.config, self.steps, lr, self.fused, &[weights.shallow_clone()], &[self.m.narrow(0, o, n)], &[self.v.narrow(0, o, n)], &[grad.shallow_clone()])
            })?;
            drop(grad);
            match &self.storage {
                // In place (as FSDP2's): this rank's part of the window is the all-gather's
                // input, the master's update rounded into it first.
                Some(storage) => {
                    let mine = storage.narrow(0, own, n);
                    if self.master.is_some() {
                        tch::no_grad(|| mine.shallow_clone().copy_(&weights));
                    }
                    let mut window = storage.narrow(0, self.layout.window_start(k), span);
                    let work = ranks.all_gather_into_async(&mut window, &mine)?;
                    self.arrivals.pending.lock().expect("the arrivals' lock")[k as usize] = work;
                }
                None => {
                    if gathers.len() == GATHERS_IN_FLIGHT {
                        land(&mut gathers, &mut spare)?;
                    }
                    let mut all = spare.pop().unwrap_or_else(|| Tensor::empty([span], (self.gather_kind, device)));
                    let work = ranks.all_gather_into_async(&mut all, &weights.to_kind(self.gather_kind))?;
                    gathers.push_back((k, all, work));
                }
            }
        }
        while !gathers.is_empty() {
            land(&mut gathers, &mut spare)?;
        }
        if self.arrivals.first_window.get().is_none() {
            self.ready()?;
        }
        Ok(())
    }

    /// Writes this rank's shard (moments, master weights, layout) into `dir`; f32 weights are
    /// their own master, copied out of the parameters.
    pub fn save(&self, dir: &Path, rank: usize) -> Result<()> {
        let path = shard_file(dir, rank, "safetensors");
        let master = match &self.master {
            Some(master) => master.shallow_clone(),
            None => self.shard_weights(),
        };
        let tensors = [("m", self.m.shallow_clone()), ("v", self.v.shallow_clone()), ("master", master)].map(|(k, t)| (k.to_string(), t));
        Tensor::write_safetensors(&tensors, &path).with_context(|| format!("writing {}", path.display()))?;
        let meta = ShardMeta { world: self.layout.world, window: self.layout.window, total: self.flat.total, steps: self.steps, config: self.config, params: self.named_sizes() };
        haloflow::io::write_json(&shard_file(dir, rank, "json"), &meta)
    }

    /// The parameters' names and elements, in the flat order.
    fn named_sizes(&self) -> Vec<(String, i64)> {
        self.names.iter().zip(&self.params).map(|(name, p)| (name.clone(), p.numel() as i64)).collect()
    }

    /// Restores this rank's shard from the shards in `dir`, written by any number of ranks in
    /// any order of the parameters (re-mapped by name), the master weights only where they
    /// are not the f32 parameters, loaded from the checkpoint's model.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let total = self.flat.total;
        let mut metas = Vec::new();
        while shard_file(dir, metas.len(), "json").exists() {
            let meta_path = shard_file(dir, metas.len(), "json");
            let meta: ShardMeta = serde_json::from_slice(&std::fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?)
                .with_context(|| format!("{}: unreadable (written by another version of halo-train?)", meta_path.display()))?;
            ensure!(meta.total == total, "{}: the checkpoint's parameters have {} elements, this model {total}", meta_path.display(), meta.total);
            metas.push(meta);
        }
        let first = metas.first().with_context(|| format!("{}: no optimizer shard in this checkpoint (it was written without --shard-optimizer?)", dir.display()))?;
        let saved = Layout::new(total, first.world, first.window);
        ensure!(
            saved.window == first.window && metas.iter().all(|m| (m.world, m.window, m.steps, &m.params) == (first.world, first.window, first.steps, &first.params)),
            "{}: the optimizer shards disagree on their layout or step",
            dir.display()
        );
        ensure!(metas.len() as i64 == first.world, "{}: {} optimizer shard(s) of the {} ranks that wrote them (a shard file is missing)", dir.display(), metas.len(), first.world);
        // Where each parameter starts in the saved flat vector, and its elements there.
        let mine = self.named_sizes();
        let saved_params = if first.params.is_empty() { legacy_order(&mine) } else { first.params.clone() };
        let saved_flat = Flat::of_sizes(saved_params.iter().map(|(_, n)| *n));
        let saved_at: BTreeMap<&str, (i64, i64)> = saved_params.iter().zip(&saved_flat.offsets).map(|((name, n), &at)| (name.as_str(), (at, *n))).collect();
        for (name, n) in &mine {
            let found = saved_at.get(name.as_str()).map(|&(_, saved_n)| saved_n);
            ensure!(found == Some(*n), "{}: the optimizer shards {} `{name}` ({n} elements in this model)", shard_file(dir, 0, "json").display(), found.map_or("have no parameter".to_string(), |s| format!("give {s} elements to")));
        }
        ensure!(saved_params.len() == mine.len(), "{}: the optimizer shards hold {} parameters, this model {}", shard_file(dir, 0, "json").display(), saved_params.len(), mine.len());
        self.steps = first.steps;
        let mut files: BTreeMap<i64, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (k, o, n) in self.windows().collect::<Vec<_>>() {
            for (i, from, to, len) in self.flat.pieces(self.layout.part(k, self.rank), n).collect::<Vec<_>>() {
                let piece_at = saved_at[self.names[i].as_str()].0 + from;
                for (rank, saved_from, run_to, run_len) in saved.runs(piece_at, len) {
                    if !files.contains_key(&rank) {
                        let path = shard_file(dir, rank as usize, "safetensors");
                        let tensors = Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))?;
                        files.insert(rank, tensors.into_iter().collect());
                    }
                    let tensors = &files[&rank];
                    tch::no_grad(|| -> Result<()> {
                        let master = self.master.as_ref();
                        for (name, mine) in [("m", Some(&self.m)), ("v", Some(&self.v)), ("master", master)] {
                            let saved = tensors.get(name).with_context(|| format!("{}: no tensor {name}", shard_file(dir, rank as usize, "safetensors").display()))?;
                            if let Some(mine) = mine {
                                mine.narrow(0, o + to + run_to, run_len).copy_(&saved.narrow(0, saved_from, run_len));
                            }
                        }
                        Ok(())
                    })?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamW;

    #[test]
    fn flat_ranges_cross_tensors_and_pad_with_zeros() {
        let ts = [Tensor::from_slice(&[1.0f32, 2.0, 3.0]), Tensor::from_slice(&[4.0f32, 5.0]).view([1, 2])];
        let flat = Flat::new(&ts);
        assert_eq!(flat.pieces(2, 3).collect::<Vec<_>>(), [(0, 2, 0, 1), (1, 0, 1, 2)]);
        let mut out = Tensor::full([4], 9.0, (Kind::Float, tch::Device::Cpu));
        flat.read(&ts, 3, &mut out);
        assert_eq!(Vec::<f32>::try_from(&out).unwrap(), [4.0, 5.0, 0.0, 0.0]);
        flat.write(&ts, 1, &Tensor::from_slice(&[-2.0f32, -3.0, -4.0, -5.0, -6.0]));
        assert_eq!(Vec::<f32>::try_from(&ts[0]).unwrap(), [1.0, -2.0, -3.0]);
        assert_eq!(Vec::<f32>::try_from(&ts[1].view([-1])).unwrap(), [-4.0, -5.0]);
    }

    #[test]
    fn each_rank_owns_its_part_of_every_window() {
        // 26 elements, 2 ranks, windows of 2 × 4: ranks alternate every 4 elements.
        let two = Layout::new(26, 2, 4);
        assert_eq!((two.window, two.windows, two.shard_len()), (4, 4, 16));
        assert_eq!(two.part(1, 1), 12);
        let runs: Vec<_> = two.runs(0, 26).collect();
        assert_eq!(runs, [(0, 0, 0, 4), (1, 0, 4, 4), (0, 4, 8, 4), (1, 4, 12, 4), (0, 8, 16, 4), (1, 8, 20, 4), (0, 12, 24, 2)]);
        // A model smaller than one window: one window, each rank a third of it.
        let three = Layout::new(26, 3, 100);
        assert_eq!((three.window, three.windows), (9, 1));
        assert_eq!(three.runs(5, 10).collect::<Vec<_>>(), [(0, 5, 0, 4), (1, 0, 4, 6)]);
        // Every element has one owner, at a place of its shard no other element has.
        let mut seen = std::collections::HashSet::new();
        for (rank, at, _, len) in two.runs(0, 26) {
            for i in 0..len {
                assert!(seen.insert((rank, at + i)));
            }
        }
        assert_eq!(seen.len(), 26);
    }

    /// A checkpoint whose flat order is not today's is re-mapped by name: one of an older
    /// halo-train (no names; `lm_head` last) and one in another named order resume with each
    /// parameter's moments in its place; one of another model is refused, naming the parameter.
    #[test]
    fn shards_in_another_order_are_re_mapped_by_name() {
        let config = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 };
        let shapes = [("lm_head.weight", vec![3, 2]), ("model.embed_tokens.weight", vec![3, 2]), ("model.layers.0.w", vec![5]), ("model.norm.weight", vec![2])];
        let params: BTreeMap<String, Tensor> = shapes.iter().enumerate().map(|(i, (n, shape))| (n.to_string(), crate::optim::tests::spread(shape, i as f64).set_requires_grad(true))).collect();
        let ranks = Ranks::single();
        // A parameter's first moment, wherever the optimizer keeps it (one rank: the shard is the flat vector).
        let moment = |zero: &ShardedAdamW, name: &str| {
            let i = zero.names.iter().position(|n| n == name).unwrap();
            Vec::<f32>::try_from(&zero.m.narrow(0, zero.flat.offsets[i], zero.params[i].numel() as i64)).unwrap()
        };
        let legacy = ["model.norm.weight", "model.layers.0.w", "model.embed_tokens.weight", "lm_head.weight"];
        let scrambled = ["model.layers.0.w", "lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"];
        for (order, named) in [(legacy, false), (scrambled, true)] {
            let mut old = ShardedAdamW::in_order(order.iter().map(|&n| (n.to_string(), params[n].shallow_clone())).collect(), config, false, false, &ranks);
            old.set_layout(Layout::new(old.flat.total, 1, 4));
            old.clear_grads();
            params.values().map(|p| (p * p * p).sum(Kind::Float)).fold(Tensor::from(0.0f32), |a, b| a + b).backward();
            old.sync_and_clip(&ranks, None, 0.0, None).unwrap();
            old.update(&ranks, 0.01).unwrap();
            let dir = tempfile::tempdir().unwrap();
            old.save(dir.path(), 0).unwrap();
            if !named {
                let path = shard_file(dir.path(), 0, "json");
                let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                meta.as_object_mut().unwrap().remove("params");
                std::fs::write(&path, meta.to_string()).unwrap();
            }
            let copies = params.iter().map(|(k, t)| (k.clone(), t.detach().copy().set_requires_grad(true))).collect();
            let mut new = ShardedAdamW::new(copies, config, false, false, &ranks);
            assert_eq!(new.names[0], "lm_head.weight");
            new.load(dir.path()).unwrap();
            assert_eq!(new.steps, 1);
            for (name, _) in &shapes {
                let (was, is) = (moment(&old, name), moment(&new, name));
                assert!(was.iter().any(|&x| x != 0.0) && was == is, "named {named}: {name}: {was:?} vs {is:?}");
            }
            // Another model of as many elements (which the element count alone let through).
            if named {
                let other = params.iter().map(|(k, t)| (k.replace("norm", "final_norm"), t.detach().copy())).collect();
                let err = ShardedAdamW::new(other, config, false, false, &ranks).load(dir.path()).unwrap_err().to_string();
                assert!(err.contains("have no parameter `model.final_norm.weight`"), "{err}");
            }
        }
    }

    /// Window by window, with weights in f32 (their own master, updated in the flat storage),
    /// in bf16 (an f32 master) and in both (PPO's f32 value head beside bf16 weights: gathered
    /// through buffers), ZeRO-1 on one process takes the steps plain AdamW takes, with the
    /// unfused update and with the fused kernel, and so does ZeRO-2 (the f32 weights' sums
    /// then in a buffer of their own).
    #[test]
    fn windowed_steps_equal_plain_adamw() {
        let config = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let (f32, bf16, mixed) = ([Kind::Float; 3], [Kind::BFloat16; 3], [Kind::BFloat16, Kind::Float, Kind::BFloat16]);
        let cases = [(f32, false), (bf16, false), (mixed, false), (f32, true), (bf16, true), (mixed, true)];
        for ((kinds, fused), shard_grads) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let kind = if kinds == f32 { Kind::Float } else { Kind::BFloat16 };
            let make = || -> BTreeMap<String, Tensor> {
                [("a", vec![5, 3]), ("b", vec![7]), ("c", vec![2, 2])]
                    .into_iter()
                    .enumerate()
                    .map(|(i, (n, shape))| (n.to_string(), (crate::optim::tests::spread(&shape, i as f64) * 1.5).to_kind(kinds[i]).set_requires_grad(true)))
                    .collect()
            };
            let (plain, sharded) = (make(), make());
            let copy = |ps: &BTreeMap<String, Tensor>| ps.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
            let mut adamw = AdamW::new(copy(&plain), config, fused);
            let ranks = Ranks::single();
            let mut zero = ShardedAdamW::new(copy(&sharded), config, fused, shard_grads, &ranks);
            assert_eq!(zero.reduced.is_some(), kind != Kind::Float || shard_grads);
            // bf16 gradients clipped in place would round: clip the f32 case only.
            let max_norm = if kind == Kind::Float { 2.0 } else { 0.0 };
            zero.set_layout(Layout::new(zero.flat.total, 1, 4)); // 26 elements: 7 windows, the last one short
            assert_eq!(zero.layout.windows, 7);
            // Parameters of one type are views of the flat storage, in the flat order.
            match &zero.storage {
                Some(storage) => {
                    for (p, &at) in zero.params.iter().zip(&zero.flat.offsets) {
                        assert_eq!(p.data_ptr() as usize, storage.data_ptr() as usize + at as usize * kind.elt_size_in_bytes());
                    }
                }
                None => assert_eq!(kinds, mixed),
            }
            let loss = |ps: &BTreeMap<String, Tensor>| ps.values().map(|p| (p.to_kind(Kind::Float) * p.to_kind(Kind::Float) * p.to_kind(Kind::Float)).sum(Kind::Float)).fold(Tensor::from(0.0f32), |a, b| a + b);
            for step in 0..4 {
                adamw.clear_grads(false);
                zero.clear_grads();
                loss(&plain).backward();
                loss(&sharded).backward();
                let a = adamw.scale_and_clip(Some(0.5), max_norm);
                let z = zero.sync_and_clip(&ranks, Some(0.5), max_norm, None).unwrap();
                assert!((a - z).abs() < 1e-5 * a.max(1.0), "{kinds:?} step {step}: norm {a} vs {z}");
                adamw.step(0.01).unwrap();
                zero.update(&ranks, 0.01).unwrap();
                for (name, p) in &plain {
                    let diff = (p.to_kind(Kind::Double) - sharded[name].to_kind(Kind::Double)).abs().max().double_value(&[]);
                    assert!(diff < 1e-6, "{kinds:?} (fused: {fused}, sharded gradients: {shard_grads}) step {step}: {name} differs by {diff}");
                }
            }
        }
    }
}
