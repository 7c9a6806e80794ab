//! The training loop: microbatch losses, gradient accumulation, AdamW steps, evaluation,
//! checkpoints and the final outputs.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use haloflow::records;
use haloflow::schema::plan_meta;
use haloflow::tracking::Tracker;
use haloflow_dist::{BucketCounts, GradBuckets};
use haloflow_ml::dataset::{self, DataKind, ScoredRow};
use haloflow_ml::device::parse_dtype;
use haloflow_ml::losses::ppo::ValueHead;
use haloflow_ml::losses::{self, Accumulator, DataNeed, Halo};
use haloflow_ml::lora::{self, LoraConfig};
use haloflow_ml::model::CausalLm;
use serde_json::{json, Map, Value};
use tch::nn::VarStore;
use tch::Tensor;

use crate::checkpoint::{self, TrainState};
use crate::data::{self, Split};
use crate::metrics::{self, Row, Tokens};
use crate::microbatch::{microbatch_loss, reference, step_kl, Job, Label, Reference, VALUE_HEAD_WIDTH};
use crate::optim::{self, AdamW, AdamWConfig, Optimizer};
use crate::parallel::Ranks;
use crate::zero::ShardedAdamW;
use crate::{estimate, report, Args};

pub(crate) fn loss_params(args: &Args) -> Result<Map<String, Value>> {
    let mut params: Map<String, Value> = match &args.loss_params {
        Some(text) => serde_json::from_str(text).with_context(|| format!("--loss-params {text}: not a JSON object"))?,
        None => Map::new(),
    };
    for (name, value) in [("beta", args.beta), ("lambda_d", args.lambda_d), ("lambda_u", args.lambda_u)] {
        if let Some(v) = value {
            params.insert(name.into(), json!(v));
        }
    }
    Ok(params)
}

/// The run's hyperparameters, as TensorBoard's HParams dashboard and summary.json show them.
fn hparams(args: &Args, per_step: usize, world: usize) -> Result<Map<String, Value>> {
    let mut h = Map::new();
    h.insert("loss".into(), json!(args.loss));
    h.extend(loss_params(args)?);
    for (name, value) in [
        ("lr", json!(args.lr)),
        ("warmup_steps", json!(args.warmup_steps)),
        ("microbatch_size", json!(args.microbatch_size)),
        ("grad_accum", json!(args.grad_accum)),
        ("ranks", json!(world)),
        ("microbatches_per_step", json!(per_step)),
        ("max_steps", json!(args.max_steps)),
        ("seed", json!(args.seed)),
        ("max_prompt_length", json!(args.max_prompt_length)),
        ("max_length", json!(args.max_length)),
        ("model", json!(args.model.file_name().map(|n| n.to_string_lossy().into_owned()))),
        ("data", json!(args.data.file_name().map(|n| n.to_string_lossy().into_owned()))),
    ] {
        h.insert(name.into(), value);
    }
    Ok(h)
}

/// Reads the data, with the completions rewritten as the loss asks (CSFT's control tokens).
fn read_data(args: &Args, halo: &dyn Halo) -> Result<(DataKind, Vec<ScoredRow>, HashMap<String, Label>, BTreeMap<String, i64>, Option<(f64, f64)>)> {
    let (kind, mut rows) = dataset::read_rows(&args.data)?;
    match (halo.data(), kind) {
        (DataNeed::Binary, DataKind::Paired) => bail!("loss `{}` learns from binary feedback: give it a plan from halo-resample, not a paired table", halo.name()),
        (DataNeed::Paired, DataKind::Plan) => bail!("loss `{}` learns from preference pairs: give it a paired table, not a plan", halo.name()),
        _ => {}
    }
    let (mut labels, mut batch_of, mut lambdas) = (HashMap::new(), BTreeMap::new(), None);
    if kind == DataKind::Plan {
        for r in records::read_plan(&args.data)? {
            batch_of.insert(r.example.example_id.clone(), r.batch);
            labels.insert(r.example.example_id, Label { desirable: r.example.label, weight: r.example.weight });
        }
        let table = haloflow::io::read_table(&args.data)?;
        let meta = |k: &str| table.metadata(k).and_then(|v| v.parse::<f64>().ok());
        lambdas = meta(plan_meta::LAMBDA_D).zip(meta(plan_meta::LAMBDA_U));
    }
    for row in &mut rows {
        let first_desirable = labels.get(&row.id).map(|l| l.desirable).unwrap_or(true);
        if let Some(first) = halo.rewrite_completion(&row.first, first_desirable) {
            row.first = first;
        }
        if let Some(second) = halo.rewrite_completion(&row.second, kind == DataKind::Plan && first_desirable) {
            row.second = second;
        }
    }
    Ok((kind, rows, labels, batch_of, lambdas))
}

