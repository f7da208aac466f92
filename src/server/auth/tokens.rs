//! API tokens and the audit log, in `DATA_DIR/auth.db`.
//!
//! A token reads `oc_<id>_<secret>`: `id` is 16 hex digits (public: lists,
//! the audit log and revocation name it), `secret` 64 hex digits (32 random
//! bytes). Only the SHA-256 of the secret is stored, and it is compared in
//! constant time. The file is its own SQLite database, not the task store:
//! `openclaw-admin token create --data-dir` writes it while the server runs
//! (WAL; the server re-reads a token at most [`CACHE_TTL`] after a change).

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file inside the data dir.
pub const AUTH_FILE: &str = "auth.db";
/// Hex digits of a token's id.
pub const ID_HEX: usize = 16;
/// Hex digits of a token's secret.
pub const SECRET_HEX: usize = 64;
/// How long the server trusts what it read about a token (an offline
/// revocation takes effect within this).
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// Longest token name.
pub const MAX_NAME: usize = 128;
/// Audit rows kept; older ones are deleted as new ones come.
pub const MAX_AUDIT_ROWS: i64 = 1_000_000;

/// Errors of the token store and of token parsing.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot create {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token store {}: {source}", path.display())]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// A token that is not `oc_<16 hex>_<64 hex>`.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("malformed Authorization header: {0}")]
    Header(&'static str),
    #[error("unknown role {0:?} (viewer, operator or admin)")]
    Role(String),
    #[error("bad duration {0:?}: a number with s, m, h or d (30d, 12h)")]
    Duration(String),
    #[error("no token with id {0}")]
    NotFound(String),
    #[error("token name: {0}")]
    Name(String),
    #[error("no random bytes from the OS: {0}")]
    Random(String),
    /// The file was deleted (or cannot be looked at) while open.
    #[error(
        "token store {} is no longer there (deleted while the server runs?): {source}; \
         restore it, or make a token with `openclaw-admin token create --data-dir`",
        path.display()
    )]
    Gone {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a token may do; each role may do what the ones below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: tasks, devices, models, health.
    Viewer,
    /// Also submits and cancels tasks, chats, runs agents.
    Operator,
    /// Also manages tokens and reads the audit log.
    Admin,
}

impl Role {
    /// Its name in config, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Role, AuthError> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(AuthError::Role(s.chars().take(64).collect())),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub created_ms: i64,
    /// None: never expires.
    pub expires_ms: Option<i64>,
    /// Set once revoked.
    pub revoked_ms: Option<i64>,
}

impl TokenInfo {
    /// Why this token may not be used at `now_ms`, if it may not.
    pub fn unusable(&self, now_ms: i64) -> Option<String> {
        if let Some(r) = self.revoked_ms {
            return Some(format!("token {} was revoked at {}", self.id, iso(r)));
        }
        match self.expires_ms {
            Some(e) if e <= now_ms => Some(format!("token {} expired at {}", self.id, iso(e))),
            _ => None,
        }
    }
}

/// A token just made: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    /// `oc_<id>_<secret>`: give it to the client.
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// One audit row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Grows with every row: `before=` pages back with it.
    pub seq: i64,
    pub at_ms: i64,
    /// The token's id; `None` with `http.auth = "off"`, and for a token
    /// change made offline (`--data-dir`; its target says so).
    pub token: Option<String>,
    pub role: Option<Role>,
    /// `task.submit`, `task.cancel`, `token.create`, `token.revoke`, `chat`,
    /// `embeddings`.
    pub action: String,
    /// What it acted on: a task id, a token id, a model.
    pub target: String,
}

impl AuditEntry {
    /// A token change made straight on the data dir (`openclaw-admin token
    /// ... --data-dir`): no token did it; its target says `(offline)`.
    pub fn offline(action: &str, id: &str) -> AuditEntry {
        AuditEntry {
            seq: 0,
            at_ms: now_ms(),
            token: None,
            role: None,
            action: action.to_string(),
            target: format!("{id} (offline, --data-dir)"),
        }
    }
}

/// Splits `oc_<id>_<secret>` into its id and secret, checking the shape.
pub fn parse_token(s: &str) -> Result<(&str, &str), AuthError> {
    let rest = s
        .strip_prefix("oc_")
        .ok_or(AuthError::Malformed("it does not start with oc_"))?;
    let (id, secret) = rest
        .split_once('_')
        .ok_or(AuthError::Malformed("no _ between its id and its secret"))?;
    let hex = |t: &str| t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if id.len() != ID_HEX || !hex(id) {
        return Err(AuthError::Malformed(
            "its id is not 16 lowercase hex digits",
        ));
    }
    if secret.len() != SECRET_HEX || !hex(secret) {
        return Err(AuthError::Malformed(
            "its secret is not 64 lowercase hex digits",
        ));
    }
    Ok((id, secret))
}

