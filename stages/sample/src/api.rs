//! The `openai` backend: samples from an OpenAI-compatible server (vLLM, llama.cpp's
//! `llama-server`, TGI, OpenAI) through haloflow-openai, with the judge's reliability: at most
//! `--concurrency` requests in flight, retries honouring `Retry-After`, answers cached as they
//! arrive (a rerun after a kill asks only what is missing) and the API key kept out of every
//! output, log and cache.
//!
//! Every sample is one request with `n = 1`: the `usage` of the answer gives the sample's own
//! `prompt_tokens` and `completion_tokens` (the `samples` schema needs both), and its seed is
//! drawn from `--seed`, the prompt_id and the sample index ([`sample_seed`]), as the local
//! backend draws each sample's random stream, so a sample does not depend on `--n` or on the
//! other prompts. A request's cache key is the hash of the endpoint's URL and the request body,
//! which holds everything that changes the answer (model, prompt or messages, temperature,
//! top_p, max_tokens, seed, stop).
//!
//! `--api-endpoint completions` (the default) sends the prompt rendered as a local run renders
//! it (`--prompt-format`; with `--model DIR` the directory's chat template), so the server
//! continues the same text the in-process backend would, and adds the format's stop strings (a
//! transcript stops at `"\n\nHuman:"`); the space a transcript puts before the reply is removed
//! from the answer, as locally. `chat` sends the messages and the server applies its own chat
//! template.
//!
//! Finish reasons: `length` is `length`; `stop` is `stop` when the server names the stop string
//! that ended the sample (vLLM's `stop_reason`), else `eos` (an end-of-sequence token; OpenAI
//! itself does not tell the two apart).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use haloflow_ml::generate::{FinishReason, GenerateOptions};
use haloflow_ml::prompt_format::PromptFormat;
use haloflow_ml::tokenize::Tokenizer;
use haloflow_openai::cache::{self, Cache, KeyHasher};
use haloflow_openai::client::Client;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sample::{extend, summary, write_outputs, Drawn, PromptRow};
use crate::{Args, Endpoint};

/// Bumped when the meaning of a cached answer changes.
const KEY_VERSION: &str = "halo-sample-cache-v1";

/// A server's answer to one request: what is cached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Answer {
    /// The completion as the server sent it (redacted).
    text: String,
    /// Why it ended.
    finish_reason: FinishReason,
    /// `usage.prompt_tokens`.
    prompt_tokens: usize,
    /// `usage.completion_tokens`.
    completion_tokens: usize,
}

/// One planned request.
struct Planned {
    row: usize,
    sample_index: usize,
    body: Value,
    key: String,
}

/// How prompts become the request's `prompt` (completions) or `messages` (chat).
enum Render {
    /// Messages as they are.
    Chat,
    /// Text in a format without a template (transcript, plain).
    Format(PromptFormat),
    /// Text from a local model directory's tokenizer (its chat template, or the format asked).
    Tokenizer(Box<Tokenizer>),
}

impl Render {
    fn new(args: &Args) -> Result<Render> {
        if args.api_endpoint == Endpoint::Chat {
            return Ok(Render::Chat);
        }
        match &args.model {
            Some(dir) => Ok(Render::Tokenizer(Box::new(args.format.tokenizer(dir)?))),
            None => match args.format.prompt_format {
                PromptFormat::Template => bail!(
                    "--prompt-format template with --api-endpoint completions needs --model DIR (a directory with the served \
                     model's tokenizer files and chat template); or use --api-endpoint chat to let the server apply its template"
                ),
                format => Ok(Render::Format(format.resolve(false)?)),
            },
        }
    }

    /// The format the reply follows (none for chat).
    fn format(&self) -> Option<PromptFormat> {
        match self {
            Render::Chat => None,
            Render::Format(format) => Some(*format),
            Render::Tokenizer(tok) => Some(tok.prompt_format()),
        }
    }

