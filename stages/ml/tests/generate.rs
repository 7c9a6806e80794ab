//! Generation on the real stories260K model: greedy decoding reproduces transformers'
//! `generate` (tests/data/stories260k_reference.json, "greedy"); batching, the KV cache, seeds,
//! nucleus sampling, stop strings, several samples per prompt and skipped prompts.

use std::path::PathBuf;

use haloflow::records::Message;
use haloflow_ml::generate::{Decoder, FinishReason, GenerateOptions, Generation, Generator, Progress, PromptIds, Skip};
use haloflow_ml::model::CausalLm;
use haloflow_ml::prompt_format::PromptFormat;
use haloflow_ml::tokenize::Tokenizer;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn model_dir() -> Option<PathBuf> {
    haloflow::shared::path("models/stories260K")
}

/// The model (f32 on the CPU) and its tokenizer.
fn load() -> Option<(CausalLm, Tokenizer)> {
    let dir = model_dir()?;
    Some((CausalLm::load(&dir, Device::Cpu, Kind::Float).unwrap(), Tokenizer::from_dir(&dir).unwrap().with_prompt_format(PromptFormat::Plain).unwrap()))
}

const STORIES: [&str; 5] = [
    "Once upon a time",
    "Lily and Ben went to the park. They saw",
    "The little dog was sad because",
    "Tom had a red ball",
    "One day, a big bird flew over the tall tree and",
];

/// Plain prompts (one user message each; stories260K has no chat template), keyed by index.
fn prompts(tok: &Tokenizer, texts: &[&str]) -> Vec<PromptIds> {
    texts
        .iter()
        .map(|text| PromptIds { key: text.to_string(), ids: tok.encode_prompt(&[Message::new("user", *text)]).unwrap() })
        .collect()
}

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens, temperature: 0.0, top_p: 1.0, n: 1, seed: 0, stop: vec![], batch_size: 8 }
}

fn run(model: &CausalLm, tok: &Tokenizer, prompts: &[PromptIds], options: &GenerateOptions) -> Generation {
    Generator::new(model, tok).generate(prompts, options, |_| {}).unwrap()
}

/// (prompt key, sample index, token ids) of every sample.
fn keyed(prompts: &[PromptIds], generation: &Generation) -> Vec<(String, usize, Vec<i64>)> {
    let mut out: Vec<_> = generation.samples.iter().map(|s| (prompts[s.prompt].key.clone(), s.sample_index, s.token_ids.clone())).collect();
    out.sort();
    out
}

#[test]
fn greedy_matches_transformers_generate() {
    let Some((model, tok)) = load() else { return };
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/stories260k_reference.json");
    let reference: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let greedy_ref = &reference["greedy"];
    let expected: Vec<i64> = serde_json::from_value(greedy_ref["ids"].clone()).unwrap();
    let prompt = prompts(&tok, &[greedy_ref["prompt"].as_str().unwrap()]);
    assert_eq!(prompt[0].ids, expected[..prompt[0].ids.len()], "the prompt tokenizes as in transformers (with BOS)");

    let generation = run(&model, &tok, &prompt, &greedy(40));
    let sample = &generation.samples[0];
    let ids: Vec<i64> = prompt[0].ids.iter().chain(&sample.token_ids).copied().collect();
    assert_eq!(ids, expected);
    // The completion starts with a comma, so it reads the same with or without the prompt
    // before it; transformers decodes the new tokens alone.
    assert_eq!(sample.text, greedy_ref["text"].as_str().unwrap());
    assert_eq!(sample.text, tok.decode(&sample.token_ids).unwrap());
    assert_eq!((sample.prompt_tokens, sample.token_ids.len(), sample.finish_reason), (5, 40, FinishReason::Length));
}

#[test]
fn a_completion_keeps_its_leading_space() {
    let Some((model, tok)) = load() else { return };
    let prompt = prompts(&tok, &["Once upon a time,"]);
    let sample = &run(&model, &tok, &prompt, &greedy(10)).samples[0];
    let alone = tok.decode(&sample.token_ids).unwrap();
    assert!(sample.text.starts_with(' ') && !alone.starts_with(' '), "{:?} vs {alone:?}", sample.text);
    assert_eq!(sample.text.trim_start(), alone);
}

