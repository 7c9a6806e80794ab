//! Keeping the API key out of text: answers, error reasons, logs and caches.

use serde_json::Value;

/// Shortest piece of a key that [`redact`] recognises on its own.
const MIN_KEY_PIECE_CHARS: usize = 8;

/// Longest server error text kept in an error reason, in characters.
pub const ERROR_TEXT_CHARS: usize = 200;

/// `text` with the key, and every piece of it of [`MIN_KEY_PIECE_CHARS`] or more characters
/// (a prefix left by a cut, a suffix, any part), replaced by `[REDACTED]`.
pub fn redact(text: &str, key: &str) -> String {
    let text: Vec<char> = text.chars().collect();
    let key: Vec<char> = key.chars().collect();
    // hidden[i]: character i of the text belongs to a piece of the key.
    let mut hidden = vec![false; text.len()];
    if key.len() >= MIN_KEY_PIECE_CHARS {
        for start in 0..text.len() {
            for from in 0..key.len() {
                let len = text[start..].iter().zip(&key[from..]).take_while(|(a, b)| a == b).count();
                if len >= MIN_KEY_PIECE_CHARS {
                    hidden[start..start + len].iter_mut().for_each(|h| *h = true);
                }
            }
        }
    } else if !key.is_empty() {
        for start in 0..text.len().saturating_sub(key.len() - 1) {
            if text[start..start + key.len()] == key[..] {
                hidden[start..start + key.len()].iter_mut().for_each(|h| *h = true);
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.iter().enumerate() {
        if !hidden[i] {
            out.push(*c);
        } else if i == 0 || !hidden[i - 1] {
            out.push_str("[REDACTED]");
        }
    }
    out
}

/// The `error.message` of an error body, or the body itself, passed through `redact` and then
/// shortened to [`ERROR_TEXT_CHARS`]: redacted before the cut, so a key straddling the cut is
/// still recognised.
pub fn error_text(body: &str, redact: impl Fn(&str) -> String) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    let message = redact(&message);
    let mut short: String = message.chars().take(ERROR_TEXT_CHARS).collect();
    if short.len() < message.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_the_key_are_redacted_wherever_they_are() {
        const KEY: &str = "sk-live-0123456789abcdef";
        assert_eq!(redact("key sk-live-0123456789abcdef!", KEY), "key [REDACTED]!");
        assert_eq!(redact("cut at sk-live-0123…", KEY), "cut at [REDACTED]…", "a prefix left by a cut");
        assert_eq!(redact("tail 456789abcdef.", KEY), "tail [REDACTED].", "a suffix");
        assert_eq!(redact("sk-live-012 and sk-live", KEY), "[REDACTED] and sk-live", "8 characters or more");
        assert_eq!(redact("no secret here", KEY), "no secret here");
        assert_eq!(redact("short key abc, abc", "abc"), "short key [REDACTED], [REDACTED]", "a short key is matched whole");
        assert_eq!(redact("é sk-live-01234 ü", KEY), "é [REDACTED] ü", "characters, not bytes");
    }

    #[test]
    fn error_bodies_are_read_redacted_and_cut() {
        let keep = |m: &str| m.to_string();
        assert_eq!(error_text(r#"{"error":{"message":"Rate limit reached"}}"#, keep), "Rate limit reached");
        assert_eq!(error_text("  <html>bad gateway</html>\n", keep), "<html>bad gateway</html>");
        assert_eq!(error_text(&"x".repeat(500), keep).chars().count(), ERROR_TEXT_CHARS + 1);
        // A key escaped in the JSON body is redacted once decoded, before the cut.
        let key = "sk-live-0123456789abcdef";
        let body = format!(r#"{{"error":{{"message":"{}sk-live-0123456789abcdef"}}}}"#, "y".repeat(190));
        let text = error_text(&body, |m| redact(m, key));
        assert!(text.ends_with("[REDACTED]") && !text.contains("sk-live"), "{text}");
    }
}
