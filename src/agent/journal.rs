//! The agent's durable state: accepted tasks, finished results and their
//! acknowledgements, as records in a [`crate::storage::Log`] under
//! `{data_dir}/journal/`.
//!
//! Replaying the records in order rebuilds three things:
//!
//! - **pending**: tasks accepted and not finished. They are run again after a
//!   restart (at least once: a plugin may have had its effect before the
//!   crash without its `Finished` being written). `Started` records say
//!   which of them were running when the agent died, and whether alone: the
//!   agent re-runs those one at a time, and fails one it died under while
//!   it ran alone instead of running it a third time (see `crate::agent`);
//! - **ledger**: the last `ledger_size` finished task ids, each with whether
//!   its result was a retryable failure, so a re-delivered id is answered or
//!   ignored, never re-run (unless the server retries a retryable failure).
//!   It holds no results: a result is kept (in the outbox) only until the
//!   server confirms it, and once confirmed the server never asks again, so
//!   the ledger costs its ids and the journal's snapshots stay the size of
//!   the unconfirmed results (issue 15, item 5);
//! - **outbox**: finished results the server has not confirmed, re-sent.
//!
//! Compaction writes the live state as a snapshot bracketed by
//! `SnapshotBegin`/`SnapshotEnd`, then deletes the older segments. Replay
//! applies every record in order, a snapshot's too (it restates the state
//! the records before it built), so a snapshot cut short by a crash or by
//! damage loses nothing after it.

use crate::protocol::TaskSpec;
use crate::storage::{FsyncPolicy, Log, LogOptions, Stats, StorageError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

/// First byte of every record payload; a record with another is skipped.
const FORMAT: u8 = 1;

/// Test hook: while the file this names exists, every journal fsync fails
/// (`tests/durability.rs`). Never set in production.
const FSYNC_FAULT_ENV: &str = "OPENCLAW_TEST_FAIL_FSYNC_WHILE";

/// One journal record. postcard-encoded after the [`FORMAT`] byte; add
/// variants only at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// Accepted from the server; written before the MQTT ack.
    Accepted(TaskSpec),
    /// Finished; `result` is the encoded `FromAgent::Finished` exactly as
    /// sent. `acked` is set in snapshots for results already confirmed.
    Finished {
        task_id: String,
        result: Vec<u8>,
        acked: bool,
    },
    /// The server confirmed this result.
    Acked { task_id: String },
    /// An accepted task handed back to the server (rejected) instead of run.
    Released { task_id: String },
    /// Start of a snapshot written by compaction.
    ///
    /// (Variants are matched by position: new ones go at the end.)
    SnapshotBegin,
    /// End of a complete snapshot.
    SnapshotEnd,
    /// The plugin of an accepted task is about to run; `alone` when nothing
    /// else runs beside it (the re-run of a task interrupted by a crash).
    Started { task_id: String, alone: bool },
    /// In snapshots: a task finished and its result confirmed, kept in the
    /// ledger without its result.
    Done { task_id: String, retryable: bool },
}

/// The state rebuilt at start.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovered {
    /// Accepted, not finished, in acceptance order.
    pub pending: Vec<TaskSpec>,
    /// Finished ids, oldest first, at most `ledger_size`, each with whether
    /// its result was a retryable failure (the server may retry it).
    pub ledger: Vec<(String, bool)>,
    /// Results not confirmed by the server.
    pub outbox: Vec<(String, Vec<u8>)>,
    /// Pending tasks whose plugin had started, with whether it ran alone.
    pub started: Vec<(String, bool)>,
}

/// Whether an encoded `Finished` is a failure another attempt could fix.
fn retryable_failure(bytes: &[u8]) -> bool {
    use crate::protocol::{FromAgent, TaskError, TaskOutcome};
    matches!(
        crate::protocol::decode::<FromAgent>(bytes, usize::MAX),
        Ok(FromAgent::Finished(TaskOutcome {
            result: Err(TaskError {
                retryable: true,
                ..
            }),
            ..
        }))
    )
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<TaskSpec>,
    ledger: HashMap<String, bool>,
    ledger_order: VecDeque<String>,
    outbox: HashMap<String, Vec<u8>>,
    outbox_order: Vec<String>,
    started: HashMap<String, bool>,
}

