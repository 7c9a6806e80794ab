//! Parity with Hugging Face transformers on ../shared/models/stories260K (a real trained tiny
//! Llama): per-token logits (single prompts and a right-padded batch) within 2e-4, summed
//! completion log-probs within 1e-3. Reference values: tests/data/stories260k_reference.json,
//! made by ci/parity/make_stories_reference.py.

mod common;

use common::{ids, logits_of};
use haloflow_ml::logprobs::{sequence_logps, Batch, Sequence};
use haloflow_ml::model::CausalLm;
use tch::{Device, Kind, Tensor};

#[test]
fn logits_match_transformers_single_and_padded() {
    let Some(dir) = common::stories_dir() else { return };
    let model = CausalLm::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let r = common::reference("stories260k_reference.json");
    let cases = r["logits"].as_array().unwrap();
    let prompts: Vec<Vec<i64>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    let expected: Vec<Tensor> = cases.iter().map(|c| logits_of(&c["logits"])).collect();
    // One at a time.
    for (p, e) in prompts.iter().zip(&expected) {
        let got = tch::no_grad(|| model.net.forward(&Tensor::from_slice(p).unsqueeze(0))).squeeze_dim(0);
        let diff = (got - e).abs().max().double_value(&[]);
        eprintln!("single prompt: max abs logit difference {diff:.2e}");
        assert!(diff < 2e-4, "max abs logit difference {diff}");
    }
    // One right-padded batch.
    let t = prompts.iter().map(|p| p.len()).max().unwrap();
    let padded: Vec<i64> = prompts.iter().flat_map(|p| p.iter().copied().chain(std::iter::repeat(0)).take(t)).collect();
    let batch = Tensor::from_slice(&padded).view([prompts.len() as i64, t as i64]);
    let got = tch::no_grad(|| model.net.forward(&batch));
    for (i, (p, e)) in prompts.iter().zip(&expected).enumerate() {
        let row = got.get(i as i64).narrow(0, 0, p.len() as i64);
        let diff = (row - e).abs().max().double_value(&[]);
        eprintln!("padded row {i}: max abs logit difference {diff:.2e}");
        assert!(diff < 2e-4, "padded row {i}: max abs logit difference {diff}");
    }
}

#[test]
fn completion_logps_match_transformers() {
    let Some(dir) = common::stories_dir() else { return };
    let model = CausalLm::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let r = common::reference("stories260k_reference.json");
    let examples = r["examples"].as_array().unwrap();
    let seqs: Vec<Sequence> = examples
        .iter()
        .map(|e| Sequence { ids: ids(&e["ids"]), completion_start: e["completion_start"].as_u64().unwrap() as usize })
        .collect();
    let batch = Batch::new(&seqs.iter().collect::<Vec<_>>(), 0, Device::Cpu);
    let (sums, counts) = tch::no_grad(|| sequence_logps(&model.net, &batch, haloflow_ml::logprobs::LOGITS_CHUNK));
    for (i, e) in examples.iter().enumerate() {
        let (got, want) = (sums.double_value(&[i as i64]), e["logp"].as_f64().unwrap());
        eprintln!("example {i}: summed logp {got:.6} vs transformers {want:.6}");
        assert!((got - want).abs() < 1e-3, "example {i}: {got} vs transformers {want}");
        assert_eq!(counts.double_value(&[i as i64]) as u64, e["n_tokens"].as_u64().unwrap());
    }
}

#[test]
fn shared_prefix_scoring_equals_separate_scoring() {
    use haloflow_ml::logprobs::{shared_prefix_logps, token_logps};
    let Some(dir) = common::stories_dir() else { return };
    let model = CausalLm::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let r = common::reference("stories260k_reference.json");
    let seqs: Vec<Sequence> = r["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Sequence { ids: ids(&e["ids"]), completion_start: e["completion_start"].as_u64().unwrap() as usize })
        .collect();
    // Pairs with a shared prompt (examples 0 and 1), and pairs sharing only BOS.
    let pairs: Vec<(&Sequence, &Sequence)> = vec![(&seqs[0], &seqs[1]), (&seqs[2], &seqs[3]), (&seqs[4], &seqs[0]), (&seqs[1], &seqs[1])];
    for budget in [1, 40, 10_000] {
    let (shared, _) = tch::no_grad(|| shared_prefix_logps(&model.net, &pairs, Device::Cpu, true, budget));
    for (p, (a, b)) in pairs.iter().enumerate() {
        for (k, s) in [a, b].into_iter().enumerate() {
            let batch = Batch::new(&[s], 0, Device::Cpu);
            let separate = tch::no_grad(|| token_logps(&model.net, &batch, haloflow_ml::logprobs::LOGITS_CHUNK)).to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
            let got = &shared[p][k];
            assert!((got.logp - separate).abs() < 1e-4, "pair {p} side {k}: {} vs {separate}", got.logp);
            assert_eq!(got.n_tokens, s.ids.len() - s.completion_start);
            assert_eq!(got.tokens.as_ref().unwrap().len(), got.n_tokens);
        }
    }
    }
}