#[test]
fn a_transcript_reply_is_the_text_after_the_assistant_separator() {
    let Some((model, _)) = load() else { return };
    let tok = Tokenizer::from_dir(&model_dir().unwrap()).unwrap();
    assert_eq!(tok.prompt_format(), PromptFormat::Transcript, "the default without a chat template");
    let prompt = prompts(&tok, &["Once upon a time"]);
    for sample in &run(&model, &tok, &prompt, &greedy(30)).samples {
        let joint = tok.decode(&[prompt[0].ids.as_slice(), &sample.token_ids].concat()).unwrap();
        let rendered = format!("\n\nHuman: Once upon a time\n\nAssistant: {}", sample.text);
        assert!(!sample.text.starts_with(' '), "the separator is not part of the reply: {:?}", sample.text);
        assert!(joint.starts_with(&rendered), "{joint:?} vs {rendered:?}");
        assert!(!sample.text.contains("\n\nHuman:"), "a reply ends before the next turn");
    }
}

#[test]
fn batched_greedy_equals_one_at_a_time() {
    let Some((model, tok)) = load() else { return };
    let prompts = prompts(&tok, &STORIES);
    let lengths: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
    assert!(lengths.iter().min() < lengths.iter().max(), "prompts of different lengths: {lengths:?}");
    let batched = run(&model, &tok, &prompts, &greedy(30));
    let single = run(&model, &tok, &prompts, &GenerateOptions { batch_size: 1, ..greedy(30) });
    assert_eq!(batched, single);
    assert_eq!(batched.samples.iter().map(|s| s.prompt).collect::<Vec<_>>(), [0, 1, 2, 3, 4], "input order");
}

#[test]
fn cached_decoding_matches_recomputing_the_whole_sequence() {
    let Some((model, tok)) = load() else { return };
    let _no_grad = tch::no_grad_guard();
    let mut seqs: Vec<Vec<i64>> = prompts(&tok, &STORIES[..4]).into_iter().map(|p| p.ids).collect();
    let refs: Vec<&[i64]> = seqs.iter().map(|s| s.as_slice()).collect();
    let (mut decoder, mut logits) = Decoder::prefill(&model.net, &refs, Device::Cpu);
    let mut rows: Vec<usize> = (0..seqs.len()).collect();
    let mut worst = 0f64;
    for step in 0..12 {
        let mut next = Vec::new();
        for (i, &row) in rows.iter().enumerate() {
            let full = model.net.forward(&Tensor::from_slice(&seqs[row]).unsqueeze(0));
            let expected = full.get(0).get(seqs[row].len() as i64 - 1);
            let diff = (logits.get(i as i64) - expected).abs().max().double_value(&[]);
            worst = worst.max(diff);
            assert!(diff < 1e-4, "step {step}, row {row}: max abs logit difference {diff}");
            let token = logits.get(i as i64).argmax(0, false).int64_value(&[]);
            seqs[row].push(token);
            next.push(token);
        }
        if step == 5 {
            // Drop rows 0 and 2 halfway, as generation drops finished rows.
            decoder.retain(&[1, 3]);
            rows = vec![1, 3];
            next = vec![next[1], next[3]];
        }
        logits = decoder.step(&next);
    }
    eprintln!("cached vs full recompute: max abs logit difference {worst:.2e}");
}

#[test]
fn seeded_sampling_is_reproducible_and_independent_of_batching() {
    let Some((model, tok)) = load() else { return };
    let all = prompts(&tok, &STORIES);
    let options = GenerateOptions { max_new_tokens: 24, temperature: 1.0, top_p: 0.9, n: 3, seed: 7, stop: vec![], batch_size: 8 };
    let reference = keyed(&all, &run(&model, &tok, &all, &options));
    assert_eq!(reference, keyed(&all, &run(&model, &tok, &all, &options)), "same seed, same samples");
    for batch_size in [1, 2, 5] {
        let generation = run(&model, &tok, &all, &GenerateOptions { batch_size, ..options.clone() });
        assert_eq!(keyed(&all, &generation), reference, "batch size {batch_size}");
    }
    // Other prompts in the batch, in another order: the shared prompts' samples do not change.
    let some: Vec<PromptIds> = [3, 0, 2].iter().map(|&i| all[i].clone()).collect();
    let subset = keyed(&some, &run(&model, &tok, &some, &options));
    assert!(subset.iter().all(|s| reference.contains(s)));
    // The samples of a prompt differ from each other, and another seed gives others.
    let first_prompt: Vec<&Vec<i64>> = reference.iter().filter(|s| s.0 == STORIES[1]).map(|s| &s.2).collect();
    assert!(first_prompt[0] != first_prompt[1] || first_prompt[1] != first_prompt[2]);
    let reseeded = keyed(&all, &run(&model, &tok, &all, &GenerateOptions { seed: 8, ..options.clone() }));
    assert_ne!(reseeded, reference);
}

#[test]
fn a_tiny_nucleus_is_greedy() {
    let Some((model, tok)) = load() else { return };
    let prompts = prompts(&tok, &STORIES);
    let tiny = GenerateOptions { temperature: 1.3, top_p: 1e-9, seed: 3, ..greedy(25) };
    let sampled = run(&model, &tok, &prompts, &tiny);
    let greedy = run(&model, &tok, &prompts, &greedy(25));
    assert_eq!(keyed(&prompts, &sampled), keyed(&prompts, &greedy));
}

