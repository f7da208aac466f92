//! Layered TOML configuration: embedded defaults, then the user's file, then
//! command-line overrides. Unknown keys are refused, and every error names
//! the key and the file it came from.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// A configuration or board-profile error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid TOML: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("{}: key `{key}`: {message}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
    #[error("unknown board `{0}`: not a built-in profile ({1}) and no such file")]
    UnknownBoard(String, String),
}

impl ConfigError {
    /// A validation error for `key` in `file`.
    pub fn invalid(file: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Checks that `value` of `key` lies in `min..=max`: every numeric key is
/// range-checked at load, so a value that would wrap, overflow or lock the
/// process out is refused with the key and the file named.
pub fn check_range<T: PartialOrd + std::fmt::Display>(
    file: &Path,
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::invalid(
            file,
            key,
            format!("{value} is out of range: must be from {min} to {max}"),
        ));
    }
    Ok(())
}

/// The `[mqtt]` keys agent and server share, range-checked in one place.
#[derive(Debug, Clone, Copy)]
pub struct MqttRanges {
    pub keep_alive_secs: u64,
    pub max_payload_bytes: usize,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl MqttRanges {
    /// Checks each key of `[mqtt]` in `file` (see [`check_range`]).
    pub fn check(&self, file: &Path) -> Result<(), ConfigError> {
        check_range(file, "mqtt.keep_alive_secs", self.keep_alive_secs, 1, 3600)?;
        check_range(
            file,
            "mqtt.max_payload_bytes",
            self.max_payload_bytes,
            1024,
            MAX_MQTT_PAYLOAD,
        )?;
        check_range(
            file,
            "mqtt.reconnect_min_ms",
            self.reconnect_min_ms,
            1,
            HOUR_MS,
        )?;
        check_range(
            file,
            "mqtt.reconnect_max_ms",
            self.reconnect_max_ms,
            1,
            HOUR_MS,
        )
    }
}

/// The largest MQTT payload a key may name: the protocol's largest packet
/// (268,435,455 bytes) less room for the topic and headers.
pub const MAX_MQTT_PAYLOAD: usize = 268_435_455 - 65_536;

/// An hour, the bound of most intervals and timeouts in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;

/// Parses TOML text, naming `file` in errors.
pub fn parse_table(text: &str, file: &Path) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })
}

/// Reads and parses a TOML file.
pub fn read_table(file: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Io {
        file: file.to_path_buf(),
        source,
    })?;
    parse_table(&text, file)
}

/// Merges `over` into `base`: tables recursively, everything else replaced.
pub fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Deserializes a merged table into `T`, reporting the failing key path.
pub fn deserialize<T: DeserializeOwned>(table: toml::Table, file: &Path) -> Result<T, ConfigError> {
    let de = toml::Value::Table(table);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message: e.into_inner().to_string().trim().to_string(),
        }
    })
}

/// Defaults (embedded text), then `file` if given, then `overrides`.
/// Returns the value and the file errors should name.
pub fn load<T: DeserializeOwned>(
    defaults: &str,
    defaults_name: &str,
    file: Option<&Path>,
    overrides: toml::Table,
) -> Result<(T, PathBuf), ConfigError> {
    let mut table = parse_table(defaults, Path::new(defaults_name))?;
    let name = match file {
        Some(f) => {
            let user = read_table(f)?;
            merge(&mut table, user);
            f.to_path_buf()
        }
        None => PathBuf::from(defaults_name),
    };
    merge(&mut table, overrides);
    Ok((deserialize(table, &name)?, name))
}

/// Builds an override table from dotted keys, e.g. `("mqtt.broker", value)`.
pub fn override_table<I>(pairs: I) -> toml::Table
where
    I: IntoIterator<Item = (&'static str, toml::Value)>,
{
    let mut root = toml::Table::new();
    for (key, value) in pairs {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().expect("non-empty key");
        let mut t = &mut root;
        for p in parts {
            t = t
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("override keys do not collide");
        }
        t.insert(last.to_string(), value);
    }
    root
}

/// Parses `mqtt://host:port` (or `tcp://`, or bare `host:port`; default port
/// 1883) or `mqtts://host:port` (TLS, default port 8883) into host and port.
/// [`broker_uses_tls`] tells the two apart.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), String> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, 8883)
    } else if let Some(r) = url.strip_prefix("ssl://") {
        (r, 8883)
    } else {
        (
            url.strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://"))
                .unwrap_or(url),
            1883,
        )
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !p.ends_with(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{url}`: port `{p}` is not a number from 1 to 65535"))?,
        ),
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || rest.contains('/') || rest.contains("://") {
        return Err(format!(
            "`{url}` is not of the form mqtt://HOST:PORT or mqtts://HOST:PORT"
        ));
    }
    Ok((host.to_string(), port))
}

/// True for a `mqtts://` (or `ssl://`) broker URL: the connection uses TLS.
pub fn broker_uses_tls(url: &str) -> bool {
    url.starts_with("mqtts://") || url.starts_with("ssl://")
}

/// `[mqtt.tls]`: how to trust a `mqtts://` broker and, for mutual TLS, who we
/// are. Private fleets run their own CA, so the CA file is required (the
/// system's web roots are never trusted implicitly).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file with the CA certificate(s) that sign the broker's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain of this client (mutual TLS); needs `client_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
}

impl TlsSection {
    /// Checks the section against the broker URL: a `mqtts://` broker needs
    /// a readable CA file with a certificate in it; a client certificate and
    /// key come together and hold what their names say. `prefix` is the
    /// section's key path (`mqtt.tls`) for the error.
    pub fn validate(&self, broker: &str, file: &Path, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let any = self.ca_file.is_some()
            || self.client_cert_file.is_some()
            || self.client_key_file.is_some();
        if !broker_uses_tls(broker) {
            if any {
                return Err(ConfigError::invalid(
                    file,
                    &key("ca_file"),
                    format!("TLS settings are given but the broker `{broker}` is not mqtts://"),
                ));
            }
            return Ok(());
        }
        let Some(ca) = &self.ca_file else {
            return Err(ConfigError::invalid(
                file,
                &key("ca_file"),
                format!("the broker `{broker}` uses TLS: set the PEM file of the CA that signs its certificate"),
            ));
        };
        check_pem(ca, "CERTIFICATE").map_err(|m| ConfigError::invalid(file, &key("ca_file"), m))?;
        match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => {}
            (Some(c), Some(k)) => {
                check_pem(c, "CERTIFICATE")
                    .map_err(|m| ConfigError::invalid(file, &key("client_cert_file"), m))?;
                check_pem(k, "PRIVATE KEY")
                    .map_err(|m| ConfigError::invalid(file, &key("client_key_file"), m))?;
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    file,
                    &key("client_key_file"),
                    "client_cert_file is set: set the key that goes with it",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    file,
                    &key("client_cert_file"),
                    "client_key_file is set: set the certificate that goes with it",
                ))
            }
        }
        Ok(())
    }
}

