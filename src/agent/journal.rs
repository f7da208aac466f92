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
//! - **ledger**: the last `ledger_size` finished task ids with their encoded
//!   results, so a re-delivered id is answered, never re-run;
//! - **outbox**: finished results the server has not confirmed, re-sent.
//!
//! Compaction writes the live state as a snapshot bracketed by
//! `SnapshotBegin`/`SnapshotEnd`, then deletes the older segments. On replay
//! a complete snapshot replaces whatever came before it; an incomplete one
//! (a crash during compaction, before anything was deleted) is ignored.

use crate::protocol::TaskSpec;
use crate::storage::{FsyncPolicy, Log, LogOptions, Stats, StorageError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

/// First byte of every record payload; a record with another is skipped.
const FORMAT: u8 = 1;

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
    SnapshotBegin,
    /// End of a complete snapshot.
    SnapshotEnd,
    /// The plugin of an accepted task is about to run; `alone` when nothing
    /// else runs beside it (the re-run of a task interrupted by a crash).
    Started { task_id: String, alone: bool },
}

/// The state rebuilt at start.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovered {
    /// Accepted, not finished, in acceptance order.
    pub pending: Vec<TaskSpec>,
    /// Finished ids and results, oldest first, at most `ledger_size`.
    pub ledger: Vec<(String, Vec<u8>)>,
    /// Results not confirmed by the server.
    pub outbox: Vec<(String, Vec<u8>)>,
    /// Pending tasks whose plugin had started, with whether it ran alone.
    pub started: Vec<(String, bool)>,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<TaskSpec>,
    ledger: HashMap<String, Vec<u8>>,
    ledger_order: VecDeque<String>,
    outbox: HashMap<String, Vec<u8>>,
    outbox_order: Vec<String>,
    started: HashMap<String, bool>,
}

impl State {
    fn apply(&mut self, r: Record, ledger_size: usize) {
        match r {
            Record::Accepted(spec) => {
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
                if !self.ledger.contains_key(&task_id) {
                    self.ledger.insert(task_id.clone(), result);
                    self.ledger_order.push_back(task_id);
                    while self.ledger_order.len() > ledger_size {
                        if let Some(old) = self.ledger_order.pop_front() {
                            self.ledger.remove(&old);
                        }
                    }
                }
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
pub fn replay(payloads: &[Vec<u8>], ledger_size: usize) -> (Recovered, u64) {
    let mut main = State::default();
    let mut snapshot: Option<State> = None;
    let mut undecodable = 0;
    for p in payloads {
        let record = match p.split_first() {
            Some((&FORMAT, rest)) => postcard::from_bytes::<Record>(rest).ok(),
            _ => None,
        };
        let Some(record) = record else {
            undecodable += 1;
            continue;
        };
        match record {
            Record::SnapshotBegin => snapshot = Some(State::default()),
            Record::SnapshotEnd => {
                if let Some(s) = snapshot.take() {
                    main = s;
                }
            }
            r => match snapshot.as_mut() {
                Some(s) => s.apply(r, ledger_size),
                None => main.apply(r, ledger_size),
            },
        }
    }
    if snapshot.is_some() {
        log::warn!("agent journal: ignoring an incomplete snapshot (crash during compaction)");
    }
    (main.into_recovered(), undecodable)
}

fn encode(r: &Record) -> Vec<u8> {
    let mut v = vec![FORMAT];
    // Serializing our own types into a Vec cannot fail.
    v.extend(postcard::to_stdvec(r).expect("postcard encoding of journal records"));
    v
}

/// The records of a snapshot of `state` (without the markers).
pub fn snapshot_records(state: &Recovered) -> Vec<Record> {
    let unacked: HashSet<&str> = state.outbox.iter().map(|(id, _)| id.as_str()).collect();
    let in_ledger: HashSet<&str> = state.ledger.iter().map(|(id, _)| id.as_str()).collect();
    let mut out: Vec<Record> = state
        .ledger
        .iter()
        .map(|(id, r)| Record::Finished {
            task_id: id.clone(),
            result: r.clone(),
            acked: !unacked.contains(id.as_str()),
        })
        .collect();
    out.extend(
        state
            .outbox
            .iter()
            .filter(|(id, _)| !in_ledger.contains(id.as_str()))
            .map(|(id, r)| Record::Finished {
                task_id: id.clone(),
                result: r.clone(),
                acked: false,
            }),
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
        let (log, payloads) = Log::open(dir, opts)?;
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
        assert_eq!(
            s.ledger,
            vec![("a".into(), b"a".to_vec()), ("b".into(), b"b".to_vec())]
        );
        assert_eq!(s.outbox, vec![("b".into(), b"b".to_vec())]);
        // The ledger window: only the newest stay.
        let (s, _) = replay(&payloads, 1);
        assert_eq!(s.ledger, vec![("b".into(), b"b".to_vec())]);
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
        let all: Vec<Vec<u8>> = before.iter().chain(&snap).map(encode).collect();
        let (s, _) = replay(&all, 10);
        assert_eq!(s.pending, vec![spec("p")]);
        assert!(s.ledger.is_empty() && s.outbox.is_empty());
        // Torn snapshot: the state before it stands.
        let torn: Vec<Vec<u8>> = before.iter().chain(&snap[..2]).map(encode).collect();
        let (s, _) = replay(&torn, 10);
        assert_eq!(s.pending, vec![spec("old")]);
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
                            .map(|k| (format!("t{k}"), format!("t{k}").into_bytes()))
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
}
