//! The GGUF parser on small hand-written files: every metadata type (arrays and nested arrays
//! included), tensor descriptions, `general.alignment`, versions 2 and 3, and the errors for
//! truncated or foreign files.

mod common;

use common::{f32_bytes, gguf_bytes, s, Tensor};
use halo_import_gguf::dequant::dequantize;
use halo_import_gguf::gguf::{GgmlType, Gguf, Value};

fn metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", s("llama")),
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-5)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-7)),
        ("t.u64", Value::U64(1 << 40)),
        ("t.i64", Value::I64(-(1 << 40))),
        ("t.f32", Value::F32(1e-5)),
        ("t.f64", Value::F64(0.1)),
        ("t.bool", Value::Bool(true)),
        ("t.string", s("héllo <|im_start|>")),
        ("t.strings", Value::Array(vec![s("a"), s(""), s("Ġthe")])),
        ("t.ints", Value::Array(vec![Value::I32(1), Value::I32(-2), Value::I32(3)])),
        (
            "t.nested",
            Value::Array(vec![Value::Array(vec![Value::U8(1), Value::U8(2)]), Value::Array(vec![Value::U8(3)])]),
        ),
    ]
}

/// Tensors: an F32 matrix, a Q8_0 vector and a Q2_K tensor (a type the parser knows by name
/// but cannot size or dequantize).
fn tensors() -> Vec<Tensor> {
    let q8 =
        [half::f16::from_f32(0.5).to_le_bytes().as_slice(), &(0..32).map(|j| j as u8).collect::<Vec<_>>()].concat();
    vec![
        Tensor {
            name: "a".into(),
            dims: vec![4, 2],
            ty: GgmlType::F32,
            data: f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]),
        },
        Tensor { name: "b".into(), dims: vec![32], ty: GgmlType::Q8_0, data: q8 },
        Tensor { name: "c".into(), dims: vec![256], ty: GgmlType(10), data: vec![7; 84] },
    ]
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn parses_metadata_of_every_type_and_tensor_infos() {
    let dir = tempfile::tempdir().unwrap();
    for (version, alignment) in [(3, 64), (2, 32)] {
        let path = write(&dir, "t.gguf", &gguf_bytes(version, &metadata(), &tensors(), alignment));
        let g = Gguf::open(&path).unwrap();
        assert_eq!((g.version, g.alignment), (version, alignment));
        for (key, value) in metadata() {
            assert_eq!(g.get(key), Some(&value), "{key}");
        }
        assert_eq!(g.get("general.alignment").is_some(), alignment != 32);
        assert_eq!(g.f64("t.f32").unwrap(), Some(1e-5), "FLOAT32 metadata as its shortest decimal");
        assert_eq!(g.u64("t.u8").unwrap(), Some(200));
        assert_eq!(
            g.u64("t.i8").unwrap_err().to_string(),
            format!("{}: metadata `t.i8` is a INT8, expected a non-negative integer", path.display())
        );
        assert!(g.require_str("t.missing").unwrap_err().to_string().contains("metadata `t.missing` is missing"));

        let names: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let a = g.tensor("a").unwrap();
        assert_eq!((a.dims.clone(), a.shape(), a.ty, a.n_bytes()), (vec![4, 2], vec![2, 4], GgmlType::F32, Some(32)));
        assert_eq!(g.tensor("c").unwrap().n_bytes(), None, "Q2_K has no known layout here");
        assert_eq!(g.data_start % alignment, 0);
        assert!(g.tensors.iter().all(|t| t.offset % alignment == 0));
        assert_eq!(g.tensor("b").unwrap().offset, alignment, "b follows a's 32 bytes, aligned");

        let mut file = std::fs::File::open(&path).unwrap();
        assert_eq!(g.read_tensor(&mut file, a).unwrap(), f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]));
        let b = g.tensor("b").unwrap();
        let values = dequantize(b.ty, &g.read_tensor(&mut file, b).unwrap()).unwrap();
        assert_eq!(values, (0..32).map(|j| j as f32 * 0.5).collect::<Vec<_>>());
    }
}

#[test]
fn every_truncation_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Without the Q2_K tensor, whose size the parser cannot check, every byte counts.
    let full = gguf_bytes(3, &metadata(), &tensors()[..2], 32);
    for cut in 0..full.len() {
        let path = write(&dir, "cut.gguf", &full[..cut]);
        let err = format!("{:#}", Gguf::open(&path).unwrap_err());
        assert!(err.starts_with(&format!("reading GGUF file {}", path.display())), "cut at {cut}: {err}");
        assert!(err.contains("truncated file"), "cut at {cut}: {err}");
    }
    // Cut inside the last tensor's data: the error names that tensor.
    let path = write(&dir, "cut.gguf", &full[..full.len() - 1]);
    let err = format!("{:#}", Gguf::open(&path).unwrap_err());
    assert!(err.contains("truncated file: tensor `b` (Q8_0 [32]) needs bytes"), "{err}");
    // Cut inside a metadata string.
    let at = full.windows(8).position(|w| w == b"t.string").unwrap() + 20;
    let path = write(&dir, "cut.gguf", &full[..at]);
    let err = format!("{:#}", Gguf::open(&path).unwrap_err());
    assert!(err.contains("reading metadata `t.string`: truncated file"), "{err}");
}

#[test]
fn foreign_files_and_bad_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = gguf_bytes(3, &metadata(), &tensors(), 32);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        ([b"GGML".as_slice(), &good[4..]].concat(), "not a GGUF file"),
        (
            [&good[..4], &1u32.to_le_bytes(), &good[8..]].concat(),
            "GGUF version 1 is not supported (only versions 2 and 3)",
        ),
        ([&good[..4], &3u32.to_be_bytes(), &good[8..]].concat(), "big-endian GGUF files are not supported"),
        (gguf_bytes(3, &[("general.alignment", Value::U32(48))], &[], 32), "general.alignment must be a power of two"),
        (gguf_bytes(3, &[("k", Value::U8(1)), ("k", Value::U8(2))], &[], 32), "metadata key `k` appears twice"),
        (gguf_bytes(3, &[], &[tensors().remove(0), tensors().remove(0)], 32), "tensor `a` appears twice"),
    ];
    for (bytes, expected) in cases {
        let path = write(&dir, "bad.gguf", &bytes);
        let err = format!("{:#}", Gguf::open(&path).unwrap_err());
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
    }
    let mut bad_bool = gguf_bytes(3, &[("flag", Value::Bool(true))], &[], 32);
    let at = bad_bool.windows(4).position(|w| w == b"flag").unwrap() + 8;
    bad_bool[at] = 2;
    let err = format!("{:#}", Gguf::open(&write(&dir, "bool.gguf", &bad_bool)).unwrap_err());
    assert!(err.contains("reading metadata `flag`: bad BOOL value 2"), "{err}");
}
