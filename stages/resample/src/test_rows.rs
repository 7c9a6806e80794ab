//! Binary rows for the unit tests.

use haloflow::records::{BinaryRow, Message};

/// Example `e{id}` on prompt `p{prompt}` with a completion unique to the example.
pub fn row(id: usize, prompt: usize, label: bool) -> BinaryRow {
    BinaryRow {
        example_id: format!("e{id:03}"),
        prompt_id: format!("p{prompt:03}"),
        prompt: vec![Message::new("user", format!("question {prompt}"))],
        completion: format!("answer {id}"),
        label,
        weight: 1.0,
        source: None,
    }
}
