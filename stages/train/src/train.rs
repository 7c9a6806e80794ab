//! The training loop: microbatch losses, gradient accumulation, AdamW steps, evaluation,
//! checkpoints and the final outputs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use haloflow::records;
use haloflow::schema::plan_meta;
use haloflow_ml::dataset::{self, DataKind, EncodedRow, ScoredRow};
use haloflow_ml::device::parse_dtype;
use haloflow_ml::fingerprint::Fingerprint;
use haloflow_ml::logprobs::{sequence_logps, target_logps, token_logps, Batch, Sequence};
use haloflow_ml::losses::ppo::{TokenLogps, ValueHead};
use haloflow_ml::losses::{self, Accumulator, DataNeed, Halo, KlPartners, LossInputs, LossOutput, Sums};
use haloflow_ml::model::CausalLm;
use haloflow_ml::tokenize::Tokenizer;
use serde_json::{json, Map, Value};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, OptimizerState, TrainState};
use crate::data::{self, Split};
use crate::metrics::{self, Row};
use crate::optim::{self, AdamW, AdamWConfig};
use crate::parallel::Ranks;
use crate::zero::ShardedAdamW;
use crate::refs::{self, RefRow};
use crate::{report, Args};

/// Where reference log-probs come from.
enum Reference {
    /// The refcache Parquet, by row id.
    Cache(HashMap<String, RefRow>),
    /// A frozen second copy of the initial model.
    Live(Box<CausalLm>),
    /// The loss needs none.
    Free,
}

/// Per-row facts of binary feedback (from the plan).
struct Label {
    desirable: bool,
    weight: f64,
}

/// Everything one microbatch's loss needs, fixed for the run.
struct Job<'a> {
    halo: &'a dyn Halo,
    kind: DataKind,
    rows: &'a [EncodedRow],
    labels: &'a HashMap<String, Label>,
    reference: &'a Reference,
    lambdas: Option<(f64, f64)>,
    device: Device,
    /// PPO's critic.
    value_head: Option<&'a ValueHead>,
}

fn loss_params(args: &Args) -> Result<Map<String, Value>> {
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

/// The optimizer: plain AdamW (its state on every rank) or ZeRO-1.
enum Optimizer {
    Full(AdamW),
    Sharded(ShardedAdamW),
}

impl Optimizer {
    fn zero_grad(&mut self) {
        match self {
            Optimizer::Full(opt) => opt.zero_grad(),
            Optimizer::Sharded(opt) => opt.zero_grad(),
        }
    }

    /// Sums the step's gradients over the ranks, divides them by its example count and clips
    /// them by global norm; returns the step's loss and the norm before clipping.
    fn sync_and_clip(&mut self, ranks: &Ranks, params: &[Tensor], acc: Accumulator, max_norm: f64) -> Result<(f64, f64)> {
        match self {
            Optimizer::Full(opt) => {
                ranks.sum_gradients(params)?;
                let loss = acc.finish(params);
                Ok((loss, opt.clip_grad_norm(max_norm)))
            }
            Optimizer::Sharded(opt) => {
                let (loss, scale) = acc.totals();
                Ok((loss, opt.sync_and_clip(ranks, scale, max_norm)?))
            }
        }
    }

    fn update(&mut self, ranks: &Ranks, lr: f64) -> Result<()> {
        match self {
            Optimizer::Full(opt) => {
                opt.step(lr);
                Ok(())
            }
            Optimizer::Sharded(opt) => opt.update(ranks, lr),
        }
    }

    fn load(&mut self, dir: &std::path::Path) -> Result<()> {
        match self {
            Optimizer::Full(opt) => opt.load(dir),
            Optimizer::Sharded(opt) => opt.load(dir),
        }
    }

    fn state(&self) -> OptimizerState<'_> {
        match self {
            Optimizer::Full(opt) => OptimizerState::Full(opt),
            Optimizer::Sharded(opt) => OptimizerState::Sharded(opt),
        }
    }
}

