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

/// Parses `mqtt://host:port` (or `tcp://`, or bare `host:port`) into host and port.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{url}`: port `{p}` is not a number from 1 to 65535"))?,
        ),
        None => (rest, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || rest.contains('/') {
        return Err(format!("`{url}` is not of the form mqtt://HOST:PORT"));
    }
    Ok((host.to_string(), port))
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
    }
}
