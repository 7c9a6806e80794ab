//! Dequantization of ggml tensor data to `f32`, block by block, as ggml's
//! `dequantize_row_*` functions do (same arithmetic, in the same order, in `f32`).
//!
//! Block layouts (ggml-common.h; `d`, `m`, `dmin` are IEEE half floats):
//!
//! | type | elements | layout | value |
//! |---|---|---|---|
//! | Q4_0 | 32 | `d`, 16 bytes of nibbles | `(q − 8)·d` |
//! | Q4_1 | 32 | `d`, `m`, 16 bytes of nibbles | `q·d + m` |
//! | Q5_0 | 32 | `d`, 4 bytes of 5th bits, 16 bytes of nibbles | `(q − 16)·d` |
//! | Q5_1 | 32 | `d`, `m`, 4 bytes of 5th bits, 16 bytes of nibbles | `q·d + m` |
//! | Q8_0 | 32 | `d`, 32 × `i8` | `q·d` |
//! | Q4_K | 256 | `d`, `dmin`, 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles | `d·sc·q − dmin·m` per 32 |
//! | Q5_K | 256 | as Q4_K, plus 32 bytes of 5th bits before the nibbles | `d·sc·q − dmin·m` per 32 |
//! | Q6_K | 256 | 128 bytes of low nibbles, 64 bytes of high 2 bits, 16 × `i8` scales, `d` | `d·sc·(q − 32)` per 16 |
//!
//! In the 32-element types the low nibbles of the 16 bytes are elements 0..15 and the high
//! nibbles elements 16..31; bit `j` of the 5th bits belongs to element `j`.

use anyhow::{bail, ensure, Result};
use half::{bf16, f16};

use crate::gguf::GgmlType;

/// Dequantizes `data`, a whole number of blocks of type `ty`, to `f32`. Fails for a type
/// outside [`GgmlType::SUPPORTED`] (listing those) or data that is not whole blocks.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Result<Vec<f32>> {
    let Some(layout) = ty.layout() else {
        bail!("type {ty} is not supported (supported: {})", GgmlType::supported_list());
    };
    ensure!(data.len().is_multiple_of(layout.bytes), "{} bytes are not whole {ty} blocks of {} bytes", data.len(), layout.bytes);
    let mut out = vec![0f32; data.len() / layout.bytes * layout.elements];
    let block: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = half(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        _ => unreachable!("every type with a layout has a block function"),
    };
    for (b, y) in data.chunks_exact(layout.bytes).zip(out.chunks_exact_mut(layout.elements)) {
        block(b, y);
    }
    Ok(out)
}

/// The half float at byte `at` of `b`.
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block: 4 bytes of 5th bits (`u32`), then 16 nibble bytes.
fn five_bit(b: &[u8]) -> impl Iterator<Item = (usize, u8, u8)> + '_ {
    let qh = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    b[4..20].iter().enumerate().map(move |(j, &q)| {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        (j, (q & 0x0F) | h0, (q >> 4) | h1)
    })
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (j, x0, x1) in five_bit(&b[2..]) {
        y[j] = (x0 as i32 - 16) as f32 * d;
        y[j + 16] = (x1 as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (j, x0, x1) in five_bit(&b[4..]) {
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = q as i8 as f32 * d;
    }
}

/// Scale and minimum of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K/Q5_K block
/// (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    };
    (sc as f32, m as f32)
}