/// Runs the stage.
pub fn run(args: &Args) -> Result<()> {
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let (ranks, device) = Ranks::join(args)?;
    let kind = parse_dtype(&args.dtype, device)?;
    let adam = AdamWConfig { beta1: args.adam_beta1, beta2: args.adam_beta2, eps: args.adam_eps, weight_decay: args.weight_decay };
    optim::validate(args.lr, &adam)?;
    ensure!(args.grad_accum >= 1, "grad_accum must be at least 1");
    let mut halo = losses::by_name(&args.loss, &loss_params(args)?)?;
    if let Some(reduce) = ranks.loss_reduce() {
        halo.set_all_reduce(reduce);
    }
    let (data_kind, rows, labels, batch_of, lambdas) = read_data(args, halo.as_ref())?;
    let tok = Tokenizer::from_dir(&args.model)?;
    let (encoded, stats) = dataset::encode_rows(&tok, &rows, args.max_prompt_length, args.max_length)?;
    if stats.skipped > 0 {
        tracing::warn!(skipped = stats.skipped, "rows skipped: a completion is empty after truncation");
    }
    let split = data::split(data_kind, &encoded, &batch_of, args.microbatch_size, args.eval_batches)?;
    let min_rows = halo.min_rows_per_microbatch();
    if let Some(small) = split.train.iter().chain(&split.eval).find(|b| b.len() < min_rows) {
        bail!("loss `{}` needs microbatches of at least {min_rows} rows; microbatch of row `{}` has {}", halo.name(), encoded[small[0]].id, small.len());
    }
    let reference = reference(args, halo.as_ref(), device, kind)?;
    let policy = CausalLm::load(&args.model, device, kind)?;
    let mut params: BTreeMap<String, Tensor> = policy.vs.variables().into_iter().collect();
    // PPO's critic: a value head trained with the policy, kept in checkpoints, not in the output.
    let value_vs = VarStore::new(device);
    let value_head = halo.needs_value_head().then(|| {
        tch::manual_seed(args.seed as i64);
        ValueHead::new(&(value_vs.root() / "value_head"), policy.config.hidden_size as i64, VALUE_HEAD_WIDTH)
    });
    params.extend(value_vs.variables());
    let param_list: Vec<Tensor> = params.values().map(|t| t.shallow_clone()).collect();
    let mut opt = if args.shard_optimizer { Optimizer::Sharded(ShardedAdamW::new(params, adam, &ranks)) } else { Optimizer::Full(AdamW::new(params, adam)) };

    ranks.check_microbatches(split.train.len(), args.grad_accum)?;
    let per_step = args.grad_accum * ranks.world();
    let steps_per_epoch = split.train.len() / per_step;
    let total = (steps_per_epoch * args.epochs).min(args.max_steps.unwrap_or(usize::MAX));
    ensure!(total > 0, "no optimizer step to take (epochs = {}, max_steps = {:?})", args.epochs, args.max_steps);

    let job = Job { halo: halo.as_ref(), kind: data_kind, rows: &encoded, labels: &labels, reference: &reference, lambdas, device, value_head: value_head.as_ref() };
    let ckpt_root = args
        .checkpoint_dir
        .clone()
        .or_else(|| std::env::var_os("HALO_SCRATCH_DIR").map(|d| PathBuf::from(d).join("checkpoints")))
        .unwrap_or_else(|| args.policy.with_extension("checkpoints"));
    let run_id = checkpoint::run_id(args, per_step, &policy.dir, &args.data)?;
    let mut state = TrainState { run_id: run_id.clone(), step: 0, metrics: Vec::new() };
    if let Some(found) = checkpoint::latest(&ckpt_root, &run_id)? {
        haloflow_ml::weights::load(&policy.vs, &found.join("model"))?;
        if value_head.is_some() {
            haloflow_ml::weights::load_file(&value_vs, &found.join(checkpoint::VALUE_HEAD_FILE))?;
        }
        opt.load(&found)?;
        state = checkpoint::read_state(&found)?;
        tracing::info!(step = state.step, checkpoint = %found.display(), "resuming");
    } else if !split.eval.is_empty() {
        let mut row = Row::new(0, 0);
        evaluate(&job, &policy, &split, &mut row)?;
        state.metrics.push(row);
    }

    let bar = if ranks.is_main() { haloflow::stage_cli::progress(total as u64, "training steps") } else { indicatif::ProgressBar::hidden() };
    bar.set_position(state.step as u64);
    let mut orders: HashMap<usize, Vec<usize>> = HashMap::new();
    for step in state.step..total {
        let started = Instant::now();
        let epoch = step / steps_per_epoch;
        let order = orders.entry(epoch).or_insert_with(|| data::epoch_order(split.train.len(), epoch, args.seed));
        let at = (step % steps_per_epoch) * per_step;
        let step_microbatches = &order[at..at + per_step];
        let mine: Vec<&[usize]> = ranks.share(step_microbatches).map(|&mb| split.train[mb].as_slice()).collect();
        let lr = optim::learning_rate(args.lr, step, args.warmup_steps, total, args.decay);
        opt.zero_grad();
        let mut acc = Accumulator::new();
        let mut row = Row::new(step + 1, epoch);
        let mut tokens = 0usize;
        let step_kl = step_kl(&job, &policy, &mine)?;
        for (k, members) in mine.iter().enumerate() {
            let fixed = step_kl.as_ref().map(|s| (&s.partners[k], s.z0.as_ref()));
            let (out, policy_logps) = microbatch_loss(&job, &policy, members, true, fixed)?;
            let loss = out.loss.double_value(&[]);
            if !loss.is_finite() {
                let ids: Vec<&str> = members.iter().map(|&i| encoded[i].id.as_str()).collect();
                bail!("loss is {loss} at step {} (microbatch of examples {}); the last good checkpoint is kept", step + 1, ids.join(", "));
            }
            acc.backward(&out)?;
            row.add_microbatch(&out, policy_logps);
            tokens += members.iter().map(|&i| encoded[i].seqs.iter().map(|s| s.ids.len()).sum::<usize>()).sum::<usize>();
        }
        if let Some(reduce) = ranks.loss_reduce() {
            acc.all_reduce(reduce.as_ref())?;
            row.sum_over(&ranks)?;
            tokens = ranks.sum(&Tensor::from_slice(&[tokens as f64]))?.double_value(&[0]).round() as usize;
        }
        let examples = acc.examples();
        let (loss, grad_norm) = opt.sync_and_clip(&ranks, &param_list, acc, args.max_grad_norm)?;
        if !grad_norm.is_finite() {
            let ids: Vec<&str> = step_microbatches.iter().flat_map(|&mb| &split.train[mb]).map(|&i| encoded[i].id.as_str()).collect();
            bail!("gradient norm is {grad_norm} at step {} (examples {}); the last good checkpoint is kept", step + 1, ids.join(", "));
        }
        opt.update(&ranks, lr)?;
        let seconds = started.elapsed().as_secs_f64();
        row.finish(loss, lr, grad_norm, examples, tokens, seconds);
        let last = step + 1 == total;
        if !split.eval.is_empty() && (last || (args.eval_every > 0 && (step + 1) % args.eval_every == 0)) {
            evaluate(&job, &policy, &split, &mut row)?;
        }
        bar.set_message(format!("loss {loss:.4}"));
        if ranks.is_main() && ((step + 1) % 10 == 0 || last) {
            tracing::info!(step = step + 1, total, loss = %format!("{loss:.4}"), grad_norm = %format!("{grad_norm:.3}"), lr, "step");
        }
        bar.inc(1);
        state.metrics.push(row);
        state.step = step + 1;
        if args.save_every > 0 && (step + 1) % args.save_every == 0 && !last {
            checkpoint::save(&ckpt_root, &ranks, &policy, value_head.is_some().then_some(&value_vs), opt.state(), &state)?;
        }
        haloflow::stage_cli::fault_point("after_steps", step + 1);
    }
    bar.finish_and_clear();
    // Every rank finished every step before anything is written.
    ranks.barrier()?;
    if !ranks.is_main() {
        return Ok(());
    }

    policy.save(&args.policy)?;
    metrics::write(&args.metrics, &state.metrics)?;
    report::write(&args.report, &args.loss, &state.metrics)?;
    let summary = json!({
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
        "shard_optimizer": args.shard_optimizer,
        "lambdas_from_plan": lambdas,
        "reference": match &reference { Reference::Cache(_) => "cache", Reference::Live(_) => "live", Reference::Free => "none" },
        "first": state.metrics.first().map(Row::to_json),
        "last": state.metrics.last().map(Row::to_json),
        "device": format!("{device:?}"),
        "dtype": format!("{kind:?}"),
    });
    tracing::info!(steps = total, final_loss = ?state.metrics.last().and_then(|r| r.get("loss")), "training finished");
    haloflow::io::write_json(&args.summary, &summary)?;
    if ckpt_root.exists() {
        std::fs::remove_dir_all(&ckpt_root).with_context(|| format!("removing {}", ckpt_root.display()))?;
    }
    Ok(())
}

