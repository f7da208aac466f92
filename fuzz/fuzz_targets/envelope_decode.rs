//! Arbitrary bytes as an MQTT payload: decoding never panics, never
//! overflows the stack, and a payload that decodes re-encodes to a
//! canonical form that survives another round trip byte for byte. (Not to
//! the input bytes: postcard accepts overlong varints, e.g. version 1 as
//! `81 00`; and not compared as values, since a NaN input is not equal to
//! itself. This target found both.)
//!
//! Each input is decoded twice: on libFuzzer's thread, whose lowest stack
//! address is a coverage feature (cargo-fuzz builds with
//! `-sanitizer-coverage-stack-depth`), so inputs that recurse deeper are
//! kept and grown; and on a thread with a tokio worker's 2 MiB stack, where
//! the server and the agent decode, so a nesting that overflows there
//! crashes here (issue 15: 50,000 nested lists aborted the server).
//! scripts/fuzz.sh runs it with `-max_len` at the 1 MiB payload limit and
//! the seeds in fuzz/seeds/envelope_decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw::protocol::{decode, encode, DeviceStatus, FromAgent, ToAgent};

/// A tokio worker thread's default stack.
const WORKER_STACK: usize = 2 << 20;

fn check(data: &[u8]) {
    if let Ok(m) = decode::<ToAgent>(data, 1 << 20) {
        let canonical = encode(&m);
        let again = decode::<ToAgent>(&canonical, 1 << 20).unwrap();
        assert_eq!(encode(&again), canonical);
    }
    let _ = decode::<FromAgent>(data, 1 << 20);
    let _ = DeviceStatus::decode(data, 1 << 20);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(WORKER_STACK)
            .spawn_scoped(s, || check(data))
            .expect("spawn a decoding thread")
            .join()
            .expect("decoding panicked");
    });
});