/// The training of one process: its microbatches' losses, the optimizer and the evaluation.
struct Trainer<'a> {
    job: Job<'a>,
    policy: &'a CausalLm,
    ranks: &'a Ranks,
    split: &'a Split,
    /// The loss as one process computes it (no all-reduce), for the evaluation.
    eval_halo: Box<dyn Halo>,
    /// Every trained tensor (policy, then PPO's value head), in the optimizer's order.
    params: Vec<Tensor>,
    opt: Optimizer,
    max_grad_norm: f64,
    /// The gradient buckets whose collectives overlap the last microbatch's backward pass
    /// (data-parallel runs with --overlap-grad-sync: all-reduces, or ZeRO-1's reduce-scatters).
    grad_buckets: Option<GradBuckets>,
    /// How the buckets were all-reduced, summed over the steps.
    bucket_counts: BucketCounts,
    /// Trained tensors holding a gradient after the last step's gradient sync and clipping
    /// (ZeRO-2: none, each dropped once its windows were copied).
    grads_held: usize,
}

/// Waits for the armed backward pass's gradient `buckets` (their collectives come before any
/// other, in the same order on every rank) and adds where they ran to `total`.
fn finish_buckets(buckets: &mut Option<GradBuckets>, total: &mut BucketCounts, rank: usize) -> Result<()> {
    if let Some(buckets) = buckets {
        let counts = buckets.finish()?;
        tracing::debug!(rank, during_backward = counts.during_backward, after_backward = counts.after_backward, redone = counts.redone, "gradient buckets reduced");
        total.during_backward += counts.during_backward;
        total.after_backward += counts.after_backward;
        total.redone += counts.redone;
    }
    Ok(())
}

