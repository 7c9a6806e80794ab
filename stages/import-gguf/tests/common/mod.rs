//! Helpers of the integration tests: a GGUF writer for hand-made files, a safetensors reader,
//! and running the binary.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

use halo_import_gguf::gguf::{GgmlType, Value};

/// A tensor to write: ggml dims (fastest first), type and raw data.
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            out.extend(items.first().map_or(8, value_type).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// The bytes of a GGUF file (`version`, metadata in order, tensors aligned to `alignment`,
/// which is also written as `general.alignment` unless it is the default 32).
pub fn gguf_bytes(version: u32, metadata: &[(&str, Value)], tensors: &[Tensor], alignment: u64) -> Vec<u8> {
    let mut metadata: Vec<(&str, Value)> = metadata.to_vec();
    if alignment != 32 {
        metadata.push(("general.alignment", Value::U32(alignment as u32)));
    }
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in &metadata {
        put_str(&mut out, key);
        out.extend(value_type(value).to_le_bytes());
        put_value(&mut out, value);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.0.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(alignment) * alignment;
    }
    let data_start = (out.len() as u64).div_ceil(alignment) * alignment;
    out.resize(data_start as usize, 0);
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize((data_start + off) as usize, 0);
        out.extend(&t.data);
    }
    out
}

/// A string metadata value.
pub fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every tensor of a safetensors file: name → (shape, f32 values). Checks the dtype is F32
/// and the data section is exactly covered.
pub fn read_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut covered = 0;
    let mut out = HashMap::new();
    for (name, entry) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(entry["dtype"], "F32", "{name}");
        let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
        let [begin, end]: [usize; 2] = serde_json::from_value(entry["data_offsets"].clone()).unwrap();
        assert_eq!(end - begin, shape.iter().product::<usize>() * 4, "{name}");
        covered += end - begin;
        let values = data[begin..end].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        out.insert(name.clone(), (shape, values));
    }
    assert_eq!(covered, data.len(), "the tensors cover the data section");
    out
}

/// Runs `halo-import-gguf --gguf GGUF --model OUT`.
pub fn run_import(gguf: &Path, out: &Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_halo-import-gguf"))
        .arg("--gguf")
        .arg(gguf)
        .arg("--model")
        .arg(out)
        .output()
        .unwrap()
}

/// The JSON file `name` of directory `dir`.
pub fn read_json(dir: &Path, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
}
