//! The device identities for an external mosquitto (`openclaw-admin
//! broker-config`): a `password_file` in mosquitto 2's own hash format, an
//! `acl_file` with the same topic rules the embedded broker enforces
//! ([`super::identities`]), and a `mosquitto.conf` that uses them and binds
//! each client id to its user name (`use_username_as_clientid`, so no
//! device can take over another's session).
//!
//! What mosquitto cannot check that the embedded broker does: a granted
//! submitter's `reply_to` (mosquitto's ACLs see topics, not payloads).

use super::identities::{replies_prefix, Identity};
use super::tokens::{AuthError, TokenStore};
use crate::protocol::topics;
use sha2::{Digest, Sha512};
use std::path::{Path, PathBuf};

/// mosquitto 2's PBKDF2 iteration count (`mosquitto_passwd`'s default).
pub const ITERATIONS: u32 = 101;

/// `$7$ITER$SALT$HASH`: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash, both
/// in standard base64 (mosquitto 2.x's `password_file` format).
pub fn password_hash(password: &str, salt: &[u8; 12]) -> String {
    let dk = pbkdf2_sha512(password.as_bytes(), salt, ITERATIONS);
    format!("$7${ITERATIONS}${}${}", base64(salt), base64(&dk))
}

fn hmac_sha512(key: &[u8], parts: &[&[u8]]) -> [u8; 64] {
    const BLOCK: usize = 128;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..64].copy_from_slice(&Sha512::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha512::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha512::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// One 64-byte block of PBKDF2-HMAC-SHA512 (all mosquitto needs).
fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 64] {
    let mut u = hmac_sha512(password, &[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac_sha512(password, &[&u]);
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                s.push(A[(n >> shift & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// What `broker-config` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerFiles {
    /// `password_file`: the server's and every active device's hash.
    pub passwd: String,
    /// `acl_file`.
    pub acl: String,
    /// Identities left out, with why (revoked; or made before their
    /// mosquitto hash was kept: `device add ID --replace` gives one).
    pub skipped: Vec<(String, String)>,
}

/// The password and ACL files for `devices` (each with its mosquitto hash,
/// if it has one) and the server's login `server_user` / `server_hash`.
pub fn broker_files(
    devices: &[(Identity, Option<String>)],
    server_user: &str,
    server_hash: &str,
) -> BrokerFiles {
    let mut passwd = format!("{server_user}:{server_hash}\n");
    let mut acl = format!(
        "# Written by openclaw-admin broker-config (mosquitto 2.x acl_file).\n\
         # Every device: its own task topic, its status and its results. %u is\n\
         # the user name, which is also the client id (use_username_as_clientid).\n\
         pattern read {}\n\
         pattern write {}\n\
         pattern write {}\n\n\
         # The server: everything under openclaw/.\n\
         user {server_user}\n\
         topic readwrite openclaw/#\n",
        topics::tasks("%u"),
        topics::status("%u"),
        topics::results("%u"),
    );
    let mut skipped = Vec::new();
    for (ident, hash) in devices {
        if ident.id == server_user {
            skipped.push((ident.id.clone(), "is the server's user name".into()));
            continue;
        }
        if ident.revoked_ms.is_some() {
            skipped.push((ident.id.clone(), "revoked".into()));
            continue;
        }
        let Some(hash) = hash else {
            skipped.push((
                ident.id.clone(),
                "has no mosquitto hash (made before broker-config): give it a new \
                 password with `device add ID --replace`"
                    .into(),
            ));
            continue;
        };
        passwd.push_str(&format!("{}:{hash}\n", ident.id));
        if ident.submit {
            acl.push_str(&format!(
                "\n# {id} may submit tasks; its replies come under {prefix}\n\
                 user {id}\n\
                 topic write {submit}\n\
                 topic read {prefix}#\n",
                id = ident.id,
                prefix = replies_prefix(&ident.id),
                submit = topics::SUBMIT,
            ));
        }
    }
    BrokerFiles {
        passwd,
        acl,
        skipped,
    }
}

/// A `mosquitto.conf` for one listener on `bind:port` with these files.
pub fn mosquitto_conf(port: u16, bind: Option<&str>, passwd: &str, acl: &str) -> String {
    let listener = match bind {
        Some(b) => format!("listener {port} {b}"),
        None => format!("listener {port}"),
    };
    format!(
        "# Written by openclaw-admin broker-config for mosquitto 2.x. After\n\
         # `device add` or `device revoke`, run broker-config again and reload\n\
         # mosquitto (SIGHUP: `systemctl reload mosquitto`) to apply them.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         password_file {passwd}\n\
         acl_file {acl}\n\
         {listener}\n\
         # A client's id is its user name: nobody takes over another's session.\n\
         use_username_as_clientid true\n\
         # Small latency-bound packets (without it a second publish waits\n\
         # ~40 ms for a delayed ACK).\n\
         set_tcp_nodelay true\n"
    )
}

/// Errors writing the broker's files.
#[derive(Debug, thiserror::Error)]
pub enum BrokerConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] AuthError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a server config written by broker-config: {message}", path.display())]
    ServerToml { path: PathBuf, message: String },
}

/// What [`write`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// `mosquitto.conf`, `passwd`, `acl` and `server.toml`, in `out`.
    pub files: Vec<PathBuf>,
    /// Devices written into the password file.
    pub devices: usize,
    /// See [`BrokerFiles::skipped`].
    pub skipped: Vec<(String, String)>,
    /// The server's password is new (no `server.toml` from an earlier run).
    pub new_server_password: bool,
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), BrokerConfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| BrokerConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A new file beside it, renamed over: mosquitto reloading at that
    // moment sees the old file or the new one, never half of one.
    // Made anew (O_EXCL): a stale or planted `*.tmp` (a symlink to another
    // file, or a file with looser permissions) is removed, never followed
    // or written through.
    let tmp = path.with_extension("tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// `openclaw-admin broker-config`: writes into `out` the password and ACL
/// files for the identities in `data_dir`'s `auth.db`, a `mosquitto.conf`
/// with one listener on `bind:port`, and `server.toml`, the server's
/// `[mqtt]` for that broker with its login as `server_user`. The server's
/// password is kept from an earlier run's `server.toml` in `out` (so
/// rewriting the files after `device add` does not lock the running server
/// out), else made new.
pub fn write(
    out: &Path,
    data_dir: &Path,
    port: u16,
    bind: Option<&str>,
    server_user: &str,
) -> Result<Written, BrokerConfigError> {
    // Both go into mosquitto's line-based files and into server.toml as
    // they are: a space, `#` or line break would be a new directive there.
    if !topics::valid_device_id(server_user) {
        return Err(BrokerConfigError::Invalid(format!(
            "--server-user {:?} is not valid (letters, digits, - _ . up to 64)",
            server_user.chars().take(80).collect::<String>()
        )));
    }
    if let Some(b) = bind {
        let host_name = !b.is_empty()
            && b.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if b.parse::<std::net::IpAddr>().is_err() && !host_name {
            return Err(BrokerConfigError::Invalid(format!(
                "--bind {:?} is not an IP address or host name",
                b.chars().take(80).collect::<String>()
            )));
        }
    }
    if out.to_string_lossy().chars().any(char::is_control) {
        return Err(BrokerConfigError::Invalid(format!(
            "--out {out:?} holds a control character (mosquitto.conf is line-based)"
        )));
    }
    std::fs::create_dir_all(out).map_err(|source| BrokerConfigError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    // mosquitto reads relative paths from its working directory.
    let out = std::fs::canonicalize(out).map_err(|source| BrokerConfigError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let server_toml = out.join("server.toml");
    let earlier = match std::fs::read_to_string(&server_toml) {
        Ok(text) => {
            let bad = |message: String| BrokerConfigError::ServerToml {
                path: server_toml.clone(),
                message,
            };
            let v: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let pass = v
                .get("mqtt")
                .and_then(|m| m.get("password"))
                .and_then(|p| p.as_str())
                .ok_or_else(|| bad("no mqtt.password".into()))?;
            Some(pass.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(BrokerConfigError::Io {
                path: server_toml,
                source,
            })
        }
    };
    let new_server_password = earlier.is_none();
    let server_password = match earlier {
        Some(p) => p,
        None => super::tokens::random_hex(32)?,
    };
    let mut salt = [0u8; 12];
    getrandom::getrandom(&mut salt).map_err(|e| AuthError::Random(e.to_string()))?;
    let store = TokenStore::open(data_dir)?;
    let devices = store.device_mosquitto_hashes()?;
    let files = broker_files(
        &devices,
        server_user,
        &password_hash(&server_password, &salt),
    );
    let (passwd, acl, conf) = (
        out.join("passwd"),
        out.join("acl"),
        out.join("mosquitto.conf"),
    );
    // Readable by mosquitto's group (chgrp them to it: mosquitto reads them
    // after it drops root).
    write_file(&passwd, &files.passwd, 0o640)?;
    write_file(&acl, &files.acl, 0o640)?;
    write_file(
        &conf,
        &mosquitto_conf(
            port,
            bind,
            &passwd.display().to_string(),
            &acl.display().to_string(),
        ),
        0o644,
    )?;
    let host = match bind {
        None | Some("0.0.0.0") | Some("::") => "127.0.0.1".to_string(),
        Some(b) if b.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{b}]"),
        Some(b) => b.to_string(),
    };
    // The kept password is whatever an earlier server.toml held: quoted as
    // TOML, so a `"` or line break in it stays inside the string.
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    write_file(
        &server_toml,
        &format!(
            "# The server's [mqtt] for this mosquitto (openclaw-server --config ...).\n\
             [mqtt]\nembedded = false\nbroker = {broker}\n\
             client_id = {user}\nusername = {user}\npassword = {pass}\n",
            broker = q(&format!("mqtt://{host}:{port}")),
            user = q(server_user),
            pass = q(&server_password),
        ),
        0o600,
    )?;
    let skipped = files.skipped;
    Ok(Written {
        files: vec![conf, passwd, acl, server_toml],
        devices: devices.len() - skipped.len(),
        skipped,
        new_server_password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::hex;

    #[test]
    fn pbkdf2_sha512_matches_the_published_vectors() {
        assert_eq!(
            hex(&pbkdf2_sha512(b"password", b"salt", 1)),
            "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252\
             c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce"
        );
        assert_eq!(
            hex(&pbkdf2_sha512(b"password", b"salt", 2)),
            "e1d9c16aa681708a45f5c7c4e215ceb66e011a2e9f0040713f18aefdb866d53c\
             f76cab2868a39b9f7840edce4fef5a82be67335c77a6068e04112754f27ccf4e"
        );
    }

    /// What `mosquitto_passwd -b` (2.0.11) wrote for user / `pass`.
    #[test]
    fn hash_matches_mosquitto_passwd() {
        let salt = [72, 205, 239, 248, 193, 143, 77, 178, 251, 197, 51, 66];
        assert_eq!(
            password_hash("pass", &salt),
            "$7$101$SM3v+MGPTbL7xTNC$cC1dnzy3O/s9D7ukQSxXEjkIQzUXkp2rHWIlfkSOi+Ebji9eQ4LFENwpMCWp\
             JCCa9ikFGdfmnZlZ/cTPngR7ZA=="
        );
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }

    #[test]
    fn files_hold_active_devices_and_grants_only() {
        let ident = |id: &str, submit, revoked: Option<i64>| Identity {
            id: id.into(),
            submit,
            created_ms: 0,
            revoked_ms: revoked,
        };
        let f = broker_files(
            &[
                (ident("pi-1", false, None), Some("$7$h1".into())),
                (ident("erp-1", true, None), Some("$7$h2".into())),
                (ident("gone", false, Some(5)), Some("$7$h3".into())),
                (ident("old", false, None), None),
            ],
            "openclaw-server",
            "$7$s",
        );
        assert_eq!(f.passwd, "openclaw-server:$7$s\npi-1:$7$h1\nerp-1:$7$h2\n");
        assert!(f
            .acl
            .contains("pattern read openclaw/v1/devices/%u/tasks\n"));
        assert!(f
            .acl
            .contains("user erp-1\ntopic write openclaw/v1/submit\n"));
        assert!(f.acl.contains("topic read openclaw/clients/erp-1/#\n"));
        assert!(!f.acl.contains("user pi-1"));
        let names: Vec<&str> = f.skipped.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(names, ["gone", "old"]);
    }

    /// `--server-user` and `--bind` go into line-based files and
    /// server.toml as they are: anything that could start a new directive
    /// there is refused before a file is written.
    #[test]
    fn names_that_would_inject_directives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (out, data) = (dir.path().join("out"), dir.path().join("data"));
        for user in ["srv\ntopic readwrite #", "a b", "srv#", "", "q\"x"] {
            let e = write(&out, &data, 1883, None, user).unwrap_err();
            assert!(matches!(e, BrokerConfigError::Invalid(_)), "{user:?}: {e}");
        }
        for bind in ["127.0.0.1\nallow_anonymous true", "a b", "h\"", ""] {
            let e = write(&out, &data, 1883, Some(bind), "srv").unwrap_err();
            assert!(matches!(e, BrokerConfigError::Invalid(_)), "{bind:?}: {e}");
        }
        assert!(!out.join("passwd").exists());
    }

    /// A planted `passwd.tmp` symlink is replaced, not written through; a
    /// kept password with a quote stays one TOML string; an IPv6 bind is
    /// bracketed in the server's broker URL.
    #[test]
    fn rewrite_neither_follows_tmp_symlinks_nor_breaks_server_toml() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (out, data) = (dir.path().join("out"), dir.path().join("data"));
        std::fs::create_dir_all(&out).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, out.join("passwd.tmp")).unwrap();
        std::os::unix::fs::symlink(&victim, out.join("server.tmp")).unwrap();
        std::fs::write(
            out.join("server.toml"),
            "[mqtt]\npassword = \"p\\\"w\\nbroker = 1\"\n",
        )
        .unwrap();
        let w = write(&out, &data, 1883, Some("::1"), "srv").unwrap();
        assert!(!w.new_server_password);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let text = std::fs::read_to_string(out.join("server.toml")).unwrap();
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["mqtt"]["password"].as_str(), Some("p\"w\nbroker = 1"));
        assert_eq!(v["mqtt"]["broker"].as_str(), Some("mqtt://[::1]:1883"));
        let mode = std::fs::metadata(out.join("server.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(std::fs::read_to_string(out.join("passwd"))
            .unwrap()
            .starts_with("srv:$7$101$"));
    }
}
