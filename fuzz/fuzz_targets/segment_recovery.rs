//! Arbitrary bytes as a segment: `scan` must not panic and must only return
//! ranges inside the input; `Log::open` on such a file (the last segment)
//! must open with the records `scan` finds, cut any damage off, and a second
//! open must find the same records and nothing left to skip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw::storage::{scan, FsyncPolicy, Log, LogOptions};

fuzz_target!(|data: &[u8]| {
    let s = scan(data);
    for r in &s.records {
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
    drop(log);
    let (log, second) = Log::open(dir.path(), opts).unwrap();
    assert_eq!(second, first);
    assert_eq!(log.stats().skipped_records, 0);
});
