//! The HALO losses against `shared/spec/LOSSES.md`: every golden value (float64, to 1e-6),
//! the KTO reference point's rules, gradients, reference requirements, the factory, PPO's
//! parts and gradient accumulation.

// The golden values are the spec's, digit for digit (0.693147 is its rounding of ln 2).
#![allow(clippy::approx_constant)]

use std::sync::Arc;

use anyhow::Result;
use haloflow_ml::losses::ppo::{self, clipped_policy_loss, gae, whiten, TokenLogps, ValueHead};
use haloflow_ml::losses::sft::{with_control_token, BAD, GOOD};
use haloflow_ml::losses::{
    by_name, Accumulator, AllReduce, DataNeed, Halo, KlPartners, LossInputs, LossOutput, SingleProcess, Sums, NAMES,
};
use serde_json::{json, Map, Value};
use tch::{nn, Device, Kind, Tensor};

const TOL: f64 = 1e-6;

fn t(v: &[f64]) -> Tensor {
    Tensor::from_slice(v)
}

/// A leaf tensor that records its gradient.
fn leaf(v: &[f64]) -> Tensor {
    t(v).set_requires_grad(true)
}

fn n(v: &[i64]) -> Tensor {
    Tensor::from_slice(v)
}

fn values(x: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(x.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < TOL, "got {got:?}, want {want:?}");
    }
}

fn scalar(x: &Tensor) -> f64 {
    x.double_value(&[])
}

