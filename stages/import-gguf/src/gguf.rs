//! Reading GGUF files, llama.cpp's model format (versions 2 and 3).
//!
//! A GGUF file is little-endian: the magic `GGUF`, a `u32` version, the tensor count and the
//! metadata count (`u64` each), the metadata key/values, one description per tensor (name,
//! dimensions, element type, offset), padding up to `general.alignment` (32 by default), and
//! then the tensor data, each tensor at its offset from the start of that data section.
//! [`Gguf::open`] reads everything but the tensor data, and checks that every tensor of a type
//! with a known size lies inside the file; [`Gguf::read_tensor`] reads one tensor's bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT32`.
    F32(f32),
    /// `FLOAT64`.
    F64(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` (UTF-8).
    String(String),
    /// `ARRAY` of values of one type (possibly arrays themselves).
    Array(Vec<Value>),
}

impl Value {
    /// The value as a non-negative integer, whatever its integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an integer, whatever its integer type.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a number. A `FLOAT32` becomes the `f64` of its shortest decimal form
    /// (`1e-5f32` gives `1e-5`, not `9.999999747378752e-6`), as it would be written in a
    /// Hugging Face `config.json`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "UINT8",
            Value::I8(_) => "INT8",
            Value::U16(_) => "UINT16",
            Value::I16(_) => "INT16",
            Value::U32(_) => "UINT32",
            Value::I32(_) => "INT32",
            Value::U64(_) => "UINT64",
            Value::I64(_) => "INT64",
            Value::F32(_) => "FLOAT32",
            Value::F64(_) => "FLOAT64",
            Value::Bool(_) => "BOOL",
            Value::String(_) => "STRING",
            Value::Array(_) => "ARRAY",
        }
    }
}

/// A tensor element type (`ggml_type`), known or not: files may hold types this crate cannot
/// dequantize, and only the tensors that are converted need a supported one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

/// Names of the `ggml_type` ids, for messages (ids 4 and 5 were removed from ggml).
const GGML_TYPE_NAMES: [&str; 40] = [
    "F32",
    "F16",
    "Q4_0",
    "Q4_1",
    "Q4_2",
    "Q4_3",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q8_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_K",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ3_XXS",
    "IQ1_S",
    "IQ4_NL",
    "IQ3_S",
    "IQ2_S",
    "IQ4_XS",
    "I8",
    "I16",
    "I32",
    "I64",
    "F64",
    "IQ1_M",
    "BF16",
    "Q4_0_4_4",
    "Q4_0_4_8",
    "Q4_0_8_8",
    "TQ1_0",
    "TQ2_0",
    "IQ4_NL_4_4",
    "IQ4_NL_4_8",
    "IQ4_NL_8_8",
    "MXFP4",
];

/// How a tensor type stores its elements: blocks of `elements` values in `bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    /// Values per block.
    pub elements: usize,
    /// Bytes per block.
    pub bytes: usize,
}

impl GgmlType {
    /// 32-bit floats.
    pub const F32: GgmlType = GgmlType(0);
    /// IEEE half floats.
    pub const F16: GgmlType = GgmlType(1);
    /// 4-bit, symmetric: blocks of 32 with an f16 scale.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// 4-bit with a minimum: blocks of 32 with an f16 scale and an f16 minimum.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// 5-bit, symmetric: blocks of 32 with an f16 scale.
    pub const Q5_0: GgmlType = GgmlType(6);
    /// 5-bit with a minimum: blocks of 32 with an f16 scale and minimum.
    pub const Q5_1: GgmlType = GgmlType(7);
    /// 8-bit: blocks of 32 with an f16 scale.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// 4-bit k-quant: super-blocks of 256 in 8 sub-blocks with 6-bit scales and minimums.
    pub const Q4_K: GgmlType = GgmlType(12);
    /// 5-bit k-quant: super-blocks of 256 in 8 sub-blocks with 6-bit scales and minimums.
    pub const Q5_K: GgmlType = GgmlType(13);
    /// 6-bit k-quant: super-blocks of 256 in 16 sub-blocks with 8-bit scales.
    pub const Q6_K: GgmlType = GgmlType(14);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType(30);