/// The token of an `Authorization: Bearer <token>` header value (the
/// scheme case-insensitive, as RFC 9110 says).
pub fn parse_bearer(value: &[u8]) -> Result<&str, AuthError> {
    let s = std::str::from_utf8(value).map_err(|_| AuthError::Header("it is not UTF-8"))?;
    let (scheme, rest) = s
        .split_once(' ')
        .ok_or(AuthError::Header("expected `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Header("the scheme is not Bearer"));
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() {
        return Err(AuthError::Header("no token after Bearer"));
    }
    Ok(token)
}

/// `30d`, `12h`, `90m`, `45s` in milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, AuthError> {
    let bad = || AuthError::Duration(s.chars().take(32).collect());
    let split = s.len().checked_sub(1).ok_or_else(bad)?;
    if !s.is_char_boundary(split) {
        return Err(bad());
    }
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    match n.checked_mul(ms) {
        Some(v) if v > 0 && v <= i64::MAX as u64 => Ok(v),
        _ => Err(bad()),
    }
}

/// SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Equality in time independent of where the inputs differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the compiler from cutting the fold short.
    std::hint::black_box(diff) == 0
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A millisecond timestamp for messages: `2026-12-01T21:50:00Z`.
fn iso(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `bytes` random bytes from the OS, in hex.
pub fn random_hex(bytes: usize) -> Result<String, AuthError> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(crate::hex(&buf))
}

/// The token store of one data dir.
pub struct TokenStore {
    pub(super) conn: Connection,
    path: PathBuf,
    /// The opened file's device and inode: [`TokenStore::follow`] tells a
    /// file replaced or deleted since.
    file: (u64, u64),
}

#[cfg(unix)]
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::metadata(path).map(|_| (0, 0))
}

impl TokenStore {
    /// Opens (creating if needed) `DIR/auth.db`.
    pub fn open(dir: &Path) -> Result<TokenStore, AuthError> {
        std::fs::create_dir_all(dir).map_err(|source| AuthError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(AUTH_FILE);
        let db = |source| AuthError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS tokens (
                id TEXT PRIMARY KEY, hash BLOB NOT NULL, role TEXT NOT NULL,
                name TEXT NOT NULL, created_ms INTEGER NOT NULL,
                expires_ms INTEGER, revoked_ms INTEGER);
             CREATE TABLE IF NOT EXISTS audit (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,
                token TEXT, role TEXT, action TEXT NOT NULL, target TEXT NOT NULL);",
        )
        .map_err(db)?;
        let file = file_id(&path).map_err(|source| AuthError::Gone {
            path: path.clone(),
            source,
        })?;
        let s = TokenStore { conn, path, file };
        s.identities_schema()?;
        Ok(s)
    }

    /// Makes sure this store reads the file now at its path: another file
    /// put there (restored, or made by `token create --data-dir` after a
    /// deletion) is opened; a deleted one is [`AuthError::Gone`], not
    /// silently read and written on.
    pub fn follow(&mut self) -> Result<(), AuthError> {
        let now = file_id(&self.path).map_err(|source| AuthError::Gone {
            path: self.path.clone(),
            source,
        })?;
        if now != self.file {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            log::warn!(
                "token store {}: the file was replaced; opening the new one",
                self.path.display()
            );
            *self = TokenStore::open(dir)?;
        }
        Ok(())
    }

    pub(super) fn db(&self) -> impl Fn(rusqlite::Error) -> AuthError + '_ {
        |source| AuthError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Makes a token. `expires_in_ms`: from now; None: never.
    pub fn create(
        &self,
        role: Role,
        name: &str,
        expires_in_ms: Option<u64>,
    ) -> Result<NewToken, AuthError> {
        Self::insert_token(&self.conn, &self.path, role, name, expires_in_ms)
    }

    /// Makes a token and writes the audit row `audit` gives for it, in one
    /// transaction: no token without its row.
    pub fn create_audited(
        &mut self,
        role: Role,
        name: &str,
        expires_in_ms: Option<u64>,
        audit: impl FnOnce(&TokenInfo) -> AuditEntry,
    ) -> Result<NewToken, AuthError> {
        let path = self.path.clone();
        let db = |source| AuthError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        let t = Self::insert_token(&tx, &path, role, name, expires_in_ms)?;
        Self::insert_audit(&tx, &path, &[audit(&t.info)])?;
        tx.commit().map_err(db)?;
        Ok(t)
    }