impl State {
    fn apply(&mut self, r: Record, ledger_size: usize) {
        match r {
            Record::Accepted(spec) => {
                // The server retries a retryable failure under the same id,
                // and the agent runs it again (`on_task`): accepted again,
                // it is pending, not answered from the ledger.
                if self.ledger.get(&spec.id) == Some(&true) {
                    self.ledger.remove(&spec.id);
                    self.ledger_order.retain(|id| id != &spec.id);
                    // Its old failure is not re-sent beside the new attempt.
                    self.outbox.remove(&spec.id);
                }
                if !self.ledger.contains_key(&spec.id)
                    && !self.pending.iter().any(|p| p.id == spec.id)
                {
                    self.pending.push(spec);
                }
            }
            Record::Finished {
                task_id,
                result,
                acked,
            } => {
                self.pending.retain(|p| p.id != task_id);
                self.started.remove(&task_id);
                if acked {
                    self.outbox.remove(&task_id);
                } else {
                    if !self.outbox.contains_key(&task_id) {
                        self.outbox_order.push(task_id.clone());
                    }
                    self.outbox.insert(task_id.clone(), result.clone());
                }
                let retryable = retryable_failure(&result);
                self.ledgered(task_id, retryable, ledger_size);
            }
            Record::Done { task_id, retryable } => {
                self.pending.retain(|p| p.id != task_id);
                self.started.remove(&task_id);
                self.outbox.remove(&task_id);
                self.ledgered(task_id, retryable, ledger_size);
            }
            Record::Acked { task_id } => {
                self.outbox.remove(&task_id);
            }
            Record::Released { task_id } => {
                self.pending.retain(|p| p.id != task_id);
                self.started.remove(&task_id);
            }
            Record::Started { task_id, alone } => {
                if self.pending.iter().any(|p| p.id == task_id) {
                    self.started.insert(task_id, alone);
                }
            }
            Record::SnapshotBegin | Record::SnapshotEnd => {}
        }
    }

    fn ledgered(&mut self, task_id: String, retryable: bool, ledger_size: usize) {
        if self.ledger.contains_key(&task_id) {
            return;
        }
        self.ledger.insert(task_id.clone(), retryable);
        self.ledger_order.push_back(task_id);
        while self.ledger_order.len() > ledger_size {
            if let Some(old) = self.ledger_order.pop_front() {
                self.ledger.remove(&old);
            }
        }
    }

    fn into_recovered(self) -> Recovered {
        let State {
            pending,
            mut ledger,
            ledger_order,
            mut outbox,
            outbox_order,
            started,
        } = self;
        Recovered {
            started: pending
                .iter()
                .filter_map(|p| started.get(&p.id).map(|a| (p.id.clone(), *a)))
                .collect(),
            pending,
            ledger: ledger_order
                .into_iter()
                .filter_map(|id| ledger.remove(&id).map(|r| (id, r)))
                .collect(),
            outbox: outbox_order
                .into_iter()
                .filter_map(|id| outbox.remove(&id).map(|r| (id, r)))
                .collect(),
        }
    }
}

