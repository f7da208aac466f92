use super::*;

fn opts() -> LogOptions {
    LogOptions {
        fsync: FsyncPolicy::Never,
        max_bytes: 1 << 20,
        segment_bytes: 4096,
        simulated_disk_bytes: None,
    }
}

fn rec(i: usize, len: usize) -> Vec<u8> {
    let mut v = format!("record-{i}-").into_bytes();
    v.resize(len.max(v.len()), (i % 251) as u8);
    v
}

/// Deterministic xorshift64*: the same cases on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn roundtrip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<Vec<u8>> = (0..300).map(|i| rec(i, i % 97)).collect();
    {
        let (mut log, got) = Log::open(dir.path(), opts()).unwrap();
        assert!(got.is_empty());
        for r in &all[..200] {
            log.append(r).unwrap();
        }
        assert!(log.segment_count() > 1, "4 KiB segments must roll");
        assert_eq!(log.stats().records_appended, 200);
    }
    {
        let (mut log, got) = Log::open(dir.path(), opts()).unwrap();
        assert_eq!(got, all[..200].to_vec());
        assert_eq!(log.stats().skipped_records, 0);
        for r in &all[200..] {
            log.append(r).unwrap();
        }
    }
    let (log, got) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(got, all);
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(log.total_bytes(), on_disk);
}

#[test]
fn torn_tail_is_skipped_counted_and_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = {
        let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
        for i in 0..5 {
            log.append(&rec(i, 100)).unwrap();
        }
        log.active_path()
    };
    // A crash in the middle of writing the last record.
    let len = std::fs::metadata(&path).unwrap().len();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 50).unwrap();
    drop(f);
    {
        let (mut log, got) = Log::open(dir.path(), opts()).unwrap();
        assert_eq!(got, (0..4).map(|i| rec(i, 100)).collect::<Vec<_>>());
        assert_eq!(log.stats().skipped_records, 1);
        assert_eq!(log.stats().skipped_bytes, 108 - 50);
        log.append(&rec(9, 10)).unwrap();
    }
    // Cut off at the first open: the next start sees a clean log.
    let (log, got) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(got[4], rec(9, 10));
    assert_eq!(log.stats().skipped_records, 0);

    // A tail shorter than a header is torn too.
    drop(log);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&[1, 2, 3]).unwrap();
    drop(f);
    let (log, got) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(log.stats().skipped_records, 1);
    assert_eq!(log.stats().skipped_bytes, 3);
}

#[test]
fn corrupt_crc_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = {
        let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
        for i in 0..5 {
            log.append(&rec(i, 64)).unwrap();
        }
        log.active_path()
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40; // one bit in the last record's payload
    std::fs::write(&path, &bytes).unwrap();
    let (_log, got) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(got, (0..4).map(|i| rec(i, 64)).collect::<Vec<_>>());
    assert_eq!(_log.stats().skipped_records, 1);

    // A damaged length field is caught by the CRC too, not read as a size.
    drop(_log);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - (HEADER_BYTES + 64);
    bytes[last] = 10; // claims 10 bytes instead of 64
    std::fs::write(&path, &bytes).unwrap();
    let (log, got) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(log.stats().skipped_records, 1);
}

#[test]
fn size_bound_drops_oldest_segments_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        max_bytes: 16 * 1024,
        ..opts()
    };
    let n = 200;
    {
        let (mut log, _) = Log::open(dir.path(), o.clone()).unwrap();
        for i in 0..n {
            log.append(&rec(i, 500)).unwrap();
            assert!(log.total_bytes() <= o.max_bytes);
        }
        let s = log.stats();
        assert!(s.segments_dropped > 0, "{s:?}");
        // 8 records of 508 bytes fit a 4 KiB segment.
        assert_eq!(s.records_dropped, s.segments_dropped * 8, "{s:?}");
        let on_disk: u64 = segment_files(dir.path())
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(on_disk, log.total_bytes());
        assert!(on_disk <= o.max_bytes);
    }
    // What is left is the newest records, in order, with no gap.
    let (_log, got) = Log::open(dir.path(), o).unwrap();
    let first = n - got.len();
    assert_eq!(got, (first..n).map(|i| rec(i, 500)).collect::<Vec<_>>());
    assert!(got.len() >= 16, "at least the last full segments stay");
}

