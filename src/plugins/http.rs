//! `http`: HTTP API calls to hosts on the config's allow-list only.
//!
//! By default the list is empty, so an agent sends nothing anywhere but its
//! broker. Redirects are not followed (a 3xx is returned as is), so a
//! response cannot lead the agent to a host off the list. The blocking
//! client runs on tokio's blocking pool. The body comes back once: parsed
//! as `json` when it is JSON and fits, else as `body` text (or
//! `body_base64`), so a response up to `max_response_bytes` always fits
//! in one result.
//!
//! `https://` goes through rustls with the ring provider, the stack the
//! agent already links for `mqtts://`. A server's certificate must chain to
//! the platform's root store (read once, at the first `https://` call, with
//! `rustls-native-certs`: `SSL_CERT_FILE` / `SSL_CERT_DIR`, else the
//! system's bundle such as `/etc/ssl/certs`) or, when the config sets
//! `ca_file`, to the certificates of that file only; and it must name the
//! host of the URL. A refused certificate fails the task, not retryable,
//! with the host and the reason.

use super::schema::Schema;
use super::util::{blocking, cfg_str, cfg_str_list, cfg_u64, config_err, failed, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use std::io::Read;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_rustls::rustls;
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

const NAME: &str = "http";

/// The `max_response_bytes` that still comes back in one result under the
/// default 1 MiB MQTT payload, base64 and envelope included (672 KiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = super::util::result_budget(1 << 20);

/// Headers a task may not set: they decide where the request goes (`host`:
/// another backend behind a reverse proxy on an allowed address) and how
/// its body is framed (request smuggling), and the client sets them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The http plugin.
#[derive(Debug, Clone)]
pub struct Http {
    /// Lower-case `host` (any port) or `host:port`.
    allow: Vec<String>,
    max_response_bytes: u64,
    max_request_bytes: u64,
    default_timeout_ms: u64,
    max_timeout_ms: u64,
    roots: Roots,
}

/// What the certificate of an `https://` host must chain to.
#[derive(Debug, Clone)]
pub enum Roots {
    /// The platform's root store, read at the first use.
    Platform,
    /// The certificates of a PEM file (config key `ca_file`), and no others.
    File {
        path: String,
        certs: Arc<Vec<Certificate<'static>>>,
    },
}

impl Roots {
    /// The CA certificates of the PEM file at `path` (at least one).
    pub fn from_pem_file(path: &str) -> Result<Roots, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => return Err(format!("`{path}`: not a valid PEM file: {e}")),
            }
        }
        if certs.is_empty() {
            return Err(format!("`{path}` holds no PEM certificate"));
        }
        Ok(Roots::File {
            path: path.to_string(),
            certs: Arc::new(certs),
        })
    }

    /// What the roots are, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Roots::Platform => "the platform's root store".into(),
            Roots::File { path, .. } => format!("ca_file `{path}`"),
        }
    }

    /// The certificates, the platform's loaded (once per process) if need be.
    fn certs(&self) -> Result<Arc<Vec<Certificate<'static>>>, String> {
        match self {
            Roots::File { certs, .. } => Ok(certs.clone()),
            Roots::Platform => {
                static PLATFORM: OnceLock<Result<Arc<Vec<Certificate<'static>>>, String>> =
                    OnceLock::new();
                PLATFORM
                    .get_or_init(|| {
                        let found = rustls_native_certs::load_native_certs();
                        if found.certs.is_empty() {
                            let why: Vec<String> =
                                found.errors.iter().map(|e| e.to_string()).collect();
                            return Err(format!(
                                "no root certificates found in the platform's store{} \
                                 (install the ca-certificates package, set SSL_CERT_FILE, \
                                 or give the CA in `ca_file`)",
                                if why.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {}", why.join("; "))
                                }
                            ));
                        }
                        Ok(Arc::new(
                            found
                                .certs
                                .iter()
                                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                                .collect(),
                        ))
                    })
                    .clone()
            }
        }
    }

    /// ureq's TLS settings for these roots: rustls with the ring provider.
    pub fn tls_config(&self) -> Result<TlsConfig, String> {
        Ok(tls_config_with(self.certs()?))
    }
}

