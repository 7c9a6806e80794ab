//! The training memory estimate of a run (`haloflow_ml::memory`) from halo-train's arguments:
//! `--estimate-memory` prints it without loading anything but config.json; every run writes it
//! to summary.json; on CUDA a run it says will not fit stops before loading the model.

use std::process::Command;

use anyhow::{bail, Context, Result};
use haloflow_ml::config::Config;
use haloflow_ml::dataset::DataKind;
use haloflow_ml::device::{parse_device, parse_dtype};
use haloflow_ml::lora::LoraConfig;
use haloflow_ml::losses::{self, DataNeed, Halo};
use haloflow_ml::memory::{self, Estimate, Setup, GIB};
use tch::{Device, Kind};

use crate::Args;

/// Whether the run keeps a live reference model (a second copy of the weights).
pub fn live_reference(args: &Args, halo: &dyn Halo) -> bool {
    // With LoRA the live reference is the policy with its adapters off: no second copy.
    args.lora.is_none() && halo.needs_reference() && args.reference.as_deref().unwrap_or(if args.ref_logps.is_some() { "cache" } else { "live" }) == "live"
}

/// The estimate for `config` trained as `args` say, with microbatches of `sequences`
/// sequences (both sides of pairs) of at most `length` tokens whose passes with gradient run at
/// most `head_positions` completion positions through the LM head (`None`: every position), on
/// `ranks` processes in `kind`.
#[allow(clippy::too_many_arguments)]
pub fn estimate(args: &Args, halo: &dyn Halo, config: &Config, kind: Kind, sequences: usize, length: usize, head_positions: Option<usize>, ranks: usize) -> Estimate {
    let setup = Setup {
        dtype_bytes: kind.elt_size_in_bytes(),
        sequences,
        length,
        head_positions: head_positions.unwrap_or(sequences * length),
        chunk: args.logits_chunk,
        runtime: memory::process_status_bytes("VmRSS:").unwrap_or(0.0),
        checkpointing: args.checkpoint_activations,
        // LoRA adapters train only their own elements.
        trainable: args.lora.as_deref().and_then(|text| LoraConfig::parse(text).ok()).map(|lora| lora.adapter_elements(config)),
        ranks,
        shard_optimizer: args.shards_optimizer(),
        shard_gradients: args.shard_gradients,
        live_reference: live_reference(args, halo),
    };
    memory::estimate(config, &setup)
}

/// `halo-train --estimate-memory`: the estimate for `--model`'s config.json with microbatches
/// of `--microbatch-size` rows (pairs for a paired loss) of `--max-length` tokens, on
/// `WORLD_SIZE` processes (1 when unset); prints it and reads nothing else. Without data every
/// position counts as a completion position reaching the LM head (an upper bound; a run's
/// summary.json has the estimate for its real completions).
pub fn print(args: &Args) -> Result<()> {
    let config = haloflow_ml::model::CausalLm::config_of(&args.model)?;
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype, device)?;
    let halo = losses::by_name(&args.loss, &crate::train::loss_params(args)?)?;
    let ranks = match std::env::var("WORLD_SIZE") {
        Ok(w) => w.parse().with_context(|| format!("WORLD_SIZE `{w}`: not a number"))?,
        Err(_) => 1,
    };
    // Without data, a loss that can take either kind counts as taking rows.
    let paired = halo.data() == DataNeed::Paired;
    let data = if paired { DataKind::Paired } else { DataKind::Plan };
    let e = estimate(args, halo.as_ref(), &config, kind, args.microbatch_size * data.sequences_per_row(), args.max_length, None, ranks);
    println!(
        "memory estimate per process: {} ({} layers, hidden {}), {}, microbatch {} {} of ≤ {} tokens (every position counted as a completion position), checkpointing {}, ranks {}, ZeRO {}, reference {}",
        args.model.display(),
        config.num_hidden_layers,
        config.hidden_size,
        haloflow_ml::device::dtype_name(kind),
        args.microbatch_size,
        if paired { "pairs" } else { "rows" },
        args.max_length,
        if args.checkpoint_activations { "on" } else { "off" },
        ranks,
        match (args.shard_optimizer, args.shard_gradients) {
            (_, true) => "2 (optimizer state and gradients sharded)",
            (true, false) => "1 (optimizer state sharded)",
            (false, false) => "off",
        },
        match (live_reference(args, halo.as_ref()), args.lora.is_some() && halo.needs_reference()) {
            (true, _) => "live",
            (false, true) => "the base (adapters off) or cached",
            (false, false) => "cached or none",
        },
    );
    print!("{}", e.table());
    Ok(())
}