fn params(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn halo(name: &str, p: Value) -> Box<dyn Halo> {
    by_name(name, &params(p)).unwrap()
}

/// The spec's golden inputs as policy leaves: chosen/desirable and rejected/undesirable sums.
struct Golden {
    chosen: Tensor,
    rejected: Tensor,
}

impl Golden {
    fn new() -> Golden {
        Golden { chosen: leaf(&[-10.0, -12.0]), rejected: leaf(&[-15.0, -9.0]) }
    }

    fn chosen(&self, reference: bool) -> Sums {
        Sums::new(self.chosen.shallow_clone(), reference.then(|| t(&[-11.0, -12.5])), n(&[10, 20]))
    }

    fn rejected(&self, reference: bool) -> Sums {
        Sums::new(self.rejected.shallow_clone(), reference.then(|| t(&[-14.0, -9.5])), n(&[5, 8]))
    }

    fn paired(&self, reference: bool) -> LossInputs {
        LossInputs::paired(self.chosen(reference), self.rejected(reference))
    }

    /// Rows: chosen 1, chosen 2, rejected 1, rejected 2.
    fn binary(&self, reference: bool) -> LossInputs {
        let rows = Sums::new(
            Tensor::cat(&[&self.chosen, &self.rejected], 0),
            reference.then(|| t(&[-11.0, -12.5, -14.0, -9.5])),
            n(&[10, 20, 5, 8]),
        );
        LossInputs::binary(rows, Tensor::from_slice(&[true, true, false, false]))
    }
}

fn kl_partners(policy: &Tensor) -> KlPartners {
    KlPartners { policy: policy.shallow_clone(), reference: t(&[-20.5, -18.2, -21.0, -16.4]) }
}

fn golden_kto_inputs() -> LossInputs {
    Golden::new().binary(true).with_kl(kl_partners(&t(&[-20.0, -18.0, -22.0, -16.0])))
}

fn run(name: &str, p: Value, inputs: &LossInputs) -> LossOutput {
    halo(name, p).loss(inputs).unwrap()
}

fn check(out: &LossOutput, per_example: &[f64]) {
    assert_close(&values(&out.per_example), per_example);
    let mean = per_example.iter().sum::<f64>() / per_example.len() as f64;
    assert_close(&[scalar(&out.loss)], &[mean]);
    assert_eq!(out.count, per_example.len());
}

// ---- golden values ----

#[test]
fn kto_golden() {
    let out = run("kto", json!({}), &golden_kto_inputs());
    check(&out, &[0.475644, 0.488127, 0.474397, 0.511873]);
    assert_close(&[scalar(&out.loss)], &[0.487510]);
    assert_close(&[out.metrics.kl.unwrap()], &[0.025]);
    let kto = haloflow_ml::losses::kto::Kto::new(0.1);
    assert_close(&[scalar(&kto.reference_point(golden_kto_inputs().kl.as_ref().unwrap()).unwrap())], &[0.025]);
    // Reported rewards are β·r: desirable r = (1, 0.5), undesirable r = (−1, 0.5).
    assert_close(&[out.metrics.rewards_chosen.unwrap(), out.metrics.rewards_rejected.unwrap()], &[0.075, -0.025]);
    assert_close(&[out.metrics.margins().unwrap()], &[0.1]);
    assert_eq!(out.metrics.accuracy, None);
}

#[test]
fn kto_lambda_d_golden_from_params_and_from_plan() {
    let by_param = run("kto", json!({"lambda_d": 1.33}), &golden_kto_inputs());
    assert_close(&[scalar(&by_param.loss)], &[0.567022]);
    let by_plan = run("kto", json!({}), &golden_kto_inputs().with_lambdas(1.33, 1.0));
    assert_close(&[scalar(&by_plan.loss)], &[0.567022]);
    // An explicit param takes precedence over the plan's value.
    let both = run("kto", json!({"lambda_d": 1.33}), &golden_kto_inputs().with_lambdas(10.0, 1.0));
    assert_close(&[scalar(&both.loss)], &[0.567022]);
}

#[test]
fn dpo_golden() {
    let out = run("dpo", json!({}), &Golden::new().paired(true));
    check(&out, &[0.598139, 0.693147]);
    assert_close(&[scalar(&out.loss)], &[0.645643]);
    // β·r: chosen (0.1, 0.05), rejected (−0.1, 0.05); the second pair is a tie.
    assert_close(&[out.metrics.rewards_chosen.unwrap(), out.metrics.rewards_rejected.unwrap()], &[0.075, -0.025]);
    assert_close(&[out.metrics.margins().unwrap(), out.metrics.accuracy.unwrap()], &[0.1, 0.5]);
}

#[test]
fn cdpo_golden() {
    let out = run("cdpo", json!({}), &Golden::new().paired(true));
    check(&out, &[0.638139, 0.693147]);
    assert_close(&[scalar(&out.loss)], &[0.665643]);
    assert_close(&[scalar(&run("cdpo", json!({"epsilon": 0.2}), &Golden::new().paired(true)).loss)], &[0.665643]);
}

#[test]
fn ipo_golden() {
    check(&run("ipo", json!({"tau": 0.1}), &Golden::new().paired(true)), &[22.09, 25.376406]);
}

#[test]
fn simpo_golden() {
    check(&run("simpo", json!({"beta": 2.0, "gamma": 1.0}), &Golden::new().paired(false)), &[0.048587, 0.668460]);
}

#[test]
fn slic_golden() {
    check(&run("slic", json!({"delta": 1.0, "lambda": 0.1}), &Golden::new().paired(false)), &[1.0, 5.2]);
}

#[test]
fn orpo_golden() {
    check(&run("orpo", json!({"lambda": 0.25}), &Golden::new().paired(false)), &[1.021551, 0.683261]);
}

#[test]
fn apo_zero_golden() {
    check(&run("apo_zero", json!({}), &Golden::new().binary(true)), &[0.475021, 0.487503, 0.475021, 0.512497]);
}

#[test]
fn dpo_second_check() {
    let inputs = LossInputs::paired(
        Sums::new(leaf(&[-0.5, -10.0, -1.0]), Some(t(&[-0.5, -10.1, -0.1])), n(&[1, 1, 1])),
        Sums::new(leaf(&[-0.1, -30.0, -21.0]), Some(t(&[-0.1, -20.1, -0.1])), n(&[1, 1, 1])),
    );
    check(&run("dpo", json!({"beta": 0.1}), &inputs), &[0.693147, 0.313262, 0.126928]);
}

#[test]
fn policy_equal_to_reference() {
    let s = [-3.0, -7.5, -1.25, -9.0];
    let sums = |v: &[f64]| Sums::new(leaf(v), Some(t(v)), n(&[3, 4]));
    let dpo = run("dpo", json!({}), &LossInputs::paired(sums(&s[..2]), sums(&s[2..])));
    check(&dpo, &[std::f64::consts::LN_2; 2]);

    let rows = Sums::new(leaf(&s), Some(t(&s)), n(&[3, 4, 5, 6]));
    let kl = KlPartners { policy: t(&[-4.0, -2.0, -6.0, -1.0]), reference: t(&[-4.0, -2.0, -6.0, -1.0]) };
    let inputs = LossInputs::binary(rows, Tensor::from_slice(&[true, false, true, false])).with_kl(kl);
    let kto = run("kto", json!({"lambda_d": 2.0, "lambda_u": 1.5}), &inputs);
    assert_eq!(kto.metrics.kl, Some(0.0));
    check(&kto, &[1.0, 0.75, 1.0, 0.75]);
}

// ---- KTO's reference point ----

#[test]
fn kto_refuses_a_single_row() {
    let rows = Sums::new(leaf(&[-1.0]), Some(t(&[-1.0])), n(&[1]));
    let inputs = LossInputs::binary(rows, Tensor::from_slice(&[true])).with_kl(KlPartners { policy: t(&[-2.0]), reference: t(&[-2.0]) });
    let err = halo("kto", json!({})).loss(&inputs).unwrap_err().to_string();
    assert!(err.contains("at least 2 rows"), "{err}");
}

#[test]
fn kto_needs_kl_partners_of_every_row() {
    let err = halo("kto", json!({})).loss(&Golden::new().binary(true)).unwrap_err().to_string();
    assert!(err.contains("KL partners"), "{err}");
    let short = Golden::new().binary(true).with_kl(KlPartners { policy: t(&[-1.0, -2.0]), reference: t(&[-1.0, -2.0]) });
    let err = halo("kto", json!({})).loss(&short).unwrap_err().to_string();
    assert!(err.contains("shape [4]"), "{err}");
}

#[test]
fn kto_z0_carries_no_gradient() {
    let g = Golden::new();
    let kl_policy = leaf(&[-20.0, -18.0, -22.0, -16.0]);
    let out = run("kto", json!({}), &g.binary(true).with_kl(kl_partners(&kl_policy)));
    out.loss.backward();
    let kl_grad = kl_policy.grad();
    assert!(!kl_grad.defined() || values(&kl_grad).iter().all(|&x| x == 0.0), "z0 leaked a gradient");
    assert!(values(&g.chosen.grad()).iter().all(|&x| x != 0.0));
    assert!(values(&g.rejected.grad()).iter().all(|&x| x != 0.0));
}

#[test]
fn kto_z0_is_clamped_at_zero() {
    let kl = KlPartners { policy: t(&[-25.0, -18.0, -22.0, -16.0]), reference: t(&[-20.5, -18.2, -21.0, -16.4]) };
    let out = run("kto", json!({}), &Golden::new().binary(true).with_kl(kl));
    assert_eq!(out.metrics.kl, Some(0.0));
}

/// Pretends a second process whose KL rows sum to 3.9 over 4 rows.
struct TwoProcesses;

impl AllReduce for TwoProcesses {
    fn sum(&self, stats: &Tensor) -> Result<Tensor> {
        Ok(stats + t(&[4.0, 3.9]))
    }
}

#[test]
fn kto_all_reduces_the_kl_mean_before_the_clamp() {
    let mut kto = halo("kto", json!({}));
    assert_close(&[run("kto", json!({}), &golden_kto_inputs()).metrics.kl.unwrap()], &[0.025]);
    kto.set_all_reduce(Arc::new(TwoProcesses));
    let out = kto.loss(&golden_kto_inputs()).unwrap();
    assert_close(&[out.metrics.kl.unwrap()], &[(0.1 + 3.9) / 8.0]);
    kto.set_all_reduce(Arc::new(SingleProcess));
    assert_close(&[kto.loss(&golden_kto_inputs()).unwrap().metrics.kl.unwrap()], &[0.025]);
}

#[test]
fn one_class_microbatch_reports_no_reward_for_the_absent_class() {
    let rows = Sums::new(leaf(&[-10.0, -12.0]), Some(t(&[-11.0, -12.5])), n(&[10, 20]));
    let inputs = LossInputs::binary(rows, Tensor::from_slice(&[true, true]))
        .with_kl(KlPartners { policy: t(&[-20.0, -18.0]), reference: t(&[-20.5, -18.2]) });
    let out = run("kto", json!({}), &inputs);
    assert!(scalar(&out.loss).is_finite());
    assert!(out.metrics.rewards_chosen.is_some());
    assert_eq!((out.metrics.rewards_rejected, out.metrics.margins(), out.metrics.logps_rejected), (None, None, None));
    let names: Vec<_> = out.metrics.entries().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["rewards/chosen", "logps/chosen", "kl"]);
    assert_eq!((out.metrics.chosen, out.metrics.rejected), (2, 0));
}