fn reference(args: &Args, halo: &dyn Halo, device: Device, kind: Kind) -> Result<Reference> {
    if !halo.needs_reference() {
        return Ok(Reference::Free);
    }
    let mode = args.reference.as_deref().unwrap_or(if args.ref_logps.is_some() { "cache" } else { "live" });
    match (mode, &args.ref_logps) {
        ("cache", Some(path)) => {
            let expected = Fingerprint::compute(&args.model, &args.data, args.max_prompt_length, args.max_length)?;
            Ok(Reference::Cache(refs::load(path, &expected)?))
        }
        ("cache", None) => bail!("--reference cache needs --ref-logps (the output of halo-refcache)"),
        _ => Ok(Reference::Live(Box::new(CausalLm::load(&args.model, device, kind)?))),
    }
}

/// Summed log-probs of sequences (with or without gradient) and their token counts.
fn logps(model: &CausalLm, seqs: &[&Sequence], device: Device, grad: bool) -> (Tensor, Tensor) {
    let batch = Batch::new(seqs, 0, device);
    if grad {
        sequence_logps(&model.net, &batch)
    } else {
        tch::no_grad(|| sequence_logps(&model.net, &batch))
    }
}

/// Reference sums of the rows' sequences `side` (0: first, 1: second).
fn reference_side(job: &Job, members: &[usize], side: usize) -> Result<Option<Tensor>> {
    let rows: Vec<&EncodedRow> = members.iter().map(|&i| &job.rows[i]).collect();
    Ok(match job.reference {
        Reference::Free => None,
        Reference::Cache(map) => {
            let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            let sums: Vec<f64> = refs::lookup(map, &ids)?.iter().map(|r| r.sums[side]).collect();
            Some(Tensor::from_slice(&sums).to_device(job.device))
        }
        Reference::Live(model) => {
            let seqs: Vec<&Sequence> = rows.iter().map(|r| &r.seqs[side]).collect();
            Some(logps(model, &seqs, job.device, false).0.to_kind(Kind::Double))
        }
    })
}

