//! Small helpers shared by the built-in plugins: error constructors, typed
//! access to config keys and task input fields (errors name plugin and
//! field), base64, and running blocking work off the async threads.

use super::{PluginError, TaskContext};
use crate::protocol::Value;

pub(crate) fn config_err(plugin: &str, key: &str, message: impl Into<String>) -> PluginError {
    PluginError::Config {
        plugin: plugin.into(),
        key: key.into(),
        message: message.into(),
    }
}

pub(crate) fn invalid(plugin: &str, field: &str, message: impl Into<String>) -> PluginError {
    PluginError::InvalidInput {
        plugin: plugin.into(),
        field: field.into(),
        message: message.into(),
    }
}

pub(crate) fn failed(plugin: &str, message: impl Into<String>) -> PluginError {
    PluginError::Failed {
        plugin: plugin.into(),
        message: message.into(),
        retryable: false,
    }
}

/// A string config key, if present.
pub(crate) fn cfg_str(
    plugin: &str,
    config: &toml::Table,
    key: &str,
) -> Result<Option<String>, PluginError> {
    match config.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(config_err(
            plugin,
            key,
            format!("expected a string, found {v}"),
        )),
    }
}

/// An integer config key in `min..=max`, or `default`.
pub(crate) fn cfg_u64(
    plugin: &str,
    config: &toml::Table,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, PluginError> {
    match config.get(key) {
        None => Ok(default),
        Some(toml::Value::Integer(i)) if *i >= min as i64 && (*i as u64) <= max => Ok(*i as u64),
        Some(v) => Err(config_err(
            plugin,
            key,
            format!("expected an integer from {min} to {max}, found {v}"),
        )),
    }
}

/// A list-of-strings config key (empty when absent).
pub(crate) fn cfg_str_list(
    plugin: &str,
    config: &toml::Table,
    key: &str,
) -> Result<Vec<String>, PluginError> {
    match config.get(key) {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s.clone()),
                other => Err(config_err(
                    plugin,
                    key,
                    format!("expected a list of strings, found {other}"),
                )),
            })
            .collect(),
        Some(v) => Err(config_err(
            plugin,
            key,
            format!("expected a list of strings, found {v}"),
        )),
    }
}

/// Typed access to the fields of a task's input map.
pub(crate) struct Input<'a> {
    pub plugin: &'static str,
    pub value: &'a Value,
}

impl<'a> Input<'a> {
    /// Checks that the input is a map.
    pub fn new(plugin: &'static str, value: &'a Value) -> Result<Input<'a>, PluginError> {
        match value {
            Value::Map(_) => Ok(Input { plugin, value }),
            _ => Err(invalid(plugin, "input", "expected an object")),
        }
    }

    pub fn get(&self, field: &str) -> Option<&'a Value> {
        match self.value.get(field) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub fn err(&self, field: &str, message: impl Into<String>) -> PluginError {
        invalid(self.plugin, field, message)
    }

    pub fn str(&self, field: &str) -> Result<&'a str, PluginError> {
        self.opt_str(field)?
            .ok_or_else(|| self.err(field, "missing (expected a string)"))
    }

    pub fn opt_str(&self, field: &str) -> Result<Option<&'a str>, PluginError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(field, "expected a string")),
        }
    }

    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, PluginError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(field, "expected true or false")),
        }
    }

    /// An integer in `min..=max`, if present.
    pub fn opt_int(&self, field: &str, min: i64, max: i64) -> Result<Option<i64>, PluginError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Int(i)) if (min..=max).contains(i) => Ok(Some(*i)),
            Some(_) => Err(self.err(field, format!("expected an integer from {min} to {max}"))),
        }
    }

    /// A finite number, if present.
    pub fn opt_num(&self, field: &str) -> Result<Option<f64>, PluginError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match as_f64(v) {
                Some(f) if f.is_finite() => Ok(Some(f)),
                _ => Err(self.err(field, "expected a finite number")),
            },
        }
    }
}

/// Cores available to this process (the default concurrency of CPU-bound
/// plugins).
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A number as f64 (ints and floats only).
pub(crate) fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