#[test]
fn full_disk_is_a_clear_counted_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        simulated_disk_bytes: Some(3000),
        ..opts()
    };
    let (mut log, _) = Log::open(dir.path(), o.clone()).unwrap();
    let mut ok = 0;
    let mut errors = 0;
    for i in 0..20 {
        match log.append(&rec(i, 292)) {
            Ok(()) => ok += 1,
            Err(e) => {
                errors += 1;
                assert!(matches!(e, StorageError::NoSpace { .. }), "{e}");
                let msg = e.to_string();
                assert!(msg.contains("no space left"), "{msg}");
            }
        }
    }
    assert_eq!(ok, 10, "3000 bytes hold ten 300-byte records");
    assert_eq!(errors, 10);
    let s = log.stats();
    assert_eq!((s.no_space_errors, s.write_errors), (10, 10));
    // Nothing half-written: the file still ends at a record boundary.
    assert_eq!(std::fs::metadata(log.active_path()).unwrap().len(), 3000);
    drop(log);
    let (log, got) = Log::open(dir.path(), o).unwrap();
    assert_eq!(got.len(), 10);
    assert_eq!(log.stats().skipped_records, 0);

    // Too large for the bound at all: a clear error as well.
    let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
    let e = log.append(&vec![0; 2 << 20]).unwrap_err();
    assert!(matches!(e, StorageError::TooLarge { .. }), "{e}");
}

#[test]
fn fsync_policies_sync_as_configured() {
    for (policy, expect) in [
        (FsyncPolicy::Always, 25),
        (
            FsyncPolicy::Batch {
                interval: Duration::from_secs(3600),
                records: 10,
            },
            2,
        ),
        (FsyncPolicy::Never, 0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = LogOptions {
            fsync: policy,
            max_bytes: 1 << 20,
            segment_bytes: 1 << 19,
            simulated_disk_bytes: None,
        };
        let (mut log, _) = Log::open(dir.path(), o).unwrap();
        for i in 0..25 {
            log.append(&rec(i, 10)).unwrap();
        }
        assert_eq!(log.stats().fsyncs, expect, "{policy:?}");
        // Unsynced appends do not sync even under `always`.
        log.append_unsynced(b"x").unwrap();
        assert_eq!(log.stats().fsyncs, expect, "{policy:?}");
    }
    // Batch by time: a due sync happens on the timer call.
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        fsync: FsyncPolicy::Batch {
            interval: Duration::from_millis(1),
            records: 1000,
        },
        ..opts()
    };
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    log.append(b"a").unwrap();
    log.append_unsynced(b"b").unwrap();
    let before = log.stats().fsyncs;
    std::thread::sleep(Duration::from_millis(2));
    log.sync_if_due().unwrap();
    assert_eq!(log.stats().fsyncs, before + 1);
    log.sync_if_due().unwrap();
    assert_eq!(log.stats().fsyncs, before + 1, "nothing waiting");
}

#[test]
fn compaction_keeps_only_the_given_records() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
        for i in 0..100 {
            log.append(&rec(i, 200)).unwrap();
        }
        assert!(log.segment_count() > 3);
        let keep = [rec(1, 5), rec(2, 5)];
        log.compact(keep.iter().map(|r| r.as_slice())).unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.total_bytes(), 2 * (HEADER_BYTES as u64 + 9));
        log.append(&rec(3, 5)).unwrap();
        assert_eq!(log.stats().compactions, 1);
    }
    assert_eq!(segment_files(dir.path()).len(), 1);
    let (_log, got) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(got, vec![rec(1, 5), rec(2, 5), rec(3, 5)]);
}

