//! What a hostile payload can make the decoder allocate (issue 15, item 1:
//! "a declared length that allocates before it is checked").
//!
//! A postcard sequence starts with its declared length. serde preallocates
//! up to 1 MiB for it (postcard passes the length on when that many bytes
//! follow), per sequence, and nested sequences each got that: 66 KB of
//! `Value::List`s nested 128 deep made the decoder hold 128 MiB at once
//! (measured, before the fix) before it failed, on an agent with 512 MiB.
//! This binary counts the peak
//! bytes the decoding thread holds, with its own allocator.

use openclaw::protocol::{self, DeviceStatus, FromAgent, ToAgent};

/// `protocol::MAX_VALUE_DEPTH` (a literal, so this also builds against
/// the code before the limit).
const MAX_VALUE_DEPTH: usize = 128;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static NOW: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if TRACK.with(Cell::get) {
            let now = NOW.with(|n| {
                n.set(n.get() + l.size());
                n.get()
            });
            PEAK.with(|p| p.set(p.get().max(now)));
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if TRACK.with(Cell::get) {
            NOW.with(|n| n.set(n.get().saturating_sub(l.size())));
        }
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak bytes held by this thread while `f` runs.
fn peak(f: impl FnOnce()) -> usize {
    NOW.with(|n| n.set(0));
    PEAK.with(|p| p.set(0));
    TRACK.with(|t| t.set(true));
    f();
    TRACK.with(|t| t.set(false));
    PEAK.with(Cell::get)
}

/// A declared length of 40,000 (a varint). postcard trusts a declared
/// length as a size hint only when that many bytes follow, so the payloads
/// below carry 64 KiB of padding after it.
const LEN: [u8; 3] = [0xc0, 0xb8, 0x02];

/// 64 KiB that is no valid `Value` (variant 255), so decoding stops at the
/// first element of the innermost sequence.
fn padding() -> Vec<u8> {
    vec![0xff; 64 << 10]
}

/// `Task { id "t", plugin "e", input: ... }` up to the input.
fn task_head() -> Vec<u8> {
    vec![1, 0, 1, b't', 1, b'e']
}

#[test]
fn declared_lengths_do_not_allocate_ahead_of_the_input() {
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Lists nested to the limit, each declaring 40,000 elements.
    let mut lists = task_head();
    for _ in 0..MAX_VALUE_DEPTH {
        lists.push(6);
        lists.extend_from_slice(&LEN);
    }
    lists.extend(padding());
    cases.push(("nested lists", lists));
    // Maps the same way (an entry: empty key, then the value).
    let mut maps = task_head();
    for _ in 0..MAX_VALUE_DEPTH {
        maps.push(7);
        maps.extend_from_slice(&LEN);
        maps.push(0);
    }
    maps.extend(padding());
    cases.push(("nested maps", maps));
    // A result of nested lists, for the server's side.
    let mut fin = vec![1, 2, 1, b't', 0];
    for _ in 0..MAX_VALUE_DEPTH {
        fin.push(6);
        fin.extend_from_slice(&LEN);
    }
    fin.extend(padding());
    cases.push(("nested result", fin));
    for (what, payload) in &cases {
        let held = peak(|| {
            assert!(
                protocol::decode::<ToAgent>(payload, 1 << 20).is_err(),
                "{what}"
            );
            let _ = protocol::decode::<FromAgent>(payload, 1 << 20);
        });
        // What the input can fill, not what it declares.
        assert!(
            held < 1 << 20,
            "{what}: {} bytes of input made the decoder hold {held} bytes",
            payload.len()
        );
    }
    // A status declaring 40,000 plugins: one sequence, at most 1 MiB before
    // (serde's cap), a few KiB now.
    let mut status = vec![1, 0, 0, 0, 0];
    status.extend_from_slice(&LEN);
    status.extend(padding());
    let held = peak(|| assert!(DeviceStatus::decode(&status, 1 << 20).is_err()));
    assert!(held < 64 << 10, "status: {held} bytes");
}