    /// Every type [`crate::dequant::dequantize`] reads.
    pub const SUPPORTED: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The block layout of a supported type; `None` for the others.
    pub fn layout(self) -> Option<BlockLayout> {
        let (elements, bytes) = match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 2 + 16),
            GgmlType::Q4_1 => (32, 2 + 2 + 16),
            GgmlType::Q5_0 => (32, 2 + 4 + 16),
            GgmlType::Q5_1 => (32, 2 + 2 + 4 + 16),
            GgmlType::Q8_0 => (32, 2 + 32),
            GgmlType::Q4_K => (256, 2 + 2 + 12 + 128),
            GgmlType::Q5_K => (256, 2 + 2 + 12 + 32 + 128),
            GgmlType::Q6_K => (256, 128 + 64 + 16 + 2),
            _ => return None,
        };
        Some(BlockLayout { elements, bytes })
    }

    /// The supported types' names, comma-separated, for error messages.
    pub fn supported_list() -> String {
        GgmlType::SUPPORTED.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match GGML_TYPE_NAMES.get(self.0 as usize) {
            Some(name) => f.write_str(name),
            None => write!(f, "ggml type {}", self.0),
        }
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` varies fastest (the columns of a matrix).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major order (as PyTorch and safetensors write it): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Size of the data in bytes, for a supported type whose rows are whole blocks.
    pub fn n_bytes(&self) -> Option<u64> {
        let layout = self.ty.layout()?;
        let row = *self.dims.first().unwrap_or(&1);
        row.is_multiple_of(layout.elements as u64).then(|| self.n_elements() / layout.elements as u64 * layout.bytes as u64)
    }
}

/// A parsed GGUF file: its metadata and tensor descriptions (the data stays on disk).
#[derive(Debug)]
pub struct Gguf {
    /// The file.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data (`general.alignment`).
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_start: u64,
}

/// Value type ids of the GGUF format.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Deepest nesting of arrays accepted (GGUF writers produce at most 2).
const MAX_ARRAY_DEPTH: usize = 8;

/// A reader of the header that knows its position and the file's size, so that a read past
/// the end is reported as a truncated file (with the offset) before anything is allocated.
struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > self.len.saturating_sub(self.pos) {
            bail!("truncated file: {n} bytes needed at offset {} but the file has {} bytes", self.pos, self.len);
        }
        let mut buf = vec![0; n as usize];
        self.inner.read_exact(&mut buf).with_context(|| format!("reading {n} bytes at offset {}", self.pos))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N as u64)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let at = self.pos;
        String::from_utf8(self.bytes(len)?).with_context(|| format!("the string at offset {at} is not UTF-8"))
    }

    /// Smallest encoded size of a value of type `ty`, to bound array lengths by the file size.
    fn min_size(ty: u32) -> u64 {
        match ty {
            value_type::U8 | value_type::I8 | value_type::BOOL => 1,
            value_type::U16 | value_type::I16 => 2,
            value_type::U32 | value_type::I32 | value_type::F32 => 4,
            value_type::ARRAY => 12,
            _ => 8,
        }
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            value_type::U8 => Value::U8(self.array::<1>()?[0]),
            value_type::I8 => Value::I8(i8::from_le_bytes(self.array()?)),
            value_type::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            value_type::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            value_type::U32 => Value::U32(self.u32()?),
            value_type::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            value_type::U64 => Value::U64(self.u64()?),
            value_type::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            value_type::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            value_type::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            value_type::BOOL => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => bail!("bad BOOL value {other} at offset {}", self.pos - 1),
            },
            value_type::STRING => Value::String(self.string()?),
            value_type::ARRAY => {
                ensure!(depth < MAX_ARRAY_DEPTH, "arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {}", self.pos);
                let item_ty = self.u32()?;
                let count = self.u64()?;
                let need = count.saturating_mul(Self::min_size(item_ty));
                if need > self.len.saturating_sub(self.pos) {
                    bail!(
                        "truncated file: an array of {count} values needs at least {need} bytes at offset {} but the file has {} bytes",
                        self.pos,
                        self.len
                    );
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            other => bail!("unknown value type {other} at offset {}", self.pos - 4),
        })
    }
}

impl Gguf {
    /// Reads the header, metadata and tensor descriptions of the GGUF file at `path`. Errors
    /// name the file and what was being read (a metadata key, a tensor).
    pub fn open(path: &Path) -> Result<Gguf> {
        Self::parse(path).with_context(|| format!("reading GGUF file {}", path.display()))
    }

    fn parse(path: &Path) -> Result<Gguf> {
        let file = File::open(path).context("opening it")?;
        let file_len = file.metadata()?.len();
        let mut r = Reader { inner: BufReader::with_capacity(1 << 20, file), pos: 0, len: file_len };

        let magic = r.array::<4>().context("reading the magic number")?;
        ensure!(&magic == MAGIC, "not a GGUF file: it starts with {magic:?}, not \"GGUF\"");
        let version = r.u32()?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            bail!("big-endian GGUF files are not supported");
        }
        ensure!(version == 2 || version == 3, "GGUF version {version} is not supported (only versions 2 and 3)");
        let n_tensors = r.u64().context("reading the tensor count")?;
        let n_kv = r.u64().context("reading the metadata count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string().with_context(|| format!("reading the key of metadata entry {i} of {n_kv}"))?;
            let value = r.u32().and_then(|ty| r.value(ty, 0)).with_context(|| format!("reading metadata `{key}`"))?;
            ensure!(metadata.insert(key.clone(), value).is_none(), "metadata key `{key}` appears twice");
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => bail!("general.alignment must be a power of two, found {v:?}"),
            },
        };

        let mut tensors: Vec<TensorInfo> = Vec::new();
        for i in 0..n_tensors {
            let name = r.string().with_context(|| format!("reading the name of tensor {i} of {n_tensors}"))?;
            let info = (|| {
                let n_dims = r.u32()?;
                ensure!((1..=4).contains(&n_dims), "{n_dims} dimensions (ggml tensors have 1 to 4)");
                let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
                let ty = GgmlType(r.u32()?);
                let offset = r.u64()?;
                ensure!(offset.is_multiple_of(alignment), "offset {offset} is not a multiple of the alignment {alignment}");
                Ok(TensorInfo { name: name.clone(), dims, ty, offset })
            })()
            .with_context(|| format!("reading the description of tensor `{name}`"))?;
            ensure!(tensors.iter().all(|t| t.name != name), "tensor `{name}` appears twice");
            tensors.push(info);
        }

        let data_start = r.pos.div_ceil(alignment) * alignment;
        let gguf = Gguf { path: path.to_path_buf(), version, metadata, tensors, alignment, data_start };
        for t in &gguf.tensors {
            if let Some(n_bytes) = t.n_bytes() {
                let end = gguf.data_start + t.offset + n_bytes;
                ensure!(
                    end <= file_len,
                    "truncated file: tensor `{}` ({} {:?}) needs bytes {}..{end} but the file has {file_len} bytes",
                    t.name,
                    t.ty,
                    t.dims,
                    gguf.data_start + t.offset
                );
            }
        }
        Ok(gguf)
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn typed<'a, T>(&'a self, key: &str, what: &str, convert: impl Fn(&'a Value) -> Option<T>) -> Result<Option<T>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => match convert(v) {
                Some(t) => Ok(Some(t)),
                None => bail!("{}: metadata `{key}` is a {}, expected {what}", self.path.display(), v.type_name()),
            },
        }
    }

    /// A non-negative integer of any integer type; an error if the key holds something else.
    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// A number of any numeric type; an error if the key holds something else.
    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    /// A string; an error if the key holds something else.
    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    /// A boolean; an error if the key holds something else.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a boolean", Value::as_bool)
    }

    /// An array; an error if the key holds something else.
    pub fn array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.typed(key, "an array", Value::as_array)
    }

    /// A required non-negative integer.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.u64(key)?.with_context(|| format!("{}: metadata `{key}` is missing", self.path.display()))
    }

    /// A required string.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.str(key)?.with_context(|| format!("{}: metadata `{key}` is missing", self.path.display()))
    }

    /// The description of tensor `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads the raw bytes of tensor `t` (of a supported type) from `file`, this GGUF file
    /// opened for reading.
    pub fn read_tensor(&self, file: &mut File, t: &TensorInfo) -> Result<Vec<u8>> {
        let n_bytes =
            t.n_bytes().with_context(|| format!("tensor `{}` has type {}, whose size is unknown", t.name, t.ty))?;
        let start = self.data_start + t.offset;
        let mut buf = vec![0; n_bytes as usize];
        file.seek(SeekFrom::Start(start)).and_then(|_| file.read_exact(&mut buf)).with_context(|| {
            format!("{}: reading tensor `{}` (bytes {start}..{})", self.path.display(), t.name, start + n_bytes)
        })?;
        Ok(buf)
    }
}
