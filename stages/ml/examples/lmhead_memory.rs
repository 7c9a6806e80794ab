//! Peak memory of the LM-head step (logits, log-softmax, target gather) of a random Llama with
//! a 128k vocabulary, full logits against completion-only chunks. Run by `ci/bench-lmhead.sh`,
//! one process per mode, since peak RSS is per process:
//!
//!     lmhead_memory full|chunked [--grad [--frozen]] [--chunk N] [--vocab V] [--hidden H]
//!                   [--rows R] [--prompt P] [--completion C]
//!
//! `--frozen`: the head's weights take no gradient (LoRA), only the hidden states do. The
//! other sizes default to 128256, 64, 4, 512 and 512.
//!
//! Prints one JSON line: RSS before the step, peak RSS after it (VmHWM), in MiB.

use std::path::Path;

use anyhow::{bail, Context, Result};
use haloflow_ml::config::Config;
use haloflow_ml::logprobs::{target_logps, Batch, Sequence, LOGITS_CHUNK};
use haloflow_ml::model::CausalLm;
use tch::{Device, Kind};

/// A `/proc/self/status` field in MiB.
fn status_mib(field: &str) -> Result<f64> {
    let bytes = haloflow_ml::memory::process_status_bytes(field).with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(bytes / 1024.0 / 1024.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("chunked");
    let grad = args.iter().any(|a| a == "--grad");
    let frozen = args.iter().any(|a| a == "--frozen");
    let number = |name: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => args.get(i + 1).with_context(|| format!("{name} N"))?.parse().with_context(|| format!("{name}: not a number")),
            None => Ok(default),
        }
    };
    let chunk = number("--chunk", LOGITS_CHUNK)?;
    let (vocab, hidden_size) = (number("--vocab", 128256)?, number("--hidden", 64)?);
    let (rows, prompt, completion) = (number("--rows", 4)?, number("--prompt", 512)?, number("--completion", 512)?);
    haloflow_ml::device::init_process(Some(1));
    tch::manual_seed(0);
    let config: Config = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden_size,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048
    }))?;
    let mut model = CausalLm::random(config, Path::new("."), Device::Cpu, Kind::Float)?;
    if frozen {
        model.vs.freeze();
    }
    let seqs: Vec<Sequence> = (0..rows)
        .map(|r| Sequence { ids: (0..prompt + completion).map(|i| ((i * 7919 + r * 104729) % vocab) as i64).collect(), completion_start: prompt })
        .collect();
    let batch = Batch::new(&seqs.iter().collect::<Vec<_>>(), 0, Device::Cpu);
    let step = || -> Result<(f64, f64)> {
        let hidden = batch.hidden_states(&model.net);
        // Frozen weights: the gradient still reaches the hidden states (through LoRA's layers).
        let hidden = if frozen { hidden.detach().set_requires_grad(true) } else { hidden };
        let before = status_mib("VmRSS:")?;
        let sums = match mode {
            "full" => target_logps(&model.net.logits(&hidden), &batch).sum_dim_intlist([-1].as_slice(), false, Kind::Float),
            "chunked" => batch.sums(&batch.completion_logps(&model.net, &hidden, chunk)),
            other => bail!("mode `{other}`: full or chunked"),
        };
        if grad {
            sums.sum(Kind::Float).backward();
        }
        Ok((before, sums.sum(Kind::Double).double_value(&[])))
    };
    let (before, total) = if grad { step()? } else { tch::no_grad(step)? };
    let peak = status_mib("VmHWM:")?;
    println!(
        "{}",
        serde_json::json!({"mode": mode, "grad": grad, "chunk": chunk, "positions": rows * (prompt + completion), "completion_positions": rows * completion,
                           "vocab": vocab, "frozen": frozen, "rss_before_mib": before, "peak_rss_mib": peak, "sum_logps": total})
    );
    Ok(())
}