#[test]
fn kto_metrics_are_per_class_under_trl_names() {
    // The golden rows interleaved: desirable (−10, −12), undesirable (−15, −9).
    let rows = Sums::new(t(&[-10.0, -15.0, -12.0, -9.0]), Some(t(&[-11.0, -14.0, -12.5, -9.5])), n(&[10, 5, 20, 8]));
    let inputs = LossInputs::binary(rows, Tensor::from_slice(&[true, false, true, false]))
        .with_kl(kl_partners(&t(&[-20.0, -18.0, -22.0, -16.0])));
    let m = run("kto", json!({}), &inputs).metrics;
    // logps/chosen is the desirable rows' mean S_pol, not the mean over all rows (−11.5).
    assert_close(&[m.logps_chosen.unwrap(), m.logps_rejected.unwrap()], &[-11.0, -12.0]);
    assert_close(&[m.rewards_chosen.unwrap(), m.rewards_rejected.unwrap(), m.margins().unwrap()], &[0.075, -0.025, 0.1]);
    assert_eq!((m.chosen, m.rejected, m.examples), (2, 2, 4));
    let entries: Vec<_> = m.entries().into_iter().map(|e| (e.name, e.weight)).collect();
    assert_eq!(
        entries,
        [("rewards/chosen", 2.0), ("rewards/rejected", 2.0), ("logps/chosen", 2.0), ("logps/rejected", 2.0), ("kl", 4.0)]
    );
}

