//! Device and dtype selection: `auto` picks CUDA when present.

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// Process-wide settings of a stage that runs models, before any model work: haloflow's
/// allocator settings ([`crate::allocator::configure`]) and libtorch's CPU threads (`None`:
/// libtorch's default).
pub fn init_process(threads: Option<i32>) {
    crate::allocator::configure();
    if let Some(threads) = threads {
        tch::set_num_threads(threads);
    }
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("unknown device `{other}` (use auto, cpu, cuda or cuda:N)"),
        },
    })
}

/// Parses `f32`, `bf16` or `f16` (and `auto`: bf16 on CUDA, f32 on CPU).
pub fn parse_dtype(name: &str, device: Device) -> Result<Kind> {
    Ok(match name {
        "auto" => if device.is_cuda() { Kind::BFloat16 } else { Kind::Float },
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        other => bail!("unknown dtype `{other}` (use f32, bf16, f16 or auto)"),
    })
}

/// The name [`parse_device`] reads for `device` (`cpu`, `cuda:N`), for summaries and logs.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        Device::Cpu => "cpu".into(),
    }
}

/// The name [`parse_dtype`] reads for `kind` (`f32`, `bf16`, `f16`; others by their libtorch name).
pub fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "f32".into(),
        Kind::BFloat16 => "bf16".into(),
        Kind::Half => "f16".into(),
        Kind::Double => "f64".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), Device::Cuda(1));
        assert!(parse_device("tpu").is_err());
        assert_eq!(parse_dtype("auto", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(parse_dtype("bf16", Device::Cpu).unwrap(), Kind::BFloat16);
        assert!(parse_dtype("int8", Device::Cpu).is_err());
    }

    #[test]
    fn names_round_trip() {
        for name in ["cpu", "cuda:1"] {
            assert_eq!(device_name(parse_device(name).unwrap()), name);
        }
        for name in ["f32", "bf16", "f16"] {
            assert_eq!(dtype_name(parse_dtype(name, Device::Cpu).unwrap()), name);
        }
    }
}
