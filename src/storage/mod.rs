//! Durable local storage for the agent: an append-only log split into
//! segment files.
//!
//! Each segment is a file `NNNNNNNNNNNNNNNNNNNN.seg` (the segment number,
//! zero-padded) holding records back to back. A record is framed as
//!
//! ```text
//! len: u32 LE | crc: u32 LE | payload (len bytes)
//! ```
//!
//! where `crc` is the CRC-32 of the four length bytes followed by the
//! payload, so a damaged length is caught as well as a damaged payload. The
//! payload is opaque here (the agent writes postcard records).
//!
//! - **Durability** follows [`FsyncPolicy`]: `always` syncs each record
//!   before [`Log::append`] returns, `batch` syncs every N records or N ms,
//!   `never` leaves it to the OS.
//! - **Recovery** ([`Log::open`]) reads every segment in order and stops
//!   reading a segment at its first torn or corrupt record. In the last
//!   segment (the one being written) that is a torn tail: skipped, counted in
//!   [`Stats::skipped_records`], logged, and cut off so that new records
//!   never follow garbage. In an older segment it is corruption: counted in
//!   [`Stats::corrupt_records`] too, logged as an error, the rest of that
//!   segment skipped, and the later segments read. Nothing searches past
//!   damage for the next record that checks out: payloads are stored
//!   verbatim, so a frame found inside a damaged record could be forged.
//!   The log opens anyway.
//! - **Size bound**: when an append would take the log over
//!   [`LogOptions::max_bytes`], whole segments are dropped oldest first and
//!   counted in [`Stats::segments_dropped`]. Callers that must not lose live
//!   records compact before that happens ([`Log::compact`]).
//! - **Full disk**: a failed write (ENOSPC included) returns an error,
//!   is counted, and the partial record is cut off again; nothing panics.

mod crc32;

pub use crc32::{crc32, Crc32};

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes of framing before each payload.
pub const HEADER_BYTES: usize = 8;
/// Largest payload a record may carry. Anything claiming more is treated as
/// corrupt on recovery.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("segment {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no space left for storage in {path} ({needed} more bytes needed): {source}")]
    NoSpace {
        path: PathBuf,
        needed: u64,
        source: io::Error,
    },
    #[error("record of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: u64 },
    #[error("invalid storage option `{key}`: {message}")]
    Options { key: &'static str, message: String },
    /// An fsync failed. What it was to make durable may be lost, and the
    /// kernel may have dropped the dirty pages and cleared the error, so a
    /// later sync "succeeding" proves nothing: the log takes no more
    /// records ([`StorageError::Failed`]); reopen it (or restart).
    #[error("fsync of {path} failed, records since the last sync may be lost: {source}")]
    Sync { path: PathBuf, source: io::Error },
    #[error("the log in {path} is unusable after a failed fsync; reopen it")]
    Failed { path: PathBuf },
}

/// When appended records are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// `fdatasync` after every record: an acknowledged append survives a
    /// power cut. The default.
    Always,
    /// Sync once `records` records are unsynced or `interval` has passed
    /// since the last sync (checked on append and on [`Log::sync_if_due`]).
    /// A power cut can lose up to that much; a process crash loses nothing.
    Batch { interval: Duration, records: u32 },
    /// Never sync (the OS writes back when it likes). A process crash loses
    /// nothing, a power cut can lose anything not yet written back.
    Never,
}

/// Options of a [`Log`].
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub fsync: FsyncPolicy,
    /// Bound on the bytes of all segment files together.
    pub max_bytes: u64,
    /// A segment is closed and a new one started beyond this size. A record
    /// bigger than this gets a segment of its own.
    pub segment_bytes: u64,
    /// Test hook: pretend the disk holds only this many bytes of segments,
    /// and fail writes beyond it with ENOSPC.
    #[doc(hidden)]
    pub simulated_disk_bytes: Option<u64>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            fsync: FsyncPolicy::Always,
            max_bytes: 64 << 20,
            segment_bytes: 1 << 20,
            simulated_disk_bytes: None,
        }
    }
}