/// The KL partners of a microbatch of a plan: policy (no gradient) and reference sums of
/// the rows' second sequences.
fn kl_partners(job: &Job, policy: &CausalLm, members: &[usize]) -> Result<KlPartners> {
    let second: Vec<&Sequence> = members.iter().map(|&i| &job.rows[i].seqs[1]).collect();
    let (kl_pol, _) = logps(policy, &second, job.device, false);
    let reference = reference_side(job, members, 1)?.with_context(|| format!("loss `{}` needs reference log-probs of the KL partners", job.halo.name()))?;
    Ok(KlPartners { policy: kl_pol, reference })
}

/// The KL partners of this rank's microbatches of an optimizer step and the step's
/// reference point, for a loss that reads KL partners.
struct StepKl {
    partners: Vec<KlPartners>,
    z0: Option<Tensor>,
}

fn step_kl(job: &Job, policy: &CausalLm, mine: &[&[usize]]) -> Result<Option<StepKl>> {
    if job.kind != DataKind::Plan || !job.halo.needs_kl_partners() {
        return Ok(None);
    }
    let partners: Vec<KlPartners> = mine.iter().map(|m| kl_partners(job, policy, m)).collect::<Result<_>>()?;
    let z0 = job.halo.step_reference_point(&partners.iter().collect::<Vec<_>>())?;
    Ok(Some(StepKl { partners, z0 }))
}

/// The loss of one microbatch and the mean policy log-probs of its (first, second) sequences.
/// `fixed` gives KL partners computed beforehand and the step's reference point; without it
/// the loss takes them from the microbatch alone (evaluation).
fn microbatch_loss(job: &Job, policy: &CausalLm, members: &[usize], grad: bool, fixed: Option<(&KlPartners, Option<&Tensor>)>) -> Result<(LossOutput, (f64, f64))> {
    let rows: Vec<&EncodedRow> = members.iter().map(|&i| &job.rows[i]).collect();
    let first: Vec<&Sequence> = rows.iter().map(|r| &r.seqs[0]).collect();
    let second: Vec<&Sequence> = rows.iter().map(|r| &r.seqs[1]).collect();
    let m = rows.len() as i64;
    let (inputs, means) = match job.kind {
        DataKind::Plan => {
            let (s_pol, n) = logps(policy, &first, job.device, grad);
            let desirable: Vec<bool> = rows.iter().map(|r| job.labels[&r.id].desirable).collect();
            let weights: Vec<f64> = rows.iter().map(|r| job.labels[&r.id].weight).collect();
            let means = (s_pol.mean(Kind::Double).double_value(&[]), f64::NAN);
            let desirable = Tensor::from_slice(&desirable).to_device(job.device);
            if let Some(head) = job.value_head {
                let inputs = ppo_inputs(job, policy, head, &rows, &first, desirable, grad)?;
                return Ok((job.halo.loss(&inputs)?, means));
            }
            let mut inputs = LossInputs::binary(Sums::new(s_pol, reference_side(job, members, 0)?, n), desirable);
            if job.halo.needs_kl_partners() {
                inputs = inputs.with_kl(match fixed {
                    Some((kl, _)) => KlPartners { policy: kl.policy.shallow_clone(), reference: kl.reference.shallow_clone() },
                    None => kl_partners(job, policy, members)?,
                });
            }
            if let Some((_, Some(z0))) = fixed {
                inputs = inputs.with_reference_point(z0.shallow_clone());
            }
            if weights.iter().any(|&w| w != 1.0) {
                inputs = inputs.with_weights(Tensor::from_slice(&weights).to_device(job.device));
            }
            if let Some((d, u)) = job.lambdas {
                inputs = inputs.with_lambdas(d, u);
            }
            (inputs, means)
        }
        DataKind::Paired => {
            let both: Vec<&Sequence> = first.iter().chain(&second).copied().collect();
            let (s_pol, n) = logps(policy, &both, job.device, grad);
            let (c, r) = (s_pol.narrow(0, 0, m), s_pol.narrow(0, m, m));
            let means = (c.mean(Kind::Double).double_value(&[]), r.mean(Kind::Double).double_value(&[]));
            let chosen = Sums::new(c, reference_side(job, members, 0)?, n.narrow(0, 0, m));
            let rejected = Sums::new(r, reference_side(job, members, 1)?, n.narrow(0, m, m));
            (LossInputs::paired(chosen, rejected), means)
        }
    };
    Ok((job.halo.loss(&inputs)?, means))
}

