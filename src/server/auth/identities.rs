//! Device identities on MQTT: each device's broker password (only its
//! SHA-256 kept, in `DATA_DIR/auth.db` beside the API tokens), and the
//! topic rules the embedded broker enforces with them.
//!
//! A device `X` logs in as user `X` with client id `X` (no other: a client
//! id is a session, and taking another's would steal its queued tasks). It
//! may subscribe only to its task topic and publish only its status and
//! results; `openclaw/v1/submit` only if it was granted submitting, and then
//! it may also subscribe under `openclaw/clients/X/` for its replies.
//! The server itself logs in with a secret made at each start.

use super::tokens::{ct_eq, hash_secret, now_ms, AuthError, TokenStore};
use crate::protocol::topics;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

/// Where a submitter's replies live: `openclaw/clients/ID/...` (outside
/// `openclaw/v1/`, where `reply_to` may not point).
pub fn replies_prefix(id: &str) -> String {
    format!("openclaw/clients/{id}/")
}

/// A device's broker identity as listed (never its password).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: String,
    /// May publish on `openclaw/v1/submit`.
    pub submit: bool,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// An identity just made: the only time its password is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewIdentity {
    pub password: String,
    #[serde(flatten)]
    pub identity: Identity,
}

/// What a logged-in client may do, by its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// The server: everything.
    Server,
    /// A device (`submit`: may also submit tasks).
    Device { submit: bool },
}

/// Whether `user` with `grant` may publish `payload` on `topic`.
///
/// A submission may name only a `reply_to` under the submitter's own
/// [`replies_prefix`]: the server publishes its answers there with its own
/// rights, so any other topic would let a submitter forge replies in
/// another submitter's topic, or answer into [`rumqttd::DENIED_SUBSCRIBE`],
/// which every client with a denied filter reads. The server takes
/// `reply_to` from the JSON object even when the submission is otherwise
/// broken (to answer "rejected"), so this looks at it the same way.
pub fn may_publish(user: &str, grant: Grant, topic: &str, payload: &[u8]) -> bool {
    match grant {
        Grant::Server => true,
        Grant::Device { submit } => {
            topic == topics::status(user)
                || topic == topics::results(user)
                || (submit && topic == topics::SUBMIT && replies_to_own(user, payload))
        }
    }
}

/// Whether a submission's `reply_to`, if any, is under `user`'s prefix.
fn replies_to_own(user: &str, payload: &[u8]) -> bool {
    // Not JSON: the server can read no `reply_to` from it either.
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return true;
    };
    match v.get("reply_to") {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::String(t)) => t
            .strip_prefix(&replies_prefix(user))
            .is_some_and(|rest| !rest.is_empty()),
        Some(_) => false,
    }
}

/// Whether `user` with `grant` may subscribe with `filter`.
pub fn may_subscribe(user: &str, grant: Grant, filter: &str) -> bool {
    match grant {
        Grant::Server => true,
        Grant::Device { submit } => {
            filter == topics::tasks(user)
                || (submit
                    && filter
                        .strip_prefix(&replies_prefix(user))
                        .is_some_and(|rest| !rest.is_empty()))
        }
    }
}