impl Trainer<'_> {
    /// One optimizer step over `microbatches` (indices into the training microbatches, all
    /// ranks' together), this rank running its share; returns the step's row of metrics.
    fn step(&mut self, step: usize, epoch: usize, microbatches: &[usize], lr: f64) -> Result<Row> {
        let (job, ranks, rows) = (&self.job, self.ranks, self.job.rows);
        let started = Instant::now();
        let mine: Vec<&[usize]> = ranks.share(microbatches).map(|&mb| self.split.train[mb].as_slice()).collect();
        self.opt.clear_grads(self.grad_buckets.as_ref());
        let mut acc = Accumulator::new();
        let mut row = Row::new(step + 1, epoch);
        job.tokens.take(); // not the evaluation passes since the last step
        let step_kl = step_kl(job, self.policy, &mine)?;
        let last = mine.len() - 1;
        for (k, members) in mine.iter().enumerate() {
            let fixed = step_kl.as_ref().map(|s| (&s.partners[k], s.z0.as_ref()));
            let out = microbatch_loss(job, self.policy, members, true, fixed)?;
            // ZeRO-1: an all-gather that failed while the forward waited for it (a lost rank)
            // is the error, not what the weights it left stale computed.
            self.opt.ready()?;
            let loss = out.loss.double_value(&[]);
            if !loss.is_finite() {
                let ids: Vec<&str> = members.iter().map(|&i| rows[i].id.as_str()).collect();
                bail!("loss is {loss} at step {} (microbatch of examples {}); the last good checkpoint is kept", step + 1, ids.join(", "));
            }
            // As DDP's no_sync: earlier microbatches accumulate on this rank alone, the last
            // one's backward sums each bucket of gradients as soon as it is final. ZeRO-2
            // reduce-scatters every microbatch's (its gradients leave as they go).
            let armed = k == last || self.opt.shards_gradients();
            if let Some(buckets) = self.grad_buckets.as_ref().filter(|_| armed) {
                buckets.arm();
            }
            acc.backward(&out)?;
            // Activation checkpointing: the layers' part of the backward (nothing otherwise).
            if self.policy.net.checkpointing() {
                tracing::debug!(forwards = self.policy.net.pending_backward(), "activation checkpointing: recomputing the layers of the microbatch's checkpointed forwards");
            }
            self.policy.net.finish_backward()?;
            if armed && k != last {
                finish_buckets(&mut self.grad_buckets, &mut self.bucket_counts, ranks.rank())?;
            }
            row.add_microbatch(&out);
        }
        let computed = started.elapsed().as_secs_f64();
        finish_buckets(&mut self.grad_buckets, &mut self.bucket_counts, ranks.rank())?;
        let mut tokens = job.tokens.take();
        if let Some(reduce) = ranks.loss_reduce() {
            acc.all_reduce(reduce.as_ref())?;
            row.sum_over(ranks)?;
            tokens = Tokens::from_array(&Vec::<f64>::try_from(ranks.sum(&Tensor::from_slice(&tokens.to_array()))?)?);
        }
        let examples = acc.examples();
        let (loss, grad_norm) = self.opt.sync_and_clip(ranks, &self.params, acc, self.max_grad_norm, self.grad_buckets.as_ref())?;
        self.grads_held = self.params.iter().filter(|p| p.grad().defined()).count();
        if !grad_norm.is_finite() {
            let ids: Vec<&str> = microbatches.iter().flat_map(|&mb| &self.split.train[mb]).map(|&i| rows[i].id.as_str()).collect();
            bail!("gradient norm is {grad_norm} at step {} (examples {}); the last good checkpoint is kept", step + 1, ids.join(", "));
        }
        let synced = started.elapsed().as_secs_f64();
        // A crash test's kill between the gradient sync and the update (with ZeRO-1, before
        // this rank starts the all-gathers the other ranks' next forward waits for).
        haloflow::stage_cli::fault_point("before_update", step + 1);
        self.opt.update(ranks, lr)?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::debug!(rank = ranks.rank(), step = step + 1, forward_backward_s = computed, sync_and_clip_s = synced - computed, update_s = seconds - synced, "step timing");
        row.finish(loss, lr, grad_norm, examples, tokens, seconds);
        Ok(row)
    }

    /// Loss and reward metrics on the held-out microbatches, without gradient. The ranks split
    /// them as they split a step's (rank r takes microbatches r, r + N, …) and sum their
    /// totals, so the metrics are those of one process evaluating all of them. Each
    /// microbatch's batch statistics (KTO's reference point) are its own, as in one process:
    /// the evaluation runs the loss's single-process instance, which reduces nothing.
    fn evaluate(&self, row: &mut Row) -> Result<()> {
        let job = Job { halo: self.eval_halo.as_ref(), tokens: Default::default(), ..self.job };
        let mut eval = Row::new(row.step, row.epoch);
        let (mut loss, mut count, mut microbatches) = (0.0, 0usize, 0usize);
        for members in self.ranks.share(&self.split.eval) {
            let out = tch::no_grad(|| microbatch_loss(&job, self.policy, members, false, None))?;
            loss += out.loss.double_value(&[]) * out.count as f64;
            count += out.count;
            microbatches += 1;
            eval.add_microbatch(&out);
        }
        tracing::debug!(rank = self.ranks.rank(), microbatches, of = self.split.eval.len(), "evaluated this rank's share of the held-out microbatches");
        eval.sum_over(self.ranks)?;
        let totals = Vec::<f64>::try_from(self.ranks.sum(&Tensor::from_slice(&[loss, count as f64]))?)?;
        row.set_eval(totals[0] / totals[1].max(1.0), &eval);
        Ok(())
    }
}

