//! A private CA and certificates made by `openssl` for a test, and a
//! loopback HTTPS (or plain HTTP) server answering with a handler.
//! Included by the tests that need it (`#[path = "support/pki.rs"] mod pki;`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed to make the test's certificates (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`{name}-ca.pem`, `{name}-ca.key`) in `dir`.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=OpenClaw https test CA {name}"),
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.pem"),
        ],
    );
    dir.join(format!("{name}-ca.pem"))
}

/// A server certificate `{name}.pem` / `{name}.key` signed by CA `ca` for
/// `san`, valid for `days` (-1: it expired a day ago).
pub fn make_cert(dir: &Path, ca: &str, name: &str, san: &str, days: i32) -> (PathBuf, PathBuf) {
    make_cert_for(dir, ca, name, san, "serverAuth", days)
}

/// Like [`make_cert`], with extended key usage `eku` (`serverAuth`,
/// `clientAuth`, or both comma-separated).
pub fn make_cert_for(
    dir: &Path,
    ca: &str,
    name: &str,
    san: &str,
    eku: &str,
    days: i32,
) -> (PathBuf, PathBuf) {
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nextendedKeyUsage={eku}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-days",
            &days.to_string(),
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// What a handler answers: status, content type, body.
pub type Answer = (u16, &'static str, Vec<u8>);
pub type Handler = Arc<dyn Fn(&str) -> Answer + Send + Sync>;

fn answer<S: Read + Write>(s: &mut S, handler: &Handler) {
    let mut r = BufReader::new(&mut *s);
    let mut first = String::new();
    // A client that refuses the certificate ends here.
    if r.read_line(&mut first).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim_end().is_empty() {
            break;
        }
    }
    let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, ctype, body) = handler(&path);
    let _ = write!(
        s,
        "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(&body);
    let _ = s.flush();
}

/// A loopback server; over TLS with this certificate and key when given.
/// Returns the port.
pub fn serve(tls: Option<(&Path, &Path)>, handler: Handler) -> u16 {
    let config = tls.map(|(cert, key)| {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
        )
    });
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let config = config.clone();
            let handler = handler.clone();
            std::thread::spawn(move || match config {
                Some(config) => {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, s);
                    answer(&mut tls, &handler);
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
                None => answer(&mut s, &handler),
            });
        }
    });
    port
}