/// Replays decoded records; returns the state and how many payloads could
/// not be decoded (checksum fine, content not a record of this format).
///
/// Every record is applied in order, a snapshot's as well: a snapshot is
/// the live state written out again, so applying it over the records it
/// summarizes changes nothing, and its markers are not needed to read it.
/// (They used to be: records after a `SnapshotBegin` went into a pending
/// snapshot that was thrown away when its `SnapshotEnd` was missing, so a
/// crash during compaction followed by a failed compaction at start, or one
/// flipped bit in the snapshot, lost every later record: issue 15, item 3.)
pub fn replay(payloads: &[Vec<u8>], ledger_size: usize) -> (Recovered, u64) {
    let mut main = State::default();
    let mut undecodable = 0;
    for p in payloads {
        let record = match p.split_first() {
            Some((&FORMAT, rest)) => crate::protocol::from_bytes_limited::<Record>(rest)
                .ok()
                .filter(|(_, rest)| rest.is_empty())
                .map(|(r, _)| r),
            _ => None,
        };
        let Some(record) = record else {
            undecodable += 1;
            continue;
        };
        main.apply(record, ledger_size);
    }
    (main.into_recovered(), undecodable)
}

fn encode(r: &Record) -> Vec<u8> {
    let mut v = vec![FORMAT];
    // Serializing our own types into a Vec cannot fail.
    v.extend(postcard::to_stdvec(r).expect("postcard encoding of journal records"));
    v
}

/// The records of a snapshot of `state` (without the markers): results
/// only for the unconfirmed (the outbox), ids for the rest of the ledger.
pub fn snapshot_records(state: &Recovered) -> Vec<Record> {
    let unacked: HashMap<&str, &Vec<u8>> = state
        .outbox
        .iter()
        .map(|(id, r)| (id.as_str(), r))
        .collect();
    let finished = |id: &str, r: &Vec<u8>| Record::Finished {
        task_id: id.to_string(),
        result: r.clone(),
        acked: false,
    };
    // Oldest first, as the ledger's window evicts; an unconfirmed result
    // in its place in that order (written after the confirmed ones, it
    // made them look older, and the window evicted them too early).
    let mut out: Vec<Record> = state
        .ledger
        .iter()
        .map(|(id, retryable)| match unacked.get(id.as_str()) {
            Some(r) => finished(id, r),
            None => Record::Done {
                task_id: id.clone(),
                retryable: *retryable,
            },
        })
        .collect();
    let in_ledger: HashSet<&str> = state.ledger.iter().map(|(id, _)| id.as_str()).collect();
    out.extend(
        state
            .outbox
            .iter()
            .filter(|(id, _)| !in_ledger.contains(id.as_str()))
            .map(|(id, r)| finished(id, r)),
    );
    out.extend(state.pending.iter().cloned().map(Record::Accepted));
    out.extend(state.started.iter().map(|(id, alone)| Record::Started {
        task_id: id.clone(),
        alone: *alone,
    }));
    out
}

/// The journal: a log plus the compaction schedule.
#[derive(Debug)]
pub struct Journal {
    log: Log,
    compact_at: u64,
    undecodable: u64,
    /// Records appended by [`Journal::append_grouped`] that the next
    /// [`Journal::commit`] must sync.
    uncommitted: u64,
}

impl Journal {
    /// Opens and replays the journal in `dir`, then compacts it to the
    /// recovered state. A failed compaction (a full disk) is logged, not
    /// fatal: the segments as they are still hold the state.
    pub fn open(
        dir: &Path,
        opts: LogOptions,
        ledger_size: usize,
    ) -> Result<(Journal, Recovered), StorageError> {
        let (mut log, payloads) = Log::open(dir, opts)?;
        if let Some(flag) = std::env::var_os(FSYNC_FAULT_ENV) {
            log::warn!("agent journal: test hook {FSYNC_FAULT_ENV} is set");
            log.fail_syncs_when(flag.into());
        }
        let (state, undecodable) = replay(&payloads, ledger_size);
        if undecodable > 0 {
            log::warn!("agent journal: skipped {undecodable} undecodable record(s)");
        }
        let mut j = Journal {
            log,
            compact_at: 0,
            undecodable,
            uncommitted: 0,
        };
        if let Err(e) = j.compact(&snapshot_records(&state)) {
            log::warn!("agent journal: compaction at start failed, continuing: {e}");
        }
        Ok((j, state))
    }

