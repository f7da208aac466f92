//! Arbitrary bytes as a segment: `scan` and `scan_all` must not panic and
//! must only return ranges inside the input; `Log::open` on such a file
//! must open with the records `scan_all` finds, and a second open must find
//! the same records and only the corruption again (a torn tail is cut off
//! by the first).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw::storage::{scan, scan_all, FsyncPolicy, Log, LogOptions};

fuzz_target!(|data: &[u8]| {
    for r in &scan(data).records {
        assert!(r.start <= r.end && r.end <= data.len());
    }
    let s = scan_all(data);
    for r in s.records.iter().chain(&s.damaged) {
        assert!(r.start <= r.end && r.end <= data.len());
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("00000000000000000001.seg"), data).unwrap();
    // No fsync: durability is not under test here, and it keeps runs fast.
    let opts = LogOptions {
        fsync: FsyncPolicy::Never,
        ..LogOptions::default()
    };
    let (log, first) = Log::open(dir.path(), opts.clone()).unwrap();
    assert_eq!(first.len(), s.records.len());
    let corrupt = log.stats().corrupt_records;
    drop(log);
    let (log, second) = Log::open(dir.path(), opts).unwrap();
    assert_eq!(second, first);
    assert_eq!(log.stats().skipped_records, corrupt);
});