    /// Revokes a token and writes its audit row in one transaction.
    pub fn revoke_audited(
        &mut self,
        id: &str,
        audit: impl FnOnce(&TokenInfo) -> AuditEntry,
    ) -> Result<TokenInfo, AuthError> {
        let path = self.path.clone();
        let db = |source| AuthError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        tx.execute(
            "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE id = ?1",
            params![id, now_ms()],
        )
        .map_err(db)?;
        let info = tx
            .query_row(
                "SELECT id, hash, role, name, created_ms, expires_ms, revoked_ms \
                 FROM tokens WHERE id = ?1",
                [id],
                Self::row,
            )
            .optional()
            .map_err(db)?
            .map(|(info, _)| info)
            .ok_or_else(|| AuthError::NotFound(id.chars().take(64).collect()))?;
        Self::insert_audit(&tx, &path, &[audit(&info)])?;
        tx.commit().map_err(db)?;
        Ok(info)
    }

    fn insert_token(
        conn: &Connection,
        path: &Path,
        role: Role,
        name: &str,
        expires_in_ms: Option<u64>,
    ) -> Result<NewToken, AuthError> {
        if name.len() > MAX_NAME {
            return Err(AuthError::Name(format!(
                "{} bytes, at most {MAX_NAME}",
                name.len()
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(AuthError::Name("it holds control characters".into()));
        }
        let id = random_hex(ID_HEX / 2)?;
        let secret = random_hex(SECRET_HEX / 2)?;
        let created_ms = now_ms();
        let expires_ms = expires_in_ms.map(|e| created_ms.saturating_add(e as i64));
        conn.execute(
            "INSERT INTO tokens (id, hash, role, name, created_ms, expires_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                id,
                &hash_secret(&secret)[..],
                role.as_str(),
                name,
                created_ms,
                expires_ms
            ],
        )
        .map_err(|source| AuthError::Db {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(NewToken {
            token: format!("oc_{id}_{secret}"),
            info: TokenInfo {
                id,
                role,
                name: name.to_string(),
                created_ms,
                expires_ms,
                revoked_ms: None,
            },
        })
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(TokenInfo, Vec<u8>)> {
        let role: String = r.get(2)?;
        // A role this build does not know (a newer one wrote it) reads as
        // the least: never more rights than it was given.
        let role = role.parse().unwrap_or(Role::Viewer);
        Ok((
            TokenInfo {
                id: r.get(0)?,
                role,
                name: r.get(3)?,
                created_ms: r.get(4)?,
                expires_ms: r.get(5)?,
                revoked_ms: r.get(6)?,
            },
            r.get(1)?,
        ))
    }

    /// A token and the hash of its secret.
    pub fn get(&self, id: &str) -> Result<Option<(TokenInfo, Vec<u8>)>, AuthError> {
        self.conn
            .query_row(
                "SELECT id, hash, role, name, created_ms, expires_ms, revoked_ms \
                 FROM tokens WHERE id = ?1",
                [id],
                Self::row,
            )
            .optional()
            .map_err(self.db())
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, AuthError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, hash, role, name, created_ms, expires_ms, revoked_ms \
                 FROM tokens ORDER BY created_ms, id",
            )
            .map_err(self.db())?;
        let rows = st
            .query_map([], Self::row)
            .map_err(self.db())?
            .map(|r| r.map(|(info, _)| info))
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db())?;
        Ok(rows)
    }

    /// Revokes a token (again: keeps the first time).
    pub fn revoke(&self, id: &str) -> Result<TokenInfo, AuthError> {
        self.conn
            .execute(
                "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE id = ?1",
                params![id, now_ms()],
            )
            .map_err(self.db())?;
        self.get(id)?
            .map(|(info, _)| info)
            .ok_or_else(|| AuthError::NotFound(id.chars().take(64).collect()))
    }

    /// Whether any token could still be used.
    pub fn any_usable(&self) -> Result<bool, AuthError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE revoked_ms IS NULL \
                 AND (expires_ms IS NULL OR expires_ms > ?1))",
                [now_ms()],
                |r| r.get(0),
            )
            .map_err(self.db())
    }

    /// Appends audit rows in one transaction, then trims the oldest past
    /// [`MAX_AUDIT_ROWS`].
    pub fn audit(&mut self, rows: &[AuditEntry]) -> Result<(), AuthError> {
        let path = self.path.clone();
        let db = |source| AuthError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        Self::insert_audit(&tx, &path, rows)?;
        tx.execute(
            "DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?1",
            [MAX_AUDIT_ROWS],
        )
        .map_err(db)?;
        tx.commit().map_err(db)
    }