/// A readable PEM file with at least one `-----BEGIN ...{what}-----` block.
fn check_pem(path: &Path, what: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{what}-----")));
    if found {
        Ok(())
    } else {
        Err(format!("{} holds no PEM {what}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        a: u32,
        inner: Inner,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        b: String,
    }

    #[test]
    fn errors_name_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.toml");
        std::fs::write(&f, "[inner]\nbogus = 1\n").unwrap();
        let err = load::<Cfg>(
            "a = 1\n[inner]\nb = 'x'\n",
            "defaults",
            Some(&f),
            toml::Table::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x.toml"), "{err}");
        assert!(err.contains("inner"), "{err}");
        assert!(err.contains("bogus"), "{err}");

        std::fs::write(&f, "a = 'nope'\n").unwrap();
        let err = load::<Cfg>(
            "a = 1\n[inner]\nb = 'x'\n",
            "defaults",
            Some(&f),
            toml::Table::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key `a`"), "{err}");

        std::fs::write(&f, "a = = 1\n").unwrap();
        let err = load::<Cfg>(
            "a = 1\n[inner]\nb = 'x'\n",
            "d",
            Some(&f),
            toml::Table::new(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn overrides_win() {
        let o = override_table([("inner.b", toml::Value::String("y".into()))]);
        let (c, _) = load::<Cfg>("a = 1\n[inner]\nb = 'x'\n", "d", None, o).unwrap();
        assert_eq!(c.inner.b, "y");
        assert_eq!(c.a, 1);
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://h:1884").unwrap(),
            ("h".into(), 1884)
        );
        assert_eq!(
            parse_broker_url("localhost").unwrap(),
            ("localhost".into(), 1883)
        );
        assert!(parse_broker_url("mqtt://h:xx").is_err());
        assert!(parse_broker_url("mqtt://:1").is_err());
        assert!(parse_broker_url("http://h/x").is_err());
        assert!(parse_broker_url("http://h:1").is_err());
        assert_eq!(
            parse_broker_url("mqtts://broker.lan").unwrap(),
            ("broker.lan".into(), 8883)
        );
        assert_eq!(
            parse_broker_url("mqtts://[::1]:8884").unwrap(),
            ("::1".into(), 8884)
        );
        assert!(broker_uses_tls("mqtts://h:1") && !broker_uses_tls("mqtt://h:1"));
    }

    #[test]
    fn tls_section_names_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = Path::new("agent.toml");
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err =
            |t: &TlsSection, url: &str| t.validate(url, f, "mqtt.tls").unwrap_err().to_string();

        let none = TlsSection::default();
        assert!(none.validate("mqtt://h:1", f, "mqtt.tls").is_ok());
        let e = err(&none, "mqtts://h:1");
        assert!(
            e.contains("agent.toml") && e.contains("mqtt.tls.ca_file"),
            "{e}"
        );

        let with_ca = TlsSection {
            ca_file: Some(ca.clone()),
            ..Default::default()
        };
        assert!(with_ca.validate("mqtts://h:1", f, "mqtt.tls").is_ok());
        let e = err(&with_ca, "mqtt://h:1");
        assert!(e.contains("not mqtts://"), "{e}");

        let missing = TlsSection {
            ca_file: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        let e = err(&missing, "mqtts://h:1");
        assert!(
            e.contains("mqtt.tls.ca_file") && e.contains("nope.pem"),
            "{e}"
        );

        // A key where the CA should be, and half a client identity.
        let wrong = TlsSection {
            ca_file: Some(key.clone()),
            ..Default::default()
        };
        assert!(err(&wrong, "mqtts://h:1").contains("no PEM CERTIFICATE"));
        let half = TlsSection {
            ca_file: Some(ca.clone()),
            client_cert_file: Some(ca.clone()),
            client_key_file: None,
        };
        assert!(err(&half, "mqtts://h:1").contains("mqtt.tls.client_key_file"));
        let full = TlsSection {
            ca_file: Some(ca.clone()),
            client_cert_file: Some(ca),
            client_key_file: Some(key),
        };
        assert!(full.validate("mqtts://h:1", f, "mqtt.tls").is_ok());
    }
}
