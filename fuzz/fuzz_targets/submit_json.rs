//! Arbitrary bytes as the JSON body of a submission (HTTP `POST /v1/tasks`
//! and MQTT `openclaw/v1/submit`): parsing never panics; a request that
//! parses survives a JSON round trip unchanged, and its `input` either
//! crosses the wire format to the agent and back unchanged (what the agent
//! receives is what was submitted) or is refused with a reason. (This target
//! found integers above i64::MAX silently rounded to floats.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw::protocol::api::SubmitRequest;
use openclaw::protocol::{decode, encode, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<SubmitRequest>(data) else {
        return;
    };
    let text = serde_json::to_vec(&req).unwrap();
    let again: SubmitRequest = serde_json::from_slice(&text).unwrap();
    assert_eq!(again, req);

    // The server converts with `try_from_json` (a 400 if it cannot).
    match Value::try_from_json(&req.input) {
        Ok(v) => {
            let wire = encode(&v);
            let back: Value = decode(&wire, usize::MAX).unwrap();
            assert_eq!(serde_json::Value::from(back), req.input);
        }
        Err(e) => assert!(e.contains("out of range"), "{e}"),
    }
});
