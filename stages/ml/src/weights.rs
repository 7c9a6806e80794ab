//! Loading and saving Hugging Face safetensors checkpoints into a `VarStore`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::lora;

/// The safetensors files of a model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`; for a LoRA adapter directory, the base model's files and
/// then `adapter_model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(adapter) = lora::AdapterFile::read(dir)? {
        let mut files = weight_files(&adapter.base_dir(dir)?)?;
        files.push(dir.join(lora::ADAPTER_WEIGHTS));
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).with_context(|| format!("reading {}", index.display()))?)
        .with_context(|| format!("{}: not JSON", index.display()))?;
    let map = json["weight_map"].as_object().with_context(|| format!("{}: no weight_map", index.display()))?;
    let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Copies the checkpoint's tensors into the variables of `vs` (converting dtype and device;
/// PEFT's key prefix is removed, so a LoRA adapter directory loads base and adapter).
/// Every variable must be found with the shape the config implies (with tied embeddings there
/// is no `lm_head.weight` variable to find). Errors name the tensor and the file.
pub fn load(vs: &VarStore, dir: &Path) -> Result<()> {
    load_files(vs, &weight_files(dir)?).with_context(|| dir.display().to_string())
}

/// [`load`] from one safetensors file.
pub fn load_file(vs: &VarStore, file: &Path) -> Result<()> {
    load_files(vs, &[file.to_path_buf()])
}

fn load_files(vs: &VarStore, files: &[PathBuf]) -> Result<()> {
    let variables = vs.variables();
    let mut loaded = BTreeSet::new();
    let mut unused = Vec::new();
    for file in files {
        let corrupt = || format!("{}: cannot read safetensors (corrupt or truncated?)", file.display());
        let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let entries = read_header(&f).with_context(corrupt)?;
        for entry in entries {
            let name = lora::variable_name(&entry.key).to_string();
            let Some(var) = variables.get(&name) else {
                unused.push(name);
                continue;
            };
            let Some(kind) = entry.kind else {
                bail!("{}: tensor `{name}` has dtype {}, which haloflow cannot read", file.display(), entry.dtype);
            };
            if var.size() != entry.shape {
                bail!("{}: tensor `{name}` has shape {:?}, the config implies {:?}", file.display(), entry.shape, var.size());
            }
            entry.read_into(&f, kind, var).with_context(corrupt)?;
            loaded.insert(name);
        }
    }
    let missing: Vec<&String> = variables.keys().filter(|n| !loaded.contains(*n)).collect();
    if !missing.is_empty() {
        bail!("weights lack {} tensor(s) the model needs: {}", missing.len(),
            missing.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
    }
    if !unused.is_empty() {
        tracing::debug!(count = unused.len(), first = %unused[0], "checkpoint tensors not used by the model");
    }
    Ok(())
}

/// One tensor of a safetensors file: its key, shape, element type and where its bytes lie.
struct Entry {
    key: String,
    shape: Vec<i64>,
    /// The type's name in the file, and its libtorch type where haloflow reads it.
    dtype: String,
    kind: Option<Kind>,
    /// Byte offset in the file and length.
    offset: u64,
    len: usize,
}

/// The tensors of a safetensors file (an 8-byte little-endian header length, a JSON header of
/// `{key: {dtype, shape, data_offsets}}`, the data), each checked to lie within the file with
/// as many bytes as its shape and type need. A type haloflow cannot read (unsigned 16 to 64
/// bits, 4- and 6-bit floats) is refused only for a tensor the model uses.
fn read_header(file: &File) -> Result<Vec<Entry>> {
    let size = file.metadata()?.len();
    let mut prefix = [0u8; 8];
    file.read_exact_at(&mut prefix, 0).context("no header")?;
    let header_len = u64::from_le_bytes(prefix);
    ensure!(header_len <= size.saturating_sub(8), "header of {header_len} bytes in a file of {size}");
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)?;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header).context("the header is not a JSON object")?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (key, info) in header.into_iter().filter(|(k, _)| k != "__metadata__") {
        let dtype = info["dtype"].as_str().with_context(|| format!("tensor `{key}`: no dtype"))?;
        let kind = match dtype {
            "F32" => Some(Kind::Float),
            "F16" => Some(Kind::Half),
            "BF16" => Some(Kind::BFloat16),
            "F64" => Some(Kind::Double),
            "F8_E4M3" => Some(Kind::Float8e4m3fn),
            "F8_E5M2" => Some(Kind::Float8e5m2),
            "I64" => Some(Kind::Int64),
            "I32" => Some(Kind::Int),
            "I16" => Some(Kind::Int16),
            "I8" => Some(Kind::Int8),
            "U8" => Some(Kind::Uint8),
            "BOOL" => Some(Kind::Bool),
            _ => None,
        };
        let shape: Vec<i64> = serde_json::from_value(info["shape"].clone()).with_context(|| format!("tensor `{key}`: no shape"))?;
        let [start, end]: [u64; 2] = serde_json::from_value(info["data_offsets"].clone()).with_context(|| format!("tensor `{key}`: no data_offsets"))?;
        ensure!(end >= start, "tensor `{key}`: data_offsets [{start}, {end}]");
        if let Some(kind) = kind {
            let len = shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
            ensure!(end - start == len, "tensor `{key}`: {} bytes for shape {shape:?} of {dtype}", end - start);
        }
        ensure!(data_start + end <= size, "tensor `{key}` ends at byte {} of a file of {size}", data_start + end);
        entries.push(Entry { key, shape, dtype: dtype.to_string(), kind, offset: data_start + start, len: (end - start) as usize });
    }
    Ok(entries)
}

