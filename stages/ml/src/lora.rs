//! LoRA adapters, compatible with Python's `peft`: a low-rank update `B·A·alpha/r` beside the
//! frozen weight of chosen projections (`y = x Wᵀ + b + dropout(x) Aᵀ Bᵀ · alpha/r`),
//! initialised as PEFT does (A Kaiming-uniform with a = √5, as `nn.Linear`; B zero, so a fresh
//! adapter leaves the model unchanged).
//!
//! The adapter variables live in the model's `VarStore` beside the base weights, named
//! `model.layers.0.self_attn.q_proj.lora_A.weight`; PEFT's files name them
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so saving and loading is
//! a prefix. An adapter directory holds `adapter_config.json` (with the base model's path and
//! a fingerprint of its weights and config), `adapter_model.safetensors` and the tokenizer
//! files; `CausalLm::load` recognises one and loads base + adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::nn::{Init, VarStore};
use tch::Tensor;

/// The file naming an adapter directory's settings and base model.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights (PEFT key names).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before the base model's parameter names.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The projections of a decoder layer that LoRA can adapt.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// LoRA settings, as the `lora` pipeline param (`--lora '{"r": 16, "alpha": 32}'`) gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update (≥ 1).
    pub r: i64,
    /// Scale numerator: the update is multiplied by `alpha / r` (> 0).
    pub alpha: f64,
    /// Dropout on the adapter's input while training, in [0, 1).
    #[serde(default)]
    pub dropout: f64,
    /// Module names (or dotted suffixes of them) to adapt; default: every projection.
    #[serde(default = "all_modules")]
    pub targets: Vec<String>,
}

fn all_modules() -> Vec<String> {
    MODULES.iter().map(|m| m.to_string()).collect()
}