impl TokenStore {
    pub(super) fn identities_schema(&self) -> Result<(), AuthError> {
        self.conn
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS mqtt_identities (
                    id TEXT PRIMARY KEY, hash BLOB NOT NULL, submit INTEGER NOT NULL,
                    created_ms INTEGER NOT NULL, revoked_ms INTEGER);",
            )
            .map_err(self.db())?;
        // Added for broker-config: the password in mosquitto's own format
        // (NULL for identities made before it).
        let has: bool = self
            .conn
            .query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('mqtt_identities') \
                 WHERE name = 'mosquitto_hash'",
                [],
                |r| r.get(0),
            )
            .map_err(self.db())?;
        if !has {
            self.conn
                .execute_batch("ALTER TABLE mqtt_identities ADD COLUMN mosquitto_hash TEXT;")
                .map_err(self.db())?;
        }
        Ok(())
    }

    /// Makes (or, with `replace`, remakes with a new password) the broker
    /// identity of device `id`.
    pub fn device_add(
        &self,
        id: &str,
        submit: bool,
        replace: bool,
    ) -> Result<NewIdentity, AuthError> {
        if !topics::valid_device_id(id) {
            return Err(AuthError::Name(format!(
                "device id {:?} is not valid (letters, digits, - _ . up to 64; no + # /)",
                id.chars().take(80).collect::<String>()
            )));
        }
        let password = super::tokens::random_hex(32)?;
        let mut salt = [0u8; 12];
        getrandom::getrandom(&mut salt).map_err(|e| AuthError::Random(e.to_string()))?;
        let mosquitto = super::mosquitto::password_hash(&password, &salt);
        let created_ms = now_ms();
        let sql = if replace {
            "INSERT OR REPLACE INTO mqtt_identities (id, hash, submit, created_ms, mosquitto_hash) \
             VALUES (?1, ?2, ?3, ?4, ?5)"
        } else {
            "INSERT INTO mqtt_identities (id, hash, submit, created_ms, mosquitto_hash) \
             VALUES (?1, ?2, ?3, ?4, ?5)"
        };
        match self.conn.execute(
            sql,
            params![
                id,
                &hash_secret(&password)[..],
                submit,
                created_ms,
                mosquitto
            ],
        ) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(AuthError::Name(format!(
                    "device {id} already has an identity; pass --replace for a new password"
                )))
            }
            Err(e) => return Err(self.db()(e)),
        }
        Ok(NewIdentity {
            password,
            identity: Identity {
                id: id.to_string(),
                submit,
                created_ms,
                revoked_ms: None,
            },
        })
    }

    fn identity_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Identity, Vec<u8>)> {
        Ok((
            Identity {
                id: r.get(0)?,
                submit: r.get(2)?,
                created_ms: r.get(3)?,
                revoked_ms: r.get(4)?,
            },
            r.get(1)?,
        ))
    }

    /// Checks a device's login: its grant if the password is right and the
    /// identity not revoked.
    pub fn device_login(&self, id: &str, password: &str) -> Result<Option<Grant>, AuthError> {
        let row = self
            .conn
            .query_row(
                "SELECT id, hash, submit, created_ms, revoked_ms FROM mqtt_identities \
                 WHERE id = ?1",
                [id],
                Self::identity_row,
            )
            .optional()
            .map_err(self.db())?;
        Ok(row.and_then(|(ident, hash)| {
            (ident.revoked_ms.is_none() && ct_eq(&hash, &hash_secret(password))).then_some(
                Grant::Device {
                    submit: ident.submit,
                },
            )
        }))
    }

    /// The password hash of device `id`'s identity; None when it is revoked
    /// or there is none.
    pub fn device_active_hash(&self, id: &str) -> Result<Option<Vec<u8>>, AuthError> {
        self.conn
            .query_row(
                "SELECT hash FROM mqtt_identities WHERE id = ?1 AND revoked_ms IS NULL",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())
    }

    /// Whether device `id` may no longer log in (revoked, or no identity).
    pub fn device_revoked(&self, id: &str) -> Result<bool, AuthError> {
        let revoked: Option<bool> = self
            .conn
            .query_row(
                "SELECT revoked_ms IS NOT NULL FROM mqtt_identities WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        Ok(revoked.unwrap_or(true))
    }

    /// Every device identity, by id.
    pub fn device_list(&self) -> Result<Vec<Identity>, AuthError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, hash, submit, created_ms, revoked_ms FROM mqtt_identities ORDER BY id",
            )
            .map_err(self.db())?;
        let rows = st
            .query_map([], Self::identity_row)
            .map_err(self.db())?
            .map(|r| r.map(|(i, _)| i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db())?;
        Ok(rows)
    }

    /// Every device identity with its mosquitto password hash (None for
    /// one made before those were kept), by id: for `broker-config`.
    pub fn device_mosquitto_hashes(&self) -> Result<Vec<(Identity, Option<String>)>, AuthError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, hash, submit, created_ms, revoked_ms, mosquitto_hash \
                 FROM mqtt_identities ORDER BY id",
            )
            .map_err(self.db())?;
        let rows = st
            .query_map([], |r| Ok((Self::identity_row(r)?.0, r.get(5)?)))
            .map_err(self.db())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db())?;
        Ok(rows)
    }

    /// Revokes a device's identity: its next login is refused.
    pub fn device_revoke(&self, id: &str) -> Result<Identity, AuthError> {
        self.conn
            .execute(
                "UPDATE mqtt_identities SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE id = ?1",
                params![id, now_ms()],
            )
            .map_err(self.db())?;
        self.device_list()?
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| AuthError::NotFound(id.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        let d = Grant::Device { submit: false };
        let s = Grant::Device { submit: true };
        assert!(may_subscribe("pi-1", d, "openclaw/v1/devices/pi-1/tasks"));
        for f in [
            "openclaw/v1/devices/pi-2/tasks",
            "openclaw/v1/devices/+/tasks",
            "#",
            "openclaw/#",
            "openclaw/clients/pi-1/r",
            "openclaw-denied/publish",
        ] {
            assert!(!may_subscribe("pi-1", d, f), "{f}");
        }
        assert!(may_subscribe("pi-1", s, "openclaw/clients/pi-1/r"));
        assert!(!may_subscribe("pi-1", s, "openclaw/clients/pi-1/"));
        assert!(!may_subscribe("pi-1", s, "openclaw/clients/pi-2/r"));
        assert!(may_publish(
            "pi-1",
            d,
            "openclaw/v1/devices/pi-1/status",
            b""
        ));
        assert!(may_publish(
            "pi-1",
            d,
            "openclaw/v1/devices/pi-1/results",
            b""
        ));
        assert!(!may_publish(
            "pi-1",
            d,
            "openclaw/v1/devices/pi-2/results",
            b""
        ));
        assert!(!may_publish(
            "pi-1",
            d,
            "openclaw/v1/devices/pi-1/tasks",
            b""
        ));
        assert!(!may_publish("pi-1", d, topics::SUBMIT, b"{}"));
        assert!(may_publish("pi-1", s, topics::SUBMIT, b"{}"));
        assert!(may_publish("x", Grant::Server, "anything", b""));
        // A submission answers only under the submitter's own prefix.
        for (body, ok) in [
            (
                r#"{"plugin":"echo","reply_to":"openclaw/clients/pi-1/r"}"#,
                true,
            ),
            (r#"{"plugin":"echo","reply_to":null}"#, true),
            ("not json", true),
            ("[1]", true),
            (r#"{"reply_to":"openclaw/clients/pi-2/r"}"#, false),
            (r#"{"reply_to":"openclaw/clients/pi-1/"}"#, false),
            (r#"{"reply_to":"openclaw/clients/pi-1"}"#, false),
            (r#"{"reply_to":"openclaw-denied/subscribe"}"#, false),
            (r#"{"reply_to":"elsewhere"}"#, false),
            (r#"{"reply_to":7}"#, false),
            // The server's loose reading takes the last of duplicate keys.
            (
                r#"{"reply_to":"openclaw/clients/pi-1/r","reply_to":"openclaw/clients/pi-2/r"}"#,
                false,
            ),
        ] {
            assert_eq!(
                may_publish("pi-1", s, topics::SUBMIT, body.as_bytes()),
                ok,
                "{body}"
            );
        }
    }

    #[test]
    fn add_login_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(dir.path()).unwrap();
        let n = s.device_add("pi-1", false, false).unwrap();
        assert_eq!(
            s.device_login("pi-1", &n.password).unwrap(),
            Some(Grant::Device { submit: false })
        );
        assert_eq!(s.device_login("pi-1", "wrong").unwrap(), None);
        assert_eq!(s.device_login("pi-2", &n.password).unwrap(), None);
        let e = s.device_add("pi-1", false, false).unwrap_err().to_string();
        assert!(e.contains("--replace"), "{e}");
        let m = s.device_add("pi-1", true, true).unwrap();
        assert_eq!(s.device_login("pi-1", &n.password).unwrap(), None);
        assert!(s.device_login("pi-1", &m.password).unwrap().is_some());
        assert!(s.device_add("a/b", false, false).is_err());
        assert!(s.device_add("+", false, false).is_err());
        assert!(!s.device_revoked("pi-1").unwrap());
        assert!(s.device_active_hash("pi-1").unwrap().is_some());
        assert_eq!(s.device_active_hash("pi-9").unwrap(), None);
        assert!(s.device_revoked("pi-9").unwrap());
        s.device_revoke("pi-1").unwrap();
        assert!(s.device_revoked("pi-1").unwrap());
        assert_eq!(s.device_login("pi-1", &m.password).unwrap(), None);
        assert_eq!(s.device_list().unwrap().len(), 1);
    }
}
