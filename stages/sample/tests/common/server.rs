//! The fake sampler: haloflow-openai's fake OpenAI-compatible server (its HTTP, counters and
//! fault markers `FAULT-429`, `FAULT-500`, `FAULT-DOWN`, `FAULT-ECHO`, ...) answering
//! `/v1/completions` and `/v1/chat/completions`.
//!
//! Every answer is `"seed <the request's seed> says hi"` (after a space on `/completions`, as a
//! model continuing `Assistant:` writes it), with `usage.prompt_tokens` the words of the prompt
//! text (the `prompt`, or the messages' contents) and `usage.completion_tokens` the words of the
//! answer. Markers in the prompt:
//!
//! | marker | behaviour |
//! |---|---|
//! | `STOPS` | finish_reason `stop` with vLLM's `stop_reason` `"\n\nHuman:"` (else `stop_reason` null: an EOS) |
//! | `LONG` | finish_reason `length` |
//! | `ECHO-KEY` | the answer also echoes the `Authorization` header |
//! | `NO-TEXT` | a choice without text |
//! | `GARBAGE` | a 200 whose body is not JSON |

use haloflow_openai::fake::{Answer, Config, FakeServer, Received};
use serde_json::{json, Value};

/// Starts a fake sampler on a free port of 127.0.0.1.
pub fn start(config: Config) -> FakeServer {
    FakeServer::start(config, answer)
}

/// The answer text for a request with this seed.
pub fn reply(seed: &Value) -> String {
    format!("seed {seed} says hi")
}

fn answer(request: &Received) -> Answer {
    let text = &request.text;
    if text.contains("GARBAGE") {
        return Answer::Raw("<html>502 Bad Gateway</html>".into());
    }
    let chat = request.path.ends_with("/chat/completions");
    let mut content = reply(&request.body["seed"]);
    if text.contains("ECHO-KEY") {
        content = format!("{content} (you sent {})", request.authorization.as_deref().unwrap_or("nothing"));
    }
    let words = |t: &str| t.split_whitespace().count();
    let usage = json!({"prompt_tokens": words(text), "completion_tokens": words(&content), "total_tokens": words(text) + words(&content)});
    let (finish_reason, stop_reason) = if text.contains("LONG") {
        ("length", Value::Null)
    } else if text.contains("STOPS") {
        ("stop", json!("\n\nHuman:"))
    } else {
        ("stop", Value::Null)
    };
    let mut choice = json!({"index": 0, "finish_reason": finish_reason, "stop_reason": stop_reason});
    if !text.contains("NO-TEXT") {
        if chat {
            choice["message"] = json!({"role": "assistant", "content": content});
        } else {
            choice["text"] = json!(format!(" {content}"));
        }
    }
    let object = if chat { "chat.completion" } else { "text_completion" };
    Answer::Ok(json!({"id": "cmpl-fake", "object": object, "model": request.body["model"], "choices": [choice], "usage": usage}))
}