impl LoraConfig {
    /// Parses and validates the JSON object of `--lora`.
    pub fn parse(text: &str) -> Result<LoraConfig> {
        let config: LoraConfig = serde_json::from_str(text)
            .with_context(|| format!("--lora {text}: expected a JSON object {{\"r\": .., \"alpha\": .., \"dropout\": .., \"targets\": [..]}}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the ranges, naming the bad field.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.r >= 1, "lora.r = {} must be at least 1", self.r);
        ensure!(self.alpha > 0.0 && self.alpha.is_finite(), "lora.alpha = {} must be positive", self.alpha);
        ensure!((0.0..1.0).contains(&self.dropout), "lora.dropout = {} must be in [0, 1)", self.dropout);
        ensure!(!self.targets.is_empty(), "lora.targets is empty: name modules among {}", MODULES.join(", "));
        Ok(())
    }

    /// `alpha / r`, the factor of the update.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether module `name` (`model.layers.0.self_attn.q_proj`) is a target: equal to one,
    /// or ending with `.` and one (PEFT's rule for a list of names).
    pub fn targets_module(&self, name: &str) -> bool {
        self.targets.iter().any(|t| name == t || name.ends_with(&format!(".{t}")))
    }

    /// Elements of every adapter this config puts on a model of `config` (`r · (in + out)` per
    /// targeted projection): what the memory estimate counts as trained.
    pub fn adapter_elements(&self, config: &crate::config::Config) -> u64 {
        let (h, i) = (config.hidden_size as i64, config.intermediate_size as i64);
        let (q, kv) = ((config.num_attention_heads * config.head_dim()) as i64, (config.kv_heads() * config.head_dim()) as i64);
        let shapes = [("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv), ("self_attn.o_proj", q, h), ("mlp.gate_proj", h, i), ("mlp.up_proj", h, i), ("mlp.down_proj", i, h)];
        (0..config.num_hidden_layers)
            .flat_map(|layer| shapes.iter().map(move |(name, a, b)| (format!("model.layers.{layer}.{name}"), a + b)))
            .filter(|(name, _)| self.targets_module(name))
            .map(|(_, widths)| (self.r * widths) as u64)
            .sum()
    }
}

/// What every adapter of a model shares: whether adapters are on (off: the base model, used as
/// the reference) and whether dropout applies (training).
#[derive(Debug, Default)]
pub struct Switch {
    disabled: AtomicBool,
    training: AtomicBool,
}

/// The low-rank update of one projection.
#[derive(Debug)]
pub struct Adapter {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f64,
    switch: Arc<Switch>,
}

impl Adapter {
    /// `y + dropout(x) Aᵀ Bᵀ · scaling`, or `y` while adapters are switched off. Dropout applies
    /// in training mode to passes that record gradients.
    pub fn apply(&self, x: &Tensor, y: Tensor) -> Tensor {
        if self.switch.disabled.load(Ordering::Relaxed) {
            return y;
        }
        let mut h = x.linear::<Tensor>(&self.a, None);
        if self.dropout > 0.0 && self.switch.training.load(Ordering::Relaxed) && h.requires_grad() {
            h = x.dropout(self.dropout, true).linear::<Tensor>(&self.a, None);
        }
        y + h.linear::<Tensor>(&self.b, None) * self.scaling
    }
}

/// The adapters of a loaded model.
#[derive(Debug)]
pub struct Lora {
    /// The settings.
    pub config: LoraConfig,
    /// The base model's directory (written as `base_model_name_or_path`).
    pub base_dir: PathBuf,
    /// [`base_fingerprint`] of the base model.
    pub base_fingerprint: String,
    switch: Arc<Switch>,
}

impl Lora {
    /// Runs `f` with the adapters switched off (the base model).
    pub fn without<T>(&self, f: impl FnOnce() -> T) -> T {
        let was = self.switch.disabled.swap(true, Ordering::Relaxed);
        let out = f();
        self.switch.disabled.store(was, Ordering::Relaxed);
        out
    }

    /// Turns adapter dropout on (training) or off.
    pub fn set_training(&self, on: bool) {
        self.switch.training.store(on, Ordering::Relaxed);
    }
}

/// Adds adapters under `vs` to the projections `linears` (module name → slot, with its input
/// and output widths) that `config` targets, freezing every variable already in `vs`. Errors
/// when a target matches no module (naming the modules). Call before `VarStore::set_kind`.
pub fn attach<'a>(
    vs: &VarStore,
    linears: impl IntoIterator<Item = (String, (i64, i64), &'a mut Option<Adapter>)>,
    config: &LoraConfig,
    base_dir: &Path,
    base_fingerprint: String,
) -> Result<Lora> {
    config.validate()?;
    let linears: Vec<_> = linears.into_iter().collect();
    let mut short: Vec<&str> = Vec::new();
    for (name, _, _) in &linears {
        let last = name.rsplit('.').next().unwrap_or(name);
        if !short.contains(&last) {
            short.push(last);
        }
    }
    for target in &config.targets {
        if !linears.iter().any(|(name, _, _)| name == target || name.ends_with(&format!(".{target}"))) {
            bail!("lora.targets: `{target}` matches no module of the model; its modules are {}", short.join(", "));
        }
    }
    for (_, var) in vs.variables() {
        let _ = var.set_requires_grad(false);
    }
    let switch = Arc::new(Switch::default());
    let root = vs.root();
    for (name, (inputs, outputs), slot) in linears {
        if !config.targets_module(&name) {
            continue;
        }
        ensure!(slot.is_none(), "module {name} already has an adapter");
        let path = name.split('.').fold(root.clone(), |p, part| &p / part);
        let bound = 1.0 / (inputs as f64).sqrt();
        let a = (&path / "lora_A").var("weight", &[config.r, inputs], Init::Uniform { lo: -bound, up: bound });
        let b = (&path / "lora_B").var("weight", &[outputs, config.r], Init::Const(0.0));
        *slot = Some(Adapter { a, b, scaling: config.scaling(), dropout: config.dropout, switch: switch.clone() });
    }
    Ok(Lora { config: config.clone(), base_dir: base_dir.to_path_buf(), base_fingerprint, switch })
}

/// Whether `name` is an adapter variable.
pub fn is_adapter_variable(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// The adapter variables of `vs`, by VarStore name.
pub fn adapter_variables(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().filter(|(n, _)| is_adapter_variable(n)).collect()
}

/// The VarStore name of a tensor of a checkpoint file (PEFT's prefix removed).
pub fn variable_name(key: &str) -> &str {
    key.strip_prefix(PEFT_PREFIX).unwrap_or(key)
}

/// Fingerprint of a base model directory: blake3 of its config.json and weight files.
pub fn base_fingerprint(dir: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(haloflow::hashing::hash_path(&dir.join("config.json"))?.as_bytes());
    hasher.update(crate::fingerprint::weights_hash(dir)?.as_bytes());
    Ok(hasher.finalize().to_hex().to_string())
}

/// `adapter_config.json` as PEFT writes it, plus haloflow's base fingerprint under `haloflow`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterFile {
    /// `LORA`.
    pub peft_type: String,
    /// `CAUSAL_LM`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model's directory.
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    pub r: i64,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// Dropout.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Adapted modules (a list, or PEFT's regex string: refused).
    pub target_modules: Value,
    /// `none` (bias training is refused).
    #[serde(default = "no_bias")]
    pub bias: String,
    /// Everything else (PEFT options; haloflow's fingerprint).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

fn no_bias() -> String {
    "none".into()
}

impl AdapterFile {
    /// The file for `lora`.
    pub fn new(lora: &Lora) -> AdapterFile {
        let c = &lora.config;
        let extra = json!({
            "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "modules_to_save": null,
            "use_rslora": false, "use_dora": false, "layers_to_transform": null, "rank_pattern": {}, "alpha_pattern": {},
            "haloflow": { "base_fingerprint": lora.base_fingerprint },
        });
        AdapterFile {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(lora.base_dir.display().to_string()),
            r: c.r,
            lora_alpha: c.alpha,
            lora_dropout: c.dropout,
            target_modules: json!(c.targets),
            bias: "none".into(),
            extra: extra.as_object().cloned().unwrap_or_default(),
        }
    }

    /// Reads `DIR/adapter_config.json` if `dir` is an adapter directory.
    pub fn read(dir: &Path) -> Result<Option<AdapterFile>> {
        let path = dir.join(ADAPTER_CONFIG);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: AdapterFile = serde_json::from_str(&text).with_context(|| format!("{}: not a PEFT adapter config", path.display()))?;
        ensure!(file.peft_type == "LORA", "{}: peft_type `{}` is not supported (only LORA)", path.display(), file.peft_type);
        ensure!(file.bias == "none", "{}: bias `{}` is not supported (only none)", path.display(), file.bias);
        for key in ["use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            ensure!(!file.extra.get(key).and_then(Value::as_bool).unwrap_or(false), "{}: {key} = true is not supported", path.display());
        }
        // PEFT options that change which layers are adapted or their rank/scale: refused rather
        // than silently ignored.
        for key in [
            "layers_to_transform", "layers_pattern", "modules_to_save", "rank_pattern", "alpha_pattern", "trainable_token_indices",
            "exclude_modules", "layer_replication", "target_parameters", "alora_invocation_tokens",
        ] {
            let set = match file.extra.get(key) {
                None | Some(Value::Null) => false,
                Some(Value::Object(m)) => !m.is_empty(),
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            ensure!(!set, "{}: {key} is not supported (haloflow adapts every layer's target modules with one r and alpha)", path.display());
        }
        Ok(Some(file))
    }

    /// The LoRA settings it holds (`dir`: the adapter directory, for errors).
    pub fn config(&self, dir: &Path) -> Result<LoraConfig> {
        let path = dir.join(ADAPTER_CONFIG);
        let targets: Vec<String> = serde_json::from_value(self.target_modules.clone())
            .with_context(|| format!("{}: target_modules must be a list of names", path.display()))?;
        let config = LoraConfig { r: self.r, alpha: self.lora_alpha, dropout: self.lora_dropout, targets };
        config.validate().with_context(|| path.display().to_string())?;
        Ok(config)
    }

    /// The base model directory: `base_model_name_or_path` as given (absolute, or relative to
    /// the working directory as PEFT reads it), else relative to the adapter directory.
    pub fn base_dir(&self, dir: &Path) -> Result<PathBuf> {
        let name = self.base_model_name_or_path.as_deref().with_context(|| format!("{}: no base_model_name_or_path", dir.join(ADAPTER_CONFIG).display()))?;
        let given = PathBuf::from(name);
        for candidate in [given.clone(), dir.join(&given)] {
            if candidate.join("config.json").is_file() {
                return Ok(candidate);
            }
        }
        bail!("{}: base model `{name}` not found (no config.json there)", dir.join(ADAPTER_CONFIG).display())
    }

    /// The stored base fingerprint, if any.
    pub fn base_fingerprint(&self) -> Option<&str> {
        self.extra.get("haloflow")?.get("base_fingerprint")?.as_str()
    }
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (PEFT key names).
pub fn save(vs: &VarStore, lora: &Lora, dir: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> =
        adapter_variables(vs).into_iter().map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t.detach().contiguous())).collect();
    let path = dir.join(ADAPTER_WEIGHTS);
    Tensor::write_safetensors(&tensors, &path).with_context(|| format!("writing {}", path.display()))?;
    haloflow::io::write_json(&dir.join(ADAPTER_CONFIG), &AdapterFile::new(lora))
}

/// The variables of `vs` with every adapter merged into its weight (`W + B·A·alpha/r`) and the
/// adapter variables left out: the full model in Hugging Face layout.
pub fn merged(vs: &VarStore, config: &LoraConfig) -> Result<BTreeMap<String, Tensor>> {
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut out = BTreeMap::new();
    for (name, var) in &variables {
        if is_adapter_variable(name) {
            continue;
        }
        let module = name.strip_suffix(".weight");
        let a = module.and_then(|m| variables.get(&format!("{m}.lora_A.weight")));
        let b = module.and_then(|m| variables.get(&format!("{m}.lora_B.weight")));
        let tensor = match (a, b) {
            (Some(a), Some(b)) => tch::no_grad(|| var + b.matmul(a) * config.scaling()),
            (None, None) => var.detach(),
            _ => bail!("{name}: adapter has lora_A or lora_B only"),
        };
        out.insert(name.clone(), tensor.contiguous());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        let ok = LoraConfig::parse(r#"{"r": 4, "alpha": 8}"#).unwrap();
        assert_eq!((ok.scaling(), ok.targets.len(), ok.dropout), (2.0, 7, 0.0));
        for (text, field) in [
            (r#"{"r": 0, "alpha": 8}"#, "lora.r"),
            (r#"{"r": -2, "alpha": 8}"#, "lora.r"),
            (r#"{"r": 4, "alpha": 0}"#, "lora.alpha"),
            (r#"{"r": 4, "alpha": 8, "dropout": 1.0}"#, "lora.dropout"),
            (r#"{"r": 4, "alpha": 8, "targets": []}"#, "lora.targets"),
            (r#"{"r": 4, "alpha": 8, "rank": 3}"#, "unknown field `rank`"),
        ] {
            let err = format!("{:#}", LoraConfig::parse(text).unwrap_err());
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn targets_match_names_and_dotted_suffixes() {
        let c = LoraConfig { r: 1, alpha: 1.0, dropout: 0.0, targets: vec!["q_proj".into(), "layers.1.mlp.up_proj".into()] };
        assert!(c.targets_module("model.layers.0.self_attn.q_proj"));
        assert!(c.targets_module("model.layers.1.mlp.up_proj"));
        assert!(!c.targets_module("model.layers.11.mlp.up_proj"));
        assert!(!c.targets_module("model.layers.0.self_attn.qq_proj"));
    }

    #[test]
    fn peft_options_haloflow_cannot_honour_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |extra: Value| {
            let mut config = json!({"peft_type": "LORA", "base_model_name_or_path": "b", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": null, "use_dora": false});
            config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            std::fs::write(dir.path().join(ADAPTER_CONFIG), config.to_string()).unwrap();
            AdapterFile::read(dir.path()).and_then(|f| f.unwrap().config(dir.path()))
        };
        assert_eq!(write(json!({})).unwrap().targets, ["q_proj"]);
        for (extra, named) in [
            (json!({"use_dora": true}), "use_dora"),
            (json!({"rank_pattern": {"q_proj": 8}}), "rank_pattern"),
            (json!({"layers_to_transform": [0]}), "layers_to_transform"),
            (json!({"peft_type": "IA3"}), "IA3"),
            (json!({"target_modules": "all-linear"}), "target_modules must be a list"),
            (json!({"r": 0}), "lora.r = 0"),
        ] {
            let err = format!("{:#}", write(extra.clone()).unwrap_err());
            assert!(err.contains(named) && err.contains(ADAPTER_CONFIG), "{extra}: {err}");
        }
    }

    fn tiny(dir: &Path) -> crate::model::CausalLm {
        let config: crate::config::Config = serde_json::from_value(json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64
        }))
        .unwrap();
        tch::manual_seed(1);
        crate::model::CausalLm::random(config, dir, tch::Device::Cpu, tch::Kind::Float).unwrap()
    }

    fn ids() -> Tensor {
        Tensor::from_slice(&[1i64, 5, 9, 30, 2, 7, 11]).view([1, 7])
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn init_is_pefts_and_leaves_the_model_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = tiny(dir.path());
        let before = model.net.forward(&ids());
        let config = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: vec!["q_proj".into(), "up_proj".into()] };
        tch::manual_seed(0);
        model.attach_lora(&config, dir.path(), "fp".into()).unwrap();
        let trainable = model.trainable();
        assert_eq!(trainable.len(), 2 * 2 * 2, "A and B of q_proj and up_proj in 2 layers");
        assert!(trainable.values().all(|t| t.requires_grad()));
        assert!(model.vs.variables().iter().filter(|(n, _)| !is_adapter_variable(n)).all(|(_, t)| !t.requires_grad()), "base frozen");
        let a = &trainable["model.layers.0.self_attn.q_proj.lora_A.weight"];
        let b = &trainable["model.layers.0.self_attn.q_proj.lora_B.weight"];
        assert_eq!((a.size(), b.size()), (vec![4, 16], vec![16, 4]));
        // Kaiming-uniform with a = √5 on fan_in 16: U(−1/4, 1/4); B zero.
        let bound = 0.25;
        assert!(a.abs().max().double_value(&[]) <= bound && a.abs().max().double_value(&[]) > 0.8 * bound);
        assert_eq!(b.abs().max().double_value(&[]), 0.0);
        let up_a = &trainable["model.layers.1.mlp.up_proj.lora_A.weight"];
        assert_eq!(up_a.size(), vec![4, 16]);
        assert_eq!(max_diff(&model.net.forward(&ids()), &before), 0.0, "B = 0: the adapted model is the base model");
    }

    #[test]
    fn unknown_targets_are_refused_naming_the_modules() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = tiny(dir.path());
        let config = LoraConfig { r: 2, alpha: 2.0, dropout: 0.0, targets: vec!["c_attn".into()] };
        let err = model.attach_lora(&config, dir.path(), "fp".into()).unwrap_err().to_string();
        assert!(err.contains("`c_attn` matches no module") && err.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"), "{err}");
    }

    #[test]
    fn merged_weights_are_w_plus_scaled_b_a_and_adapters_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("base");
        let mut model = tiny(dir.path());
        model.save(&base_dir).unwrap();
        let base_logits = model.net.forward(&ids());
        let w = model.vs.variables()["model.layers.1.self_attn.v_proj.weight"].copy();
        let config = LoraConfig { r: 3, alpha: 6.0, dropout: 0.0, targets: MODULES.iter().map(|m| m.to_string()).collect() };
        model.attach_lora(&config, &base_dir, base_fingerprint(&base_dir).unwrap()).unwrap();
        tch::no_grad(|| {
            for (name, var) in model.trainable() {
                if name.contains("lora_B") {
                    let _ = var.shallow_clone().copy_(&(Tensor::randn(var.size(), (tch::Kind::Float, tch::Device::Cpu)) * 0.1));
                }
            }
        });
        let adapted = model.net.forward(&ids());
        assert!(max_diff(&adapted, &base_logits) > 1e-3);
        assert_eq!(max_diff(&model.without_adapters(|| model.net.forward(&ids())), &base_logits), 0.0, "adapters off = base");
        let vars = model.vs.variables();
        let (a, b) = (&vars["model.layers.1.self_attn.v_proj.lora_A.weight"], &vars["model.layers.1.self_attn.v_proj.lora_B.weight"]);
        let merged = merged(&model.vs, &config).unwrap();
        assert!(!merged.keys().any(|n| is_adapter_variable(n)));
        assert!(max_diff(&merged["model.layers.1.self_attn.v_proj.weight"], &(&w + b.matmul(a) * 2.0)) < 1e-7);
        assert_eq!(max_diff(&merged["model.norm.weight"], &vars["model.norm.weight"]), 0.0);
        // Adapter directory and merged directory both reload to the adapted model.
        let (adapter_dir, merged_dir) = (dir.path().join("adapter"), dir.path().join("merged"));
        model.save(&adapter_dir).unwrap();
        model.save_merged(&merged_dir).unwrap();
        assert!(adapter_dir.join(ADAPTER_CONFIG).is_file() && !adapter_dir.join("model.safetensors").exists());
        let keys: Vec<String> = Tensor::read_safetensors(adapter_dir.join(ADAPTER_WEIGHTS)).unwrap().into_iter().map(|(k, _)| k).collect();
        assert!(keys.iter().all(|k| k.starts_with("base_model.model.model.layers.")) && keys.len() == 2 * 7 * 2);
        let reloaded = crate::model::CausalLm::load(&adapter_dir, tch::Device::Cpu, tch::Kind::Float).unwrap();
        assert_eq!(max_diff(&reloaded.net.forward(&ids()), &adapted), 0.0);
        let full = crate::model::CausalLm::load(&merged_dir, tch::Device::Cpu, tch::Kind::Float).unwrap();
        assert!(full.lora.is_none() && max_diff(&full.net.forward(&ids()), &adapted) < 1e-5);
        // An adapter directory's weight files are its base's and its own (for fingerprints).
        let files = crate::weights::weight_files(&adapter_dir).unwrap();
        assert_eq!(files, vec![base_dir.join("model.safetensors"), adapter_dir.join(ADAPTER_WEIGHTS)]);
    }
}
