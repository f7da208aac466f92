//! `openclaw-admin release`: signing keys, signed releases uploaded to the
//! server, and their rollouts (`server::releases`, `agent::ota`).

use super::{AdminError, Client};
use crate::release::api::{DeployRequest, ReleaseView};
use crate::release::{self, Manifest};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Writes a new signing key to `out` (PKCS#8 PEM, 0600, refused if it
/// exists) and its public key to `out.pub` (the line `[ota] keys` takes).
/// Returns the public key and its id.
pub fn keygen(out: &Path) -> Result<(String, String), AdminError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |m: String| AdminError::Invalid(format!("release keygen: {m}"));
    let key = release::generate_key().map_err(|e| fail(e.to_string()))?;
    let pem = release::key_to_pem(&key).map_err(|e| fail(e.to_string()))?;
    let public = release::public_key_hex(&key.verifying_key());
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    if pub_path.exists() {
        return Err(fail(format!(
            "{} exists: not overwritten",
            pub_path.display()
        )));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            fail(format!(
                "{}: {e} (an existing key is never overwritten)",
                out.display()
            ))
        })?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| fail(format!("{}: {e}", out.display())))?;
    std::fs::write(&pub_path, format!("{public}\n"))
        .map_err(|e| fail(format!("{}: {e}", pub_path.display())))?;
    Ok((public, release::key_id(&key.verifying_key())))
}

/// What `release create` signs.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub board: String,
    pub binary: PathBuf,
    pub key: PathBuf,
    /// Default: the target of the board's profile.
    pub target: Option<String>,
    /// Default: this admin's version.
    pub version: Option<String>,
    /// Default: one above the highest the server has for the board.
    pub counter: Option<u64>,
    /// Default: `BOARD-COUNTER`.
    pub id: Option<String>,
    /// Default: `SERVER/v1/releases/ID/binary`.
    pub url: Option<String>,
    pub expires_ms: u64,
    /// Also write the signed manifest here.
    pub out: Option<PathBuf>,
    /// Sign and write `out` only; upload nothing.
    pub offline: bool,
}

/// Signs a manifest for the binary and uploads both (unless offline).
/// Returns the manifest and, uploaded, the server's view.
pub fn create(
    client: &Client,
    o: &CreateOptions,
) -> Result<(Manifest, Option<ReleaseView>), AdminError> {
    let fail = |m: String| AdminError::Invalid(format!("release create: {m}"));
    let pem = std::fs::read_to_string(&o.key)
        .map_err(|e| fail(format!("--key {}: {e}", o.key.display())))?;
    let key =
        release::key_from_pem(&pem).map_err(|e| fail(format!("--key {}: {e}", o.key.display())))?;
    let board = crate::boards::Board::load(&o.board).map_err(|e| fail(format!("--board: {e}")))?;
    let (size, sha256) =
        hash_file(&o.binary).map_err(|e| fail(format!("--binary {}: {e}", o.binary.display())))?;
    let counter = match o.counter {
        Some(c) => c,
        None if o.offline => return Err(fail("--offline needs --counter".into())),
        None => {
            let list: Vec<ReleaseView> = list(client)?;
            list.iter()
                .filter(|r| r.board == board.name)
                .map(|r| r.counter)
                .max()
                .unwrap_or(0)
                + 1
        }
    };
    let id =
        o.id.clone()
            .unwrap_or_else(|| format!("{}-{counter}", board.name));
    if !release::valid_id(&id) {
        return Err(fail(format!(
            "release id `{id}`: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with a dot"
        )));
    }
    let url = match &o.url {
        Some(u) => u.clone(),
        None => {
            // Signed into the manifest: a loopback address would send every
            // device to itself, for good.
            let host = client
                .base()
                .split("://")
                .nth(1)
                .unwrap_or("")
                .split('/')
                .next()
                .unwrap_or("");
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
            if matches!(
                host,
                "127.0.0.1" | "localhost" | "[::1]" | "::1" | "0.0.0.0"
            ) || host.starts_with("127.")
            {
                return Err(fail(format!(
                    "the server's address {} is loopback, and devices download from the URL \
                     signed into the manifest: give --server as devices reach it, or --url",
                    client.base()
                )));
            }
            format!("{}/v1/releases/{id}/binary", client.base())
        }
    };
    let now = crate::now_ms();
    let m = Manifest {
        url,
        id,
        version: o
            .version
            .clone()
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
        counter,
        target: o.target.clone().unwrap_or_else(|| board.target.clone()),
        board: board.name.clone(),
        sha256,
        size,
        created_ms: now,
        expires_ms: now.saturating_add(o.expires_ms),
        key_id: String::new(),
    };
    let text = m.sign(&key).map_err(|e| fail(e.to_string()))?;
    let (m, _) = release::parse(text.as_bytes()).map_err(|e| fail(e.to_string()))?;
    if let Some(out) = &o.out {
        std::fs::write(out, &text).map_err(|e| fail(format!("--out {}: {e}", out.display())))?;
    }
    if o.offline {
        return Ok((m, None));
    }
    let url = format!("{}/v1/releases", client.base());
    let file = std::fs::File::open(&o.binary)
        .map_err(|e| fail(format!("--binary {}: {e}", o.binary.display())))?;
    let r = client
        .post(&url)
        .header(crate::release::api::MANIFEST_HEADER, text.trim_end())
        .header("Content-Type", "application/octet-stream")
        .send(ureq::SendBody::from_owned_reader(file));
    let view: ReleaseView = client.answer(&url, r)?;
    Ok((m, Some(view)))
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, crate::hex(&h.finalize())))
}

/// `GET /v1/releases`.
pub fn list(client: &Client) -> Result<Vec<ReleaseView>, AdminError> {
    let url = format!("{}/v1/releases", client.base());
    client.answer(&url, client.get(&url).call())
}

/// `GET /v1/releases/{id}`.
pub fn show(client: &Client, id: &str) -> Result<ReleaseView, AdminError> {
    let url = format!("{}/v1/releases/{id}", client.base());
    client.answer(&url, client.get(&url).call())
}

/// `POST /v1/releases/{id}/deploy`.
pub fn deploy(client: &Client, id: &str, req: &DeployRequest) -> Result<ReleaseView, AdminError> {
    let url = format!("{}/v1/releases/{id}/deploy", client.base());
    client.answer(&url, client.post(&url).send_json(req))
}

/// `--canary 10%` (or `10`) as a percentage.
pub fn parse_percent(s: &str) -> Result<u8, String> {
    let n = s.trim().trim_end_matches('%');
    match n.parse::<u8>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("`{s}` is not a percentage from 1% to 100%")),
    }
}
