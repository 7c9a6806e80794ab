//! Reading input records: JSON lines (plain or gzip, detected by its magic bytes) and Parquet
//! rows, each with its 1-based line or row number, plus typed access to their fields whose
//! errors name the file, the line and the field, e.g.
//! `data.jsonl:17: field "chosen": expected a string, found number`.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type,
    UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Value};

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const PARQUET_MAGIC: &[u8] = b"PAR1";

/// Where a record came from: the file and its 1-based line (JSONL) or row (Parquet) number.
#[derive(Debug, Clone)]
pub struct Loc {
    /// The file as given on the command line.
    pub file: Rc<str>,
    /// The first 8 hex digits of the file's content hash: tells records of two source files apart.
    pub tag: Rc<str>,
    /// 1-based line (JSONL) or row (Parquet) number.
    pub line: usize,
}

impl Loc {
    /// The id of this record's row: `FORMAT-TAG-LINE`, unique across source files (ids made from
    /// the line alone repeated when two imports of one format were concatenated).
    pub fn id(&self, format: &str) -> String {
        format!("{format}-{}-{}", self.tag, self.line)
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One input record: a JSON value and where it came from.
pub struct Record {
    /// Location for error messages and ids.
    pub loc: Loc,
    /// The parsed line, or the Parquet row as a JSON object.
    pub value: Value,
}

impl Record {
    /// Typed access to the record's top-level value.
    pub fn root(&self) -> Field<'_> {
        Field { value: &self.value, loc: &self.loc, path: String::new() }
    }
}

/// A stream of records, stopped by the caller at the first error.
pub type Records = Box<dyn Iterator<Item = Result<Record>>>;

/// Opens the records of `path`: Parquet rows if it is a Parquet file (`.parquet` or `PAR1`
/// magic), else JSON lines, gunzipped if the file starts with the gzip magic. Only the columns
/// in `fields` are read from Parquet; blank JSONL lines are skipped. A progress bar follows
/// the bytes read from JSONL files.
pub fn records(path: &Path, fields: &[&str]) -> Result<Records> {
    let name: Rc<str> = path.display().to_string().into();
    let tag: Rc<str> = haloflow::hashing::hash_path(path)?[..8].into();
    let mut file = File::open(path).with_context(|| format!("opening {name}"))?;
    if is_parquet(path, &mut file).with_context(|| format!("reading {name}"))? {
        return parquet_rows(file, name, tag, fields);
    }
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = haloflow::stage_cli::progress(len, "reading").with_finish(indicatif::ProgressFinish::AndClear);
    let mut reader = BufReader::new(bar.wrap_read(file));
    let gzip = reader.fill_buf().with_context(|| format!("reading {name}"))?.starts_with(GZIP_MAGIC);
    let reader: Box<dyn BufRead> = if gzip {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else {
        Box::new(reader)
    };
    Ok(Box::new(JsonLines { file: name, tag, lines: reader.lines(), line: 0 }))
}

/// Whether `file` is Parquet: by the extension of `path`, else by its first four bytes.
/// Leaves the file positioned at its start.
fn is_parquet(path: &Path, file: &mut File) -> Result<bool> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
        return Ok(true);
    }
    let mut magic = Vec::with_capacity(PARQUET_MAGIC.len());
    file.by_ref().take(PARQUET_MAGIC.len() as u64).read_to_end(&mut magic)?;
    std::io::Seek::rewind(file)?;
    Ok(magic == PARQUET_MAGIC)
}

struct JsonLines {
    file: Rc<str>,
    tag: Rc<str>,
    lines: std::io::Lines<Box<dyn BufRead>>,
    line: usize,
}

impl Iterator for JsonLines {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            let text = self.lines.next()?;
            self.line += 1;
            let loc = Loc { file: self.file.clone(), tag: self.tag.clone(), line: self.line };
            let text = match text {
                Ok(text) => text,
                Err(err) => return Some(Err(anyhow!(err).context(format!("{loc}: reading")))),
            };
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            if text.trim().is_empty() {
                continue;
            }
            return Some(parse_line(text, &loc).map(|value| Record { loc, value }));
        }
    }
}

