//! Progress of one push, shared between the blob tasks that advance it and
//! whoever reports it (the terminal, or the coordinator session).

use std::{
    io::{IsTerminal, Write},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

#[derive(Debug, Default)]
pub struct Progress {
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
    bytes_uploaded: AtomicU64,
    blobs_total: AtomicU32,
    blobs_done: AtomicU32,
    blobs_uploaded: AtomicU32,
    blobs_mounted: AtomicU32,
    blobs_existing: AtomicU32,
}

/// A consistent-enough copy of the counters for display.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_uploaded: u64,
    pub blobs_total: u32,
    pub blobs_done: u32,
    pub blobs_uploaded: u32,
    pub blobs_mounted: u32,
    pub blobs_existing: u32,
}

/// How a blob reached the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobOutcome {
    Existing,
    Mounted,
    Uploaded,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub(crate) fn add_planned(&self, blobs: u32, bytes: u64) {
        self.blobs_total.fetch_add(blobs, Relaxed);
        self.bytes_total.fetch_add(bytes, Relaxed);
    }

    pub(crate) fn streamed(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Relaxed);
    }

    /// Takes back bytes of an attempt that failed and will be streamed again.
    pub(crate) fn rewind(&self, bytes: u64) {
        self.bytes_done.fetch_sub(bytes, Relaxed);
    }

    /// A blob is in the target; `streamed` bytes of it were already counted.
    pub(crate) fn finished(&self, outcome: BlobOutcome, size: u64, streamed: u64) {
        self.blobs_done.fetch_add(1, Relaxed);
        match outcome {
            BlobOutcome::Existing => self.blobs_existing.fetch_add(1, Relaxed),
            BlobOutcome::Mounted => self.blobs_mounted.fetch_add(1, Relaxed),
            BlobOutcome::Uploaded => {
                self.bytes_uploaded.fetch_add(size, Relaxed);
                self.blobs_uploaded.fetch_add(1, Relaxed)
            }
        };
        self.bytes_done.fetch_add(size.saturating_sub(streamed), Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bytes_total: self.bytes_total.load(Relaxed),
            bytes_done: self.bytes_done.load(Relaxed),
            bytes_uploaded: self.bytes_uploaded.load(Relaxed),
            blobs_total: self.blobs_total.load(Relaxed),
            blobs_done: self.blobs_done.load(Relaxed),
            blobs_uploaded: self.blobs_uploaded.load(Relaxed),
            blobs_mounted: self.blobs_mounted.load(Relaxed),
            blobs_existing: self.blobs_existing.load(Relaxed),
        }
    }
}

impl Snapshot {
    /// `42% 108.0/256.0 MB`, the form `kubectl get ib` and the terminal show.
    pub fn summary(&self) -> String {
        image_backup_proto::progress_summary(self.bytes_done, self.bytes_total)
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Prints progress to stderr until the returned handle is dropped: a line
/// redrawn in place on a terminal, a line every few seconds otherwise.
pub fn spawn_printer(progress: Arc<Progress>) -> PrinterGuard {
    let tty = std::io::stderr().is_terminal();
    let period = if tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
    let task = tokio::spawn(async move {
        let started = Instant::now();
        let mut interval = tokio::time::interval(period);
        interval.tick().await;
        loop {
            interval.tick().await;
            let s = progress.snapshot();
            let rate = mb(s.bytes_done) / started.elapsed().as_secs_f64().max(1e-3);
            let line = format!("{} at {rate:.1} MB/s, blobs {}/{}", s.summary(), s.blobs_done, s.blobs_total);
            let mut err = std::io::stderr().lock();
            let _ = if tty { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
            let _ = err.flush();
        }
    });
    PrinterGuard { task, tty }
}

pub struct PrinterGuard {
    task: tokio::task::JoinHandle<()>,
    tty: bool,
}

impl Drop for PrinterGuard {
    fn drop(&mut self) {
        self.task.abort();
        if self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}
