//! `halo-import-gguf` end to end on a hand-made tiny llama GGUF (no download needed): tensors in
//! F32, F16, BF16, Q8_0, Q4_0 and Q4_1 come out as the f32 values they encode, the query and
//! key rows un-permuted, under Hugging Face names; config.json, the rebuilt tokenizer (digit
//! split, special and added tokens, BOS from `add_bos_token`) and tokenizer_config.json; the
//! output replaces an old directory; and bad inputs fail naming the file and the tensor, leaving
//! no output behind.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{f32_bytes, gguf_bytes, read_json, read_safetensors, run_import, s, Tensor};
use half::{bf16, f16};
use halo_import_gguf::gguf::{GgmlType, Value};

const HIDDEN: usize = 32;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 64;
const TEMPLATE: &str = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}";

/// GPT-2's byte-to-character table of byte-level BPE: printable bytes stand for themselves,
/// the others for the characters from U+0100 on, in byte order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 0x100;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// Ids 0–3: `<|endoftext|>` (control, unknown), `<s>` (control, BOS), `</s>` (control, EOS),
/// `<tool>` (user-defined); 4–259: the bytes; then `Ġt`, `he`, `Ġthe`, `12`.
fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<s>", "</s>", "<tool>"].map(String::from).to_vec();
    tokens.extend(byte_chars().iter().map(|c| c.to_string()));
    tokens.extend(["Ġt", "he", "Ġthe", "12"].map(String::from));
    let mut types = vec![3, 3, 3, 4];
    types.resize(tokens.len(), 1);
    let merges = ["Ġ t", "h e", "Ġt he", "1 2"].map(String::from).to_vec();
    (tokens, types, merges)
}

fn byte_id(b: u8) -> u32 {
    4 + u32::from(b)
}

/// llama.cpp's permutation of query/key rows (`convert_hf_to_gguf.py`).
fn permute(data: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = data.len() / rows;
    let width = rows / heads;
    (0..rows)
        .flat_map(|r| {
            let hf = (r / width) * width + (r % width % 2) * (width / 2) + r % width / 2;
            data[hf * cols..(hf + 1) * cols].to_vec()
        })
        .collect()
}

fn matrix(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))).map(|(r, c)| f(r, c)).collect()
}

/// Q8_0 rows of one block each: scale 0.5, q = j − 16 + r. Returns (bytes, values).
fn q8_0(rows: usize) -> (Vec<u8>, Vec<f32>) {
    let q = |r: usize, j: usize| (j as i32 - 16 + r as i32) as i8;
    let bytes = (0..rows)
        .flat_map(|r| [f16::from_f32(0.5).to_le_bytes().to_vec(), (0..32).map(|j| q(r, j) as u8).collect()].concat())
        .collect();
    (bytes, matrix(rows, 32, |r, j| q(r, j) as f32 * 0.5))
}

/// Q4_0 rows of one block: scale (r + 1)/4, low nibble j = (j + r) % 16, high nibble j = 15 − j.
fn q4_0(rows: usize) -> (Vec<u8>, Vec<f32>) {
    let d = |r: usize| (r + 1) as f32 / 4.0;
    let lo = |r: usize, j: usize| ((j + r) % 16) as u8;
    let bytes = (0..rows)
        .flat_map(|r| {
            [f16::from_f32(d(r)).to_le_bytes().to_vec(), (0..16).map(|j| lo(r, j) | ((15 - j as u8) << 4)).collect()]
                .concat()
        })
        .collect();
    let values =
        matrix(
            rows,
            32,
            |r, j| if j < 16 { (lo(r, j) as f32 - 8.0) * d(r) } else { (15.0 - (j - 16) as f32 - 8.0) * d(r) },
        );
    (bytes, values)
}

/// Q4_1 rows of `cols / 32` blocks: scale 0.5, minimum −r/16, low nibbles j, high nibbles r % 16.
fn q4_1(rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let m = |r: usize| -(r as f32) / 16.0;
    let block = |r: usize| {
        [
            f16::from_f32(0.5).to_le_bytes().as_slice(),
            &f16::from_f32(m(r)).to_le_bytes(),
            &(0..16).map(|j| j as u8 | ((r % 16) as u8) << 4).collect::<Vec<_>>(),
        ]
        .concat()
    };
    let bytes = (0..rows).flat_map(|r| (0..cols / 32).flat_map(move |_| block(r))).collect();
    let values = matrix(rows, cols, |r, c| {
        let j = c % 32;
        let q = if j < 16 { j } else { r % 16 };
        q as f32 * 0.5 + m(r)
    });
    (bytes, values)
}

