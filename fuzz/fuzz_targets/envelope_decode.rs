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
//!
//! An overflow leaves its input behind (see [`AltStack`]). With the depth
//! limit taken out and the nested seeds removed, this target built a
//! 15,509-byte nesting of lists by itself and overflowed in about 13
//! minutes (2.6 million runs; issue 15), but the process died with a bare
//! SIGSEGV and no file. Now libFuzzer reports a deadly signal; its dump of
//! the input then stalls inside the handler, and the `-timeout` handler
//! writes it (`timeout-*`). Either way the run fails, with the input. That
//! input is `fuzz/seeds/envelope_decode/issue15_found_by_fuzzing.bin`
//! (`protocol::tests::the_nesting_the_fuzzer_found_is_refused`).
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

/// An alternate signal stack for the current thread, removed on drop.
///
/// On a stack overflow the SIGSEGV handler has no stack left to run on
/// unless it runs on one of its own. libFuzzer keeps `SA_ONSTACK` only if
/// the handler it replaced had it, and a fuzz target has none (no
/// sanitizer; `std`'s overflow handler is installed by Rust's `main`, which
/// libFuzzer's `main` replaces), so an overflow faulted again inside the
/// handler and the input was lost. With this stack and libFuzzer's handler
/// re-registered with `SA_ONSTACK`, it reports "deadly signal" and writes
/// the input to `crash-*`.
struct AltStack(Vec<u8>);

impl AltStack {
    const BYTES: usize = 256 << 10;

    fn install() -> AltStack {
        static ONSTACK: std::sync::Once = std::sync::Once::new();
        ONSTACK.call_once(|| unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut sa) == 0 {
                sa.sa_flags |= libc::SA_ONSTACK;
                libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
            }
        });
        let mut buf = vec![0u8; Self::BYTES];
        let ss = libc::stack_t {
            ss_sp: buf.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: buf.len(),
        };
        // SAFETY: `buf` outlives the registration (removed in `drop`).
        unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
        AltStack(buf)
    }
}

impl Drop for AltStack {
    fn drop(&mut self) {
        let ss = libc::stack_t {
            ss_sp: std::ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
    }
}

thread_local! {
    /// libFuzzer's own thread keeps one for the whole run.
    static MAIN_ALT: AltStack = AltStack::install();
}

fuzz_target!(|data: &[u8]| {
    MAIN_ALT.with(|_| ());
    check(data);
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(WORKER_STACK)
            .spawn_scoped(s, || {
                let _alt = AltStack::install();
                check(data)
            })
            .expect("spawn a decoding thread")
            .join()
            .expect("decoding panicked");
    });
});