impl Entry {
    /// Copies the tensor's bytes (of type `kind`, the entry's) from `file` into `var` (same
    /// shape): straight into its memory when it is a contiguous CPU tensor of the same type,
    /// else through one buffer of the tensor's size (converted by `copy_`). So loading holds
    /// the model and at most one tensor's bytes, not the whole file besides the model.
    fn read_into(&self, file: &File, kind: Kind, var: &Tensor) -> Result<()> {
        if var.device() == Device::Cpu && var.kind() == kind && var.is_contiguous() {
            // SAFETY: `var` is a contiguous CPU tensor of `self.len` bytes (same shape and
            // element type), written only here, without autograd (the bytes are its value).
            let bytes = unsafe { std::slice::from_raw_parts_mut(var.data_ptr() as *mut u8, self.len) };
            file.read_exact_at(bytes, self.offset).with_context(|| format!("tensor `{}`", self.key))?;
        } else {
            let mut bytes = vec![0u8; self.len];
            file.read_exact_at(&mut bytes, self.offset).with_context(|| format!("tensor `{}`", self.key))?;
            let tensor = Tensor::f_from_data_size(&bytes, &self.shape, kind)?;
            tch::no_grad(|| var.shallow_clone().copy_(&tensor));
        }
        Ok(())
    }
}

/// Writes the variables of `vs` as `DIR/model.safetensors` (sorted by name).
pub fn save(vs: &VarStore, dir: &Path) -> Result<()> {
    save_file(vs, &dir.join("model.safetensors"))
}

/// Writes the variables of `vs` to one safetensors file (sorted by name).
pub fn save_file(vs: &VarStore, path: &Path) -> Result<()> {
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let tensors: Vec<(&str, Tensor)> = variables.iter().map(|(n, t)| (n.as_str(), t.detach().contiguous())).collect();
    Tensor::write_safetensors(&tensors, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::CausalLm;

    /// The bytes of a contiguous CPU tensor.
    fn raw(t: &Tensor) -> Vec<u8> {
        let t = t.contiguous();
        let n = t.numel() * t.kind().elt_size_in_bytes();
        // SAFETY: `n` bytes of a live contiguous CPU tensor.
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }.to_vec()
    }

    /// A safetensors file of (key, dtype, shape, bytes), as the format lays it out.
    fn write_raw(path: &Path, tensors: &[(String, &str, Vec<i64>, Vec<u8>)]) {
        let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
        for (key, dtype, shape, bytes) in tensors {
            header.insert(key.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}));
            data.extend_from_slice(bytes);
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(data);
        std::fs::write(path, out).unwrap();
    }

    fn tiny(kind: Kind) -> CausalLm {
        let config: Config = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16
        }))
        .unwrap();
        CausalLm::random(config, Path::new("."), Device::Cpu, kind).unwrap()
    }

    #[test]
    fn tensors_load_in_place_or_converted_and_bad_offsets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        tch::manual_seed(1);
        let saved = tiny(Kind::Float);
        save_file(&saved.vs, &file).unwrap();
        // Same type on the CPU: read straight into the variables; bf16: converted by copy_.
        for kind in [Kind::Float, Kind::BFloat16] {
            tch::manual_seed(2);
            let loaded = tiny(kind);
            load_file(&loaded.vs, &file).unwrap();
            for (name, var) in saved.vs.variables() {
                let got = loaded.vs.variables()[&name].to_kind(Kind::Float);
                let want = var.to_kind(kind).to_kind(Kind::Float);
                assert!(got.equal(&want), "{name} ({kind:?}) differs after loading");
            }
        }
        // A tensor of a type haloflow cannot read is skipped when unused (U32 here) and named
        // when the model needs it; FP8 weights load converted.
        let fp8 = |t: &Tensor| t.to_kind(Kind::Float8e4m3fn);
        let mut tensors: Vec<(String, &str, Vec<i64>, Vec<u8>)> = saved.vs.variables().into_iter().map(|(n, t)| (n, "F8_E4M3", t.size(), raw(&fp8(&t)))).collect();
        tensors.push(("extra.counts".into(), "U32", vec![3], vec![0u8; 12]));
        let fp8_file = dir.path().join("fp8.safetensors");
        write_raw(&fp8_file, &tensors);
        let loaded = tiny(Kind::Float);
        load_file(&loaded.vs, &fp8_file).unwrap();
        for (name, var) in saved.vs.variables() {
            assert!(loaded.vs.variables()[&name].equal(&fp8(&var).to_kind(Kind::Float)), "{name} differs after loading FP8");
        }
        tensors[0].1 = "U32";
        let u32_bytes = tensors[0].3.len() * 4;
        tensors[0].3.resize(u32_bytes, 0);
        write_raw(&fp8_file, &tensors);
        let err = format!("{:#}", load_file(&tiny(Kind::Float).vs, &fp8_file).unwrap_err());
        assert!(err.contains(&format!("tensor `{}` has dtype U32", tensors[0].0)) && err.contains("fp8.safetensors"), "{err}");

        // A header whose offsets run past the end of the file names the tensor.
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 4]).unwrap();
        let err = format!("{:#}", load_file(&tiny(Kind::Float).vs, &file).unwrap_err());
        assert!(err.contains("corrupt or truncated") && err.contains("ends at byte"), "{err}");
    }
}