    /// Appends a record, synced as the fsync policy says.
    pub fn append(&mut self, r: &Record) -> Result<(), StorageError> {
        self.log.append(&encode(r))
    }

    /// Appends a record that is durable only after the next
    /// [`Journal::commit`] (group commit): under `fsync = always` one sync
    /// then covers every record of the batch, and the caller holds back
    /// what depends on them (acks, launches, result publishes) until the
    /// commit returns. Under `batch` and `never` the policy applies as in
    /// [`Journal::append`].
    pub fn append_grouped(&mut self, r: &Record) -> Result<(), StorageError> {
        if self.log.options().fsync == FsyncPolicy::Always {
            self.log.append_unsynced(&encode(r))?;
            self.uncommitted += 1;
            Ok(())
        } else {
            self.log.append(&encode(r))
        }
    }

    /// Makes every grouped record durable (one sync, if any are waiting).
    /// Returns how many records the sync covered.
    pub fn commit(&mut self) -> Result<u64, StorageError> {
        let n = std::mem::take(&mut self.uncommitted);
        if n > 0 {
            self.log.sync()?;
        }
        Ok(n)
    }

    /// Appends a record whose loss only causes a harmless repeat.
    pub fn append_unsynced(&mut self, r: &Record) -> Result<(), StorageError> {
        self.log.append_unsynced(&encode(r))
    }

    /// Whether the log has grown enough to be worth compacting.
    pub fn wants_compaction(&self) -> bool {
        self.log.total_bytes() >= self.compact_at
    }

    /// Replaces the log with a snapshot of the live state `records`.
    pub fn compact(&mut self, records: &[Record]) -> Result<(), StorageError> {
        let mut payloads = Vec::with_capacity(records.len() + 2);
        payloads.push(encode(&Record::SnapshotBegin));
        payloads.extend(records.iter().map(encode));
        payloads.push(encode(&Record::SnapshotEnd));
        let result = self.log.compact(payloads.iter().map(Vec::as_slice));
        if result.is_ok() {
            // The snapshot was written and synced: it holds every grouped record.
            self.uncommitted = 0;
        }
        let o = self.log.options();
        let (seg, max) = (o.segment_bytes, o.max_bytes);
        let live = self.log.total_bytes();
        // Amortized: the log grows by at least the live size (and a few
        // segments) between compactions, and compacts well before the size
        // bound would drop live segments.
        self.compact_at = (2 * live)
            .max(live + 4 * seg)
            .min(max / 4 * 3)
            .max(live + seg);
        result
    }

    /// Syncs if a batch is due.
    pub fn sync_if_due(&mut self) -> Result<(), StorageError> {
        self.log.sync_if_due()
    }