#[test]
fn paired_metrics_log_both_sides_logps() {
    let m = run("dpo", json!({}), &Golden::new().paired(true)).metrics;
    assert_close(&[m.logps_chosen.unwrap(), m.logps_rejected.unwrap()], &[-11.0, -12.0]);
    assert_eq!((m.chosen, m.rejected, m.examples), (2, 2, 2));
}

#[test]
fn accuracy_ignores_margins_within_rounding_noise() {
    use haloflow_ml::losses::{accurate, ACCURACY_TOLERANCE};
    // Reported margins (β = 0.1) of +1e-6 and −1e-6 (step-1 rounding noise) and +1e-2.
    let chosen = t(&[1e-6, 0.0, 1e-2]);
    let rejected = t(&[0.0, 1e-6, 0.0]);
    assert_eq!(values(&accurate(&chosen, &rejected, 0.1)), [0.0, 0.0, 1.0]);
    assert_eq!(ACCURACY_TOLERANCE, 1e-4);
    // Through every loss that reports accuracies: r = S_pol − S_ref of 1e-5 (noise) and 0.1 nats.
    let pol_c = t(&[-10.0 + 1e-5, -10.0, -10.0 + 0.1]);
    let pol_r = t(&[-10.0, -10.0 + 1e-5, -10.0]);
    let reference = t(&[-10.0, -10.0, -10.0]);
    let inputs = LossInputs::paired(
        Sums::new(pol_c, Some(reference.shallow_clone()), n(&[10, 10, 10])),
        Sums::new(pol_r, Some(reference), n(&[10, 10, 10])),
    );
    for name in ["dpo", "cdpo", "ipo"] {
        let acc = run(name, json!({}), &inputs).metrics.accuracy.unwrap();
        assert_close(&[acc], &[1.0 / 3.0]);
    }
}

// ---- gradients and references ----

/// Inputs fit for `halo`, with policy leaves to check gradients on (and, for PPO, the values).
fn inputs_for(halo: &dyn Halo) -> (LossInputs, Vec<Tensor>) {
    let g = Golden::new();
    let leaves = vec![g.chosen.shallow_clone(), g.rejected.shallow_clone()];
    match (halo.name(), halo.data()) {
        ("ppo", _) => {
            let policy = t(&[-1.0, -2.0, -0.5, -1.5, -0.7, -3.0, -0.2, -0.9]).view([2, 4]).set_requires_grad(true);
            let values = t(&[0.1, 0.2, 0.3, 0.4, -0.1, 0.0, 0.5, 0.6]).view([2, 4]).set_requires_grad(true);
            let tokens = TokenLogps {
                policy: policy.shallow_clone(),
                reference: t(&[-1.1, -1.9, -0.6, -1.2, -0.7, -2.5, -0.4, -0.9]).view([2, 4]),
                mask: t(&[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]).view([2, 4]),
                values: values.shallow_clone(),
            };
            let rows = Sums::new(policy.sum_dim_intlist([1].as_slice(), false, Kind::Double), None, n(&[3, 2]));
            let inputs = LossInputs::binary(rows, Tensor::from_slice(&[true, false])).with_tokens(tokens);
            (inputs, vec![policy, values])
        }
        // SFT learns from the chosen side only.
        ("sft", _) => (g.paired(false), vec![g.chosen.shallow_clone()]),
        (_, DataNeed::Binary) => (g.binary(true).with_kl(kl_partners(&t(&[-20.0, -18.0, -22.0, -16.0]))), leaves),
        _ => (g.paired(halo.needs_reference()), leaves),
    }
}