    fn insert_audit(conn: &Connection, path: &Path, rows: &[AuditEntry]) -> Result<(), AuthError> {
        let db = |source| AuthError::Db {
            path: path.to_path_buf(),
            source,
        };
        let mut st = conn
            .prepare_cached(
                "INSERT INTO audit (at_ms, token, role, action, target) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(db)?;
        for r in rows {
            st.execute(params![
                r.at_ms,
                r.token,
                r.role.map(Role::as_str),
                r.action,
                r.target
            ])
            .map_err(db)?;
        }
        Ok(())
    }

    /// Audit rows newest first, below `before` (a `seq`) if given.
    pub fn audit_page(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, AuthError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT seq, at_ms, token, role, action, target FROM audit \
                 WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(self.db())?;
        let rows = st
            .query_map(params![before.unwrap_or(i64::MAX), limit], |r| {
                let role: Option<String> = r.get(3)?;
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    at_ms: r.get(1)?,
                    token: r.get(2)?,
                    role: role.and_then(|s| s.parse().ok()),
                    action: r.get(4)?,
                    target: r.get(5)?,
                })
            })
            .map_err(self.db())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db())?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_only_in_their_shape() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        let t = format!("oc_{id}_{secret}");
        assert_eq!(parse_token(&t).unwrap(), (id, secret.as_str()));
        for bad in [
            String::new(),
            "oc_".into(),
            format!("xx_{id}_{secret}"),
            format!("oc_{id}{secret}"),
            format!("oc_{}_{secret}", &id[1..]),
            format!("oc_{}_{secret}", id.to_uppercase()),
            format!("oc_{id}_{}", &secret[1..]),
            format!("oc_{id}_{secret}0"),
            format!("oc_{id}_{}é", &secret[2..]),
        ] {
            assert!(parse_token(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(parse_bearer(b"Bearer abc").unwrap(), "abc");
        assert_eq!(parse_bearer(b"bearer  abc ").unwrap(), "abc");
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer ",
            b"\xff\xfe abc",
            b"",
        ] {
            assert!(parse_bearer(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_duration("12h").unwrap(), 12 * 3_600_000);
        assert_eq!(parse_duration("90m").unwrap(), 90 * 60_000);
        assert_eq!(parse_duration("45s").unwrap(), 45_000);
        for bad in [
            "",
            "d",
            "0d",
            "-1d",
            "1w",
            "1.5h",
            "99999999999999999999d",
            "1é",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_796_161_800_000), "2026-12-01T21:50:00Z");
    }

    #[test]
    fn create_get_revoke_and_audit() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = TokenStore::open(dir.path()).unwrap();
        assert!(!s.any_usable().unwrap());
        let t = s.create(Role::Operator, "ci", Some(60_000)).unwrap();
        let (id, secret) = parse_token(&t.token).unwrap();
        assert_eq!(id, t.info.id);
        let (info, hash) = s.get(id).unwrap().unwrap();
        assert!(ct_eq(&hash, &hash_secret(secret)));
        assert!(!ct_eq(&hash, &hash_secret("0")));
        assert_eq!(info.role, Role::Operator);
        assert!(info.unusable(now_ms()).is_none());
        assert!(info
            .unusable(now_ms() + 120_000)
            .unwrap()
            .contains("expired"));
        assert!(s.any_usable().unwrap());
        let r = s.revoke(id).unwrap();
        assert!(r.unusable(now_ms()).unwrap().contains("revoked"));
        assert!(matches!(s.revoke("nope"), Err(AuthError::NotFound(_))));
        assert_eq!(s.list().unwrap().len(), 1);
        let e = |n: i64| AuditEntry {
            seq: 0,
            at_ms: n,
            token: Some(id.into()),
            role: Some(Role::Operator),
            action: "task.submit".into(),
            target: format!("t{n}"),
        };
        s.audit(&[e(1), e(2), e(3)]).unwrap();
        let page = s.audit_page(None, 2).unwrap();
        assert_eq!(page.iter().map(|a| a.at_ms).collect::<Vec<_>>(), [3, 2]);
        let next = s.audit_page(Some(page[1].seq), 10).unwrap();
        assert_eq!(next.iter().map(|a| a.at_ms).collect::<Vec<_>>(), [1]);
        // Revoked from another connection (the CLI) is seen by a new read.
        let other = TokenStore::open(dir.path()).unwrap();
        assert!(other.get(id).unwrap().unwrap().0.revoked_ms.is_some());
    }
}