/// The tiny model's GGUF tensors and the Hugging Face tensors they must become.
fn model(vocab: usize) -> (Vec<Tensor>, HashMap<String, Vec<f32>>) {
    let mut expected = HashMap::new();
    let mut tensors = Vec::new();
    let mut add = |gguf: &str, hf: &str, dims: Vec<u64>, ty: GgmlType, data: Vec<u8>, values: Vec<f32>| {
        tensors.push(Tensor { name: gguf.into(), dims, ty, data });
        expected.insert(hf.to_string(), values);
    };
    let (h, v, q, kv, f) =
        (HIDDEN as u64, vocab as u64, (HEADS * HEAD_DIM) as u64, (KV_HEADS * HEAD_DIM) as u64, FFN as u64);

    let embed = matrix(vocab, HIDDEN, |r, c| ((r * HIDDEN + c) % 17) as f32 / 16.0 - 0.5);
    let embed_f16: Vec<u8> = embed.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
    add("token_embd.weight", "model.embed_tokens.weight", vec![h, v], GgmlType::F16, embed_f16, embed);
    let head = matrix(vocab, HIDDEN, |r, c| r as f32 * 0.01 + c as f32);
    add("output.weight", "lm_head.weight", vec![h, v], GgmlType::F32, f32_bytes(&head), head);
    let norm = |k: f32| matrix(1, HIDDEN, move |_, c| 1.0 + c as f32 * k);
    add("output_norm.weight", "model.norm.weight", vec![h], GgmlType::F32, f32_bytes(&norm(0.125)), norm(0.125));
    add(
        "blk.0.attn_norm.weight",
        "model.layers.0.input_layernorm.weight",
        vec![h],
        GgmlType::F32,
        f32_bytes(&norm(0.25)),
        norm(0.25),
    );
    add(
        "blk.0.ffn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        vec![h],
        GgmlType::F32,
        f32_bytes(&norm(0.5)),
        norm(0.5),
    );

    let wq = matrix(HEADS * HEAD_DIM, HIDDEN, |r, c| (r * 100 + c) as f32);
    add(
        "blk.0.attn_q.weight",
        "model.layers.0.self_attn.q_proj.weight",
        vec![h, q],
        GgmlType::F32,
        f32_bytes(&permute(&wq, HEADS * HEAD_DIM, HEADS)),
        wq,
    );
    let wk = matrix(KV_HEADS * HEAD_DIM, HIDDEN, |r, c| r as f32 - c as f32 / 4.0);
    let wk_bf16 =
        permute(&wk, KV_HEADS * HEAD_DIM, KV_HEADS).iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
    add("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", vec![h, kv], GgmlType::BF16, wk_bf16, wk);
    let (bytes, values) = q8_0(KV_HEADS * HEAD_DIM);
    add("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", vec![h, kv], GgmlType::Q8_0, bytes, values);
    let (bytes, values) = q4_0(HIDDEN);
    add(
        "blk.0.attn_output.weight",
        "model.layers.0.self_attn.o_proj.weight",
        vec![q, h],
        GgmlType::Q4_0,
        bytes,
        values,
    );
    let (bytes, values) = q4_1(FFN, HIDDEN);
    add("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", vec![h, f], GgmlType::Q4_1, bytes, values);
    let (bytes, values) = q8_0(FFN);
    add("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", vec![h, f], GgmlType::Q8_0, bytes, values);
    let down = matrix(HIDDEN, FFN, |r, c| (r as f32 - c as f32) / 8.0);
    let down_f16 = down.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
    add("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", vec![f, h], GgmlType::F16, down_f16, down);
    (tensors, expected)
}