#[test]
fn gradients_reach_the_policy_log_probs_of_every_loss() {
    for name in NAMES {
        let halo = halo(name, json!({}));
        let (inputs, leaves) = inputs_for(&*halo);
        let out = halo.loss(&inputs).unwrap();
        assert_eq!(out.loss.size(), Vec::<i64>::new(), "{name}: loss must be a scalar");
        assert!(!out.per_example.requires_grad(), "{name}: per-example losses must be detached");
        out.loss.backward();
        for l in &leaves {
            let grad = l.grad();
            assert!(grad.defined() && values(&grad).iter().any(|&x| x != 0.0), "{name}: no gradient");
        }
    }
}

#[test]
fn csft_on_binary_and_paired_data() {
    let g = Golden::new();
    let out = run("csft", json!({}), &g.binary(false));
    check(&out, &[1.0, 0.6, 3.0, 1.125]);
    out.loss.backward();
    assert!(values(&g.rejected.grad()).iter().all(|&x| x != 0.0), "csft learns from undesirable rows");
    check(&run("csft", json!({}), &g.paired(false)), &[2.0, 0.8625]);
    check(&run("sft", json!({}), &g.paired(false)), &[1.0, 0.6]);
}

#[test]
fn sft_learns_from_desirable_rows_only() {
    let g = Golden::new();
    let out = run("sft", json!({}), &g.binary(false));
    assert_close(&values(&out.per_example), &[1.0, 0.6, 0.0, 0.0]);
    assert_close(&[scalar(&out.loss)], &[0.8]);
    assert_eq!(out.count, 2);
    out.loss.backward();
    assert!(!g.rejected.grad().defined() || values(&g.rejected.grad()).iter().all(|&x| x == 0.0));
    assert_close(&values(&g.chosen.grad()), &[-1.0 / 20.0, -1.0 / 40.0]);
}

#[test]
fn control_tokens_prefix_the_completion() {
    assert_eq!(with_control_token("Sure.", true), format!("{GOOD}Sure."));
    assert_eq!(with_control_token("No.", false), "<|bad|>No.");
    assert_eq!(with_control_token("", true), "<|good|>");
    assert_eq!(BAD, "<|bad|>");
}

#[test]
fn reference_free_losses_need_no_reference() {
    for name in ["simpo", "slic", "orpo", "sft", "csft"] {
        let halo = halo(name, json!({}));
        assert!(!halo.needs_reference(), "{name}");
        let inputs = if halo.data() == DataNeed::Paired { Golden::new().paired(false) } else { Golden::new().binary(false) };
        assert!(scalar(&halo.loss(&inputs).unwrap().loss).is_finite(), "{name}");
    }
}

#[test]
fn reference_losses_refuse_a_missing_reference() {
    for name in ["kto", "apo_zero", "dpo", "cdpo", "ipo"] {
        let halo = halo(name, json!({}));
        assert!(halo.needs_reference(), "{name}");
        let inputs = match halo.data() {
            DataNeed::Paired => Golden::new().paired(false),
            _ => Golden::new().binary(false).with_kl(kl_partners(&t(&[-20.0, -18.0, -22.0, -16.0]))),
        };
        let err = halo.loss(&inputs).unwrap_err().to_string();
        assert!(err.contains(&format!("`{name}` needs reference log-probs")), "{name}: {err}");
    }
    let ppo = halo("ppo", json!({}));
    assert!(ppo.needs_reference());
    let err = ppo.loss(&Golden::new().binary(false)).unwrap_err().to_string();
    assert!(err.contains("per-token"), "{err}");
}

