//! Shared by the integration tests: prompt fixtures and the fake OpenAI-compatible server.

pub mod server;

use std::path::Path;
use std::sync::Arc;

use arrow_array::{RecordBatch, StringArray};
use haloflow::records::{messages_array, Message};
use haloflow::schema;

/// Writes a `prompts` table: (prompt_id, user message) rows, no reference or category.
pub fn write_prompts(path: &Path, prompts: &[(&str, String)]) {
    let conversations: Vec<(&str, Vec<Message>)> =
        prompts.iter().map(|(id, text)| (*id, vec![Message::new("user", text.as_str())])).collect();
    write_conversations(path, &conversations);
}

/// Writes a `prompts` table: (prompt_id, messages) rows, no reference or category.
pub fn write_conversations(path: &Path, prompts: &[(&str, Vec<Message>)]) {
    let none = || Arc::new(StringArray::from(vec![None::<&str>; prompts.len()]));
    let batch = RecordBatch::try_new(
        schema::by_name(schema::PROMPTS).unwrap().arrow_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(prompts.iter().map(|(id, _)| *id))),
            messages_array(prompts.iter().map(|(_, m)| m.as_slice())),
            none(),
            none(),
        ],
    )
    .unwrap();
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], Default::default()).unwrap();
}