#[test]
fn bad_options_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let e = Log::open(
        dir.path(),
        LogOptions {
            segment_bytes: 10,
            ..opts()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("segment_bytes"), "{e}");
    let e = Log::open(
        dir.path(),
        LogOptions {
            max_bytes: 5000,
            ..opts()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("max_bytes"), "{e}");
}

/// Fuzz-like: 10,000 random buffers and 10,000 mutated valid segments, fixed
/// seed. `scan` must never panic, return ranges inside the buffer, and on a
/// damaged copy of a valid segment return a prefix of the original records.
#[test]
fn scan_survives_random_and_mutated_input() {
    let mut rng = Rng(0x5EED_0C1A_u64);
    for _ in 0..10_000 {
        let len = rng.below(300);
        let buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let s = scan(&buf);
        for r in &s.records {
            assert!(r.start <= r.end && r.end <= buf.len());
        }
        let end = s.records.last().map_or(0, |r| r.end);
        match s.damage {
            Some((at, _)) => assert_eq!(at, end),
            None => assert_eq!(end, buf.len()),
        }
    }
    let originals: Vec<Vec<u8>> = (0..20).map(|i| rec(i, i * 7)).collect();
    let mut valid = Vec::new();
    for r in &originals {
        valid.extend_from_slice(&frame(r));
    }
    for _ in 0..10_000 {
        let mut buf = valid.clone();
        match rng.below(3) {
            0 => buf.truncate(rng.below(valid.len())),
            1 => {
                let i = rng.below(buf.len());
                buf[i] ^= 1 << rng.below(8);
            }
            _ => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(buf.len());
                    buf[i] = rng.next() as u8;
                }
            }
        }
        let s = scan(&buf);
        let got: Vec<&[u8]> = s.records.iter().map(|r| &buf[r.clone()]).collect();
        assert!(got.len() <= originals.len());
        for (g, o) in got.iter().zip(&originals) {
            assert_eq!(g, &o.as_slice(), "a damaged record was returned");
        }
        if buf != valid {
            assert!(s.damage.is_some() || got.len() < originals.len());
        }
    }
}

/// Recovery of whole directories holding random segment files: opens, counts
/// damage, and a second open finds only the corruption again (a torn tail
/// was cut off).
#[test]
fn open_survives_random_segment_files() {
    let mut rng = Rng(42);
    for case in 0..200 {
        let dir = tempfile::tempdir().unwrap();
        let mut valid = Vec::new();
        for i in 0..rng.below(10) {
            valid.extend_from_slice(&frame(&rec(i, rng.below(50))));
        }
        let cut = rng.below(valid.len() + 1);
        valid.truncate(cut);
        for _ in 0..rng.below(4) {
            if !valid.is_empty() {
                let i = rng.below(valid.len());
                valid[i] = rng.next() as u8;
            }
        }
        std::fs::write(dir.path().join(segment_name(1)), &valid).unwrap();
        let junk: Vec<u8> = (0..rng.below(100)).map(|_| rng.next() as u8).collect();
        std::fs::write(dir.path().join(segment_name(2)), &junk).unwrap();
        let (mut log, first) = Log::open(dir.path(), opts()).unwrap();
        let corrupt = log.stats().corrupt_records;
        log.append(b"after").unwrap();
        drop(log);
        let (log, second) = Log::open(dir.path(), opts()).unwrap();
        // A torn tail is cut once; corruption stays and is reported again.
        assert_eq!(log.stats().skipped_records, corrupt, "case {case}");
        assert_eq!(log.stats().corrupt_records, corrupt, "case {case}");
        assert_eq!(second.len(), first.len() + 1, "case {case}");
        assert_eq!(second.last().unwrap(), b"after");
    }
}

/// Append throughput per fsync policy (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn append_throughput() {
    for (name, policy, n) in [
        ("always", FsyncPolicy::Always, 2_000),
        (
            "batch(10ms/64)",
            FsyncPolicy::Batch {
                interval: Duration::from_millis(10),
                records: 64,
            },
            20_000,
        ),
        ("never", FsyncPolicy::Never, 200_000),
    ] {
        let dir =
            tempfile::tempdir_in(std::env::var("STORAGE_BENCH_DIR").unwrap_or(".".into())).unwrap();
        let o = LogOptions {
            fsync: policy,
            max_bytes: 1 << 30,
            segment_bytes: 8 << 20,
            simulated_disk_bytes: None,
        };
        let (mut log, _) = Log::open(dir.path(), o).unwrap();
        let payload = vec![7u8; 200];
        let start = Instant::now();
        for _ in 0..n {
            log.append(&payload).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "fsync {name}: {n} appends of 200 B in {secs:.3} s = {:.0} records/s ({:.1} us each), {} fsyncs",
            n as f64 / secs,
            secs * 1e6 / n as f64,
            log.stats().fsyncs
        );
    }
}

