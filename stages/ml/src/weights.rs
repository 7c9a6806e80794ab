//! Loading and saving Hugging Face safetensors checkpoints into a `VarStore`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Tensor};

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
        let tensors = Tensor::read_safetensors(file)
            .with_context(|| format!("{}: cannot read safetensors (corrupt or truncated?)", file.display()))?;
        for (key, tensor) in tensors {
            let name = lora::variable_name(&key).to_string();
            let Some(var) = variables.get(&name) else {
                unused.push(name);
                continue;
            };
            if var.size() != tensor.size() {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, the config implies {:?}",
                    file.display(),
                    tensor.size(),
                    var.size()
                );
            }
            tch::no_grad(|| var.shallow_clone().copy_(&tensor));
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