#[test]
fn stop_strings_end_and_cut_the_text() {
    let Some((model, tok)) = load() else { return };
    let prompt = prompts(&tok, &["Once upon a time"]);
    // Greedy text: ", there was a little girl named Lily. She loved to play outside ..."
    let stop = vec!["play".to_string(), "girl named".to_string()];
    let sample = &run(&model, &tok, &prompt, &GenerateOptions { stop, ..greedy(40) }).samples[0];
    assert_eq!(sample.finish_reason, FinishReason::Stop);
    assert_eq!(sample.text, ", there was a little ");
    assert!(tok.decode(&sample.token_ids).unwrap().ends_with("girl named"), "decoding stops at the token that completes the stop string");
    // A stop string the text never holds changes nothing.
    let never = run(&model, &tok, &prompt, &GenerateOptions { stop: vec!["\n\nUser:".into()], ..greedy(40) });
    assert_eq!(never, run(&model, &tok, &prompt, &greedy(40)));
}

#[test]
fn generation_ends_at_a_stop_token() {
    let Some((model, tok)) = load() else { return };
    // stories260K (llama2.c) separates stories with BOS and never generates EOS, so give a
    // copy of its tokenizer a second stop id through generation_config.json: the full stop.
    let prompt = prompts(&tok, &["Once upon a time"]);
    let free = &run(&model, &tok, &prompt, &greedy(40)).samples[0];
    let period = *free.token_ids.iter().find(|&&id| tok.decode(&[id]).unwrap() == ".").expect("a full stop");
    let dir = std::env::temp_dir().join(format!("haloflow-generate-stop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir().unwrap().join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("generation_config.json"), format!(r#"{{"eos_token_id": [2, {period}]}}"#)).unwrap();
    let stopping = Tokenizer::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(stopping.stop_ids().contains(&period));

    let sample = &run(&model, &stopping, &prompt, &greedy(40)).samples[0];
    assert_eq!(sample.finish_reason, FinishReason::Eos);
    assert_eq!(sample.token_ids.last(), Some(&period), "the stop token is kept in the ids");
    assert_eq!(sample.token_ids[..], free.token_ids[..sample.token_ids.len()]);
    assert_eq!(sample.text, ", there was a little girl named Lily", "and left out of the text");
}

#[test]
fn several_samples_per_prompt_with_progress() {
    let Some((model, tok)) = load() else { return };
    let prompts = prompts(&tok, &STORIES[..3]);
    let options = GenerateOptions { max_new_tokens: 10, temperature: 0.8, top_p: 0.95, n: 4, seed: 1, stop: vec![], batch_size: 5 };
    let mut last = Progress::default();
    let generation = Generator::new(&model, &tok).generate(&prompts, &options, |p| last = *p).unwrap();
    let order: Vec<(usize, usize)> = generation.samples.iter().map(|s| (s.prompt, s.sample_index)).collect();
    let expected: Vec<(usize, usize)> = (0..3).flat_map(|p| (0..4).map(move |i| (p, i))).collect();
    assert_eq!(order, expected);
    let tokens: usize = generation.samples.iter().map(|s| s.token_ids.len()).sum();
    assert_eq!(last, Progress { tokens: tokens as u64, token_bound: tokens as u64, samples: 12 });
}

#[test]
fn prompts_that_do_not_fit_are_skipped() {
    let Some((model, tok)) = load() else { return };
    let mut prompts = prompts(&tok, &STORIES);
    prompts[1].ids.clear();
    // 512 positions: with 500 new tokens, prompts longer than 12 tokens do not fit.
    let options = greedy(500);
    let long: Vec<usize> = (0..5).filter(|&i| prompts[i].ids.len() > 12).collect();
    assert!(!long.is_empty() && long.len() < 4);
    let generation = run(&model, &tok, &prompts, &options);
    let skipped: Vec<usize> = generation.skipped.iter().map(|s| s.prompt).collect();
    for s in &generation.skipped {
        match s.prompt {
            1 => assert_eq!(s.reason, Skip::Empty),
            p => assert_eq!(s.reason, Skip::TooLong { tokens: prompts[p].ids.len(), limit: 12 }),
        }
    }
    let mut expected = vec![1];
    expected.extend(&long);
    expected.sort();
    assert_eq!(skipped, expected);
    assert_eq!(generation.samples.len(), 5 - skipped.len());
    let err = Generator::new(&model, &tok).generate(&prompts, &greedy(512), |_| {}).unwrap_err();
    assert!(err.to_string().contains("no room"), "{err}");
}
