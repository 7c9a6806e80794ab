//! The `local` backend: an LLM judge run in-process by haloflow's model core.
//!
//! The judge prompt (the template's messages, rendered with the judge model's chat template)
//! is continued by each verdict label of the template (`A`/`B`/tie labels such as `[[A]]`),
//! scored as a completion under haloflow's tokenization contract; the label probabilities are
//! the softmax of those summed log-probs, so they sum to one over the labels (AlpacaEval-style
//! weighted preference: the summary's `weighted_win_rate`). The verdict is the most probable
//! label; the raw answer
//! records every probability, e.g. `p([[A]])=0.6214 p([[B]])=0.3786`.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use haloflow_ml::device::{parse_device, parse_dtype};
use haloflow_ml::logprobs::{sequence_logps, Batch, Sequence, LOGITS_CHUNK};
use haloflow_ml::model::CausalLm;
use haloflow_ml::tokenize::Tokenizer;
use tch::Device;

use super::{preference_first, softmax, Backend, JudgeAnswer, JudgeRequest};
use crate::cli::JudgeArgs;

/// The in-process judge.
pub struct Local {
    model: Mutex<CausalLm>,
    tokenizer: Tokenizer,
    device: Device,
    name: String,
    weights: String,
}

impl Local {
    /// Loads `--judge-model`.
    pub fn from_args(args: &JudgeArgs) -> Result<Local> {
        let dir = args.judge_model.as_ref().context("--backend local needs --judge-model DIR")?;
        haloflow_ml::device::init_process(args.threads);
        let device = parse_device(&args.device)?;
        let kind = parse_dtype(&args.dtype, device)?;
        let weights = haloflow_ml::weights::weight_files(dir)?
            .iter()
            .map(|f| haloflow::hashing::hash_path(f))
            .collect::<Result<Vec<_>>>()?
            .join(",");
        Ok(Local {
            model: Mutex::new(CausalLm::load(dir, device, kind)?),
            tokenizer: Tokenizer::from_dir(dir)?,
            device,
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "local".into()),
            weights: format!("{}:{kind:?}", blake3::hash(weights.as_bytes()).to_hex()),
        })
    }
}

impl Backend for Local {
    fn fingerprint(&self) -> String {
        format!("local:{}:{}", self.name, self.weights)
    }

    fn model(&self) -> Option<String> {
        Some(self.name.clone())
    }

    fn concurrency(&self) -> usize {
        1
    }

    fn judge(&self, request: &JudgeRequest) -> Result<JudgeAnswer> {
        let started = Instant::now();
        let labels = request.template.verdict.labels();
        let positions = self.model.lock().map_err(|_| anyhow!("judge model lock poisoned"))?.config.max_position_embeddings;
        let seqs: Vec<Sequence> = labels
            .iter()
            .map(|(label, _)| {
                let e = self.tokenizer.encode_example(request.messages, label, positions - 1, positions)?;
                Ok(Sequence { ids: e.ids, completion_start: e.completion_start })
            })
            .collect::<Result<_>>()?;
        let logps: Vec<f64> = {
            let model = self.model.lock().map_err(|_| anyhow!("judge model lock poisoned"))?;
            let batch = Batch::new(&seqs.iter().collect::<Vec<_>>(), 0, self.device);
            let (sums, _) = tch::no_grad(|| sequence_logps(&model.net, &batch, LOGITS_CHUNK));
            Vec::<f64>::try_from(sums.to_kind(tch::Kind::Double).to_device(Device::Cpu))?
        };
        let probs = softmax(&logps);
        let best = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b])).context("a template has labels")?;
        let raw = labels.iter().zip(&probs).map(|((label, _), p)| format!("p({label})={p:.4}")).collect::<Vec<_>>().join(" ");
        Ok(JudgeAnswer {
            raw,
            preference_first: Some(preference_first(&labels, &probs)),
            verdict: labels[best].1,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            prompt_tokens: Some(seqs[0].completion_start as i64),
            completion_tokens: None,
        })
    }
}