    /// Syncs everything.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.log.sync()
    }

    /// Whether the disk takes a write now (see [`Log::writable`]); not
    /// counted as a write error when it does not.
    pub fn writable(&mut self) -> bool {
        self.log.writable()
    }

    /// `Err` once a failed fsync made the journal unusable: what it holds
    /// on disk is uncertain, so the agent stops and is restarted on it.
    pub fn check(&self) -> Result<(), StorageError> {
        self.log.usable()
    }

    /// Log counters.
    pub fn stats(&self) -> Stats {
        self.log.stats()
    }

    /// Records skipped at recovery: damaged frames plus undecodable payloads.
    pub fn skipped(&self) -> u64 {
        self.log.stats().skipped_records + self.undecodable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Value;
    use crate::storage::FsyncPolicy;

    fn spec(id: &str) -> TaskSpec {
        TaskSpec {
            id: id.into(),
            plugin: "echo".into(),
            input: Value::Int(1),
            timeout_ms: 100,
            attempt: 1,
        }
    }

    fn fin(id: &str) -> Record {
        Record::Finished {
            task_id: id.into(),
            result: id.as_bytes().to_vec(),
            acked: false,
        }
    }

    fn opts() -> LogOptions {
        LogOptions {
            fsync: FsyncPolicy::Never,
            max_bytes: 1 << 20,
            segment_bytes: 4096,
            simulated_disk_bytes: None,
        }
    }

    #[test]
    fn replay_rebuilds_pending_ledger_and_outbox() {
        let recs = [
            Record::Accepted(spec("a")),
            Record::Accepted(spec("b")),
            Record::Accepted(spec("c")),
            fin("a"),
            Record::Acked {
                task_id: "a".into(),
            },
            fin("b"),
            Record::Released {
                task_id: "c".into(),
            },
            Record::Accepted(spec("d")),
            // A re-delivery of a finished id is not pending again.
            Record::Accepted(spec("a")),
        ];
        let payloads: Vec<Vec<u8>> = recs.iter().map(encode).collect();
        let (s, bad) = replay(&payloads, 10);
        assert_eq!(bad, 0);
        assert_eq!(s.pending, vec![spec("d")]);
        assert_eq!(s.ledger, vec![("a".into(), false), ("b".into(), false)]);
        assert_eq!(s.outbox, vec![("b".into(), b"b".to_vec())]);
        // The ledger window: only the newest stay.
        let (s, _) = replay(&payloads, 1);
        assert_eq!(s.ledger, vec![("b".into(), false)]);
    }

    /// Issue 15, item 3: an unfinished snapshot (a crash during
    /// compaction, then a compaction at start that failed) swallowed every
    /// record after it, across segments: the next accepted task was lost.
    #[test]
    fn an_unfinished_snapshot_swallows_nothing() {
        let recs = [
            Record::Accepted(spec("old")),
            fin("x"),
            // The crash: a snapshot begun, never ended.
            Record::SnapshotBegin,
            Record::Accepted(spec("old")),
            fin("x"),
            // After the restart.
            Record::Accepted(spec("new")),
            fin("y"),
        ];
        let payloads: Vec<Vec<u8>> = recs.iter().map(encode).collect();
        let (s, _) = replay(&payloads, 10);
        assert_eq!(s.pending, vec![spec("old"), spec("new")]);
        assert_eq!(s.outbox.len(), 2);
        assert_eq!(s.ledger.len(), 2);
    }

    /// Issue 15, item 3: one flipped bit inside the segment holding the
    /// snapshot cut it there (its end marker with it) and replay then
    /// discarded every later, intact segment: pending 0, ledger 0. Now the
    /// rest of that segment is lost (nothing searches past damage for a
    /// frame: it could be forged) and every later segment is read.
    #[test]
    fn a_flipped_bit_in_the_snapshot_keeps_the_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, _) = Journal::open(dir.path(), opts(), 100).unwrap();
            for i in 0..20 {
                j.append(&Record::Accepted(spec(&format!("s{i}")))).unwrap();
            }
            let live = Recovered {
                pending: (0..20).map(|i| spec(&format!("s{i}"))).collect(),
                ..Default::default()
            };
            j.compact(&snapshot_records(&live)).unwrap();
            // Enough after the snapshot to fill later segments.
            for i in 0..300 {
                j.append(&Record::Accepted(spec(&format!("late{i}"))))
                    .unwrap();
            }
            assert!(j.log.segment_count() > 1);
        }
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        // The snapshot is the oldest file; flip a bit in its middle.
        let snap = &files[0];
        let mut b = std::fs::read(snap).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x10;
        std::fs::write(snap, &b).unwrap();
        let (j, s) = Journal::open(dir.path(), opts(), 100).unwrap();
        // The first file (4 KiB) holds the snapshot and the first ~100
        // late records; everything after it is read.
        for i in 150..300 {
            let id = format!("late{i}");
            assert!(
                s.pending.iter().any(|p| p.id == id),
                "{id} lost: {:?}",
                j.stats()
            );
        }
        assert!(s.pending.len() < 320);
        assert_eq!(j.skipped(), 1);
    }

    #[test]
    fn started_marks_survive_replay_and_snapshots() {
        let started = |id: &str, alone| Record::Started {
            task_id: id.into(),
            alone,
        };
        let recs = [
            Record::Accepted(spec("a")),
            Record::Accepted(spec("b")),
            Record::Accepted(spec("c")),
            started("a", false),
            started("b", false),
            fin("b"),
            started("c", true),
            // Not pending: ignored.
            started("zz", false),
        ];
        let payloads: Vec<Vec<u8>> = recs.iter().map(encode).collect();
        let (s, _) = replay(&payloads, 10);
        assert_eq!(s.pending, vec![spec("a"), spec("c")]);
        assert_eq!(s.started, vec![("a".into(), false), ("c".into(), true)]);
        let snap: Vec<Vec<u8>> = std::iter::once(Record::SnapshotBegin)
            .chain(snapshot_records(&s))
            .chain(std::iter::once(Record::SnapshotEnd))
            .map(|r| encode(&r))
            .collect();
        let (again, _) = replay(&snap, 10);
        assert_eq!(again, s);
    }

    #[test]
    fn complete_snapshot_replaces_incomplete_is_ignored() {
        let before = [Record::Accepted(spec("old")), fin("x")];
        let snap = [
            Record::SnapshotBegin,
            Record::Accepted(spec("p")),
            Record::SnapshotEnd,
        ];
        // What a snapshot holds is applied like any record (the records
        // before it are normally deleted by the same compaction).
        let all: Vec<Vec<u8>> = before.iter().chain(&snap).map(encode).collect();
        let (s, _) = replay(&all, 10);
        assert_eq!(s.pending, vec![spec("old"), spec("p")]);
        // Torn snapshot: the state before it stands, and what it had.
        let torn: Vec<Vec<u8>> = before.iter().chain(&snap[..2]).map(encode).collect();
        let (s, _) = replay(&torn, 10);
        assert_eq!(s.pending, vec![spec("old"), spec("p")]);
        assert_eq!(s.outbox.len(), 1);
        // Garbage payloads with a good CRC are counted, not fatal.
        let (_, bad) = replay(&[vec![9, 9], vec![FORMAT, 0xff]], 10);
        assert_eq!(bad, 2);
    }

    #[test]
    fn full_disk_at_start_still_opens_with_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let used = {
            let (mut j, _) = Journal::open(dir.path(), opts(), 10).unwrap();
            j.append(&Record::Accepted(spec("a"))).unwrap();
            j.append(&fin("b")).unwrap();
            j.log.total_bytes()
        };
        // No room for the snapshot written at start, nor for a new record.
        let full = LogOptions {
            simulated_disk_bytes: Some(used),
            ..opts()
        };
        let (mut j, s) = Journal::open(dir.path(), full.clone(), 10).unwrap();
        assert_eq!(s.pending, vec![spec("a")]);
        assert_eq!(s.outbox.len(), 1);
        let e = j.append(&Record::Accepted(spec("c"))).unwrap_err();
        assert!(matches!(e, StorageError::NoSpace { .. }), "{e}");
        assert!(j.stats().no_space_errors >= 1);
        drop(j);
        let (_, s) = Journal::open(dir.path(), full, 10).unwrap();
        assert_eq!(s.pending, vec![spec("a")], "nothing lost or half-written");
    }

    #[test]
    fn journal_survives_reopen_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, s) = Journal::open(dir.path(), opts(), 100).unwrap();
            assert_eq!(s, Recovered::default());
            for i in 0..300u32 {
                let id = format!("t{i}");
                j.append(&Record::Accepted(spec(&id))).unwrap();
                j.append(&fin(&id)).unwrap();
                j.append_unsynced(&Record::Acked { task_id: id }).unwrap();
                if j.wants_compaction() {
                    // What the agent would pass: the live state, here the
                    // last 100 finished and acknowledged ids.
                    let live = Recovered {
                        ledger: (i.saturating_sub(99)..=i)
                            .map(|k| (format!("t{k}"), false))
                            .collect(),
                        ..Default::default()
                    };
                    j.compact(&snapshot_records(&live)).unwrap();
                }
            }
            j.append(&Record::Accepted(spec("open"))).unwrap();
            assert!(j.stats().compactions > 1, "{:?}", j.stats());
        }
        let (j, s) = Journal::open(dir.path(), opts(), 100).unwrap();
        assert_eq!(s.pending, vec![spec("open")]);
        assert_eq!(s.ledger.len(), 100);
        assert_eq!(s.ledger[99].0, "t299");
        assert!(s.outbox.is_empty());
        assert_eq!(j.skipped(), 0);
    }

    /// Issue 15, item 5: the ledger held every result (up to 1 MiB each,
    /// 4096 of them) in memory and in every snapshot, so with results over
    /// ~16 KB compaction failed with `TooLarge` on every attempt. A
    /// confirmed result is now kept as its id only: the snapshot of 4096
    /// confirmed 20 KiB results is under 64 bytes per task, the
    /// unconfirmed ones are kept whole, and the retryable mark survives.
    #[test]
    fn snapshots_keep_only_unconfirmed_results() {
        let dir = tempfile::tempdir().unwrap();
        let big = |id: &str| Record::Finished {
            task_id: id.into(),
            result: vec![7; 20 << 10],
            acked: false,
        };
        let mut o = opts();
        o.max_bytes = 1 << 30;
        o.segment_bytes = 1 << 20;
        let (mut j, _) = Journal::open(dir.path(), o.clone(), 4096).unwrap();
        for i in 0..4096 {
            let id = format!("t{i}");
            j.append(&Record::Accepted(spec(&id))).unwrap();
            j.append(&big(&id)).unwrap();
            if i != 4095 {
                j.append(&Record::Acked { task_id: id }).unwrap();
            }
        }
        drop(j);
        let (mut j, s) = Journal::open(dir.path(), o.clone(), 4096).unwrap();
        assert_eq!(s.ledger.len(), 4096);
        assert_eq!(s.outbox.len(), 1);
        let before = j.stats();
        let mut live = s.clone();
        live.ledger[7].1 = true;
        let records = snapshot_records(&live);
        j.compact(&records).unwrap();
        let total: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        // 4095 ids plus one 20 KiB result; the log before held 80 MiB.
        assert!(
            total < (20 << 10) + 4096 * 64,
            "snapshot of {total} bytes ({before:?})"
        );
        drop(j);
        let (_, s) = Journal::open(dir.path(), o, 4096).unwrap();
        assert_eq!(s.ledger.len(), 4096);
        assert_eq!(s.outbox, live.outbox);
        assert_eq!(s.ledger[7], ("t7".into(), true));
        assert!(s.ledger.iter().filter(|(_, r)| *r).count() == 1);
    }

    /// Found in the issue-15 attack: a snapshot wrote the unconfirmed
    /// results after every confirmed id, so after a compaction the ledger's
    /// window (which evicts the oldest) took confirmed ids for older than
    /// they were and forgot them too early.
    #[test]
    fn a_snapshot_keeps_the_ledger_in_finishing_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), opts(), 64).unwrap();
        let ids: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        for id in &ids {
            j.append(&Record::Accepted(spec(id))).unwrap();
            j.append(&Record::Finished {
                task_id: id.clone(),
                result: vec![1],
                acked: false,
            })
            .unwrap();
            if id != "t3" {
                j.append(&Record::Acked {
                    task_id: id.clone(),
                })
                .unwrap();
            }
        }
        drop(j);
        let (mut j, s) = Journal::open(dir.path(), opts(), 64).unwrap();
        let order = |s: &Recovered| {
            s.ledger
                .iter()
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&s), ids);
        j.compact(&snapshot_records(&s)).unwrap();
        drop(j);
        let (_, s) = Journal::open(dir.path(), opts(), 64).unwrap();
        assert_eq!(order(&s), ids, "the ledger's order after a compaction");
        assert_eq!(s.outbox.len(), 1);
    }
}
