//! Arbitrary bytes as a signed release manifest: reading never panics; a
//! file that verifies is exactly what signing its manifest again writes
//! (ed25519 signatures are deterministic, and only one spelling is
//! accepted); and any change the input makes to a valid manifest's bytes
//! is refused.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use openclaw::release::{parse, verify, Manifest};

fn valid(key: &SigningKey) -> Vec<u8> {
    Manifest {
        id: "rpi4-7".into(),
        version: "0.4.0".into(),
        counter: 7,
        target: "aarch64-unknown-linux-musl".into(),
        board: "rpi4".into(),
        sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        size: 4,
        url: "http://10.0.0.1:8080/v1/releases/rpi4-7/binary".into(),
        created_ms: 1_000,
        expires_ms: 2_000,
        key_id: String::new(),
    }
    .sign(key)
    .unwrap()
    .into_bytes()
}

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[7; 32]);
    let keys = [key.verifying_key()];
    let _ = parse(data);
    if let Ok(m) = verify(data, &keys) {
        assert_eq!(m.sign(&key).unwrap().as_bytes(), data);
    }
    // The input as changes to a valid manifest: each byte XORed in at its
    // position (wrapping around).
    let good = valid(&key);
    let mut t = good.clone();
    for (i, b) in data.iter().enumerate() {
        t[i % good.len()] ^= b;
    }
    if t != good {
        assert!(verify(&t, &keys).is_err(), "a changed manifest was accepted");
    } else {
        assert!(verify(&t, &keys).is_ok());
    }
});
