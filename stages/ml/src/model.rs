//! A causal LM loaded from a Hugging Face directory, ready for log-probs, sampling and training.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::config::{Architecture, Config};
use crate::llama::Llama;
use crate::{qwen2, weights};

/// Files besides the weights that make a Hugging Face model directory; copied on save.
pub const SIDE_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

/// A model with its variables.
pub struct CausalLm {
    /// The parsed `config.json`.
    pub config: Config,
    /// Owner of every parameter (named as in the checkpoint).
    pub vs: VarStore,
    /// The network.
    pub net: Llama,
    /// Directory it was loaded from (tokenizer files are read from here).
    pub dir: PathBuf,
}

impl CausalLm {
    /// Builds the network for `config` with random weights on `device` in `kind`.
    pub fn random(config: Config, dir: &Path, device: Device, kind: Kind) -> Result<CausalLm> {
        let mut vs = VarStore::new(device);
        let net = match config.architecture()? {
            Architecture::Llama => Llama::new(&vs.root(), &config),
            Architecture::Qwen2 => qwen2::new(&vs.root(), &config),
        };
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        Ok(CausalLm { config, vs, net, dir: dir.to_path_buf() })
    }

    /// Loads `DIR/config.json` and its safetensors weights.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<CausalLm> {
        let config = Config::from_dir(dir)?;
        let model = Self::random(config, dir, device, kind)?;
        weights::load(&model.vs, dir).with_context(|| format!("loading weights of {}", dir.display()))?;
        Ok(model)
    }

    /// Saves a Hugging Face directory (safetensors, config.json, tokenizer files) atomically:
    /// written to a temporary sibling, then renamed into place.
    pub fn save(&self, out: &Path) -> Result<()> {
        let tmp = haloflow::io::temp_sibling(out);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        weights::save(&self.vs, &tmp)?;
        haloflow::io::write_json(&tmp.join("config.json"), &self.config)?;
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
