//! The output of streaming tasks (`llm`) while they run: what the agents'
//! `Chunk` messages carried so far, per task, and who reads it live.
//!
//! Owned by the scheduler's event loop (no locks). A chunk counts only in
//! order: `seq` is the next one expected for the task's current attempt.
//! One sent twice (QoS 1 after a reconnect) is dropped; one past a gap is
//! dropped and counted, and the reader fills the rest from the task's
//! result. A new attempt (the task moved to another node) starts again at
//! 0, and readers are told, so they can skip what they already passed on.

use std::collections::HashMap;
use tokio::sync::mpsc;

/// Most text kept per task for `GET /v1/tasks/{id}` (`output`); chunks
/// past it still reach live readers.
pub const MAX_KEPT_BYTES: usize = 1 << 20;
/// Chunks a live reader may fall behind before it is dropped (it then
/// takes the rest from the result). A chunk carries at most 16 KiB (the
/// agent's `CHUNK_MAX_BYTES`), so a reader holds at most 1 MiB.
pub const READER_BOUND: usize = 64;

/// What a live reader of a task's output receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// The next piece of text.
    Text(String),
    /// The task went to another node: its text starts again from nothing.
    Restart,
}

#[derive(Default)]
struct TaskStream {
    attempt: u32,
    next_seq: u32,
    text: String,
    /// Past [`MAX_KEPT_BYTES`]: `text` is kept no further (a hole in it
    /// would make it a wrong prefix for late readers).
    truncated: bool,
    readers: Vec<mpsc::Sender<StreamEvent>>,
}

/// The streams of every open task that sent output or has readers.
#[derive(Default)]
pub struct Streams {
    by_task: HashMap<String, TaskStream>,
    /// Chunks dropped because one before them was missing.
    pub gaps: u64,
    /// Chunks dropped because they came twice.
    pub duplicates: u64,
}

impl Streams {
    /// A chunk of attempt `attempt` of task `id`, from the device that holds it.
    pub fn chunk(&mut self, id: &str, attempt: u32, seq: u32, text: String) {
        let s = self.by_task.entry(id.to_string()).or_default();
        if s.attempt != attempt {
            if s.attempt != 0 || !s.text.is_empty() {
                s.readers
                    .retain(|r| r.try_send(StreamEvent::Restart).is_ok());
            }
            s.attempt = attempt;
            s.next_seq = 0;
            s.text.clear();
            s.truncated = false;
        }
        if seq < s.next_seq {
            self.duplicates += 1;
            return;
        }
        if seq > s.next_seq {
            self.gaps += 1;
            // At powers of two: a device that keeps sending an old
            // attempt's chunks must not flood the log.
            if self.gaps.is_power_of_two() {
                log::warn!(
                    "task {id}: output chunk {seq} arrived while {} was expected; dropped (the \
                     result holds the whole output; {} such chunk(s) so far)",
                    s.next_seq,
                    self.gaps
                );
            }
            return;
        }
        s.next_seq += 1;
        if !s.truncated && s.text.len() + text.len() <= MAX_KEPT_BYTES {
            s.text.push_str(&text);
        } else {
            s.truncated = true;
        }
        // A reader that fell behind is dropped: its channel closes and it
        // takes the rest from the result.
        s.readers
            .retain(|r| r.try_send(StreamEvent::Text(text.clone())).is_ok());
    }

    /// A live reader of task `id`'s output: it gets the text so far first.
    pub fn subscribe(&mut self, id: &str) -> mpsc::Receiver<StreamEvent> {
        let (tx, rx) = mpsc::channel(READER_BOUND);
        let s = self.by_task.entry(id.to_string()).or_default();
        if !s.text.is_empty() {
            let _ = tx.try_send(StreamEvent::Text(s.text.clone()));
        }
        s.readers.retain(|r| !r.is_closed());
        s.readers.push(tx);
        rx
    }

    /// The text so far of an open task, if it sent any.
    pub fn text(&self, id: &str) -> Option<&str> {
        self.by_task
            .get(id)
            .map(|s| s.text.as_str())
            .filter(|t| !t.is_empty())
    }

    /// The task ended: its readers' channels close (they read the result).
    pub fn end(&mut self, id: &str) {
        self.by_task.remove(id);
    }

    /// Keeps only the streams of tasks `open` says are open (after the
    /// scheduler replaced its tasks by the store's).
    pub fn retain(&mut self, open: impl Fn(&str) -> bool) {
        self.by_task.retain(|id, _| open(id));
    }

    /// Open streams (for tests and health).
    pub fn len(&self) -> usize {
        self.by_task.len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.by_task.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut mpsc::Receiver<StreamEvent>) -> Vec<StreamEvent> {
        let mut v = Vec::new();
        while let Ok(e) = rx.try_recv() {
            v.push(e);
        }
        v
    }

    #[test]
    fn chunks_count_in_order_once_and_a_new_attempt_starts_again() {
        let mut s = Streams::default();
        s.chunk("t", 1, 0, "Hel".into());
        let mut r = s.subscribe("t");
        s.chunk("t", 1, 1, "lo".into());
        s.chunk("t", 1, 1, "lo".into()); // sent twice after a reconnect
        s.chunk("t", 1, 3, "?".into()); // past a gap
        assert_eq!(s.text("t"), Some("Hello"));
        assert_eq!((s.duplicates, s.gaps), (1, 1));
        assert_eq!(
            drain(&mut r),
            vec![
                StreamEvent::Text("Hel".into()),
                StreamEvent::Text("lo".into())
            ]
        );
        // The node was lost; attempt 2 elsewhere.
        s.chunk("t", 2, 0, "Hi".into());
        assert_eq!(s.text("t"), Some("Hi"));
        assert_eq!(
            drain(&mut r),
            vec![StreamEvent::Restart, StreamEvent::Text("Hi".into())]
        );
        s.end("t");
        assert!(r.try_recv().is_err() && r.is_closed());
        assert!(s.is_empty());
    }

    #[test]
    fn a_reader_that_falls_behind_is_dropped_not_waited_for() {
        let mut s = Streams::default();
        let mut r = s.subscribe("t");
        for i in 0..(READER_BOUND as u32 + 10) {
            s.chunk("t", 1, i, "x".into());
        }
        assert_eq!(drain(&mut r).len(), READER_BOUND);
        assert!(r.is_closed());
        assert_eq!(s.text("t").unwrap().len(), READER_BOUND + 10);
    }
}
