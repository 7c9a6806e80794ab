//! Open-Assistant message trees: one `{"message_tree_id", "prompt": MESSAGE}` per line, where a
//! message has `role` (`prompter` or `assistant`), `text`, `deleted`, `synthetic`, `rank`
//! (assistant replies ranked by annotators, 0 = best) and `replies`.
//!
//! At every prompter message, the assistant replies that are neither deleted nor synthetic and
//! have a rank give one pair per (better, worse) combination; the prompt is the conversation
//! from the root down to that prompter message. Every non-deleted reply's subtree is walked,
//! synthetic ones included (only synthetic *replies* are kept out of the rankings).
//! Scores: `score_chosen`/`score_rejected` hold minus the rank, so the higher score is better.

use std::path::Path;

use anyhow::Result;
use haloflow::records::{prompt_id, Message, PairedRow};

use crate::format::Format;
use crate::output::{Collected, EMPTY_PROMPT, EMPTY_REPLY, IDENTICAL_REPLIES};
use crate::source::Field;

/// Skip reason: a deleted assistant reply (its subtree is not walked either).
pub const DELETED_REPLY: &str = "deleted_reply";
/// Skip reason: a synthetic (model-written) assistant reply.
pub const SYNTHETIC_REPLY: &str = "synthetic_reply";
/// Skip reason: an assistant reply without a rank.
pub const UNRANKED_REPLY: &str = "unranked_reply";
/// Skip reason: two ranked replies with the same rank (one count per tied combination).
pub const TIED_RANK: &str = "tied_rank";
/// Skip reason: a tree whose root prompt is deleted.
pub const DELETED_TREE: &str = "deleted_tree";
/// Note: synthetic prompter messages, which are kept in prompts.
pub const SYNTHETIC_PROMPTER_MESSAGES: &str = "synthetic_prompter_messages";
/// Note: deleted prompter messages, whose subtrees are not walked.
pub const DELETED_PROMPTER_MESSAGES: &str = "deleted_prompter_messages";
/// Note: trees without two differently ranked replies anywhere, so without any pair.
pub const TREES_WITHOUT_PAIRS: &str = "trees_without_pairs";

/// Imports Open-Assistant preference pairs from the message trees in `path`.
pub fn import(path: &Path, limit: Option<usize>) -> Result<Collected<PairedRow>> {
    let reasons = [
        DELETED_TREE,
        DELETED_REPLY,
        SYNTHETIC_REPLY,
        UNRANKED_REPLY,
        TIED_RANK,
        EMPTY_PROMPT,
        EMPTY_REPLY,
        IDENTICAL_REPLIES,
    ];
    Collected::read(path, &["message_tree_id", "prompt"], &reasons, limit, |record, out| {
        let root = Node::parse(record.root().get("prompt")?, "prompter")?;
        if root.deleted {
            out.skip(DELETED_TREE);
            return Ok(());
        }
        let mut walk = Walk { tree_id: record.loc.id(Format::Oasst.name()), pairs: 0, path: Vec::new(), out };
        walk.visit(&root)?;
        if walk.pairs == 0 {
            walk.out.note(TREES_WITHOUT_PAIRS);
        }
        Ok(())
    })
}

/// One message of a tree.
struct Node<'a> {
    field: Field<'a>,
    role: &'static str,
    text: &'a str,
    deleted: bool,
    synthetic: bool,
    rank: Option<f64>,
}

