//! Signed release manifests for over-the-air agent updates.
//!
//! `openclaw-admin release create` signs a [`Manifest`] with an ed25519
//! key; the server stores it beside the binary and hands it to the devices
//! of a rollout; each agent checks it against the keys in its `[ota] keys`
//! before it downloads anything ([`verify`]), and the binary against the
//! manifest's size and sha256 after.
//!
//! The file is one line of JSON, `{"manifest":{...},"signature":"HEX"}`,
//! and the signature covers [`SIGNING_CONTEXT`] followed by the manifest's
//! JSON exactly as it is written there. A file is accepted only in that
//! one spelling (fields in order, no spaces, lowercase hex, no escapes
//! that need not be): [`parse`] writes what it read back out and refuses a
//! file that differs, so no two files mean the same release and any bit
//! flipped anywhere is refused (tested over every bit of a manifest).

use crate::hex;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prepended to the manifest's JSON before signing, so a signature made
/// for something else with the same key never passes as a release's.
pub const SIGNING_CONTEXT: &[u8] = b"openclaw-release-v1\n";

/// The largest manifest file read.
pub const MAX_MANIFEST_BYTES: usize = 16 << 10;

/// What an update installs: one agent binary for one board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The release id, also its directory `PREFIX/releases/ID` on devices.
    pub id: String,
    /// The agent version the binary reports.
    pub version: String,
    /// Grows with every release of a fleet: an agent refuses one at or
    /// below the highest it has installed (no downgrade, no replay).
    pub counter: u64,
    /// The binary's target triple (`aarch64-unknown-linux-musl`).
    pub target: String,
    /// The board profile it is for.
    pub board: String,
    /// sha256 of the binary, lowercase hex.
    pub sha256: String,
    /// The binary's size in bytes.
    pub size: u64,
    /// Where devices download it (the server's `/v1/releases/ID/binary`).
    pub url: String,
    /// Unix milliseconds when signed.
    pub created_ms: u64,
    /// Unix milliseconds after which no agent installs it.
    pub expires_ms: u64,
    /// [`key_id`] of the signing key.
    pub key_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedFile {
    manifest: Manifest,
    signature: String,
}

/// Why a manifest, key or binary was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    #[error("the manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    TooLarge(usize),
    #[error("the manifest is not valid: {0}")]
    Malformed(String),
    #[error(
        "the manifest is not in its one accepted spelling (changed after signing, or not written by openclaw-admin)"
    )]
    NotCanonical,
    #[error("manifest field `{field}` is not valid: {why}")]
    Field { field: &'static str, why: String },
    #[error("the manifest is signed by key {0}, which is not among the trusted keys ([ota] keys)")]
    UnknownKey(String),
    #[error("the signature does not verify with key {0}: the manifest was altered or signed by another key")]
    BadSignature(String),
    #[error("bad key: {0}")]
    Key(String),
}

/// Whether `id` can be a release id: a plain file name, 1 to 64 of
/// `A-Z a-z 0-9 . _ -`, not starting with a dot (no `..`, no hidden or
/// staging directory, no path).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    // Lowercase only: one spelling per value.
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A key's id: the first 8 bytes of the sha256 of its public key, hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..8])
}

/// A public key as `[ota] keys` lists it: 64 lowercase hex digits.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex(key.as_bytes())
}

/// Parses a public key written by [`public_key_hex`].
pub fn parse_public_key(s: &str) -> Result<VerifyingKey, ReleaseError> {
    let bytes = unhex::<32>(s.trim()).ok_or_else(|| {
        ReleaseError::Key(format!(
            "`{}` is not an ed25519 public key (64 lowercase hex digits)",
            s.chars().take(80).collect::<String>()
        ))
    })?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| ReleaseError::Key(format!("not a point of the curve: {e}")))
}