#[test]
fn losses_refuse_the_wrong_kind_of_data() {
    let err = halo("dpo", json!({})).loss(&Golden::new().binary(true)).unwrap_err().to_string();
    assert!(err.contains("preference pairs"), "{err}");
    let err = halo("apo_zero", json!({})).loss(&Golden::new().paired(true)).unwrap_err().to_string();
    assert!(err.contains("binary feedback"), "{err}");
    let mismatched = LossInputs::paired(Golden::new().chosen(true), Sums::new(t(&[-1.0]), Some(t(&[-1.0])), n(&[1])));
    let err = halo("dpo", json!({})).loss(&mismatched).unwrap_err().to_string();
    assert!(err.contains("2 chosen but 1 rejected"), "{err}");
}

#[test]
fn weights_scale_each_example() {
    let out = run("dpo", json!({}), &Golden::new().paired(true).with_weights(t(&[2.0, 0.5])));
    assert_close(&[scalar(&out.loss)], &[(2.0 * 0.598139 + 0.5 * 0.693147) / 2.0]);
    assert_close(&values(&out.per_example), &[0.598139, 0.693147]);
    let err = halo("dpo", json!({})).loss(&Golden::new().paired(true).with_weights(t(&[1.0]))).unwrap_err().to_string();
    assert!(err.contains("weights"), "{err}");
}

#[test]
fn float32_inputs_work() {
    let rows = Sums::new(
        Tensor::from_slice(&[-10f32, -12.0, -15.0, -9.0]),
        Some(Tensor::from_slice(&[-11f32, -12.5, -14.0, -9.5])),
        n(&[10, 20, 5, 8]),
    );
    let kl = KlPartners {
        policy: Tensor::from_slice(&[-20f32, -18.0, -22.0, -16.0]),
        reference: Tensor::from_slice(&[-20.5f32, -18.2, -21.0, -16.4]),
    };
    let out = run("kto", json!({}), &LossInputs::binary(rows, Tensor::from_slice(&[true, true, false, false])).with_kl(kl));
    assert_eq!(out.loss.kind(), Kind::Float);
    assert!((scalar(&out.loss) - 0.487510).abs() < 1e-5);
}

// ---- the factory ----

#[test]
fn factory_knows_every_loss_with_the_spec_defaults() {
    for name in NAMES {
        assert_eq!(halo(name, json!({})).name(), name);
    }
    let data: Vec<_> = NAMES.iter().map(|name| halo(name, json!({})).data()).collect();
    use DataNeed::*;
    assert_eq!(data, [Binary, Binary, Binary, Either, Either, Paired, Paired, Paired, Paired, Paired, Paired]);
    // SimPO's defaults β = 2, γ = 1, SLiC's δ = 1, λ = 0.1, ORPO's λ = 0.25, IPO's τ = 0.1.
    check(&run("simpo", json!({}), &Golden::new().paired(false)), &[0.048587, 0.668460]);
    check(&run("slic", json!({}), &Golden::new().paired(false)), &[1.0, 5.2]);
    check(&run("orpo", json!({}), &Golden::new().paired(false)), &[1.021551, 0.683261]);
    check(&run("ipo", json!({}), &Golden::new().paired(true)), &[22.09, 25.376406]);
    // Integers are numbers.
    check(&run("slic", json!({"delta": 1, "lambda": 0}), &Golden::new().paired(false)), &[0.0, 4.0]);
}

#[test]
fn factory_errors_name_the_problem() {
    let err = |name: &str, p: Value| by_name(name, &params(p)).err().expect("an error").to_string();
    let e = err("kot", json!({}));
    assert!(e.contains("unknown loss `kot`") && NAMES.iter().all(|n| e.contains(n)), "{e}");
    let e = err("dpo", json!({"tau": 0.1}));
    assert!(e.contains("unknown param `tau`") && e.contains("beta"), "{e}");
    let e = err("sft", json!({"beta": 0.1}));
    assert!(e.contains("unknown param `beta`"), "{e}");
    let e = err("kto", json!({"beta": "0.1"}));
    assert!(e.contains("`beta`") && e.contains("must be a number"), "{e}");
    let e = err("kto", json!({"lambda_u": null}));
    assert!(e.contains("`lambda_u`") && e.contains("must be a number"), "{e}");
    let e = err("cdpo", json!({"epsilon": 1.5}));
    assert!(e.contains("`epsilon`") && e.contains("in [0, 1]"), "{e}");
    let e = err("dpo", json!({"beta": -0.1}));
    assert!(e.contains("`beta`") && e.contains("> 0"), "{e}");
    let e = err("ppo", json!({"clip": 1.0}));
    assert!(e.contains("`clip`"), "{e}");
}