/// Runs blocking work on tokio's blocking pool, returning early on cancel.
///
/// The thread holds the task's [`super::Work`] handle until `f` returns, so
/// the agent keeps the task's slot while it runs: `f` should check a
/// [`Stop`] in its long loops so that it ends soon after a cancel.
pub(crate) async fn blocking<T: Send + 'static>(
    plugin: &str,
    task: &TaskContext,
    f: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
) -> Result<T, PluginError> {
    let work = super::Work::current();
    let handle = tokio::task::spawn_blocking(move || {
        let _held = work;
        f()
    });
    tokio::select! {
        r = handle => r.map_err(|e| failed(plugin, format!("worker aborted: {e}")))?,
        _ = task.cancel.cancelled() => Err(PluginError::Cancelled(plugin.into())),
    }
}

/// Tells blocking work that its task was cancelled or is past its deadline.
#[derive(Clone, Debug)]
pub(crate) struct Stop {
    cancel: tokio_util::sync::CancellationToken,
    deadline: Option<std::time::Instant>,
}

impl Stop {
    pub fn of(task: &TaskContext) -> Stop {
        Stop {
            cancel: task.cancel.clone(),
            deadline: Some(task.deadline),
        }
    }

    /// Never stops (unit tests, direct calls).
    #[allow(dead_code)]
    pub fn never() -> Stop {
        Stop {
            cancel: tokio_util::sync::CancellationToken::new(),
            deadline: None,
        }
    }

    pub fn stopped(&self) -> bool {
        self.cancel.is_cancelled()
            || self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
    }

    /// `Err(Cancelled)` once the task is cancelled or past its deadline.
    pub fn check(&self, plugin: &str) -> Result<(), PluginError> {
        if self.stopped() {
            Err(PluginError::Cancelled(plugin.into()))
        } else {
            Ok(())
        }
    }
}

/// How large a plugin's raw output may be so that its result still fits in
/// one MQTT payload of `payload_bytes`: base64 (4/3) of it plus an eighth of
/// the payload for the envelope (task id, field names, a path, HTTP
/// response headers). 672 KiB under the default 1 MiB.
pub const fn result_budget(payload_bytes: u64) -> u64 {
    let room = payload_bytes - payload_bytes / 8;
    room / 4 * 3
}

/// `s` fit for one log line: control characters (escapes, carriage
/// returns, bells, newlines) shown as `\u{..}`, and at most `max` bytes
/// kept (the rest counted).
pub(crate) fn log_safe(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 16);
    let mut cut = 0usize;
    for (i, c) in s.char_indices() {
        if out.len() >= max {
            cut = s.len() - i;
            break;
        }
        if c.is_control() {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    if cut > 0 {
        out.push_str(&format!(" [{cut} more bytes]"));
    }
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Standard base64 (padding optional, whitespace ignored).
pub(crate) fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for (i, c) in s.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return Err(format!("byte {i} ({:?}) is not base64", c as char)),
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// Builds a map value from pairs.
pub(crate) fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrips() {
        for data in [&b""[..], b"a", b"ab", b"abc", b"hello world\x00\xff"] {
            assert_eq!(base64_decode(&base64_encode(data)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert!(base64_decode("a*b").is_err());
    }

    #[test]
    fn log_lines_lose_control_characters_and_length() {
        assert_eq!(log_safe("a\x1b[2J\rb\n", 100), "a\\u{1b}[2J\\u{d}b\\u{a}");
        let long = log_safe(&"x".repeat(5000), 100);
        assert!(long.starts_with(&"x".repeat(100)) && long.ends_with("[4900 more bytes]"));
        assert!(!long.chars().any(char::is_control));
        assert_eq!(result_budget(1 << 20), 688_128);
    }

    #[test]
    fn input_fields_name_plugin_and_field() {
        let v = Value::from(serde_json::json!({"a": 1, "s": "x"}));
        let i = Input::new("t", &v).unwrap();
        assert_eq!(i.str("s").unwrap(), "x");
        let e = i.str("a").unwrap_err().to_string();
        assert!(e.contains("`t`") && e.contains("`a`"), "{e}");
        let e = i.opt_int("a", 2, 5).unwrap_err().to_string();
        assert!(e.contains("from 2 to 5"), "{e}");
        assert!(Input::new("t", &Value::Int(1)).is_err());
    }
}