fn metadata() -> Vec<(&'static str, Value)> {
    let (tokens, types, merges) = vocab();
    vec![
        ("general.architecture", s("llama")),
        ("general.name", s("tiny")),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Value::F32(500000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        ("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges", Value::Array(merges.iter().map(|m| s(m)).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ("tokenizer.chat_template", s(TEMPLATE)),
    ]
}

/// `metadata` with `key` set to `value`.
fn with(mut metadata: Vec<(&'static str, Value)>, key: &str, value: Value) -> Vec<(&'static str, Value)> {
    metadata.iter_mut().find(|(k, _)| *k == key).unwrap().1 = value;
    metadata
}

fn tiny_gguf(dir: &Path, metadata: &[(&str, Value)], tensors: &[Tensor]) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, gguf_bytes(3, metadata, tensors, 32)).unwrap();
    path
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn imports_a_tiny_llama() {
    let dir = tempfile::tempdir().unwrap();
    let n_tokens = vocab().0.len();
    let (tensors, expected) = model(n_tokens);
    let gguf = tiny_gguf(dir.path(), &metadata(), &tensors);
    let out = dir.path().join("model");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("stale.txt"), "from an earlier run").unwrap();
    let run = run_import(&gguf, &out);
    assert!(run.status.success(), "{}", stderr(&run));

    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(
        files,
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "no temporary directory left: {leftovers:?}");

    let weights = read_safetensors(&out.join("model.safetensors"));
    assert_eq!(weights.len(), expected.len());
    for (name, values) in &expected {
        let (shape, got) = &weights[name];
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        assert_eq!(got, values, "{name}");
    }
    assert_eq!(weights["model.layers.0.self_attn.q_proj.weight"].0, [HIDDEN, HIDDEN]);
    assert_eq!(weights["model.layers.0.self_attn.k_proj.weight"].0, [KV_HEADS * HEAD_DIM, HIDDEN]);
    assert_eq!(weights["model.layers.0.mlp.down_proj.weight"].0, [HIDDEN, FFN]);

    let config = read_json(&out, "config.json");
    let expect = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": n_tokens, "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
    });
    for (key, value) in expect.as_object().unwrap() {
        assert_eq!(&config[key], value, "config.json {key}");
    }
    assert_eq!(config.get("pad_token_id"), None, "no padding id in the file");
    assert_eq!(read_json(&out, "generation_config.json"), serde_json::json!({"bos_token_id": 1, "eos_token_id": 2}));

    let tc = read_json(&out, "tokenizer_config.json");
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str(), tc["unk_token"].as_str()),
        (Some("<s>"), Some("</s>"), Some("<|endoftext|>"))
    );
    assert_eq!(
        (&tc["add_bos_token"], &tc["add_eos_token"], &tc["chat_template"]),
        (&true.into(), &false.into(), &TEMPLATE.into())
    );
    assert_eq!(tc["model_max_length"], 256);
    assert_eq!(tc["added_tokens_decoder"]["3"]["special"], false, "user-defined token");
    assert_eq!(tc["added_tokens_decoder"]["1"]["special"], true);

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let text = "hi the 12<tool></s>";
    let enc = tok.encode(text, true).unwrap();
    let b = |c: u8| byte_id(c);
    // BOS first (add_bos_token); "12" stays two digits although the merge "1 2" exists.
    assert_eq!(enc.get_ids(), [1, b(b'h'), b(b'i'), 262, b(b' '), b(b'1'), b(b'2'), 3, 2]);
    assert_eq!(tok.decode(&enc.get_ids()[1..], false).unwrap(), text);
    assert_eq!(tok.encode("12", false).unwrap().get_ids(), [b(b'1'), b(b'2')]);
}

#[test]
fn failures_name_the_file_and_the_tensor_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let n_tokens = vocab().0.len();
    let out = dir.path().join("model");
    let check = |metadata: &[(&str, Value)], tensors: &[Tensor], expected: &[&str]| {
        let gguf = tiny_gguf(dir.path(), metadata, tensors);
        let run = run_import(&gguf, &out);
        let err = stderr(&run);
        assert!(!run.status.success());
        assert!(err.contains(&gguf.display().to_string()), "names the file: {err}");
        for e in expected {
            assert!(err.contains(e), "expected {e:?} in {err}");
        }
        assert!(!out.exists(), "no output after a failure");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing but the GGUF file");
    };

    let (mut tensors, _) = model(n_tokens);
    tensors.iter_mut().find(|t| t.name == "blk.0.attn_k.weight").unwrap().ty = GgmlType(10);
    check(
        &metadata(),
        &tensors,
        &[
            "tensor `blk.0.attn_k.weight` has type Q2_K, which is not supported",
            "supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K",
        ],
    );

    let (mut tensors, _) = model(n_tokens);
    tensors.push(Tensor { name: "rope_freqs.weight".into(), dims: vec![8], ty: GgmlType::F32, data: vec![0; 32] });
    check(&metadata(), &tensors, &["tensor `rope_freqs.weight` has no Hugging Face counterpart"]);

    let (mut tensors, _) = model(n_tokens);
    tensors.retain(|t| t.name != "blk.0.ffn_up.weight");
    check(&metadata(), &tensors, &["no tensor for `model.layers.0.mlp.up_proj.weight`"]);

    let (tensors, _) = model(n_tokens);
    check(
        &with(metadata(), "llama.feed_forward_length", Value::U32(48)),
        &tensors,
        &["tensor `blk.0.ffn_gate.weight` has shape [64, 32], expected [48, 32]"],
    );
    check(&with(metadata(), "general.architecture", s("qwen2")), &tensors, &["architecture `qwen2` is not supported"]);
    check(
        &with(metadata(), "tokenizer.ggml.pre", s("llama-bpe")),
        &tensors,
        &["tokenizer.ggml.pre `llama-bpe` is not supported"],
    );
    check(
        &with(metadata(), "tokenizer.ggml.model", s("llama")),
        &tensors,
        &["tokenizer.ggml.model `llama` is not supported"],
    );

    // A truncated file: the last tensor's data is cut short.
    let gguf = tiny_gguf(dir.path(), &metadata(), &tensors);
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() - 100]).unwrap();
    let run = run_import(&gguf, &out);
    let err = stderr(&run);
    assert!(!run.status.success() && err.contains("truncated file: tensor `blk.0.ffn_down.weight`"), "{err}");
    assert!(!out.exists());
}
