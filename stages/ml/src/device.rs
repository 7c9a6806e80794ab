//! Device and dtype selection: `auto` picks CUDA when present.

use anyhow::{bail, Result};
use tch::{Device, Kind};

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
}