/// Issue 15, item 3: damage that is not a torn tail is corruption. A
/// flipped bit in a sealed segment used to cut that segment at the bad
/// record (truncating it on disk) as if a write had been cut short; now the
/// bad record alone is skipped, reported as corrupt, and left on disk, and
/// the records after it, in that segment and later ones, are read.
#[test]
fn corruption_in_an_older_segment_is_reported_and_later_segments_read() {
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<Vec<u8>> = (0..40).map(|i| rec(i, 200)).collect();
    {
        let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
        for r in &all {
            log.append(r).unwrap();
        }
        assert!(log.segment_count() >= 3);
    }
    let files = segment_files(dir.path());
    let first = files[0].clone();
    let per_segment = std::fs::metadata(&first).unwrap().len() as usize / (200 + HEADER_BYTES);
    let mut b = std::fs::read(&first).unwrap();
    let size = b.len();
    // Inside the second record's payload.
    b[208 + HEADER_BYTES + 50] ^= 0x04;
    std::fs::write(&first, &b).unwrap();
    for _ in 0..2 {
        let (log, got) = Log::open(dir.path(), opts()).unwrap();
        // Record 0, then the first segment stops; every later segment is read.
        let mut want = vec![all[0].clone()];
        want.extend(all[per_segment..].iter().cloned());
        assert_eq!(got, want);
        let s = log.stats();
        assert_eq!((s.skipped_records, s.corrupt_records), (1, 1), "{s:?}");
        assert_eq!(std::fs::metadata(&first).unwrap().len(), size as u64);
    }
    // In the last segment damage is the torn tail: cut there, even with
    // good-looking records after it (never searched for).
    let last = segment_files(dir.path()).last().unwrap().clone();
    let in_last = std::fs::metadata(&last).unwrap().len() as usize / (200 + HEADER_BYTES);
    let mut b = std::fs::read(&last).unwrap();
    b[HEADER_BYTES + 3] ^= 0x01;
    std::fs::write(&last, &b).unwrap();
    let (log, got) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(got.len(), 1 + all.len() - per_segment - in_last);
    assert_eq!(log.stats().corrupt_records, 1);
    assert_eq!(std::fs::metadata(&last).unwrap().len(), 0);
}

/// Review of issue 15: a damaged record whose payload holds a valid frame
/// (task inputs and results are stored verbatim) must not have that frame
/// replayed as a record of its own.
#[test]
fn a_frame_inside_a_torn_record_is_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let forged = frame(b"forged record");
    let mut payload = b"outer:".to_vec();
    payload.extend_from_slice(&forged);
    payload.extend_from_slice(&[b'x'; 64]);
    {
        let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
        log.append(b"before").unwrap();
        log.append(&payload).unwrap();
    }
    // Tear the outer record: its length and CRC stay, its end is gone.
    let seg = segment_files(dir.path())[0].clone();
    let b = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &b[..b.len() - 10]).unwrap();
    let (_, got) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(got, vec![b"before".to_vec()]);
}

/// Review of the catch-up snapshot: every failed compaction rolled to a
/// new segment before writing and left it behind, empty (one more file,
/// read again at every start, per failed try on a full disk). Now a
/// compaction into an empty active segment reuses it.
#[test]
fn failed_compactions_do_not_pile_up_segment_files() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        simulated_disk_bytes: Some(3000),
        ..opts()
    };
    let (mut log, _) = Log::open(dir.path(), o.clone()).unwrap();
    for i in 0..10 {
        log.append(&rec(i, 292)).unwrap();
    }
    let files = || std::fs::read_dir(dir.path()).unwrap().count();
    let before = files();
    let snapshot: Vec<Vec<u8>> = (0..10).map(|i| rec(i, 292)).collect();
    for _ in 0..5 {
        let e = log.compact(snapshot.iter().map(Vec::as_slice)).unwrap_err();
        assert!(matches!(e, StorageError::NoSpace { .. }), "{e}");
    }
    assert!(
        files() <= before + 1,
        "{} files after five failed compactions, {before} before",
        files()
    );
    assert!(!log.writable(), "the probe on a full disk");
    drop(log);
    let (mut log, got) = Log::open(dir.path(), o).unwrap();
    assert_eq!(got.len(), 10, "nothing lost");
    let s = log.stats().write_errors;
    assert!(!log.writable());
    assert_eq!(log.stats().write_errors, s, "the probe is not counted");
}