impl<'a> Node<'a> {
    /// Parses a message whose `role` must be `expected` (`prompter` or `assistant`).
    fn parse(field: Field<'a>, expected: &str) -> Result<Node<'a>> {
        let role_field = field.get("role")?;
        if role_field.str()? != expected {
            return Err(role_field.error(format!("expected \"{expected}\", found {:?}", role_field.str()?)));
        }
        let flag = |key| field.opt(key)?.map_or(Ok(false), |f| f.bool());
        Ok(Node {
            role: if expected == "prompter" { "user" } else { "assistant" },
            text: field.get("text")?.str()?,
            deleted: flag("deleted")?,
            synthetic: flag("synthetic")?,
            rank: field.opt("rank")?.map(|f| f.finite()).transpose()?,
            field,
        })
    }

    /// The replies, which alternate roles with this message.
    fn replies(&self) -> Result<Vec<Node<'a>>> {
        let expected = if self.role == "user" { "assistant" } else { "prompter" };
        let Some(replies) = self.field.opt("replies")? else { return Ok(Vec::new()) };
        replies.array()?.into_iter().map(|reply| Node::parse(reply, expected)).collect()
    }
}

/// The depth-first walk over one tree.
struct Walk<'o> {
    /// The id of the tree's line; its pairs are numbered after it.
    tree_id: String,
    pairs: usize,
    path: Vec<Message>,
    out: &'o mut Collected<PairedRow>,
}

