//! Terminal progress of a run: a spinner line per running stage, a line per finished stage, and
//! the final table. Without a terminal the same lines go to stderr as plain text.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::manifest::StageRecord;

/// Progress display of one run.
pub struct Progress {
    multi: MultiProgress,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// A display on stderr (hidden bars when stderr is not a terminal).
    pub fn new() -> Progress {
        Progress { multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()) }
    }

    /// Prints a line above the bars (or plainly without a terminal).
    pub fn line(&self, text: &str) {
        if self.multi.is_hidden() {
            eprintln!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }

    /// Starts a spinner for a running stage.
    pub fn start(&self, stage: &str, reason: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:<12} running {elapsed:>4}  {msg}").expect("valid template"),
        );
        bar.set_prefix(stage.to_string());
        bar.set_message(reason.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        if self.multi.is_hidden() {
            eprintln!("> {stage:<12} running: {reason}");
        }
        bar
    }

    /// Ends a stage's spinner with a summary line.
    pub fn finish(&self, bar: Option<ProgressBar>, record: &StageRecord) {
        if let Some(bar) = bar {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        let mark = match record.status {
            crate::manifest::Status::Ran => "✓",
            crate::manifest::Status::Cached => "·",
            _ => "✗",
        };
        let rows = primary_rows(record).map(|r| format!("  {} rows", thousands(r))).unwrap_or_default();
        let extra = match record.status {
            crate::manifest::Status::Failed | crate::manifest::Status::Skipped => {
                format!("  {}", record.reason.as_deref().unwrap_or_default().lines().next().unwrap_or_default())
            }
            _ => String::new(),
        };
        self.line(&format!("{mark} {:<12} {:<7} {:>7.2}s{rows}{extra}", record.name, record.status, record.duration_s));
    }
}

/// Rows of a stage's first table output.
pub fn primary_rows(record: &StageRecord) -> Option<u64> {
    record.outputs.values().find_map(|o| o.rows)
}

/// Formats an integer with thousands separators.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The final table of a run: stage, ran/cached, time, rows.
pub fn table(records: &[StageRecord]) -> String {
    let mut out = format!("{:<14} {:<8} {:>9} {:>10}\n", "stage", "status", "time", "rows");
    for r in records {
        let rows = primary_rows(r).map(thousands).unwrap_or_else(|| "-".into());
        out.push_str(&format!("{:<14} {:<8} {:>8.2}s {:>10}\n", r.name, r.status, r.duration_s, rows));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_separators() {
        assert_eq!(super::thousands(4708), "4,708");
        assert_eq!(super::thousands(100), "100");
        assert_eq!(super::thousands(1234567), "1,234,567");
    }
}