impl Manifest {
    /// Checks each field's form (not the signature, nor whether it suits
    /// a device).
    pub fn check(&self) -> Result<(), ReleaseError> {
        let bad = |field: &'static str, why: &str| ReleaseError::Field {
            field,
            why: why.to_string(),
        };
        if !valid_id(&self.id) {
            return Err(bad(
                "id",
                "1 to 64 of A-Z a-z 0-9 . _ -, not starting with a dot",
            ));
        }
        let plain =
            |s: &str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic());
        if !plain(&self.version) {
            return Err(bad("version", "1 to 128 printable ASCII characters"));
        }
        if !plain(&self.target) {
            return Err(bad("target", "1 to 128 printable ASCII characters"));
        }
        if !plain(&self.board) {
            return Err(bad("board", "1 to 128 printable ASCII characters"));
        }
        if unhex::<32>(&self.sha256).is_none() {
            return Err(bad("sha256", "64 lowercase hex digits"));
        }
        if self.size == 0 {
            return Err(bad("size", "an empty binary"));
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://"))
            || self.url.len() > 2048
            || !self.url.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad("url", "an http:// or https:// URL without spaces"));
        }
        if self.counter == 0 {
            return Err(bad(
                "counter",
                "0 is what an install without a manifest has",
            ));
        }
        if self.expires_ms <= self.created_ms {
            return Err(bad("expires_ms", "not after created_ms"));
        }
        if unhex::<8>(&self.key_id).is_none() {
            return Err(bad("key_id", "16 lowercase hex digits"));
        }
        Ok(())
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut m = SIGNING_CONTEXT.to_vec();
        m.extend(serde_json::to_vec(self).expect("a manifest serializes"));
        m
    }

    /// Signs it (setting `key_id`) and returns the file's text.
    pub fn sign(mut self, key: &SigningKey) -> Result<String, ReleaseError> {
        self.key_id = key_id(&key.verifying_key());
        self.check()?;
        let signature = hex(&key.sign(&self.signed_bytes()).to_bytes());
        Ok(file_text(&SignedFile {
            manifest: self,
            signature,
        }))
    }
}

fn file_text(f: &SignedFile) -> String {
    let mut s = serde_json::to_string(f).expect("a manifest serializes");
    s.push('\n');
    s
}

/// Reads a manifest file without checking its signature (the server,
/// which stores and serves it, and `release list`). The form is checked.
pub fn parse(text: &[u8]) -> Result<(Manifest, Signature), ReleaseError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ReleaseError::TooLarge(text.len()));
    }
    let f: SignedFile =
        serde_json::from_slice(text).map_err(|e| ReleaseError::Malformed(e.to_string()))?;
    if file_text(&f).as_bytes() != text {
        return Err(ReleaseError::NotCanonical);
    }
    f.manifest.check()?;
    let sig = unhex::<64>(&f.signature).ok_or(ReleaseError::Field {
        field: "signature",
        why: "128 lowercase hex digits".into(),
    })?;
    Ok((f.manifest, Signature::from_bytes(&sig)))
}

/// Reads a manifest file and checks its signature against `keys`
/// (`verify_strict`: no malleable or small-order signatures).
pub fn verify(text: &[u8], keys: &[VerifyingKey]) -> Result<Manifest, ReleaseError> {
    let (m, sig) = parse(text)?;
    let key = keys
        .iter()
        .find(|k| key_id(k) == m.key_id)
        .ok_or_else(|| ReleaseError::UnknownKey(m.key_id.clone()))?;
    key.verify_strict(&m.signed_bytes(), &sig)
        .map_err(|_| ReleaseError::BadSignature(m.key_id.clone()))?;
    Ok(m)
}