/// On CUDA, refuses a run whose estimated tensors exceed the device's free memory (read with
/// `nvidia-smi`; skipped with a warning when it cannot be read). CPU runs are not checked.
pub fn check_fits(e: &Estimate, device: Device) -> Result<()> {
    let Device::Cuda(index) = device else { return Ok(()) };
    match free_cuda_bytes(index, "nvidia-smi") {
        Ok(free) => refuse_beyond(e, index, free),
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "free GPU memory unknown: the memory estimate is not checked");
            Ok(())
        }
    }
}

/// Refuses an estimate above `free` bytes of CUDA device `index`, with the table and what to
/// try.
fn refuse_beyond(e: &Estimate, index: usize, free: f64) -> Result<()> {
    if e.tensors() > free {
        bail!("the memory estimate says this run does not fit on cuda:{index}: its tensors need {:.2} GiB, {:.2} GiB are free\n{}(try --checkpoint-activations, a smaller --microbatch-size or --max-length, bf16, or --shard-optimizer over more ranks)", e.tensors() / GIB, free / GIB, e.table());
    }
    Ok(())
}

/// Free bytes on CUDA device `index` (as libtorch numbers it, i.e. after CUDA_VISIBLE_DEVICES),
/// from `nvidia_smi`.
fn free_cuda_bytes(index: usize, nvidia_smi: &str) -> Result<f64> {
    let physical = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) => list.split(',').nth(index).map(|s| s.trim().to_string()).with_context(|| format!("CUDA_VISIBLE_DEVICES `{list}` has no device {index}"))?,
        Err(_) => index.to_string(),
    };
    let out = Command::new(nvidia_smi).args(["--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", &physical]).output().with_context(|| format!("running {nvidia_smi}"))?;
    anyhow::ensure!(out.status.success(), "{nvidia_smi}: {}", String::from_utf8_lossy(&out.stderr).trim());
    let text = String::from_utf8_lossy(&out.stdout);
    let mib: f64 = text.trim().parse().with_context(|| format!("{nvidia_smi} printed `{}`, not MiB", text.trim()))?;
    Ok(mib * 1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA fit check's parts, without a GPU: the free memory read from a stand-in
    /// `nvidia-smi` (asked for the right device and fields), and the refusal above it.
    #[test]
    fn the_fit_check_reads_nvidia_smi_and_refuses_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nvidia-smi");
        let asked = dir.path().join("asked");
        std::fs::write(&fake, format!("#!/bin/sh\necho \"$@\" > {}\necho 2048\n", asked.display())).unwrap();
        std::process::Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
        let device = std::env::var("CUDA_VISIBLE_DEVICES").ok().and_then(|l| l.split(',').next().map(|s| s.trim().to_string())).unwrap_or("0".into());
        let free = free_cuda_bytes(0, fake.to_str().unwrap()).unwrap();
        assert_eq!(free, 2048.0 * 1024.0 * 1024.0);
        assert_eq!(std::fs::read_to_string(&asked).unwrap().trim(), format!("--query-gpu=memory.free --format=csv,noheader,nounits -i {device}"));
        let e = |gib: f64| Estimate { parameters: 1, trainable: 1, weights: gib * GIB, reference: 0.0, gradients: 0.0, optimizer: 0.0, master_weights: 0.0, activations: 0.0, head_activations: 0.0, head_positions: 0, runtime: GIB };
        refuse_beyond(&e(1.5), 0, free).unwrap();
        let err = refuse_beyond(&e(2.5), 3, free).unwrap_err().to_string();
        assert!(err.contains("does not fit on cuda:3: its tensors need 2.50 GiB, 2.00 GiB are free") && err.contains("--checkpoint-activations"), "{err}");
        std::fs::write(&fake, "#!/bin/sh\necho 'No devices were found'\n").unwrap();
        let err = format!("{:#}", free_cuda_bytes(0, fake.to_str().unwrap()).unwrap_err());
        assert!(err.contains("not MiB"), "{err}");
    }
}