// ---- PPO ----

#[test]
fn ppo_gae_on_a_hand_computed_three_token_example() {
    // Positions: a prompt token, three completion tokens, padding. V = 0.5, 0.2, −0.1; reward
    // +1 on the last completion token. By hand (γ = 0.99, λ = 0.95, γλ = 0.9405):
    // δ2 = 1 + 0 − (−0.1) = 1.1                A2 = 1.1
    // δ1 = 0.99·(−0.1) − 0.2 = −0.299          A1 = −0.299 + 0.9405·1.1 = 0.73555
    // δ0 = 0.99·0.2 − 0.5 = −0.302             A0 = −0.302 + 0.9405·0.73555 = 0.389784775
    let mask = t(&[0.0, 1.0, 1.0, 1.0, 0.0]).view([1, 5]);
    let rewards = ppo::last_token_rewards(&t(&[1.0]), &mask);
    assert_close(&values(&rewards), &[0.0, 0.0, 0.0, 1.0, 0.0]);
    let v = t(&[9.0, 0.5, 0.2, -0.1, 7.0]).view([1, 5]);
    let (adv, returns) = gae(&rewards, &v, &mask, 0.99, 0.95);
    assert_close(&values(&adv), &[0.0, 0.389784775, 0.73555, 1.1, 0.0]);
    assert_close(&values(&returns), &[0.0, 0.889784775, 0.93555, 1.0, 0.0]);
}

#[test]
fn ppo_whitening_over_the_masked_tokens() {
    let x = t(&[5.0, 1.0, 2.0, 3.0, 4.0, 100.0]).view([2, 3]);
    let mask = t(&[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]).view([2, 3]);
    let w = values(&whiten(&x, &mask, &SingleProcess).unwrap());
    // Valid 1, 2, 3, 4: mean 2.5, population variance 1.25.
    let s = (1.25f64 + 1e-8).sqrt();
    assert_close(&w, &[0.0, -1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0]);
}

#[test]
fn ppo_clipping_stops_the_gradient_on_the_clipped_side() {
    // ρ = 2 and 0.25 lie outside [0.5, 1.5]; ρ = 1.2 inside.
    let ratios = [2.0f64, 0.25, 2.0, 0.25, 1.2];
    let log_ratio = leaf(&ratios.map(f64::ln));
    let adv = t(&[1.0, -1.0, -1.0, 1.0, 1.0]);
    let loss = clipped_policy_loss(&log_ratio, &adv, 0.5);
    assert_close(&values(&loss), &[-1.5, 0.5, 2.0, -0.25, -1.2]);
    loss.sum(Kind::Double).backward();
    // d(−A·ρ)/d logρ = −A·ρ where the clip does not bind.
    assert_close(&values(&log_ratio.grad()), &[0.0, 0.0, 2.0, -0.25, -1.2]);
}

#[test]
fn ppo_loss_shapes_parts_and_value_head() {
    let vs = {
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::Double);
        vs
    };
    let head = ValueHead::new(&(vs.root() / "value_head"), 6, 8);
    let hidden = Tensor::randn([3, 5, 6], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let v = head.forward(&hidden);
    assert_eq!(v.size(), [3, 5]);
    let policy = t(&[-1.0; 15]).view([3, 5]).set_requires_grad(true);
    let tokens = TokenLogps {
        policy: policy.shallow_clone(),
        reference: t(&[-1.2; 15]).view([3, 5]),
        mask: Tensor::from_slice(&[false, true, true, false, false, true, true, true, true, true, false, false, true, false, false])
            .view([3, 5]),
        values: v,
    };
    let rows = Sums::new(t(&[-2.0, -5.0, -1.0]), None, n(&[2, 5, 1]));
    let inputs = LossInputs::binary(rows, Tensor::from_slice(&[true, false, true])).with_tokens(tokens);
    let out = run("ppo", json!({}), &inputs);
    assert_eq!((out.per_example.size(), out.count), (vec![3], 3));
    let parts: Vec<_> = out.metrics.extra.iter().map(|(k, _)| *k).collect();
    assert_eq!(parts, ["ppo/policy", "ppo/critic", "ppo/kl"]);
    // Every row's mean log-ratio is 0.2.
    assert_close(&[out.metrics.extra[2].1], &[0.2]);
    out.loss.backward();
    assert!(!hidden.grad().defined(), "the value head must see detached hidden states");
    assert!(vs.trainable_variables().iter().all(|p| p.grad().defined()), "the value head learns");
    // Masked-out tokens get no gradient.
    let grad = values(&policy.grad());
    assert!([0, 3, 4, 10, 11, 13, 14].iter().all(|&i| grad[i] == 0.0), "{grad:?}");

    let mut wrong = inputs;
    wrong.tokens.as_mut().unwrap().mask = Tensor::ones([3, 4], (Kind::Double, Device::Cpu));
    let err = halo("ppo", json!({})).loss(&wrong).unwrap_err().to_string();
    assert!(err.contains("mask"), "{err}");
}