/// A new signing key from the operating system's random source.
#[cfg(feature = "admin")]
pub fn generate_key() -> Result<SigningKey, ReleaseError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| ReleaseError::Key(format!("no randomness: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A signing key as PKCS#8 PEM (what `openssl genpkey -algorithm ed25519`
/// writes, and reads).
#[cfg(feature = "admin")]
pub fn key_to_pem(key: &SigningKey) -> Result<String, ReleaseError> {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    key.to_pkcs8_pem(pkcs8::LineEnding::LF)
        .map(|s| s.to_string())
        .map_err(|e| ReleaseError::Key(e.to_string()))
}

/// Reads a PKCS#8 PEM signing key.
#[cfg(feature = "admin")]
pub fn key_from_pem(pem: &str) -> Result<SigningKey, ReleaseError> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    SigningKey::from_pkcs8_pem(pem)
        .map_err(|e| ReleaseError::Key(format!("not a PKCS#8 PEM ed25519 private key: {e}")))
}

/// JSON of the releases API (`/v1/releases`), shared by the server and
/// `openclaw-admin release`.
pub mod api {
    use serde::{Deserialize, Serialize};

    /// The header of `POST /v1/releases` that carries the signed manifest
    /// (the binary is the body).
    pub const MANIFEST_HEADER: &str = "openclaw-manifest";

    /// `POST /v1/releases/{id}/deploy`.
    #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct DeployRequest {
        /// These devices only (each must be known and of the release's
        /// board); absent: every known device of the board.
        #[serde(default)]
        pub devices: Option<Vec<String>>,
        /// First to this share of the devices (1-100, at least one
        /// device); the rest only once they all settled and the failure
        /// rate is within `max_failure_percent`.
        #[serde(default)]
        pub canary_percent: Option<u8>,
        /// The rollout pauses when more than this share of the devices
        /// it settled failed (default `releases.max_failure_percent`).
        #[serde(default)]
        pub max_failure_percent: Option<u8>,
    }

    /// One device of a rollout.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct TargetView {
        pub device: String,
        /// 1: the canary wave; 2: the rest.
        pub wave: u32,
        /// `waiting`, `sent`, `succeeded` or `failed`.
        pub state: String,
        /// Why it failed (the agent's words), empty otherwise.
        pub message: String,
        pub updated_ms: u64,
    }

    /// A release and its rollout.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct ReleaseView {
        pub id: String,
        pub board: String,
        pub target: String,
        pub version: String,
        pub counter: u64,
        pub size: u64,
        pub sha256: String,
        pub key_id: String,
        pub created_ms: u64,
        pub expires_ms: u64,
        /// `new` (not deployed), `rolling`, `paused` or `done`.
        pub state: String,
        /// Why it paused.
        pub reason: Option<String>,
        pub canary_percent: Option<u8>,
        pub max_failure_percent: u8,
        /// The wave being rolled out (0 before the deploy).
        pub wave: u32,
        pub targets: Vec<TargetView>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    pub(crate) fn sample() -> Manifest {
        Manifest {
            id: "rpi4-7".into(),
            version: "0.4.0".into(),
            counter: 7,
            target: "aarch64-unknown-linux-musl".into(),
            board: "rpi4".into(),
            sha256: hex(&Sha256::digest(b"binary")),
            size: 6,
            url: "http://10.0.0.1:8080/v1/releases/rpi4-7/binary".into(),
            created_ms: 1_000,
            expires_ms: 2_000,
            key_id: String::new(),
        }
    }

    #[test]
    fn a_signed_manifest_verifies_with_its_key_only() {
        let text = sample().sign(&key(1)).unwrap();
        let k1 = key(1).verifying_key();
        let k2 = key(2).verifying_key();
        let m = verify(text.as_bytes(), &[k2, k1]).unwrap();
        assert_eq!(m.counter, 7);
        assert_eq!(m.key_id, key_id(&k1));
        assert!(matches!(
            verify(text.as_bytes(), &[k2]),
            Err(ReleaseError::UnknownKey(_))
        ));
        // Another key given the first one's id still fails.
        let forged = text.replace(&key_id(&k1), &key_id(&k2));
        assert!(verify(forged.as_bytes(), &[k2]).is_err());
        assert_eq!(parse_public_key(&public_key_hex(&k1)).unwrap(), k1);
        assert!(parse_public_key("zz").is_err());
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let text = sample().sign(&key(3)).unwrap().into_bytes();
        let keys = [key(3).verifying_key()];
        for i in 0..text.len() * 8 {
            let mut t = text.clone();
            t[i / 8] ^= 1 << (i % 8);
            assert!(
                verify(&t, &keys).is_err(),
                "bit {i} (byte {}) flipped and still accepted",
                i / 8
            );
        }
        // Truncations and additions too.
        for n in 0..text.len() {
            assert!(verify(&text[..n], &keys).is_err());
        }
        let mut longer = text.clone();
        longer.push(b' ');
        assert_eq!(verify(&longer, &keys), Err(ReleaseError::NotCanonical));
    }

    #[test]
    fn fields_are_checked_before_signing() {
        for (m, field) in [
            (
                Manifest {
                    id: "../x".into(),
                    ..sample()
                },
                "id",
            ),
            (
                Manifest {
                    counter: 0,
                    ..sample()
                },
                "counter",
            ),
            (
                Manifest {
                    sha256: "AB".into(),
                    ..sample()
                },
                "sha256",
            ),
            (
                Manifest {
                    url: "file:///etc/passwd".into(),
                    ..sample()
                },
                "url",
            ),
            (
                Manifest {
                    expires_ms: 1,
                    ..sample()
                },
                "expires_ms",
            ),
        ] {
            match m.sign(&key(1)) {
                Err(ReleaseError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(valid_id("rpi4-7") && !valid_id(".staging-1") && !valid_id("a/b"));
    }

    #[cfg(feature = "admin")]
    #[test]
    fn keys_round_trip_through_pem() {
        let k = generate_key().unwrap();
        let pem = key_to_pem(&k).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(key_from_pem(&pem).unwrap().to_bytes(), k.to_bytes());
        assert!(key_from_pem("nope").is_err());
    }
}
