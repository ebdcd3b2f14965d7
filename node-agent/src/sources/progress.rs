//! Download progress in the logs: a line when a file starts, one per quarter of it (or every
//! few seconds when the size is unknown), and one when it ends — never one per network chunk.

use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(5);

/// Progress of one file.
#[derive(Debug)]
pub(crate) struct ProgressLog {
    uri: String,
    file: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last: Instant,
    /// Quarters already reported.
    quarter: u64,
}

impl ProgressLog {
    pub fn start(uri: &str, file: &str, total: Option<u64>) -> Self {
        tracing::info!(source = %uri, file = %file, total_bytes = total, "download started");
        let now = Instant::now();
        ProgressLog {
            uri: uri.to_owned(),
            file: file.to_owned(),
            total,
            done: 0,
            started: now,
            last: now,
            quarter: 0,
        }
    }

    pub fn advance(&mut self, bytes: u64) {
        self.done = self.done.saturating_add(bytes);
        let now = Instant::now();
        let report = match self.total {
            Some(total) if total > 0 => {
                let quarter = self.done.saturating_mul(4) / total;
                let crossed = quarter > self.quarter && quarter < 4;
                if crossed {
                    self.quarter = quarter;
                }
                crossed || now.duration_since(self.last) >= EVERY
            }
            _ => now.duration_since(self.last) >= EVERY,
        };
        if report {
            self.last = now;
            tracing::info!(
                source = %self.uri,
                file = %self.file,
                bytes = self.done,
                total_bytes = self.total,
                "downloading"
            );
        }
    }

    pub fn finish(&self) {
        tracing::info!(
            source = %self.uri,
            file = %self.file,
            bytes = self.done,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "download finished"
        );
    }
}