/// Where `--merge-lora` writes the merged model (`--merged`), checked before anything runs.
fn merged_output(args: &Args, lora: bool) -> Result<Option<std::path::PathBuf>> {
    match (args.merge_lora, &args.merged) {
        (false, None) => Ok(None),
        (false, Some(_)) => bail!("--merged is the output of --merge-lora: add --merge-lora"),
        (true, _) if !lora => bail!("--merge-lora needs --lora (there are no adapters to merge)"),
        (true, None) => bail!("--merge-lora needs --merged DIR (where the merged model goes)"),
        (true, Some(dir)) => Ok(Some(dir.clone())),
    }
}

/// Attaches fresh adapters (seeded by `--seed`) to the loaded base model `--model`, which the
/// adapter directory will name by its absolute path.
fn attach_lora(policy: &mut CausalLm, config: &LoraConfig, args: &Args) -> Result<()> {
    ensure!(
        policy.lora.is_none(),
        "--model {} is a LoRA adapter directory: continue training it without --lora, or give --lora its merged model",
        args.model.display()
    );
    let base = std::fs::canonicalize(&args.model).with_context(|| format!("resolving {}", args.model.display()))?;
    tch::manual_seed(args.seed as i64);
    policy.attach_lora(config, &base, lora::base_fingerprint(&base)?)?;
    if let Some(lora) = &policy.lora {
        lora.set_training(true);
    }
    Ok(())
}

/// The RNG seed of step `step` on rank `rank` (adapter dropout).
fn dropout_seed(seed: u64, step: usize, rank: usize) -> i64 {
    let hash = blake3::hash(format!("lora-dropout/{seed}/{step}/{rank}").as_bytes());
    i64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes")) & i64::MAX
}

