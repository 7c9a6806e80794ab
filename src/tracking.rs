//! Live metrics for people watching a run: a JSON-lines file appended and flushed per step,
//! and TensorBoard event files (scalars, plus the run's hyperparameters for TensorBoard's
//! HParams dashboard), written with no TensorFlow: TFRecord framing with masked CRC-32C and
//! the few protobuf messages TensorBoard reads, encoded by hand.
//!
//! Under `halo run` the runner gives each stage `HALO_TRACKING_DIR` =
//! `WORK_DIR/tracking/PIPELINE/STAGE`, so `tensorboard --logdir WORK_DIR/tracking` shows
//! every stage of every pipeline in the work dir as it trains.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Map, Value};

/// The environment variable naming a stage's tracking directory.
pub const TRACKING_DIR_ENV: &str = "HALO_TRACKING_DIR";

/// Appends a run's metrics to `metrics.jsonl` and a TensorBoard event file in one directory.
pub struct Tracker {
    jsonl: BufWriter<File>,
    events: BufWriter<File>,
}

impl Tracker {
    /// Starts a run in `dir` (created if needed): a new event file
    /// (`events.out.tfevents.SECONDS.HOST.PID.haloflow`) with the file version and the
    /// hyperparameters, and `metrics.jsonl` opened for appending (a resumed run continues it).
    pub fn create(dir: &Path, hparams: &Map<String, Value>) -> Result<Tracker> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = unix_seconds();
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
        let name = format!("events.out.tfevents.{}.{host}.{}.haloflow", now as u64, std::process::id());
        let path = dir.join(name);
        let events = BufWriter::new(File::create(&path).with_context(|| format!("creating {}", path.display()))?);
        let jsonl_path = dir.join("metrics.jsonl");
        let jsonl = OpenOptions::new().create(true).append(true).open(&jsonl_path).with_context(|| format!("opening {}", jsonl_path.display()))?;
        let mut tracker = Tracker { jsonl: BufWriter::new(jsonl), events };
        tracker.record(&event(now, 0, Some("brain.Event:2"), None))?;
        tracker.record(&event(now, 0, None, Some(&hparams_summary(hparams, now))))?;
        tracker.flush()?;
        Ok(tracker)
    }

    /// Logs one step's named values: a JSON line `{"step": N, "time": T, NAME: VALUE, ...}` and
    /// one TensorBoard scalar per value (tag = the name, e.g. `loss`, `rewards/chosen`).
    /// Non-finite values are left out of both. Flushed at once, so watchers see every step.
    pub fn log(&mut self, step: usize, values: &[(String, f64)]) -> Result<()> {
        let now = unix_seconds();
        let finite: Vec<&(String, f64)> = values.iter().filter(|(_, v)| v.is_finite()).collect();
        let mut line = Map::new();
        line.insert("step".into(), step.into());
        line.insert("time".into(), now.into());
        for (name, value) in &finite {
            line.insert(name.clone(), (*value).into());
        }
        serde_json::to_writer(&mut self.jsonl, &line)?;
        self.jsonl.write_all(b"\n")?;
        let mut summary = Vec::new();
        for (name, value) in &finite {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, name.as_bytes());
            put_fixed32(&mut v, 2, (*value as f32).to_bits());
            put_bytes(&mut summary, 1, &v);
        }
        self.record(&event(now, step as i64, None, Some(&summary)))?;
        self.flush()
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.events.write_all(&len)?;
        self.events.write_all(&masked_crc32c(&len).to_le_bytes())?;
        self.events.write_all(data)?;
        self.events.write_all(&masked_crc32c(data).to_le_bytes())?;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.events.flush().context("writing the TensorBoard event file")?;
        self.jsonl.flush().context("writing metrics.jsonl")
    }
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// An `Event`: wall_time (1), step (2), file_version (3) or summary (5).
fn event(wall_time: f64, step: i64, file_version: Option<&str>, summary: Option<&[u8]>) -> Vec<u8> {
    let mut e = Vec::new();
    put_fixed64(&mut e, 1, wall_time.to_bits());
    put_varint_field(&mut e, 2, step as u64);
    if let Some(v) = file_version {
        put_bytes(&mut e, 3, v.as_bytes());
    }
    if let Some(s) = summary {
        put_bytes(&mut e, 5, s);
    }
    e
}