    /// The request fields that carry the prompt.
    fn prompt(&self, row: &PromptRow) -> Result<(&'static str, Value)> {
        Ok(match self {
            Render::Chat => ("messages", serde_json::to_value(&row.prompt)?),
            Render::Format(format) => ("prompt", json!(format.render(&row.prompt))),
            Render::Tokenizer(tok) => ("prompt", json!(tok.prompt_text(&row.prompt)?)),
        })
    }
}

impl Endpoint {
    /// The path under the base URL.
    fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat/completions",
        }
    }

    /// The name in the summary.
    fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }
}

/// The seed sent for sample `sample_index` of prompt `prompt_id`: drawn from `seed` and both, in
/// [0, 2^31) (every server's seed type holds it).
pub fn sample_seed(seed: u64, prompt_id: &str, sample_index: usize) -> u64 {
    let hash = KeyHasher::new("halo-sample-seed").field(&seed.to_le_bytes()).field(prompt_id.as_bytes()).field(&(sample_index as u64).to_le_bytes()).finish();
    u64::from_str_radix(&hash[..8], 16).expect("hex digits") & 0x7fff_ffff
}

/// The requests, one per prompt and sample index, in output order.
fn plan(rows: &[PromptRow], options: &GenerateOptions, render: &Render, model: &str, url: &str) -> Result<Vec<Planned>> {
    let mut stop = options.stop.clone();
    for s in render.format().map_or(&[][..], |f| f.stop_strings()) {
        if !stop.iter().any(|t| t == s) {
            stop.push(s.to_string());
        }
    }
    let mut planned = Vec::with_capacity(rows.len() * options.n);
    for (row, r) in rows.iter().enumerate() {
        let (field, prompt) = render.prompt(r).with_context(|| format!("prompt row {row} (prompt_id `{}`)", r.prompt_id))?;
        for sample_index in 0..options.n {
            let mut body = json!({
                "model": model,
                "max_tokens": options.max_new_tokens,
                "temperature": options.temperature,
                "top_p": options.top_p,
                "n": 1,
                "seed": sample_seed(options.seed, &r.prompt_id, sample_index),
            });
            body[field] = prompt.clone();
            if !stop.is_empty() {
                body["stop"] = json!(stop);
            }
            let key = KeyHasher::new(KEY_VERSION).field(url.as_bytes()).field(&serde_json::to_vec(&body)?).finish();
            planned.push(Planned { row, sample_index, body, key });
        }
    }
    Ok(planned)
}

/// Reads an answer: the first choice's text (`text`, or `message.content` for chat), its finish
/// reason and the usage. Its errors make the answer unreadable (retried by the client).
fn read_answer(endpoint: Endpoint, body: &str, redact: &dyn Fn(&str) -> String) -> Result<Answer> {
    let v: Value = serde_json::from_str(body).context("not JSON")?;
    let choice = v.pointer("/choices/0").context("no choices[0]")?;
    let text = match endpoint {
        Endpoint::Completions => choice.get("text"),
        Endpoint::Chat => choice.pointer("/message/content"),
    };
    let text = text.and_then(Value::as_str).with_context(|| {
        format!("choices[0] has no text (`{}`)", if endpoint == Endpoint::Chat { "message.content" } else { "text" })
    })?;
    let finish_reason = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("length") => FinishReason::Length,
        Some("stop" | "eos") if choice.get("stop_reason").is_some_and(Value::is_string) => FinishReason::Stop,
        Some("stop" | "eos") => FinishReason::Eos,
        other => bail!("choices[0].finish_reason {other:?} is neither stop nor length"),
    };
    let usage = |field: &str| {
        v.pointer(&format!("/usage/{field}")).and_then(Value::as_u64).map(|n| n as usize).with_context(|| format!("no usage.{field}"))
    };
    Ok(Answer { text: redact(text), finish_reason, prompt_tokens: usage("prompt_tokens")?, completion_tokens: usage("completion_tokens")? })
}

