//! Arbitrary bytes as an `Authorization` header value and as a token or an
//! expiry: parsing never panics, and whatever parses has the shape it
//! claims (a token's id and secret are lowercase hex of their lengths, and
//! rebuilding the token gives back the input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw::server::auth::tokens::{
    parse_bearer, parse_duration, parse_token, ID_HEX, SECRET_HEX,
};

fn hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = parse_bearer(data) {
        assert!(!token.is_empty());
        assert!(!token.starts_with(' ') && !token.ends_with(' '));
        if let Ok((id, secret)) = parse_token(token) {
            assert!(id.len() == ID_HEX && hex(id), "{id:?}");
            assert!(secret.len() == SECRET_HEX && hex(secret), "{secret:?}");
            assert_eq!(format!("oc_{id}_{secret}"), token);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok((id, secret)) = parse_token(s) {
            assert_eq!(format!("oc_{id}_{secret}"), s);
        }
        if let Ok(ms) = parse_duration(s) {
            assert!(ms > 0 && ms <= i64::MAX as u64);
        }
    }
});