/// Parses one JSON line; the error gives the column (in characters) and a hint for Python's
/// `NaN`/`Infinity`, or says that the file is a Git LFS pointer rather than the data.
fn parse_line(text: &str, loc: &Loc) -> Result<Value> {
    serde_json::from_str(text).map_err(|err| {
        if loc.line == 1 && text.starts_with(haloflow::io::LFS_POINTER_START) {
            return anyhow!("{}: a Git LFS pointer, not the data: fetch the file (`git lfs pull`) and rerun", loc.file);
        }
        let message = err.to_string();
        let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
        let hint = if ["NaN", "Infinity"].iter().any(|t| text.contains(t)) {
            " (NaN and Infinity are not valid JSON numbers)"
        } else {
            ""
        };
        // serde_json counts bytes; people count characters.
        let bytes = err.column().saturating_sub(1).min(text.len());
        let column = text.char_indices().take_while(|(i, _)| *i < bytes).count() + 1;
        anyhow!("{loc}: malformed JSON at column {column}: {message}{hint}")
    })
}

fn parquet_rows(file: File, name: Rc<str>, tag: Rc<str>, fields: &[&str]) -> Result<Records> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{name}: not a Parquet file"))?;
    let roots: Vec<usize> = fields.iter().filter_map(|f| builder.schema().index_of(f).ok()).collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder.with_projection(mask).build().with_context(|| format!("{name}: reading Parquet"))?;
    Ok(Box::new(ParquetRows { file: name, tag, reader, batch: None, next_row: 0, rows_before: 0 }))
}

struct ParquetRows {
    file: Rc<str>,
    tag: Rc<str>,
    reader: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    next_row: usize,
    rows_before: usize,
}

impl Iterator for ParquetRows {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            if let Some(batch) = &self.batch {
                if self.next_row < batch.num_rows() {
                    let i = self.next_row;
                    self.next_row += 1;
                    let loc = Loc { file: self.file.clone(), tag: self.tag.clone(), line: self.rows_before + i + 1 };
                    return Some(row_object(batch, i, &loc).map(|value| Record { loc, value }));
                }
                self.rows_before += batch.num_rows();
            }
            match self.reader.next()? {
                Ok(batch) => {
                    self.batch = Some(batch);
                    self.next_row = 0;
                }
                Err(err) => {
                    return Some(Err(anyhow!(err).context(format!("{}: reading Parquet", self.file))))
                }
            }
        }
    }
}

/// Row `i` of a batch as a JSON object of its columns.
fn row_object(batch: &RecordBatch, i: usize, loc: &Loc) -> Result<Value> {
    let mut object = Map::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let value = cell(column.as_ref(), i).map_err(|data_type| {
            anyhow!("{loc}: field \"{}\": unsupported Parquet column type {data_type}", field.name())
        })?;
        object.insert(field.name().clone(), value);
    }
    Ok(Value::Object(object))
}

/// One Arrow value as JSON; strings, booleans, numbers, lists and structs are supported (the
/// error is the unsupported type). Non-finite floats become the strings `NaN`, `inf`, `-inf`,
/// which [`Field::finite`] reports as such.
fn cell(array: &dyn Array, i: usize) -> Result<Value, DataType> {
    macro_rules! number {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(i))
        };
    }
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match array.data_type() {
        DataType::Utf8 => Value::from(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(array.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(array.as_string_view().value(i)),
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => number!(Int8Type),
        DataType::Int16 => number!(Int16Type),
        DataType::Int32 => number!(Int32Type),
        DataType::Int64 => number!(Int64Type),
        DataType::UInt8 => number!(UInt8Type),
        DataType::UInt16 => number!(UInt16Type),
        DataType::UInt32 => number!(UInt32Type),
        DataType::UInt64 => number!(UInt64Type),
        DataType::Float32 => float(f64::from(array.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(i)),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let columns = array.as_struct().columns();
            let mut object = Map::new();
            for (field, column) in fields.iter().zip(columns) {
                object.insert(field.name().clone(), cell(column.as_ref(), i)?);
            }
            Value::Object(object)
        }
        other => return Err(other.clone()),
    })
}

fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or_else(|| Value::String(v.to_string()), Value::Number)
}

fn list(values: &dyn Array) -> Result<Value, DataType> {
    (0..values.len()).map(|j| cell(values, j)).collect::<Result<Vec<_>, _>>().map(Value::Array)
}

/// A JSON value inside a record with its path (`prompt.replies[2].rank`), for typed access
/// whose errors name the file, line and field.
#[derive(Debug, Clone)]
pub struct Field<'a> {
    /// The value itself.
    pub value: &'a Value,
    loc: &'a Loc,
    path: String,
}

impl<'a> Field<'a> {
    /// An error about this value: `FILE:LINE: field "PATH": MESSAGE`.
    pub fn error(&self, message: impl fmt::Display) -> anyhow::Error {
        if self.path.is_empty() {
            anyhow!("{}: {message}", self.loc)
        } else {
            anyhow!("{}: field \"{}\": {message}", self.loc, self.path)
        }
    }

    /// An error for a value of the wrong type: `expected WHAT, found TYPE`.
    pub fn expected(&self, what: &str) -> anyhow::Error {
        self.error(format!("expected {what}, found {}", type_name(self.value)))
    }

    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn object(&self) -> Result<&'a Map<String, Value>> {
        self.value.as_object().ok_or_else(|| self.expected("an object"))
    }

    /// Whether this is an object with a non-null `key`.
    pub fn has(&self, key: &str) -> bool {
        self.value.get(key).is_some_and(|v| !v.is_null())
    }

    /// The required member `key` of this object (it may still be null).
    pub fn get(&self, key: &str) -> Result<Field<'a>> {
        let path = self.child(key);
        match self.object()?.get(key) {
            Some(value) => Ok(Field { value, loc: self.loc, path }),
            None => Err(anyhow!("{}: field \"{path}\": missing", self.loc)),
        }
    }

    /// The optional member `key` of this object; absent and null are both `None`.
    pub fn opt(&self, key: &str) -> Result<Option<Field<'a>>> {
        let path = self.child(key);
        Ok(self.object()?.get(key).filter(|v| !v.is_null()).map(|value| Field { value, loc: self.loc, path }))
    }

    /// This value as a string.
    pub fn str(&self) -> Result<&'a str> {
        self.value.as_str().ok_or_else(|| self.expected("a string"))
    }

    /// This value as a boolean.
    pub fn bool(&self) -> Result<bool> {
        self.value.as_bool().ok_or_else(|| self.expected("a boolean (true or false)"))
    }

    /// This value as a finite number (`NaN` and infinities are refused by name).
    pub fn finite(&self) -> Result<f64> {
        match self.value {
            Value::Number(n) => n.as_f64().ok_or_else(|| self.expected("a number")),
            Value::String(s) if s.parse::<f64>().is_ok_and(|v| !v.is_finite()) => {
                Err(self.error(format!("expected a finite number, found {s}")))
            }
            _ => Err(self.expected("a number")),
        }
    }

    /// This value as an array of fields (`path[0]`, `path[1]`, ...).
    pub fn array(&self) -> Result<Vec<Field<'a>>> {
        let items = self.value.as_array().ok_or_else(|| self.expected("an array"))?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| Field { value, loc: self.loc, path: format!("{}[{i}]", self.path) })
            .collect())
    }
}