/// Q4_K and Q5_K: `high` holds the 32 bytes of 5th bits of Q5_K (`None` for Q4_K).
fn k_quant_4_5(b: &[u8], high: Option<&[u8]>, qs: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    for (chunk, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for l in 0..32 {
            let (h1, h2) = match high {
                Some(qh) => ((qh[l] & u1 != 0) as u8 * 16, (qh[l] & u2 != 0) as u8 * 16),
                None => (0, 0),
            };
            y[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    k_quant_4_5(b, None, &b[16..144], y);
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    k_quant_4_5(b, Some(&b[16..48]), &b[48..176], y);
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for n in 0..2 {
        let (ql, qh, sc, y) = (&ql[64 * n..], &qh[32 * n..], &scales[8 * n..], &mut y[128 * n..]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let sc = |k: usize| sc[is + k] as i8 as f32;
            y[l] = d * sc(0) * q1 as f32;
            y[l + 32] = d * sc(2) * q2 as f32;
            y[l + 64] = d * sc(4) * q3 as f32;
            y[l + 96] = d * sc(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// 16 nibble bytes holding `lo[j]` in the low and `hi[j]` in the high nibble of byte `j`.
    fn nibbles(lo: impl Fn(usize) -> u8, hi: impl Fn(usize) -> u8) -> Vec<u8> {
        (0..16).map(|j| lo(j) | (hi(j) << 4)).collect()
    }

    #[test]
    fn q4_0_block() {
        // Element j < 16 is the low nibble j, element j + 16 the high nibble: q = j and 15 − j.
        let block = [h(0.5).as_slice(), &nibbles(|j| j as u8, |j| 15 - j as u8)].concat();
        let y = dequantize(GgmlType::Q4_0, &block).unwrap();
        let expected: Vec<f32> =
            (0..16).map(|j| (j as f32 - 8.0) * 0.5).chain((0..16).map(|j| (7.0 - j as f32) * 0.5)).collect();
        assert_eq!(y, expected);
        assert_eq!((y[0], y[8], y[16], y[31]), (-4.0, 0.0, 3.5, -4.0));
    }

    #[test]
    fn q4_1_block() {
        let block = [h(0.25).as_slice(), &h(-1.5), &nibbles(|j| j as u8, |_| 15)].concat();
        let y = dequantize(GgmlType::Q4_1, &block).unwrap();
        let expected: Vec<f32> = (0..16).map(|j| j as f32 * 0.25 - 1.5).chain([15.0 * 0.25 - 1.5; 16]).collect();
        assert_eq!(y, expected);
    }

    #[test]
    fn q8_0_block() {
        let qs: Vec<u8> = (0..32).map(|j| (j as i8 * 4 - 64) as u8).collect();
        let block = [h(-0.125).as_slice(), &qs].concat();
        let y = dequantize(GgmlType::Q8_0, &block).unwrap();
        let expected: Vec<f32> = (0..32).map(|j| (j as f32 * 4.0 - 64.0) * -0.125).collect();
        assert_eq!(y, expected);
        assert_eq!((y[0], y[31]), (8.0, -7.5));
    }

    #[test]
    fn q5_blocks_take_the_fifth_bit_per_element() {
        // Fifth bit set for elements 1 and 17 only; nibbles all 3.
        let qh = (1u32 << 1 | 1 << 17).to_le_bytes();
        let qs = nibbles(|_| 3, |_| 3);
        let y0 = dequantize(GgmlType::Q5_0, &[h(2.0).as_slice(), &qh, &qs].concat()).unwrap();
        let y1 = dequantize(GgmlType::Q5_1, &[h(2.0).as_slice(), &h(1.0), &qh, &qs].concat()).unwrap();
        for j in 0..32 {
            let q = if j == 1 || j == 17 { 19.0 } else { 3.0 };
            assert_eq!(y0[j], (q - 16.0) * 2.0, "Q5_0 element {j}");
            assert_eq!(y1[j], q * 2.0 + 1.0, "Q5_1 element {j}");
        }
    }

    #[test]
    fn float_types_and_several_blocks() {
        let f32s = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>();
        assert_eq!(dequantize(GgmlType::F32, &f32s).unwrap(), [1.5, -2.0]);
        assert_eq!(dequantize(GgmlType::F16, &[h(0.5), h(-3.0)].concat()).unwrap(), [0.5, -3.0]);
        assert_eq!(dequantize(GgmlType::BF16, &[0x80, 0x3f, 0x00, 0xc0]).unwrap(), [1.0, -2.0]);
        let two = [[h(1.0).as_slice(), &[0x88; 16]].concat(), [h(2.0).as_slice(), &[0x99; 16]].concat()].concat();
        assert_eq!(dequantize(GgmlType::Q4_0, &two).unwrap(), [[0.0; 32], [2.0; 32]].concat());
    }

    #[test]
    fn k_quant_sub_block_scales() {
        // Q4_K: sub-block j (0..8) has scale j + 1 and minimum 2j; every nibble is 5.
        let (sc, m): (Vec<u8>, Vec<u8>) = (0..8).map(|j| (j as u8 + 1, 2 * j as u8)).unzip();
        let mut packed = [0u8; 12];
        for j in 0..4 {
            packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            packed[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
        }
        let block = [h(0.5).as_slice(), &h(0.25), &packed, &[0x55; 128]].concat();
        let y = dequantize(GgmlType::Q4_K, &block).unwrap();
        for (i, v) in y.iter().enumerate() {
            let j = i / 32;
            assert_eq!(*v, 0.5 * sc[j] as f32 * 5.0 - 0.25 * m[j] as f32, "Q4_K element {i}");
        }
        // Q6_K: scales 1..=16 per 16 elements, every 6-bit value 33 (low nibble 1, high bits 2).
        let block = [vec![0x11; 128], vec![0xAA; 64], (1..=16).collect(), h(0.5).to_vec()].concat();
        let y = dequantize(GgmlType::Q6_K, &block).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, 0.5 * (i / 16 + 1) as f32, "Q6_K element {i}");
        }
    }

    /// Random blocks of every supported type, dequantized by gguf-py (llama.cpp's NumPy
    /// implementation): tests/data/gguf_dequant_reference.json, made by
    /// ci/parity/make_gguf_dequant_reference.py. The arithmetic is the same, so the values are
    /// bit-identical.
    #[test]
    fn matches_gguf_py() {
        let reference: serde_json::Value =
            serde_json::from_str(include_str!("../tests/data/gguf_dequant_reference.json")).unwrap();
        let cases = reference["cases"].as_array().unwrap();
        assert_eq!(cases.len(), GgmlType::SUPPORTED.len());
        for case in cases {
            let name = case["type"].as_str().unwrap();
            let ty = *GgmlType::SUPPORTED.iter().find(|t| t.to_string() == name).unwrap();
            let hex = case["bytes"].as_str().unwrap();
            let bytes: Vec<u8> =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            let expected: Vec<f32> =
                case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let got = dequantize(ty, &bytes).unwrap();
            assert_eq!(got.len(), expected.len(), "{name}");
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(g.to_bits(), e.to_bits(), "{name} element {i}: {g} vs gguf-py {e}");
            }
        }
    }

    #[test]
    fn unsupported_types_and_partial_blocks_are_refused() {
        let err = dequantize(GgmlType(10), &[0; 84]).unwrap_err().to_string();
        assert!(err.contains("Q2_K is not supported") && err.contains("F32, F16, BF16, Q4_0, Q4_1"), "{err}");
        let err = dequantize(GgmlType::Q8_0, &[0; 35]).unwrap_err().to_string();
        assert!(err.contains("35 bytes are not whole Q8_0 blocks of 34 bytes"), "{err}");
    }
}