/// Width of PPO's value head.
const VALUE_HEAD_WIDTH: i64 = 128;

/// PPO's per-token inputs: policy log-probs and values from one forward pass (the value head
/// reads the detached hidden states), reference log-probs per token from the cache (refcache
/// with `per_token = true`) or the live reference.
fn ppo_inputs(job: &Job, policy: &CausalLm, head: &ValueHead, rows: &[&EncodedRow], seqs: &[&Sequence], desirable: Tensor, grad: bool) -> Result<LossInputs> {
    let batch = Batch::new(seqs, 0, job.device);
    let run = || {
        let (b, t) = batch.input_ids.size2().expect("(B, T) ids");
        let positions = Tensor::arange(t, (Kind::Int64, job.device)).unsqueeze(0).expand([b, t], false);
        let hidden = policy.net.hidden_states(&batch.input_ids, &positions, None, None);
        let logps = target_logps(&policy.net.logits(&hidden), &batch);
        let values = head.forward(&hidden.narrow(1, 0, t - 1).detach().to_kind(Kind::Float));
        (logps, values)
    };
    let (logps, values) = if grad { run() } else { tch::no_grad(run) };
    let reference = match job.reference {
        Reference::Live(model) => tch::no_grad(|| token_logps(&model.net, &batch)),
        Reference::Cache(map) => {
            let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            let t = batch.target_mask.size()[1] as usize;
            let mut dense = vec![0f32; rows.len() * t];
            for (i, (found, s)) in refs::lookup(map, &ids)?.into_iter().zip(seqs).enumerate() {
                let tokens = found.tokens.as_ref().context("PPO needs per-token reference log-probs: run refcache with per_token = true")?;
                ensure!(tokens.len() == s.ids.len() - s.completion_start, "row `{}`: the cache has {} per-token log-probs for {} completion tokens", ids[i], tokens.len(), s.ids.len() - s.completion_start);
                dense[i * t + s.completion_start - 1..i * t + s.ids.len() - 1].copy_from_slice(tokens);
            }
            Tensor::from_slice(&dense).view([rows.len() as i64, t as i64]).to_device(job.device)
        }
        Reference::Free => bail!("PPO needs reference log-probs"),
    };
    let sums = Sums::new(logps.sum_dim_intlist([-1].as_slice(), false, Kind::Float), None, batch.target_mask.sum_dim_intlist([-1].as_slice(), false, Kind::Float));
    Ok(LossInputs::binary(sums, desirable).with_tokens(TokenLogps { policy: logps, reference: reference.to_kind(Kind::Float), mask: batch.target_mask.shallow_clone(), values }))
}

/// Loss and reward metrics on the held-out microbatches, without gradient.
fn evaluate(job: &Job, policy: &CausalLm, split: &Split, row: &mut Row) -> Result<()> {
    let mut eval = Row::new(row.step, row.epoch);
    let mut total = (0.0, 0usize);
    for members in &split.eval {
        let (out, means) = tch::no_grad(|| microbatch_loss(job, policy, members, false, None))?;
        total.0 += out.loss.double_value(&[]) * out.count as f64;
        total.1 += out.count;
        eval.add_microbatch(&out, means);
    }
    row.set_eval(total.0 / total.1.max(1) as f64, &eval);
    Ok(())
}