impl Walk<'_> {
    fn visit(&mut self, node: &Node) -> Result<()> {
        self.path.push(Message::new(node.role, node.text));
        let replies = node.replies()?;
        if node.role == "user" {
            if node.synthetic {
                self.out.note(SYNTHETIC_PROMPTER_MESSAGES);
            }
            self.rank(&replies);
        }
        for reply in &replies {
            if !reply.deleted {
                self.visit(reply)?;
            } else if reply.role == "user" {
                self.out.note(DELETED_PROMPTER_MESSAGES);
            }
        }
        self.path.pop();
        Ok(())
    }

    /// Emits the pairs among the ranked replies to the prompter message ending `self.path`.
    fn rank(&mut self, replies: &[Node]) {
        let mut ranked = Vec::new();
        for reply in replies {
            match reply {
                Node { deleted: true, .. } => self.out.skip(DELETED_REPLY),
                Node { synthetic: true, .. } => self.out.skip(SYNTHETIC_REPLY),
                Node { rank: None, .. } => self.out.skip(UNRANKED_REPLY),
                Node { rank: Some(rank), text, .. } => ranked.push((*rank, *text)),
            }
        }
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        let id = prompt_id(&self.path);
        for (i, &(better, chosen)) in ranked.iter().enumerate() {
            for &(worse, rejected) in &ranked[i + 1..] {
                if better == worse {
                    self.out.skip(TIED_RANK);
                    continue;
                }
                self.out.push_pair(PairedRow {
                    prompt_id: id.clone(),
                    pair_id: format!("{}-{}", self.tree_id, self.pairs),
                    prompt: self.path.clone(),
                    chosen: chosen.to_string(),
                    rejected: rejected.to_string(),
                    score_chosen: Some(0.0 - better),
                    score_rejected: Some(0.0 - worse),
                    source: Some(Format::Oasst.name().to_string()),
                });
                self.pairs += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{nonzero, shared_file, temp_file, OASST};
    use serde_json::json;
    use std::collections::{BTreeMap, HashSet};

    fn reply(text: &str, rank: Option<u32>, replies: serde_json::Value) -> serde_json::Value {
        json!({"role": "assistant", "text": text, "rank": rank, "deleted": false, "synthetic": false, "replies": replies})
    }

    #[test]
    fn pairs_follow_ranks_at_every_level() {
        let mut deleted = reply("gone", Some(0), json!([]));
        deleted["deleted"] = json!(true);
        let mut synthetic = reply("bot", Some(0), json!([]));
        synthetic["synthetic"] = json!(true);
        let follow_up = json!([{"role": "prompter", "text": "why?", "replies": [
            reply("because", Some(1), json!([])), reply("since", Some(0), json!([])),
        ]}]);
        let tree = json!({"message_tree_id": "t", "prompt": {"role": "prompter", "text": "q", "synthetic": true, "replies": [
            reply("second", Some(1), json!([])),
            reply("first", Some(0), follow_up),
            reply("third", Some(2), json!([])),
            reply("unranked", None, json!([])),
            deleted, synthetic,
        ]}});
        let (_dir, path) = temp_file("trees.jsonl", &format!("{tree}\n"));
        let out = import(&path, None).unwrap();
        let got: Vec<(&str, &str, Option<f64>)> =
            out.rows.iter().map(|r| (r.chosen.as_str(), r.rejected.as_str(), r.score_chosen)).collect();
        assert_eq!(
            got,
            [
                ("first", "second", Some(0.0)),
                ("first", "third", Some(0.0)),
                ("second", "third", Some(-1.0)),
                ("since", "because", Some(0.0))
            ]
        );
        let deep = &out.rows[3];
        assert_eq!(
            deep.prompt,
            [Message::new("user", "q"), Message::new("assistant", "first"), Message::new("user", "why?")]
        );
        assert!(deep.pair_id.starts_with("oasst-") && deep.pair_id.ends_with("-1-3"), "{}", deep.pair_id);
        assert_eq!(deep.score_rejected, Some(-1.0));
        assert_eq!(
            nonzero(&out.skipped),
            BTreeMap::from([(DELETED_REPLY, 1), (SYNTHETIC_REPLY, 1), (UNRANKED_REPLY, 1)])
        );
        assert_eq!(out.notes, BTreeMap::from([(SYNTHETIC_PROMPTER_MESSAGES, 1)]));
    }

    #[test]
    fn bad_messages_name_the_path_in_the_tree() {
        let tree = json!({"message_tree_id": "t", "prompt": {"role": "prompter", "text": "q", "replies": [
            {"role": "assistant", "text": "a", "rank": "best"}]}});
        let (_dir, path) = temp_file("trees.jsonl", &format!("{tree}\n"));
        let err = import(&path, None).err().unwrap().to_string();
        assert!(
            err.ends_with("trees.jsonl:1: field \"prompt.replies[0].rank\": expected a number, found string"),
            "{err}"
        );
        let tree = json!({"message_tree_id": "t", "prompt": {"role": "prompter", "text": "q", "replies": [
            {"role": "prompter", "text": "a"}]}});
        let (_dir, path) = temp_file("trees.jsonl", &format!("{tree}\n"));
        let err = import(&path, None).err().unwrap().to_string();
        assert!(err.contains("field \"prompt.replies[0].role\": expected \"assistant\""), "{err}");
    }

    #[test]
    fn real_trees() {
        let Some(path) = shared_file(OASST) else { return };
        let path = path.as_path();
        let out = import(path, None).unwrap();
        assert_eq!(out.rows_read, 100);
        // Observed: 732 pairs; 17 synthetic and 46 unranked replies skipped; the 5 synthetic
        // root prompts only have synthetic replies, so they give no pair.
        assert!(out.rows.len() > 500, "{}", out.rows.len());
        let expected = [
            (DELETED_TREE, 0),
            (DELETED_REPLY, 0),
            (SYNTHETIC_REPLY, 17),
            (UNRANKED_REPLY, 46),
            (TIED_RANK, 0),
            (EMPTY_PROMPT, 0),
            (EMPTY_REPLY, 0),
            (IDENTICAL_REPLIES, 0),
        ];
        assert_eq!(out.skipped, BTreeMap::from(expected));
        assert_eq!(out.notes.get(SYNTHETIC_PROMPTER_MESSAGES), Some(&5));
        let ids: HashSet<&str> = out.rows.iter().map(|r| r.pair_id.as_str()).collect();
        assert_eq!(ids.len(), out.rows.len(), "pair ids are unique");
        for row in &out.rows {
            let (better, worse) = (row.score_chosen.unwrap(), row.score_rejected.unwrap());
            assert!(better > worse, "{}: chosen has the better rank", row.pair_id);
            assert_eq!(row.prompt.last().unwrap().role, "user");
            for (i, m) in row.prompt.iter().enumerate() {
                assert_eq!(m.role, if i % 2 == 0 { "user" } else { "assistant" });
            }
        }
        assert!(out.rows.iter().any(|r| r.prompt.len() > 1), "some pairs come from deeper levels");
    }
}