/// A `Summary` holding the HParams plugin's session-start record: `Summary.Value` with tag
/// `_hparams_/session_start_info` and metadata whose plugin data (`hparams`) is an
/// `HParamsPluginData { version: 0, session_start_info: { hparams, start_time_secs } }`.
fn hparams_summary(hparams: &Map<String, Value>, start: f64) -> Vec<u8> {
    let mut info = Vec::new();
    for (name, value) in hparams.iter().filter(|(_, v)| !v.is_null()) {
        // google.protobuf.Value: number_value (2), string_value (3), bool_value (4).
        let mut v = Vec::new();
        match value {
            Value::Number(n) => put_fixed64(&mut v, 2, n.as_f64().unwrap_or(f64::NAN).to_bits()),
            Value::Bool(b) => put_varint_field(&mut v, 4, *b as u64),
            Value::String(s) => put_bytes(&mut v, 3, s.as_bytes()),
            other => put_bytes(&mut v, 3, other.to_string().as_bytes()),
        }
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, name.as_bytes());
        put_bytes(&mut entry, 2, &v);
        put_bytes(&mut info, 1, &entry);
    }
    put_fixed64(&mut info, 5, start.to_bits());
    let mut plugin_content = Vec::new();
    put_varint_field(&mut plugin_content, 1, 0);
    put_bytes(&mut plugin_content, 3, &info);
    let mut plugin_data = Vec::new();
    put_bytes(&mut plugin_data, 1, b"hparams");
    put_bytes(&mut plugin_data, 2, &plugin_content);
    let mut metadata = Vec::new();
    put_bytes(&mut metadata, 1, &plugin_data);
    let mut value = Vec::new();
    put_bytes(&mut value, 1, b"_hparams_/session_start_info");
    put_bytes(&mut value, 9, &metadata);
    let mut summary = Vec::new();
    put_bytes(&mut summary, 1, &value);
    summary
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, (field as u64) << 3);
    put_varint(out, v);
}

fn put_fixed64(out: &mut Vec<u8>, field: u32, bits: u64) {
    put_varint(out, ((field as u64) << 3) | 1);
    out.extend_from_slice(&bits.to_le_bytes());
}

fn put_fixed32(out: &mut Vec<u8>, field: u32, bits: u32) {
    put_varint(out, ((field as u64) << 3) | 5);
    out.extend_from_slice(&bits.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, ((field as u64) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), bitwise.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc32c(b""), 0u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn protobuf_fields_encode_as_the_wire_format() {
        let mut out = Vec::new();
        put_varint_field(&mut out, 2, 300);
        assert_eq!(out, [0x10, 0xAC, 0x02]);
        let mut out = Vec::new();
        put_bytes(&mut out, 1, b"hi");
        assert_eq!(out, [0x0A, 2, b'h', b'i']);
    }

    #[test]
    fn records_are_framed_and_jsonl_lines_appended() {
        let dir = tempfile::tempdir().unwrap();
        let hparams: Map<String, Value> = serde_json::from_str(r#"{"loss": "kto", "beta": 0.1}"#).unwrap();
        let mut t = Tracker::create(dir.path(), &hparams).unwrap();
        t.log(1, &[("loss".into(), 0.5), ("eval/loss".into(), f64::NAN)]).unwrap();
        drop(t);
        let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
        assert_eq!((first["step"].as_u64(), first["loss"].as_f64(), first.get("eval/loss")), (Some(1), Some(0.5), None));
        let file = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().contains("tfevents")).unwrap();
        let bytes = std::fs::read(file).unwrap();
        let (mut at, mut records) = (0, 0);
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc32c(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc32c(data));
            at += 16 + len;
            records += 1;
        }
        assert_eq!(records, 3, "file version, hparams, one step");
    }
}