// ---- gradient accumulation ----

#[test]
fn accumulated_step_equals_one_big_batch() {
    let (c, c_ref) = ([-3.0, -5.0, -2.5, -8.0, -1.0], [-3.5, -4.0, -2.0, -9.0, -1.5]);
    let (r, r_ref) = ([-4.0, -6.0, -2.0, -7.0, -3.0], [-3.0, -6.5, -2.2, -7.5, -2.0]);
    let (nc, nr) = ([3, 5, 2, 8, 1], [4, 6, 2, 7, 3]);
    let pairs = |chosen: &Tensor, rejected: &Tensor, range: std::ops::Range<usize>| {
        let (start, len) = (range.start as i64, range.len() as i64);
        LossInputs::paired(
            Sums::new(chosen.narrow(0, start, len), Some(t(&c_ref[range.clone()])), n(&nc[range.clone()])),
            Sums::new(rejected.narrow(0, start, len), Some(t(&r_ref[range.clone()])), n(&nr[range])),
        )
    };
    for name in ["dpo", "ipo", "simpo", "orpo"] {
        let halo = halo(name, json!({}));
        let (big_c, big_r) = (leaf(&c), leaf(&r));
        let big = halo.loss(&pairs(&big_c, &big_r, 0..5)).unwrap();
        big.loss.backward();

        let (acc_c, acc_r) = (leaf(&c), leaf(&r));
        let mut acc = Accumulator::new();
        let mut weighted = 0.0;
        for range in [0..2, 2..5] {
            let out = halo.loss(&pairs(&acc_c, &acc_r, range)).unwrap();
            weighted += out.count as f64 * scalar(&out.loss);
            acc.backward(&out).unwrap();
        }
        assert_eq!(acc.examples(), 5);
        let step = finish(&acc, &[&acc_c, &acc_r]);
        assert_close(&[weighted / 5.0, step], &[scalar(&big.loss); 2]);
        assert_close(&values(&acc_c.grad()), &values(&big_c.grad()));
        assert_close(&values(&acc_r.grad()), &values(&big_r.grad()));
    }
}

/// The step's loss, with the gradients of `params` multiplied by the accumulator's factor
/// (what the trainer's optimizer does).
fn finish(acc: &Accumulator, params: &[&Tensor]) -> f64 {
    let (loss, scale) = acc.totals();
    for p in params {
        let _ = p.grad().g_mul_scalar_(scale.expect("examples"));
    }
    loss
}

#[test]
fn accumulation_weights_sft_by_counted_examples() {
    // SFT counts only desirable rows: microbatches of 1 and 3 desirable rows.
    let s = [-2.0, -4.0, -6.0, -8.0, -10.0, -12.0];
    let labels = [true, false, true, true, true, false];
    let sft = halo("sft", json!({}));
    let inputs = |policy: &Tensor, range: std::ops::Range<usize>| {
        let (start, len) = (range.start as i64, range.len() as i64);
        LossInputs::binary(Sums::new(policy.narrow(0, start, len), None, n(&[2; 6][range.clone()])), Tensor::from_slice(&labels[range]))
    };
    let big_policy = leaf(&s);
    let big = sft.loss(&inputs(&big_policy, 0..6)).unwrap();
    big.loss.backward();
    let policy = leaf(&s);
    let mut acc = Accumulator::new();
    for range in [0..2, 2..6] {
        acc.backward(&sft.loss(&inputs(&policy, range)).unwrap()).unwrap();
    }
    assert_eq!(acc.examples(), 4);
    assert_close(&[finish(&acc, &[&policy])], &[scalar(&big.loss)]);
    assert_close(&values(&policy.grad()), &values(&big_policy.grad()));
}
