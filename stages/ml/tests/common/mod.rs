//! What the parity tests share: the stories260K directory and the stored transformers
//! references they compare with.

use std::path::PathBuf;

use serde_json::Value;
use tch::Tensor;

/// ../shared/models/stories260K (see `haloflow::shared::path`).
pub fn stories_dir() -> Option<PathBuf> {
    haloflow::shared::path("models/stories260K")
}

/// A file stored beside the tests, `tests/data/NAME`.
pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A reference stored beside the tests, `tests/data/NAME`.
pub fn reference(name: &str) -> Value {
    let path = data(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Token ids of a JSON list.
pub fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// A `(rows, vocab)` tensor of a JSON list of logit rows.
pub fn logits_of(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, -1])
}
