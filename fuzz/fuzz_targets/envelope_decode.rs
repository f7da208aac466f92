//! Arbitrary bytes as an MQTT payload: decoding never panics, and a payload
//! that decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw::protocol::{decode, encode, DeviceStatus, FromAgent, ToAgent};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<ToAgent>(data, 1 << 20) {
        assert_eq!(encode(&m), data);
    }
    let _ = decode::<FromAgent>(data, 1 << 20);
    let _ = decode::<DeviceStatus>(data, 1 << 20);
});
