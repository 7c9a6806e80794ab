//! A causal LM loaded from a Hugging Face directory (or a PEFT LoRA adapter directory on top
//! of one), ready for log-probs, sampling and training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::lora::{self, AdapterFile, Lora, LoraConfig};
use crate::network::Network;
use crate::weights;

/// Files besides the weights that make a Hugging Face model directory; copied on save
/// (`chat_template.jinja`: where transformers 5 saves the chat template, which the tokenizer
/// prefers to tokenizer_config.json's).
pub const SIDE_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json"];

/// A model with its variables.
pub struct CausalLm {
    /// The parsed `config.json`.
    pub config: Config,
    /// Owner of every parameter (named as in the checkpoint).
    pub vs: VarStore,
    /// The network.
    pub net: Network,
    /// Directory it was loaded from (tokenizer files are read from here).
    pub dir: PathBuf,
    /// LoRA adapters, when attached (then only they are trained, and `save` writes them).
    pub lora: Option<Lora>,
}

impl CausalLm {
    /// Builds the network for `config` with random weights on `device` in `kind`.
    pub fn random(config: Config, dir: &Path, device: Device, kind: Kind) -> Result<CausalLm> {
        let mut vs = VarStore::new(device);
        config.architecture()?;
        let net = Network::new(&vs.root(), &config);
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        Ok(CausalLm { config, vs, net, dir: dir.to_path_buf(), lora: None })
    }

    /// Loads `DIR/config.json` and its safetensors weights; or, when `DIR` is a LoRA adapter
    /// directory (`adapter_config.json`), its base model (`base_model_name_or_path`, refused if
    /// its fingerprint differs from the one the adapter recorded) with the adapter attached.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<CausalLm> {
        let (adapter, base_dir) = resolve(dir)?;
        let mut model = Self::random(Config::from_dir(&base_dir)?, dir, device, kind)?;
        if let Some(a) = &adapter {
            let path = dir.join(lora::ADAPTER_CONFIG);
            let fingerprint = lora::base_fingerprint(&base_dir)?;
            if let Some(stored) = a.base_fingerprint() {
                if stored != fingerprint {
                    bail!("{}: the adapter was trained on another base model than {} (its weights or config.json differ)", path.display(), base_dir.display());
                }
            }
            model.attach_lora(&a.config(dir)?, &base_dir, fingerprint)?;
        }
        weights::load(&model.vs, dir).with_context(|| format!("loading weights of {}", dir.display()))?;
        Ok(model)
    }

    /// The config.json of a model directory, or of the base model an adapter directory names.
    pub fn config_of(dir: &Path) -> Result<Config> {
        Config::from_dir(&resolve(dir)?.1)
    }

    /// Attaches fresh LoRA adapters (PEFT's initialisation, from libtorch's RNG) and freezes
    /// every other weight; `base_dir` and its fingerprint are recorded for `save`.
    pub fn attach_lora(&mut self, config: &LoraConfig, base_dir: &Path, base_fingerprint: String) -> Result<()> {
        if self.lora.is_some() {
            bail!("{} already carries a LoRA adapter: merge it into full weights before training another", self.dir.display());
        }
        let kind = self.vs.kind();
        self.lora = Some(lora::attach(&self.vs, self.net.adapter_slots(), config, base_dir, base_fingerprint)?);
        if kind != Kind::Float {
            self.vs.set_kind(kind);
        }
        Ok(())
    }

    /// The tensors training updates, by name: the adapters with LoRA, else every weight.
    pub fn trainable(&self) -> BTreeMap<String, Tensor> {
        match &self.lora {
            Some(_) => lora::adapter_variables(&self.vs),
            None => self.vs.variables().into_iter().collect(),
        }
    }

    /// Runs `f` on the base model: LoRA adapters switched off (`f` as is without adapters).
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.lora {
            Some(lora) => lora.without(f),
            None => f(),
        }
    }

    /// Saves the model atomically (written to a temporary sibling, then renamed into place):
    /// a Hugging Face directory (safetensors, config.json, tokenizer files), or with LoRA a
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors, tokenizer files).
    pub fn save(&self, out: &Path) -> Result<()> {
        self.write_dir(out, |tmp| match &self.lora {
            Some(lora) => lora::save(&self.vs, lora, tmp),
            None => {
                weights::save(&self.vs, tmp)?;
                haloflow::io::write_json(&tmp.join("config.json"), &self.config)
            }
        })
    }

    /// Saves the full model with the LoRA adapters merged into the weights (`W + B·A·alpha/r`),
    /// in Hugging Face layout, atomically. Errors without adapters.
    pub fn save_merged(&self, out: &Path) -> Result<()> {
        let lora = self.lora.as_ref().context("no LoRA adapter to merge")?;
        let merged = lora::merged(&self.vs, &lora.config)?;
        self.write_dir(out, |tmp| {
            let path = tmp.join("model.safetensors");
            let tensors: Vec<(&str, &Tensor)> = merged.iter().map(|(n, t)| (n.as_str(), t)).collect();
            Tensor::write_safetensors(&tensors, &path).with_context(|| format!("writing {}", path.display()))?;
            haloflow::io::write_json(&tmp.join("config.json"), &self.config)
        })
    }

    /// Writes a model directory with `write` into a temporary sibling of `out`, copies the
    /// tokenizer files, then renames it into place.
    fn write_dir(&self, out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tmp = haloflow::io::temp_sibling(out);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        write(&tmp)?;
        for file in SIDE_FILES {
            let src = self.dir.join(file);
            if src.is_file() {
                std::fs::copy(&src, tmp.join(file)).with_context(|| format!("copying {}", src.display()))?;
            }
        }
        if out.exists() {
            std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
        }
        std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
    }
}

/// The adapter of `dir` if it is an adapter directory, and the directory of the full model: its
/// base, or `dir` itself.
fn resolve(dir: &Path) -> Result<(Option<AdapterFile>, PathBuf)> {
    let adapter = AdapterFile::read(dir)?;
    let base = match &adapter {
        Some(a) => a.base_dir(dir)?,
        None => dir.to_path_buf(),
    };
    Ok((adapter, base))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saved model keeps its tokenizer files, the chat template of a transformers 5 directory
    /// (chat_template.jinja) included: without it a policy trained from Gemma 3 would be
    /// sampled with an HH transcript instead of its template.
    #[test]
    fn save_copies_the_tokenizer_files_and_chat_template_jinja() {
        let src = tempfile::tempdir().unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
            std::fs::write(src.path().join(file), file).unwrap();
        }
        let config: Config = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 16
        }))
        .unwrap();
        let model = CausalLm::random(config, src.path(), Device::Cpu, Kind::Float).unwrap();
        let out = src.path().join("saved");
        model.save(&out).unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
            assert_eq!(std::fs::read_to_string(out.join(file)).unwrap(), file, "{file} of the saved model");
        }
        assert!(out.join("model.safetensors").is_file() && !out.join("special_tokens_map.json").exists());
    }
}