impl LogOptions {
    /// Checks the options, naming the offending one.
    pub fn validate(&self) -> Result<(), StorageError> {
        if self.segment_bytes < 4096 {
            return Err(StorageError::Options {
                key: "segment_bytes",
                message: "must be at least 4096".into(),
            });
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return Err(StorageError::Options {
                key: "max_bytes",
                message: format!(
                    "must be at least twice segment_bytes ({})",
                    self.segment_bytes
                ),
            });
        }
        if let FsyncPolicy::Batch { interval, records } = self.fsync {
            if interval.is_zero() || records == 0 {
                return Err(StorageError::Options {
                    key: "fsync",
                    message: "batch interval and record count must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

/// Counters, since the log was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records appended.
    pub records_appended: u64,
    /// Bytes appended, framing included.
    pub bytes_appended: u64,
    /// fsync calls on segment files.
    pub fsyncs: u64,
    /// Torn or corrupt records found (and skipped) by recovery.
    pub skipped_records: u64,
    /// Bytes cut off by recovery.
    pub skipped_bytes: u64,
    /// Whole segments dropped to stay within `max_bytes`.
    pub segments_dropped: u64,
    /// Records inside those dropped segments.
    pub records_dropped: u64,
    /// Appends that failed (no space included).
    pub write_errors: u64,
    /// Of those, failures for lack of space.
    pub no_space_errors: u64,
    /// Compactions done.
    pub compactions: u64,
    /// Of the skipped records, those in a segment that was not the last:
    /// data that was on disk and changed (reported as errors; the rest of
    /// that segment is skipped, the later segments are read).
    pub corrupt_records: u64,
}

/// Why [`scan`] stopped before the end of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The buffer ends inside a record: a write cut short.
    Torn,
    /// A record's checksum does not match, or its length is impossible.
    Corrupt,
}

/// Result of [`scan`]: the payload ranges of the good records, and where
/// and why scanning stopped early, if it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub records: Vec<std::ops::Range<usize>>,
    /// Offset of the first bad record and what is wrong with it.
    pub damage: Option<(usize, Damage)>,
}

/// Parses the records of one segment's bytes. Never panics, whatever the
/// input (fuzzed).
pub fn scan(bytes: &[u8]) -> Scan {
    let mut out = Scan::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEADER_BYTES {
            out.damage = Some((at, Damage::Torn));
            break;
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > MAX_RECORD_BYTES {
            out.damage = Some((at, Damage::Corrupt));
            break;
        }
        if rest.len() - HEADER_BYTES < len {
            out.damage = Some((at, Damage::Torn));
            break;
        }
        let payload = &rest[HEADER_BYTES..HEADER_BYTES + len];
        if record_crc(&rest[0..4], payload) != crc {
            out.damage = Some((at, Damage::Corrupt));
            break;
        }
        out.records.push(at + HEADER_BYTES..at + HEADER_BYTES + len);
        at += HEADER_BYTES + len;
    }
    out
}

fn record_crc(len_bytes: &[u8], payload: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(len_bytes);
    c.update(payload);
    c.finish()
}

/// Frames `payload` as one record.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut buf = Vec::with_capacity(HEADER_BYTES + payload.len());
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&record_crc(&len, payload).to_le_bytes());
    buf.extend_from_slice(payload);
    buf
}

#[derive(Debug)]
struct Segment {
    id: u64,
    bytes: u64,
    records: u64,
}

/// An append-only, segmented, checksummed log in one directory.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    opts: LogOptions,
    /// Oldest first; the last one is the active segment.
    segments: VecDeque<Segment>,
    active: File,
    total_bytes: u64,
    unsynced: u32,
    last_sync: Instant,
    stats: Stats,
    /// Bytes of the active segment known to be on disk (after its last sync).
    synced_bytes: u64,
    /// Set by a failed fsync; nothing is written after it.
    failed: bool,
    /// Test hook ([`Log::fail_syncs_when`]).
    sync_fault: Option<PathBuf>,
}