/// ureq's TLS settings for the platform's roots, or, when there are none,
/// settings that refuse every certificate, and why. A ureq agent must never
/// be left to ureq's TLS defaults: built without a provider, it would panic
/// at its first `https://` request (a redirect to one included).
pub fn platform_tls_config() -> (TlsConfig, Option<String>) {
    match Roots::Platform.tls_config() {
        Ok(t) => (t, None),
        Err(e) => (tls_config_with(Arc::new(Vec::new())), Some(e)),
    }
}

fn tls_config_with(certs: Arc<Vec<Certificate<'static>>>) -> TlsConfig {
    static RING: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    let ring = RING
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone();
    TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(certs))
        .unversioned_rustls_crypto_provider(ring)
        .build()
}

/// Why a TLS connection to `host` failed, when `e` is a TLS error: a
/// refused certificate says which check failed (host name, expiry, CA).
pub fn tls_failure(e: &ureq::Error, host: &str, roots: &Roots) -> Option<String> {
    let r = match e {
        ureq::Error::Rustls(r) => r,
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    use rustls::CertificateError as C;
    Some(match r {
        rustls::Error::InvalidCertificate(c) => {
            let why = match c {
                C::NotValidForNameContext { presented, .. } if !presented.is_empty() => {
                    // rustls shows the names as `DnsName("a.example")`.
                    let names: Vec<&str> = presented
                        .iter()
                        .map(|n| {
                            n.split_once("(\"")
                                .and_then(|(_, rest)| rest.strip_suffix("\")"))
                                .unwrap_or(n)
                        })
                        .collect();
                    format!("wrong host name: it is for {}", names.join(", "))
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "wrong host name: it is not for this host".into()
                }
                C::ExpiredContext { time, not_after } => format!(
                    "expired {} s ago (not valid after {} UNIX time)",
                    time.as_secs().saturating_sub(not_after.as_secs()),
                    not_after.as_secs()
                ),
                C::Expired => "expired: its validity period has ended".into(),
                C::NotValidYet | C::NotValidYetContext { .. } => format!("not valid yet: {c}"),
                C::UnknownIssuer => format!(
                    "unknown CA: it does not chain to a certificate of {}",
                    roots.describe()
                ),
                other => other.to_string(),
            };
            format!("the TLS certificate of `{host}` is refused: {why}")
        }
        other => format!("TLS with `{host}` failed: {other}"),
    })
}

struct Call {
    method: String,
    url: String,
    /// `host:port`, for error messages.
    host: String,
    https: bool,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    timeout: Duration,
}

impl Http {
    /// Config keys: `allow` (list of `host` or `host:port`; default empty),
    /// `max_response_bytes` (default 672 KiB: what comes back in one result
    /// under the default MQTT payload limit, see [`DEFAULT_MAX_RESPONSE_BYTES`]),
    /// `max_request_bytes` (default 1 MiB), `timeout_ms` (default 10000),
    /// `max_timeout_ms` (default 60000), `ca_file` (PEM; the only roots for
    /// `https://` when set, else the platform's).
    pub fn from_config(config: &toml::Table) -> Result<Http, PluginError> {
        check_keys(
            NAME,
            config,
            &[
                "allow",
                "max_response_bytes",
                "max_request_bytes",
                "timeout_ms",
                "max_timeout_ms",
                "ca_file",
            ],
        )?;
        let allow = cfg_str_list(NAME, config, "allow")?
            .into_iter()
            .map(|h| {
                if h.is_empty() || h.contains('/') || h.contains('*') {
                    Err(config_err(
                        NAME,
                        "allow",
                        format!(
                            "`{h}`: expected a host name or host:port, no scheme, path or wildcard"
                        ),
                    ))
                } else {
                    Ok(h.to_ascii_lowercase())
                }
            })
            .collect::<Result<_, _>>()?;
        let max_timeout_ms = cfg_u64(NAME, config, "max_timeout_ms", 60_000, 1, 3_600_000)?;
        let roots = match cfg_str(NAME, config, "ca_file")? {
            None => Roots::Platform,
            Some(path) => {
                Roots::from_pem_file(&path).map_err(|e| config_err(NAME, "ca_file", e))?
            }
        };
        Ok(Http {
            roots,
            allow,
            max_response_bytes: cfg_u64(
                NAME,
                config,
                "max_response_bytes",
                DEFAULT_MAX_RESPONSE_BYTES,
                1,
                1 << 30,
            )?,
            max_request_bytes: cfg_u64(NAME, config, "max_request_bytes", 1 << 20, 0, 1 << 30)?,
            default_timeout_ms: cfg_u64(NAME, config, "timeout_ms", 10_000, 1, max_timeout_ms)?,
            max_timeout_ms,
        })
    }

    /// Whether `host` at `port` is on the allow-list.
    fn allowed(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let with_port = format!("{host}:{port}");
        self.allow.iter().any(|a| *a == host || *a == with_port)
    }

    fn parse(&self, input: &Input) -> Result<Call, PluginError> {
        let url = input.str("url")?;
        let uri: ureq::http::Uri = url
            .parse()
            .map_err(|e| input.err("url", format!("`{url}`: {e}")))?;
        let port = match uri.scheme_str() {
            Some("http") => uri.port_u16().unwrap_or(80),
            Some("https") => uri.port_u16().unwrap_or(443),
            _ => return Err(input.err("url", format!("`{url}`: only http:// and https:// URLs"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| input.err("url", format!("`{url}` has no host")))?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(input.err(
                "url",
                "credentials in the URL are not accepted; use a header",
            ));
        }
        if !self.allowed(host, port) {
            return Err(input.err(
                "url",
                format!(
                    "host `{host}:{port}` is not on the allow-list of plugin `http` (config key `allow`: [{}])",
                    self.allow.join(", ")
                ),
            ));
        }
        let method = input
            .opt_str("method")?
            .unwrap_or("GET")
            .to_ascii_uppercase();
        if !["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"].contains(&method.as_str())
        {
            return Err(input.err(
                "method",
                format!("`{method}` is not one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            ));
        }
        let mut headers = Vec::new();
        match input.get("headers") {
            None => {}
            Some(Value::Map(h)) => {
                for (k, v) in h {
                    let v = match v {
                        Value::Str(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        _ => return Err(input.err(&format!("headers.{k}"), "expected a string")),
                    };
                    if ureq::http::HeaderName::from_bytes(k.as_bytes()).is_err()
                        || ureq::http::HeaderValue::from_str(&v).is_err()
                    {
                        return Err(input.err(&format!("headers.{k}"), "not a valid HTTP header"));
                    }
                    if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
                        return Err(input.err(
                            &format!("headers.{k}"),
                            format!(
                                "may not be set by a task (the agent sets it from the URL and body; reserved: {})",
                                RESERVED_HEADERS.join(", ")
                            ),
                        ));
                    }
                    headers.push((k.clone(), v));
                }
            }
            Some(_) => return Err(input.err("headers", "expected an object of name: value")),
        }
        let body = match (input.get("body"), input.get("json")) {
            (None, None) => None,
            (Some(Value::Str(s)), None) => Some(s.clone().into_bytes()),
            (Some(Value::Bytes(b)), None) => Some(b.clone()),
            (Some(_), None) => return Err(input.err("body", "expected a string")),
            (None, Some(j)) => {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                Some(serde_json::to_vec(&serde_json::Value::from(j.clone())).unwrap_or_default())
            }
            (Some(_), Some(_)) => return Err(input.err("body", "give `body` or `json`, not both")),
        };
        if let Some(b) = &body {
            if matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS") {
                return Err(input.err("body", format!("{method} requests carry no body")));
            }
            if b.len() as u64 > self.max_request_bytes {
                return Err(input.err(
                    "body",
                    format!(
                        "{} bytes, more than max_request_bytes ({})",
                        b.len(),
                        self.max_request_bytes
                    ),
                ));
            }
        }
        let timeout_ms = input
            .opt_int("timeout_ms", 1, self.max_timeout_ms as i64)?
            .map_or(self.default_timeout_ms, |t| t as u64);
        Ok(Call {
            method,
            url: url.to_string(),
            host: format!("{host}:{port}"),
            https: uri.scheme_str() == Some("https"),
            headers,
            body,
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    /// A JSON body parsed, when that fits where its text would: at most
    /// the room of a capped body sent as base64 (a long list of floats
    /// takes about twice its text parsed), and not nested deeper than a
    /// result may be. Otherwise the body comes back as text.
    fn parsed_json(&self, bytes: &[u8]) -> Option<Value> {
        let j = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
        let v = Value::from(j);
        let room = self.max_response_bytes.div_ceil(3) * 4;
        let size = postcard::to_stdvec(&v).map_or(u64::MAX, |b| b.len() as u64);
        // The result map is one level above it.
        (size <= room && v.depth() < crate::protocol::MAX_VALUE_DEPTH).then_some(v)
    }

    fn call(&self, c: Call) -> Result<Value, PluginError> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(c.timeout));
        if c.https {
            let tls = self
                .roots
                .tls_config()
                .map_err(|e| failed(NAME, format!("`url`: {} {}: {e}", c.method, c.url)))?;
            config = config.tls_config(tls);
        }
        let agent: ureq::Agent = config.build().into();
        let mut b = ureq::http::Request::builder()
            .method(c.method.as_str())
            .uri(&c.url);
        for (k, v) in &c.headers {
            b = b.header(k, v);
        }
        let started = Instant::now();
        let bad = |e: ureq::http::Error| super::util::invalid(NAME, "url", e.to_string());
        let res = match c.body {
            Some(body) => agent.run(b.body(body).map_err(bad)?),
            None => agent.run(b.body(()).map_err(bad)?),
        };
        let what = format!("{} {}", c.method, c.url);
        let mut resp = res.map_err(|e| {
            // A refused certificate stays refused: not worth a retry.
            if let Some(why) = tls_failure(&e, &c.host, &self.roots) {
                return failed(NAME, format!("`url`: {what}: {why}"));
            }
            let message = match e {
                ureq::Error::Timeout(_) => format!(
                    "`url`: {what}: no answer within timeout_ms ({} ms)",
                    c.timeout.as_millis()
                ),
                other => format!("`url`: {what}: {other}"),
            };
            PluginError::Failed {
                plugin: NAME.into(),
                message,
                retryable: true,
            }
        })?;
        let status = resp.status().as_u16();
        let headers: Vec<(String, Value)> = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    Value::Str(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect();
        let is_json = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
        let mut bytes = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(self.max_response_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| failed(NAME, format!("`url`: {what}: reading the response: {e}")))?;
        let truncated = bytes.len() as u64 > self.max_response_bytes;
        bytes.truncate(self.max_response_bytes as usize);
        let mut out = vec![
            ("status", Value::Int(status as i64)),
            ("headers", Value::Map(headers)),
            ("truncated", Value::Bool(truncated)),
            (
                "elapsed_ms",
                Value::Int(started.elapsed().as_millis() as i64),
            ),
        ];
        // One copy only: a JSON response comes back parsed, as `json`,
        // or as text, never both (both doubled the result, so a response
        // near the cap failed as too large).
        if is_json && !truncated {
            if let Some(j) = self.parsed_json(&bytes) {
                out.push(("json", j));
                return Ok(map(out));
            }
        }
        match String::from_utf8(bytes) {
            Ok(s) => out.push(("body", Value::Str(s))),
            Err(e) => out.push((
                "body_base64",
                Value::Str(super::util::base64_encode(e.as_bytes())),
            )),
        }
        Ok(map(out))
    }
}

#[async_trait]
impl Plugin for Http {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Calls an HTTP API on a host of the device's allow-list.".into()
    }

    fn effects(&self) -> super::Effects {
        // One table, which the server also holds catalogs to.
        crate::schema::builtin_effects("http").unwrap_or(super::Effects::Always)
    }

    fn input_schema(&self) -> Schema {
        Schema::object()
            .req(
                "url",
                Schema::string()
                    .len(1, 8192)
                    .desc("http[s]://HOST[:PORT]/..., host on the allow-list"),
            )
            .field(
                "method",
                Schema::enumeration(&["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
            )
            .field(
                "headers",
                Schema::object().open().desc("name -> string value"),
            )
            .field("body", Schema::string())
            .field("json", Schema::any().desc("sent as application/json"))
            .field("timeout_ms", Schema::integer(1, self.max_timeout_ms as i64))
    }

    fn concurrency(&self) -> usize {
        8
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let call = self.parse(&Input::new(NAME, &task.input)?)?;
        let me = self.clone();
        blocking(NAME, &task, move || me.call(call)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// Answers one request per connection with a JSON echo of what it got.
    fn echo_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut len = 0;
                let mut hdrs = serde_json::Map::new();
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap();
                    }
                    hdrs.insert(k.to_ascii_lowercase(), json!(v.trim()));
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let answer = json!({"request": line.trim_end(), "headers": hdrs,
                    "body": String::from_utf8_lossy(&body)})
                .to_string();
                let _ = write!(
                    s,
                    "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-test: yes\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        port
    }

    fn plugin(allow: &str) -> Http {
        Http::from_config(
            &toml::from_str(&format!("allow = [{allow:?}]\nmax_response_bytes = 4096")).unwrap(),
        )
        .unwrap()
    }

    fn call(p: &Http, v: serde_json::Value) -> Result<serde_json::Value, String> {
        let v = Value::from(v);
        let c = p
            .parse(&Input::new(NAME, &v).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        p.call(c)
            .map(serde_json::Value::from)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn calls_an_allowed_host() {
        let port = echo_server();
        let p = plugin(&format!("127.0.0.1:{port}"));
        let r = call(
            &p,
            json!({"url": format!("http://127.0.0.1:{port}/api?x=1"), "method": "post",
                "headers": {"X-Key": "k1"}, "json": {"a": 1}}),
        )
        .unwrap();
        assert_eq!(r["status"], 201);
        assert_eq!(r["headers"]["x-test"], "yes");
        assert_eq!(r["json"]["request"], "POST /api?x=1 HTTP/1.1");
        assert_eq!(r["json"]["headers"]["x-key"], "k1");
        assert_eq!(r["json"]["headers"]["content-type"], "application/json");
        assert_eq!(r["json"]["body"], "{\"a\":1}");
    }

    #[test]
    fn refuses_hosts_off_the_list_and_bad_input() {
        let p = Http::from_config(&toml::Table::new()).unwrap();
        let e = call(&p, json!({"url": "http://127.0.0.1:1/"})).unwrap_err();
        assert!(
            e.contains("`http`") && e.contains("`url`") && e.contains("allow-list"),
            "{e}"
        );
        let p = plugin("example.com");
        for (input, field) in [
            (json!({"url": "http://example.org/"}), "`url`"),
            (json!({"url": "ftp://example.com/"}), "`url`"),
            (json!({"url": "http://u:p@example.com/"}), "`url`"),
            (json!({}), "`url`"),
            (
                json!({"url": "http://example.com/", "method": "BREW"}),
                "`method`",
            ),
            (json!({"url": "http://example.com/", "body": "x"}), "`body`"),
            (
                json!({"url": "http://example.com/", "headers": {"a b": "x"}}),
                "`headers.a b`",
            ),
            (
                json!({"url": "http://example.com/", "headers": "x"}),
                "`headers`",
            ),
            (
                json!({"url": "http://example.com/", "headers": {"Host": "admin.internal"}}),
                "`headers.Host`",
            ),
            (
                json!({"url": "http://example.com/", "method": "POST", "body": "x",
                       "headers": {"transfer-encoding": "chunked"}}),
                "`headers.transfer-encoding`",
            ),
            (
                json!({"url": "http://example.com/", "timeout_ms": 0}),
                "`timeout_ms`",
            ),
        ] {
            let e = call(&p, input.clone()).unwrap_err();
            assert!(e.contains("`http`") && e.contains(field), "{input}: {e}");
        }
        assert!(Http::from_config(&toml::from_str("allow = [\"http://x\"]").unwrap()).is_err());
    }

    #[test]
    fn dead_peer_and_timeout_fail_clearly() {
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = plugin("127.0.0.1");
        let e = call(&p, json!({"url": format!("http://127.0.0.1:{dead}/")})).unwrap_err();
        assert!(e.contains("`http`") && e.contains("`url`"), "{e}");
        // Accepts and never answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let e = call(
            &p,
            json!({"url": format!("http://127.0.0.1:{port}/"), "timeout_ms": 300}),
        )
        .unwrap_err();
        assert!(e.contains("timeout_ms"), "{e}");
        drop(l);
    }
}