/// Runs the stage.
pub fn run(args: &Args) -> Result<()> {
    haloflow_ml::device::init_process(args.threads);
    let (ranks, device) = Ranks::join(args)?;
    let kind = parse_dtype(&args.dtype, device)?;
    let adam = AdamWConfig { beta1: args.adam_beta1, beta2: args.adam_beta2, eps: args.adam_eps, weight_decay: args.weight_decay };
    optim::validate(args.lr, &adam)?;
    ensure!(args.grad_accum >= 1, "grad_accum must be at least 1");
    let lora_config = args.lora.as_deref().map(LoraConfig::parse).transpose()?;
    if let Some(dropout) = lora_config.as_ref().map(|c| c.dropout).filter(|&d| d > 0.0 && args.checkpoint_activations) {
        bail!("--checkpoint-activations with LoRA dropout {dropout}: the recomputed layers would draw other dropout masks than the forward did; set the adapters' dropout to 0 or turn checkpointing off");
    }
    let merged = merged_output(args, lora_config.is_some())?;
    let mut halo = losses::by_name(&args.loss, &loss_params(args)?)?;
    let eval_halo = losses::by_name(&args.loss, &loss_params(args)?)?;
    if let Some(reduce) = ranks.loss_reduce() {
        halo.set_all_reduce(reduce);
    }
    let (data_kind, rows, labels, batch_of, lambdas) = read_data(args, halo.as_ref())?;
    let tok = args.format.tokenizer(&args.model)?;
    let (encoded, stats) = dataset::encode_rows(&tok, &rows, args.max_prompt_length, args.max_length)?;
    if stats.skipped > 0 {
        tracing::warn!(skipped = stats.skipped, "rows skipped: a completion is empty after truncation");
    }
    let split = data::split(data_kind, &encoded, &batch_of, args.microbatch_size, args.eval_batches)?;
    let min_rows = halo.min_rows_per_microbatch();
    if let Some(small) = split.train.iter().chain(&split.eval).find(|b| b.len() < min_rows) {
        bail!("loss `{}` needs microbatches of at least {min_rows} rows; microbatch of row `{}` has {}", halo.name(), encoded[small[0]].id, small.len());
    }
    let config = CausalLm::config_of(&args.model)?;
    let rows = split.train.iter().chain(&split.eval).map(Vec::len).max().unwrap_or(0);
    let length = encoded.iter().flat_map(|r| r.seqs.iter().map(|s| s.ids.len())).max().unwrap_or(0);
    // The sequences of a microbatch's passes with gradient (both sides of pairs) and their
    // completion positions.
    let sides = data_kind.sequences_per_row();
    let head_positions = split.train.iter().map(|mb| mb.iter().flat_map(|&i| &encoded[i].seqs[..sides]).map(|s| s.ids.len() - s.completion_start).sum::<usize>()).max();
    let memory = estimate::estimate(args, halo.as_ref(), &config, kind, rows * sides, length, head_positions, ranks.world());
    estimate::check_fits(&memory, device)?;
    let reference = reference(args, &tok, halo.as_ref(), device, kind)?;
    let mut policy = CausalLm::load(&args.model, device, kind)?;
    if let Some(config) = &lora_config {
        attach_lora(&mut policy, config, args)?;
    }
    policy.net.set_checkpointing(args.checkpoint_activations);
    let mut params: BTreeMap<String, Tensor> = policy.trainable();
    let trainable_parameters: i64 = params.values().map(Tensor::numel).sum::<usize>() as i64;
    // PPO's critic: a value head trained with the policy, kept in checkpoints, not in the output.
    let value_vs = VarStore::new(device);
    let value_head = halo.needs_value_head().then(|| {
        tch::manual_seed(args.seed as i64);
        ValueHead::new(&(value_vs.root() / "value_head"), policy.config.hidden_size as i64, VALUE_HEAD_WIDTH)
    });
    params.extend(value_vs.variables());
    let param_list: Vec<Tensor> = params.values().map(|t| t.shallow_clone()).collect();
    let names: Vec<String> = params.keys().cloned().collect();
    let fused = args.fused_adamw;
    let opt = if args.shards_optimizer() {
        Optimizer::Sharded(ShardedAdamW::new(params, adam, fused, args.shard_gradients, &ranks))
    } else {
        Optimizer::Full(AdamW::new(params, adam, fused))
    };
    if args.shard_gradients && ranks.world() > 1 && !args.overlap_grad_sync {
        tracing::warn!("--shard-gradients with --overlap-grad-sync=false: every gradient is kept until the backward pass ends, so ZeRO-2 saves nothing over ZeRO-1");
    }
    // ZeRO-1's all-gathers of updated weights run on into the next forward pass, which waits
    // for each layer's.
    if let Optimizer::Sharded(zero) = &opt {
        let gate = zero.weights_gate(|name| policy.net.weight_stage(name));
        policy.net.set_weights_gate(gate);
    }
    let grad_buckets = match &opt {
        _ if !args.overlap_grad_sync => None,
        Optimizer::Sharded(zero) => zero.grad_buckets(&ranks)?,
        Optimizer::Full(_) => ranks.grad_buckets(&param_list, &names)?,
    };

    ranks.check_microbatches(split.train.len(), args.grad_accum)?;
    let per_step = args.grad_accum * ranks.world();
    let steps_per_epoch = split.train.len() / per_step;
    let total = (steps_per_epoch * args.epochs).min(args.max_steps.unwrap_or(usize::MAX));
    ensure!(total > 0, "no optimizer step to take (epochs = {}, max_steps = {:?})", args.epochs, args.max_steps);

    let job = Job {
        halo: halo.as_ref(),
        kind: data_kind,
        rows: &encoded,
        labels: &labels,
        reference: &reference,
        lambdas,
        device,
        value_head: value_head.as_ref(),
        share: args.share_prompts,
        chunk: args.logits_chunk,
        tokens: Default::default(),
    };
    let mut trainer = Trainer { job, policy: &policy, ranks: &ranks, split: &split, eval_halo, params: param_list, opt, max_grad_norm: args.max_grad_norm, grad_buckets, bucket_counts: BucketCounts::default(), grads_held: 0 };
    let ckpt_root = args
        .checkpoint_dir
        .clone()
        .or_else(|| args.scratch_dir.as_ref().map(|d| d.join("checkpoints")))
        .unwrap_or_else(|| args.policy.with_extension("checkpoints"));
    let run_id = checkpoint::run_id(args, per_step, &policy.dir, &args.data)?;
    let hparams = hparams(args, per_step, ranks.world())?;
    let mut tracker = match (&args.tracking_dir, ranks.is_main()) {
        (Some(dir), true) => Some(Tracker::create(dir, &hparams)?),
        _ => None,
    };
    let mut track = |row: &Row| match tracker.as_mut() {
        Some(t) => t.log(row.step, &row.values.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>()),
        None => Ok(()),
    };
    let mut state = TrainState { run_id: run_id.clone(), step: 0, metrics: Vec::new() };
    let found = checkpoint::latest(&ckpt_root, &run_id)?;
    let found_step = found.as_ref().map_or(Ok(0), |f| checkpoint::read_state(f).map(|s| s.step as i64))?;
    ranks
        .check_same(found_step, "the checkpoint step to resume from")
        .with_context(|| format!("every rank must see the same checkpoint directory, here {}", ckpt_root.display()))?;
    if let Some(found) = found {
        haloflow_ml::weights::load(&policy.vs, &found.join("model"))?;
        if value_head.is_some() {
            haloflow_ml::weights::load_file(&value_vs, &found.join(checkpoint::VALUE_HEAD_FILE))?;
        }
        trainer.opt.load(&found)?;
        state = checkpoint::read_state(&found)?;
        tracing::info!(step = state.step, checkpoint = %found.display(), "resuming");
    } else if !split.eval.is_empty() {
        let mut row = Row::new(0, 0);
        trainer.evaluate(&mut row)?;
        track(&row)?;
        state.metrics.push(row);
    }

    let bar = if ranks.is_main() { haloflow::stage_cli::progress(total as u64, "training steps") } else { indicatif::ProgressBar::hidden() };
    bar.set_position(state.step as u64);
    let mut orders: HashMap<usize, Vec<usize>> = HashMap::new();
    for step in state.step..total {
        let epoch = step / steps_per_epoch;
        let order = orders.entry(epoch).or_insert_with(|| data::epoch_order(split.train.len(), epoch, args.seed));
        let at = (step % steps_per_epoch) * per_step;
        let lr = optim::learning_rate(args.lr, step, args.warmup_steps, total, args.decay);
        if lora_config.as_ref().is_some_and(|c| c.dropout > 0.0) {
            // Adapter dropout masks follow from (seed, step, rank), so a resumed run draws the same.
            tch::manual_seed(dropout_seed(args.seed, step, ranks.rank()));
        }
        let mut row = trainer.step(step, epoch, &order[at..at + per_step], lr)?;
        let last = step + 1 == total;
        if !split.eval.is_empty() && (last || (args.eval_every > 0 && (step + 1) % args.eval_every == 0)) {
            trainer.evaluate(&mut row)?;
        }
        let (loss, grad_norm) = (row.get("loss").unwrap_or(f64::NAN), row.get("grad_norm").unwrap_or(f64::NAN));
        bar.set_message(format!("loss {loss:.4}"));
        if ranks.is_main() && ((step + 1) % 10 == 0 || last) {
            let f = |name: &str| format!("{:.3}", row.get(name).unwrap_or(f64::NAN));
            tracing::info!(step = step + 1, total, loss = %format!("{loss:.4}"), grad_norm = %format!("{grad_norm:.3}"), lr, tokens_per_s = %format!("{:.0}", row.get("tokens_per_s").unwrap_or(0.0)), prefix_sharing_saving = %f("prefix_sharing_saving"), padding_waste = %f("padding_waste"), "step");
        }
        bar.inc(1);
        track(&row)?;
        state.metrics.push(row);
        state.step = step + 1;
        if args.save_every > 0 && (step + 1) % args.save_every == 0 && !last {
            trainer.opt.ready()?;
            checkpoint::save(&ckpt_root, &ranks, &policy, value_head.is_some().then_some(&value_vs), trainer.opt.state(), &state)?;
        }
        haloflow::stage_cli::fault_point("after_steps", step + 1);
    }
    bar.finish_and_clear();
    trainer.opt.ready()?;
    // Every rank finished every step before anything is written.
    ranks.barrier()?;
    if !ranks.is_main() {
        return Ok(());
    }

    policy.save(&args.policy)?;
    if let Some(merged) = &merged {
        policy.save_merged(merged)?;
    }
    metrics::write(&args.metrics, &state.metrics, &hparams)?;
    report::write(&args.report, &args.loss, &state.metrics, args.smoothing)?;
    let mut summary = json!({
        "loss": args.loss,
        "data_kind": data_kind,
        "steps": total,
        "rows": stats.rows,
        "rows_skipped": stats.skipped,
        "truncated_prompts": stats.truncated_prompts,
        "truncated_completions": stats.truncated_completions,
        "train_microbatches": split.train.len(),
        "eval_microbatches": split.eval.len(),
        "microbatches_per_step": per_step,
        "ranks": ranks.world(),
        "shard_optimizer": args.shards_optimizer(),
        "shard_gradients": args.shard_gradients,
        // Rank 0's gradient buckets over the run (all zero without overlap).
        "grad_sync": {
            "overlap": trainer.grad_buckets.is_some(),
            "buckets_during_backward": trainer.bucket_counts.during_backward,
            "buckets_after_backward": trainer.bucket_counts.after_backward,
            "buckets_redone": trainer.bucket_counts.redone,
            "gradients_held_after_sync": trainer.grads_held,
        },
        // ZeRO-1's all-gathers of updated weights (rank 0's windows over the run).
        "weight_gathers": match &trainer.opt {
            Optimizer::Sharded(zero) => json!(zero.gather_counts()),
            Optimizer::Full(_) => json!(null),
        },
        "fused_adamw": fused,
        "lora": lora_config,
        "trainable_parameters": trainable_parameters,
        "merge_lora": merged.is_some(),
        "checkpoint_activations": args.checkpoint_activations,
        "memory_estimate": memory.to_json(),
        "lambdas_from_plan": lambdas,
        "reference": match &reference { Reference::Cache(_) => "cache", Reference::Live(_) => "live", Reference::Base => "base (adapters off)", Reference::Free => "none" },
        "first": state.metrics.first().map(Row::to_json),
        "last": state.metrics.last().map(Row::to_json),
        "device": haloflow_ml::device::device_name(device),
        "dtype": haloflow_ml::device::dtype_name(kind),
        "hparams": hparams,
        "share_prompts": args.share_prompts,
        "logits_chunk": args.logits_chunk,
    });
    for (name, value) in Tokens::total(&state.metrics).named() {
        summary[name] = json!(value);
    }
    match state.metrics.last().and_then(|r| r.get("loss")) {
        Some(loss) => tracing::info!(steps = total, final_loss = loss, "training finished"),
        None => tracing::info!(steps = total, "training finished"),
    }
    haloflow::io::write_json(&args.summary, &summary)?;
    if ckpt_root.exists() {
        std::fs::remove_dir_all(&ckpt_root).with_context(|| format!("removing {}", ckpt_root.display()))?;
    }
    Ok(())
}