fn segment_name(id: u64) -> String {
    format!("{id:020}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

impl Log {
    /// Opens (creating if needed) the log in `dir` and recovers it. Returns
    /// the log, ready for appends, and every good record's payload, oldest
    /// first. Damaged records are skipped and counted, not fatal.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<(Log, Vec<Vec<u8>>), StorageError> {
        opts.validate()?;
        let dir_err = |source| StorageError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(dir_err)? {
            let entry = entry.map_err(dir_err)?;
            if let Some(id) = entry.file_name().to_str().and_then(parse_segment_name) {
                ids.push(id);
            }
        }
        ids.sort_unstable();

        let mut stats = Stats::default();
        let mut records = Vec::new();
        let mut segments = VecDeque::new();
        let last_id = ids.last().copied();
        for id in ids {
            let path = dir.join(segment_name(id));
            let io_err = |source| StorageError::Io {
                path: path.clone(),
                source,
            };
            let bytes = std::fs::read(&path).map_err(io_err)?;
            // Stop at the first damage, never search past it for the next
            // frame that checks out: task inputs and results are stored
            // verbatim, so bytes inside a damaged record can be a valid
            // frame (a forged task), and the search costs the square of
            // the damaged size (review of issue 15).
            let scan = scan(&bytes);
            let mut good = bytes.len();
            if let Some((at, damage)) = scan.damage {
                stats.skipped_records += 1;
                stats.skipped_bytes += (bytes.len() - at) as u64;
                if Some(id) == last_id {
                    // A write cut short (or damage at the end): cut it off,
                    // so new records never follow garbage and the same
                    // damage is not counted again at the next start.
                    log::warn!(
                        "storage: segment {} has a {} record at offset {at}; cutting off its last {} bytes",
                        path.display(),
                        match damage {
                            Damage::Torn => "torn",
                            Damage::Corrupt => "corrupt",
                        },
                        bytes.len() - at
                    );
                    let f = OpenOptions::new().write(true).open(&path).map_err(io_err)?;
                    f.set_len(at as u64).map_err(io_err)?;
                    f.sync_all().map_err(io_err)?;
                    good = at;
                } else {
                    // Not the segment being written: these bytes were on
                    // disk and changed. Reported; the rest of this segment
                    // is skipped and the later segments are read.
                    stats.corrupt_records += 1;
                    log::error!(
                        "storage: segment {} is corrupt at offset {at}; skipping its last {} bytes, reading the later segments",
                        path.display(),
                        bytes.len() - at
                    );
                }
            }
            segments.push_back(Segment {
                id,
                bytes: good as u64,
                records: scan.records.len() as u64,
            });
            records.extend(scan.records.into_iter().map(|r| bytes[r].to_vec()));
        }

        // Continue in the last segment unless it is full.
        let reuse = segments
            .back()
            .is_some_and(|s| s.bytes < opts.segment_bytes);
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let (active, segments) = if reuse {
            let last = segments.back().expect("checked").id;
            let path = dir.join(segment_name(last));
            let f = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|source| StorageError::Io { path, source })?;
            (f, segments)
        } else {
            let id = segments.back().map_or(1, |s| s.id + 1);
            let f = create_segment(dir, id, opts.fsync != FsyncPolicy::Never)?;
            let mut segments = segments;
            segments.push_back(Segment {
                id,
                bytes: 0,
                records: 0,
            });
            (f, segments)
        };
        let log = Log {
            dir: dir.to_path_buf(),
            opts,
            segments,
            active,
            total_bytes,
            unsynced: 0,
            last_sync: Instant::now(),
            stats,
            synced_bytes: 0,
            failed: false,
            sync_fault: None,
        };
        let mut log = log;
        log.synced_bytes = log.segments.back().map_or(0, |s| s.bytes);
        Ok((log, records))
    }

    /// Appends one record and syncs it as the policy says.
    pub fn append(&mut self, payload: &[u8]) -> Result<(), StorageError> {
        self.append_inner(payload, true)
    }

    /// Appends one record without forcing a sync even under
    /// [`FsyncPolicy::Always`]; it reaches the disk with the next synced
    /// append. For records whose loss only causes a harmless repeat.
    pub fn append_unsynced(&mut self, payload: &[u8]) -> Result<(), StorageError> {
        self.append_inner(payload, false)
    }

    fn append_inner(&mut self, payload: &[u8], durable: bool) -> Result<(), StorageError> {
        self.usable()?;
        let framed = (HEADER_BYTES + payload.len()) as u64;
        if payload.len() > MAX_RECORD_BYTES || framed > self.opts.max_bytes {
            self.stats.write_errors += 1;
            return Err(StorageError::TooLarge {
                size: payload.len(),
                limit: (MAX_RECORD_BYTES as u64).min(self.opts.max_bytes - HEADER_BYTES as u64),
            });
        }
        let active = self.segments.back().expect("always an active segment");
        if active.bytes > 0 && active.bytes + framed > self.opts.segment_bytes {
            self.roll()?;
        }
        // Keep within the bound by dropping the oldest segments; the active
        // one too if it alone is too big (after starting a fresh one).
        while self.total_bytes + framed > self.opts.max_bytes {
            if self.segments.len() == 1 {
                self.roll()?;
            }
            self.drop_oldest()?;
        }
        self.write_record(payload)?;
        self.unsynced += 1;
        if durable {
            match self.opts.fsync {
                FsyncPolicy::Always => self.sync()?,
                FsyncPolicy::Batch { records, .. } if self.unsynced >= records => self.sync()?,
                _ => self.sync_if_due()?,
            }
        }
        Ok(())
    }

    /// Writes one framed record to the active segment; on failure cuts the
    /// partial record off again.
    fn write_record(&mut self, payload: &[u8]) -> Result<(), StorageError> {
        let buf = frame(payload);
        let framed = buf.len() as u64;
        let seg = self.segments.back().expect("active segment");
        let path = self.dir.join(segment_name(seg.id));
        let result = match self.opts.simulated_disk_bytes {
            Some(cap) if self.total_bytes + framed > cap => {
                Err(io::Error::from_raw_os_error(28 /* ENOSPC */))
            }
            _ => self.active.write_all(&buf),
        };
        if let Err(source) = result {
            self.stats.write_errors += 1;
            // A short write would leave a torn record in the middle of the
            // segment; put the file back to its previous length.
            let _ = self.active.set_len(seg.bytes);
            if is_no_space(&source) {
                self.stats.no_space_errors += 1;
                return Err(StorageError::NoSpace {
                    path,
                    needed: framed,
                    source,
                });
            }
            return Err(StorageError::Io { path, source });
        }
        let seg = self.segments.back_mut().expect("active segment");
        seg.bytes += framed;
        seg.records += 1;
        self.total_bytes += framed;
        self.stats.records_appended += 1;
        self.stats.bytes_appended += framed;
        Ok(())
    }

    /// Forces everything appended so far to stable storage. A failure is
    /// final ([`StorageError::Sync`]): the log refuses every later write.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.usable()?;
        let result = match &self.sync_fault {
            Some(flag) if flag.exists() => {
                // What a failed writeback does: the dirty pages are gone.
                let _ = self.active.set_len(self.synced_bytes);
                Err(io::Error::from_raw_os_error(5 /* EIO */))
            }
            _ => self.active.sync_data(),
        };
        if let Err(source) = result {
            self.stats.write_errors += 1;
            self.failed = true;
            let id = self.segments.back().expect("active segment").id;
            let path = self.dir.join(segment_name(id));
            log::error!(
                "storage: fsync of {} failed ({source}); the log takes no more records",
                path.display()
            );
            return Err(StorageError::Sync { path, source });
        }
        self.stats.fsyncs += 1;
        self.unsynced = 0;
        self.last_sync = Instant::now();
        self.synced_bytes = self.segments.back().expect("active segment").bytes;
        Ok(())
    }

    /// Whether the active segment takes a write now: one byte appended and
    /// cut off again, outside the counters. A cheap probe for a disk that
    /// refused records (full, or over the file size limit) to be tried on
    /// every tick. `true` does not promise that a larger write fits (a
    /// nearly full disk); a torn byte left by a crash in between is cut at
    /// recovery like any torn tail.
    pub fn writable(&mut self) -> bool {
        if self.failed {
            return false;
        }
        let len = self.segments.back().expect("active segment").bytes;
        if let Some(cap) = self.opts.simulated_disk_bytes {
            if self.total_bytes + 1 > cap {
                return false;
            }
        }
        let ok = self.active.write_all(&[0]).is_ok();
        let _ = self.active.set_len(len);
        ok
    }

    /// Whether a failed fsync has made the log unusable.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// `Err(StorageError::Failed)` once a failed fsync made the log unusable.
    pub fn usable(&self) -> Result<(), StorageError> {
        if self.failed {
            return Err(StorageError::Failed {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Test hook: while the file `flag` exists, every fsync fails with EIO
    /// and cuts the active segment back to what the last good sync covered
    /// (the kernel drops the dirty pages of a failed writeback).
    #[doc(hidden)]
    pub fn fail_syncs_when(&mut self, flag: PathBuf) {
        self.sync_fault = Some(flag);
    }

    /// Under [`FsyncPolicy::Batch`], syncs if records wait and the interval
    /// has passed. Call it from a timer so a quiet log still gets synced.
    pub fn sync_if_due(&mut self) -> Result<(), StorageError> {
        if let FsyncPolicy::Batch { interval, .. } = self.opts.fsync {
            if self.unsynced > 0 && self.last_sync.elapsed() >= interval {
                return self.sync();
            }
        }
        Ok(())
    }

    /// Closes the active segment and starts the next one.
    fn roll(&mut self) -> Result<(), StorageError> {
        let sync = self.opts.fsync != FsyncPolicy::Never;
        if sync && self.unsynced > 0 {
            self.sync()?;
        }
        let id = self.segments.back().map_or(1, |s| s.id + 1);
        self.active = create_segment(&self.dir, id, sync)?;
        self.segments.push_back(Segment {
            id,
            bytes: 0,
            records: 0,
        });
        self.synced_bytes = 0;
        Ok(())
    }

    fn drop_oldest(&mut self) -> Result<(), StorageError> {
        let seg = self.segments.pop_front().expect("a sealed segment");
        let path = self.dir.join(segment_name(seg.id));
        std::fs::remove_file(&path).map_err(|source| StorageError::Io {
            path: path.clone(),
            source,
        })?;
        self.total_bytes -= seg.bytes;
        self.stats.segments_dropped += 1;
        self.stats.records_dropped += seg.records;
        log::warn!(
            "storage: over max_bytes ({}), dropped the oldest segment {} with {} record(s)",
            self.opts.max_bytes,
            path.display(),
            seg.records
        );
        Ok(())
    }

    /// Rewrites the log as exactly `records`: they go into a new segment,
    /// which is synced (whatever the policy) before every older segment is
    /// deleted, oldest first, each deletion synced before the next. A crash in between leaves the old segments
    /// followed by a complete or torn copy, so the caller's replay must
    /// tolerate reading both (the agent brackets its snapshot with markers).
    /// On error nothing older is deleted.
    pub fn compact<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), StorageError> {
        self.usable()?;
        // An empty active segment takes the snapshot as a new one would
        // (it follows every older one): a failed compaction leaves one
        // behind, and rolling again each time piled up empty files.
        if self.segments.back().expect("active segment").bytes > 0 {
            self.roll()?;
        }
        let start_segments = self.segments.len();
        for r in records {
            let framed = (HEADER_BYTES + r.len()) as u64;
            let snapshot_bytes = self.segments.back().expect("active segment").bytes;
            if r.len() > MAX_RECORD_BYTES || snapshot_bytes + framed > self.opts.max_bytes {
                self.stats.write_errors += 1;
                let _ = self.active.set_len(0);
                let seg = self.segments.back_mut().expect("active segment");
                self.total_bytes -= seg.bytes;
                seg.bytes = 0;
                seg.records = 0;
                return Err(StorageError::TooLarge {
                    size: r.len(),
                    limit: self.opts.max_bytes,
                });
            }
            if let Err(e) = self.write_record(r) {
                let _ = self.active.set_len(0);
                let seg = self.segments.back_mut().expect("active segment");
                self.total_bytes -= seg.bytes;
                seg.bytes = 0;
                seg.records = 0;
                return Err(e);
            }
        }
        debug_assert_eq!(start_segments, self.segments.len());
        self.sync()?;
        while self.segments.len() > 1 {
            let seg = self.segments.pop_front().expect("len > 1");
            let path = self.dir.join(segment_name(seg.id));
            std::fs::remove_file(&path).map_err(|source| StorageError::Io { path, source })?;
            self.total_bytes -= seg.bytes;
            // Each unlink durable before the next: the directory's changes
            // need not reach the disk in order, and a replay that applies
            // every record would read an older segment back while a newer
            // one it depends on is gone (a task's `Accepted` without its
            // `Finished`). One directory sync per old segment; compactions
            // are rare.
            sync_dir(&self.dir)?;
        }
        self.stats.compactions += 1;
        Ok(())
    }

    /// Bytes in all segment files.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Number of segment files, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The options in use.
    pub fn options(&self) -> &LogOptions {
        &self.opts
    }

    /// Counters since the log was opened.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The directory of the segment files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the active segment (tests damage it).
    pub fn active_path(&self) -> PathBuf {
        self.dir
            .join(segment_name(self.segments.back().expect("active").id))
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if self.unsynced > 0 && self.opts.fsync != FsyncPolicy::Never && !self.failed {
            let _ = self.active.sync_data();
        }
    }
}

fn create_segment(dir: &Path, id: u64, sync: bool) -> Result<File, StorageError> {
    let path = dir.join(segment_name(id));
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| StorageError::Io { path, source })?;
    if sync {
        // The new file's directory entry must be durable too.
        sync_dir(dir)?;
    }
    Ok(f)
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StorageError::Dir {
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests;