/// Runs the backend and writes the outputs.
pub fn run(args: &Args, rows: &[PromptRow], options: &GenerateOptions) -> Result<()> {
    if let Some(rv) = haloflow_dist::read_rendezvous(|k| std::env::var(k).ok())? {
        bail!(
            "--backend openai runs as one process (this is rank {} of {}): drop `ranks` and raise --concurrency instead",
            rv.rank,
            rv.world_size
        );
    }
    let api_model = args.api_model.clone().context("--backend openai needs --api-model (the served model's name, as the server's /v1/models lists it)")?;
    let model_id = args.model_id.clone().unwrap_or_else(|| api_model.clone());
    let client = Client::new(&args.client, concat!("haloflow-sample/", env!("CARGO_PKG_VERSION")))?;
    let render = Render::new(args)?;
    let endpoint = args.api_endpoint;
    let url = format!("{}/{}", client.base_url(), endpoint.path());
    let planned = plan(rows, options, &render, &api_model, &url)?;

    let cache_dir = cache::dir_from_env(args.cache_dir.as_deref(), "sample");
    let mut cache = Cache::<Answer>::open(&cache_dir)?;
    let mut todo: Vec<usize> = Vec::new();
    let mut queued = std::collections::HashSet::new();
    for (i, p) in planned.iter().enumerate() {
        if cache.get(&p.key).is_none() && queued.insert(p.key.as_str()) {
            todo.push(i);
        }
    }
    let base_url = client.redact(client.base_url());
    tracing::info!(base_url = %base_url, model = %api_model, endpoint = endpoint.name(), samples = planned.len(), cached = planned.len() - todo.len(), to_ask = todo.len(), "sampling");

    let started = Instant::now();
    let bar = haloflow::stage_cli::progress(todo.len() as u64, "sampling");
    let (mut retries, mut asked_tokens, mut appended) = (0u64, 0usize, 0usize);
    let asked = haloflow_openai::pool::run(
        todo.len(),
        client.concurrency(),
        |j| client.post(endpoint.path(), &planned[todo[j]].body, |text, redact| read_answer(endpoint, text, redact)),
        |j, result| {
            bar.inc(1);
            let p = &planned[todo[j]];
            let reply = result.with_context(|| {
                format!("prompt row {} (prompt_id `{}`), sample {}: {url}", p.row, rows[p.row].prompt_id, p.sample_index)
            })?;
            retries += u64::from(reply.retries);
            asked_tokens += reply.value.completion_tokens;
            cache.append(&p.key, &reply.value)?;
            appended += 1;
            haloflow::stage_cli::fault_point("after_samples", appended);
            Ok(())
        },
    );
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    asked.with_context(|| {
        format!(
            "no output written; the {appended} answer(s) received in this run are cached in {}: a rerun asks only for the rest",
            cache_dir.display()
        )
    })?;

    let format = render.format();
    let drawn: Vec<Drawn> = planned
        .iter()
        .map(|p| {
            let answer = cache.get(&p.key).context("an answer missing from the cache")?;
            let text = format.map_or(answer.text.as_str(), |f| f.strip_reply(&answer.text));
            Ok(Drawn {
                prompt: p.row,
                sample_index: p.sample_index,
                text: text.to_string(),
                prompt_tokens: answer.prompt_tokens,
                completion_tokens: answer.completion_tokens,
                finish_reason: answer.finish_reason,
            })
        })
        .collect::<Result<_>>()?;
    let mut summary = summary(rows, &drawn, &model_id, options, "openai");
    extend(
        &mut summary,
        json!({
            "base_url": base_url,
            "api_model": api_model,
            "api_endpoint": endpoint.name(),
            "prompt_format": format.map(|f| f.to_string()),
            "prompts_sampled": rows.len(),
            "skipped": 0,
            "skipped_examples": [],
            "requests": todo.len(),
            "retries": retries,
            "cache_hits": planned.len() - todo.len(),
            "cache_dir": cache_dir.display().to_string(),
            "concurrency": client.concurrency(),
            "seconds": seconds,
            "tokens_generated_by_requests": asked_tokens,
            "tokens_per_s": if todo.is_empty() { Value::Null } else { json!(asked_tokens as f64 / seconds.max(1e-9)) },
        }),
    );
    write_outputs(args, rows, &drawn, &model_id, &summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use haloflow::records::Message;

    fn keep(text: &str) -> String {
        text.to_string()
    }

    #[test]
    fn answers_are_read_with_their_finish_reason_and_usage() {
        let usage = r#""usage":{"prompt_tokens":7,"completion_tokens":3}"#;
        let completion = format!(r#"{{"choices":[{{"text":" Hi.","finish_reason":"stop","stop_reason":"\n\nHuman:"}}],{usage}}}"#);
        let a = read_answer(Endpoint::Completions, &completion, &keep).unwrap();
        assert_eq!(a, Answer { text: " Hi.".into(), finish_reason: FinishReason::Stop, prompt_tokens: 7, completion_tokens: 3 });
        let eos = format!(r#"{{"choices":[{{"message":{{"content":"Yo"}},"finish_reason":"stop","stop_reason":null}}],{usage}}}"#);
        assert_eq!(read_answer(Endpoint::Chat, &eos, &keep).unwrap().finish_reason, FinishReason::Eos);
        let long = format!(r#"{{"choices":[{{"text":"a","finish_reason":"length"}}],{usage}}}"#);
        assert_eq!(read_answer(Endpoint::Completions, &long, &|t| t.replace('a', "[R]")).unwrap().text, "[R]", "text is redacted");
        let error = |body: &str, endpoint| format!("{:#}", read_answer(endpoint, body, &keep).unwrap_err());
        assert!(error(&long, Endpoint::Chat).contains("no text (`message.content`)"));
        assert!(error(r#"{"choices":[{"message":{"content":null}}]}"#, Endpoint::Chat).contains("no text"));
        assert!(error("<html>", Endpoint::Completions).contains("not JSON"));
        assert!(error(r#"{"choices":[{"text":"a","finish_reason":"stop"}]}"#, Endpoint::Completions).contains("no usage.prompt_tokens"));
        assert!(error(&format!(r#"{{"choices":[{{"text":"a","finish_reason":"content_filter"}}],{usage}}}"#), Endpoint::Completions).contains("content_filter"));
    }

    #[test]
    fn seeds_differ_per_sample_and_prompt_and_fit_every_server() {
        let s = sample_seed(0, "p", 0);
        assert_eq!(s, sample_seed(0, "p", 0));
        assert!(s != sample_seed(0, "p", 1) && s != sample_seed(0, "q", 0) && s != sample_seed(1, "p", 0));
        assert!((0..100).all(|i| sample_seed(7, "p", i) < 1 << 31));
    }

    #[test]
    fn requests_carry_the_rendered_prompt_and_keys_follow_the_body() {
        let rows = vec![PromptRow { prompt_id: "a".into(), prompt: vec![Message::new("user", "Hi")] }];
        let options = GenerateOptions { max_new_tokens: 9, temperature: 0.5, top_p: 0.9, n: 2, seed: 3, stop: vec!["###".into()], batch_size: 1 };
        let transcript = Render::Format(PromptFormat::Transcript);
        let planned = plan(&rows, &options, &transcript, "m", "http://h/v1/completions").unwrap();
        assert_eq!(planned.len(), 2);
        let body = &planned[0].body;
        assert_eq!(body["prompt"], "\n\nHuman: Hi\n\nAssistant:");
        assert_eq!(body["stop"], json!(["###", "\n\nHuman:"]), "the transcript's stop string is added");
        assert_eq!((body["max_tokens"].as_u64(), body["n"].as_u64()), (Some(9), Some(1)));
        assert_ne!(planned[0].key, planned[1].key, "samples differ by seed");
        let chat = plan(&rows, &options, &Render::Chat, "m", "http://h/v1/chat/completions").unwrap();
        assert_eq!(chat[0].body["messages"], json!([{"role": "user", "content": "Hi"}]));
        assert_eq!(chat[0].body["stop"], json!(["###"]));
        let other_url = plan(&rows, &options, &transcript, "m", "http://other/v1/completions").unwrap();
        assert_ne!(planned[0].key, other_url[0].key);
        let hotter = GenerateOptions { temperature: 0.6, ..options };
        assert_ne!(planned[0].key, plan(&rows, &hotter, &transcript, "m", "http://h/v1/completions").unwrap()[0].key);
    }
}