/// The JSON type of a value, for messages.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::temp_file;
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::Arc;

    fn read_all(path: &Path) -> Result<Vec<Record>> {
        records(path, &["a", "b"])?.collect()
    }

    #[test]
    fn json_lines_are_numbered_from_one_and_blank_lines_skipped() {
        let (_dir, path) = temp_file("in.jsonl", "{\"a\": 1}\n\n   \n{\"a\": 2}\n");
        let lines: Vec<usize> = read_all(&path).unwrap().iter().map(|r| r.loc.line).collect();
        assert_eq!(lines, [1, 4]);
    }

    #[test]
    fn gzip_is_detected_by_magic_not_extension() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"a\": \"x\"}\n{\"a\": \"y\"}\n").unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        let values: Vec<Value> = read_all(&path).unwrap().into_iter().map(|r| r.value).collect();
        assert_eq!(values, [serde_json::json!({"a": "x"}), serde_json::json!({"a": "y"})]);
    }

    #[test]
    fn malformed_json_names_file_line_and_column() {
        let (_dir, path) = temp_file("bad.jsonl", "{\"a\": 1}\n{\"a\": }\n");
        let err = read_all(&path).err().unwrap().to_string();
        assert!(err.contains("bad.jsonl:2: malformed JSON at column 7"), "{err}");
        let (_dir, path) = temp_file("nan.jsonl", "{\"a\": NaN}\n");
        let err = read_all(&path).err().unwrap().to_string();
        assert!(err.contains("nan.jsonl:1:") && err.contains("NaN and Infinity"), "{err}");
        // "é" and "…" are 2 and 3 bytes: the column counts characters.
        let (_dir, path) = temp_file("utf8.jsonl", "{\"é…\": }\n");
        let err = read_all(&path).err().unwrap().to_string();
        assert!(err.contains("utf8.jsonl:1: malformed JSON at column 8"), "{err}");
    }

    #[test]
    fn lfs_pointer_is_named_as_such() {
        let (_dir, path) = temp_file("train.jsonl", "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n");
        let err = read_all(&path).err().unwrap().to_string();
        assert!(err.contains("train.jsonl: a Git LFS pointer"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = read_all(Path::new("/nonexistent/x.jsonl")).err().unwrap();
        assert!(format!("{err:#}").contains("opening /nonexistent/x.jsonl"), "{err:#}");
    }

    #[test]
    fn field_errors_name_file_line_and_path() {
        let (_dir, path) = temp_file("data.jsonl", "\n{\"a\": 3, \"b\": [{\"c\": true}]}\n");
        let records = read_all(&path).unwrap();
        let root = records[0].root();
        let err = root.get("a").unwrap().str().unwrap_err().to_string();
        assert_eq!(err, format!("{}:2: field \"a\": expected a string, found number", path.display()));
        let item = &root.get("b").unwrap().array().unwrap()[0];
        let err = item.get("c").unwrap().finite().unwrap_err().to_string();
        assert!(err.ends_with(":2: field \"b[0].c\": expected a number, found boolean"), "{err}");
        let err = item.get("d").unwrap_err().to_string();
        assert!(err.ends_with(":2: field \"b[0].d\": missing"), "{err}");
        assert!(root.opt("zzz").unwrap().is_none() && root.has("a") && !root.has("zzz"));
    }

    #[test]
    fn parquet_rows_become_json_objects_with_nan_kept_visible() {
        use arrow_array::{Float64Array, StringArray};
        use arrow_schema::{Field as ArrowField, Schema};
        let dir = tempfile::tempdir().unwrap();
        let prompts = [vec![haloflow::records::Message::new("user", "hi")]];
        let schema = Arc::new(Schema::new(vec![
            ArrowField::new("a", haloflow::schema::messages_type(), false),
            ArrowField::new("b", DataType::Float64, true),
            ArrowField::new("ignored", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                haloflow::records::messages_array(prompts.iter().map(|p| p.as_slice())),
                Arc::new(Float64Array::from(vec![f64::NAN])),
                Arc::new(StringArray::from(vec!["x"])),
            ],
        )
        .unwrap();
        // No .parquet extension: detected by the PAR1 magic.
        let path = dir.path().join("rows.bin");
        haloflow::io::write_parquet(&path, &schema, &[batch], HashMap::new()).unwrap();
        let rows = read_all(&path).unwrap();
        assert_eq!(rows[0].value, serde_json::json!({"a": [{"role": "user", "content": "hi"}], "b": "NaN"}));
        assert_eq!(rows[0].loc.line, 1);
        let err = rows[0].root().get("b").unwrap().finite().unwrap_err().to_string();
        assert!(err.ends_with("rows.bin:1: field \"b\": expected a finite number, found NaN"), "{err}");
    }
}
