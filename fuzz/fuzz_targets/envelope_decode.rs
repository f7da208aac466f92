//! Arbitrary bytes as an MQTT payload: decoding never panics, and a payload
//! that decodes re-encodes to a canonical form that survives another round
//! trip byte for byte. (Not to the input bytes: postcard accepts overlong
//! varints, e.g. version 1 as `81 00`; and not compared as values, since a
//! NaN input is not equal to itself. This target found both.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw::protocol::{decode, encode, DeviceStatus, FromAgent, ToAgent};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode::<ToAgent>(data, 1 << 20) {
        let canonical = encode(&m);
        let again = decode::<ToAgent>(&canonical, 1 << 20).unwrap();
        assert_eq!(encode(&again), canonical);
    }
    let _ = decode::<FromAgent>(data, 1 << 20);
    let _ = decode::<DeviceStatus>(data, 1 << 20);
});
