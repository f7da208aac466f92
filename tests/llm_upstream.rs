#![cfg(feature = "llm")]
//! The `openai` backend (src/llm/upstream.rs) against real peers: a real
//! OpenAI-compatible server (llama-cpp-python 0.2.62's `llama_cpp.server`
//! from the venv of scripts/lib/llm-upstream-env.sh, serving
//! Qwen2.5-Coder-0.5B-Instruct Q4_K_M on 1 thread), ports nobody listens
//! on, servers killed with SIGKILL, and deliberately broken upstreams
//! written here as tiny raw-TCP servers. No assertion is on wall-clock
//! time: waits are polls of the pool's status with a generous bound.
//!
//! Run: `source scripts/lib/llm-upstream-env.sh` once, then
//! `cargo test --features agent --test llm_upstream -- --test-threads=1`.

use openclaw::llm::upstream::UpstreamPool;
use openclaw::llm::{Backend, ChatMessage, ChatRequest, EmbedRequest, FinishReason, LlmError};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[path = "support/llama_server.rs"]
mod llama_server;
use llama_server::*;

fn pool(config: &str) -> UpstreamPool {
    UpstreamPool::from_toml(&toml::from_str(config).unwrap()).unwrap()
}

/// A pool config serving `qwen` (upstream name `qwen-upstream`) with these
/// upstream tables and pool keys.
fn config(pool_keys: &str, upstreams: &[String]) -> String {
    let mut s =
        format!("models = [{{ name = \"qwen\", upstream = \"qwen-upstream\" }}]\n{pool_keys}\n");
    for u in upstreams {
        s.push_str("[[upstreams]]\n");
        s.push_str(u);
        s.push('\n');
    }
    s
}

fn up(url: &str) -> String {
    format!("url = \"{url}\"")
}

fn request(max_tokens: u32) -> ChatRequest {
    ChatRequest {
        model: "qwen".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Count from one to twenty in words, separated by commas.".into(),
            name: None,
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        top_p: None,
        top_k: Some(1),
        seed: Some(7),
        stop: Vec::new(),
        response_format: None,
    }
}

/// Runs a chat, collecting its pieces.
fn chat(
    pool: &UpstreamPool,
    req: &ChatRequest,
) -> (Result<openclaw::llm::Completion, LlmError>, Vec<String>) {
    let mut pieces = Vec::new();
    let r = pool.chat(
        req,
        &mut |p| pieces.push(p.to_string()),
        &CancellationToken::new(),
    );
    (r, pieces)
}

/// Polls `f` every 50 ms until it holds, at most `secs` (a bound, not a
/// measurement).
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- deliberately broken upstreams: raw TCP ----

/// What a hostile server saw of one request.
#[derive(Debug, Clone, Default)]
struct Seen {
    request_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Accepts connections on 127.0.0.1 and runs `answer` on each (one thread
/// per connection), after reading the request's head and body. Counts
/// connections.
fn hostile(
    answer: impl Fn(TcpStream, Seen) + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let answer = Arc::new(answer);
    let (c, s) = (count.clone(), seen.clone());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let (answer, s) = (answer.clone(), s.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut seen = Seen::default();
                if r.read_line(&mut seen.request_line).is_err() {
                    return;
                }
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 {
                        return;
                    }
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        seen.headers
                            .push((k.to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                let mut body = vec![0; len];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                seen.body = body;
                s.lock().unwrap().push(seen.clone());
                answer(conn, seen);
            });
        }
    });
    (url, count, seen)
}

fn sse_head(s: &mut TcpStream) -> std::io::Result<()> {
    // No length, no chunking: the body ends when the connection closes.
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
}

fn sse_piece(s: &mut TcpStream, text: &str) -> std::io::Result<()> {
    let v = serde_json::json!({"object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    s.write_all(format!("data: {v}\n\n").as_bytes())?;
    s.flush()
}

fn answer_status(s: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Our process's TCP connections to `port` that are still established
/// (from /proc: the sockets among our fds).
fn established_to(port: u16) -> usize {
    let mine: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut n = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(table) else {
            continue;
        };
        for row in t.lines().skip(1) {
            let f: Vec<&str> = row.split_whitespace().collect();
            let rem_port = f[2].rsplit(':').next().unwrap();
            if u16::from_str_radix(rem_port, 16).ok() == Some(port)
                && f[3] == "01"
                && mine.contains(f[9])
            {
                n += 1;
            }
        }
    }
    n
}

// ---- the real server ----

#[test]
fn streams_from_the_real_server_first_in_a_pool_of_two() {
    let _one = one_at_a_time();
    if peer_skipped("streams_from_the_real_server_first_in_a_pool_of_two") {
        return;
    }
    let a = Server::start();
    let b = Server::start();
    let p = pool(&config(
        "health_interval_ms = 0",
        &[up(&format!("{}/v1/", a.url())), up(&b.url())],
    ));
    let (r, pieces) = chat(&p, &request(12));
    let c = r.unwrap();
    assert!(pieces.len() > 1, "streamed in pieces: {pieces:?}");
    assert_eq!(pieces.concat(), c.text);
    assert!(c.text.to_lowercase().contains("one"), "{:?}", c.text);
    assert_eq!(c.model, "qwen");
    assert!(
        matches!(c.finish_reason, FinishReason::Length | FinishReason::Stop),
        "{:?}",
        c.finish_reason
    );
    // llama-cpp-python 0.2.62 sends no usage in a stream (it ignores
    // stream_options): the documented 0.
    assert_eq!((c.prompt_tokens, c.completion_tokens), (0, 0));
    let st = p.status();
    assert_eq!(st.upstreams[0].url, format!("{}/v1", a.url()));
    assert_eq!((st.upstreams[0].served, st.upstreams[1].served), (1, 0));
    // Again on the kept-alive connection: the same greedy text.
    let (r2, _) = chat(&p, &request(12));
    assert_eq!(r2.unwrap().text, c.text);
    assert_eq!(p.status().upstreams[0].served, 2);
}

#[test]
fn embeddings_the_real_server_cannot_make_come_back_with_its_message() {
    let _one = one_at_a_time();
    if peer_skipped("embeddings_the_real_server_cannot_make_come_back_with_its_message") {
        return;
    }
    // llama-cpp-python 0.2.62 cannot pool this GGUF's embeddings: HTTP 500
    // "pooling type is not set" from each upstream, so none is left.
    let a = Server::start();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let p = pool(&config(
        "health_interval_ms = 0",
        &[up(&a.url()), up(&dead)],
    ));
    let e = p
        .embed(&EmbedRequest {
            model: "qwen".into(),
            input: vec!["hello".into()],
        })
        .unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, LlmError::NoUpstream { .. }), "{s}");
    assert!(
        s.contains(&a.url()) && s.contains("HTTP 500") && s.contains("pooling type"),
        "{s}"
    );
    assert!(s.contains(&dead), "{s}");
}

#[test]
fn fails_over_from_a_dead_port_and_a_killed_server_then_names_each() {
    let _one = one_at_a_time();
    if peer_skipped("fails_over_from_a_dead_port_and_a_killed_server_then_names_each") {
        return;
    }
    let mut a = Server::start();
    let mut b = Server::start();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let p = pool(&config(
        "health_interval_ms = 0\ncooldown_ms = 600000\nmax_cooldown_ms = 600000",
        &[up(&dead), up(&a.url()), up(&b.url())],
    ));
    let (r, pieces) = chat(&p, &request(6));
    assert_eq!(pieces.concat(), r.unwrap().text);
    let st = p.status();
    assert_eq!(st.upstreams[0].failures, 1);
    assert!(st.upstreams[0].cooling_down);
    assert!(
        st.upstreams[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("cannot reach"),
        "{st:?}"
    );
    assert_eq!(st.upstreams[1].served, 1);

    a.kill();
    let (r, pieces) = chat(&p, &request(6));
    assert_eq!(pieces.concat(), r.unwrap().text);
    let st = p.status();
    assert_eq!(
        (st.upstreams[1].failures, st.upstreams[2].served),
        (1, 1),
        "{st:?}"
    );

    b.kill();
    let (r, pieces) = chat(&p, &request(6));
    assert!(pieces.is_empty());
    let e = r.unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, LlmError::NoUpstream { .. }), "{s}");
    for u in [&dead, &a.url(), &b.url()] {
        assert!(s.contains(u.as_str()), "names {u}: {s}");
    }
    assert!(s.contains("qwen"), "{s}");
}

#[test]
fn health_check_marks_a_killed_server_dead_and_brings_it_back_restarted() {
    let _one = one_at_a_time();
    if peer_skipped("health_check_marks_a_killed_server_dead_and_brings_it_back_restarted") {
        return;
    }
    let mut a = Server::start();
    let b = Server::start();
    let port = a.port;
    // Only the health check can end this cooldown.
    let p = pool(&config(
        "health_interval_ms = 200\ncooldown_ms = 600000\nmax_cooldown_ms = 600000",
        &[up(&a.url()), up(&b.url())],
    ));
    a.kill();
    let (r, pieces) = chat(&p, &request(6));
    assert_eq!(pieces.concat(), r.unwrap().text);
    assert_eq!(p.status().upstreams[1].served, 1);
    wait_until(60, "the health check marks the killed server dead", || {
        p.status().upstreams[0].dead
    });
    let st = p.status();
    assert!(
        st.upstreams[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("GET /models"),
        "{st:?}"
    );
    // Dead: skipped without a try.
    let (r, _) = chat(&p, &request(4));
    r.unwrap();
    assert_eq!(p.status().upstreams[1].served, 2);

    let a2 = Server::start_on(port);
    wait_until(
        120,
        "the health check brings the restarted server back",
        || {
            let u = &p.status().upstreams[0];
            !u.dead && !u.cooling_down
        },
    );
    let (r, pieces) = chat(&p, &request(6));
    assert_eq!(pieces.concat(), r.unwrap().text);
    let st = p.status();
    assert_eq!((st.upstreams[0].served, st.upstreams[1].served), (1, 2));
    drop(a2);
}

/// Starts a chat on another thread whose first piece blocks until `go`;
/// returns when that first piece arrived.
fn held_request(
    p: &Arc<UpstreamPool>,
    events: &Arc<Mutex<Vec<String>>>,
    name: &'static str,
) -> (
    mpsc::Sender<()>,
    std::thread::JoinHandle<openclaw::llm::Completion>,
) {
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (p, ev) = (p.clone(), events.clone());
    let h = std::thread::spawn(move || {
        let mut first = true;
        let c = p
            .chat(
                &request(8),
                &mut |piece| {
                    ev.lock().unwrap().push(format!("{name} piece {piece}"));
                    if first {
                        first = false;
                        started_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                    }
                },
                &CancellationToken::new(),
            )
            .unwrap();
        ev.lock().unwrap().push(format!("{name} done"));
        c
    });
    started_rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the held request streams");
    (go_tx, h)
}

fn free_request(
    p: &Arc<UpstreamPool>,
    events: &Arc<Mutex<Vec<String>>>,
    name: &'static str,
) -> std::thread::JoinHandle<Result<openclaw::llm::Completion, LlmError>> {
    let (p, ev) = (p.clone(), events.clone());
    std::thread::spawn(move || {
        let r = p.chat(
            &request(8),
            &mut |piece| ev.lock().unwrap().push(format!("{name} piece {piece}")),
            &CancellationToken::new(),
        );
        ev.lock().unwrap().push(format!("{name} done"));
        r
    })
}

fn position(events: &[String], prefix: &str) -> usize {
    events
        .iter()
        .position(|e| e.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in {events:?}"))
}

#[test]
fn max_concurrent_one_makes_the_second_request_wait_for_the_first() {
    let _one = one_at_a_time();
    if peer_skipped("max_concurrent_one_makes_the_second_request_wait_for_the_first") {
        return;
    }
    let a = Server::start();
    let p = Arc::new(pool(&config(
        "health_interval_ms = 0",
        &[format!("{}\nmax_concurrent = 1", up(&a.url()))],
    )));
    let events = Arc::new(Mutex::new(Vec::new()));
    let (go, r1) = held_request(&p, &events, "r1");
    let r2 = free_request(&p, &events, "r2");
    wait_until(60, "r2 waits for a permit", || p.status().waiting == 1);
    assert_eq!(p.status().upstreams[0].in_flight, 1);
    go.send(()).unwrap();
    let c1 = r1.join().unwrap();
    let c2 = r2.join().unwrap().unwrap();
    assert_eq!(c1.text, c2.text, "same greedy request, same text");
    let ev = events.lock().unwrap().clone();
    assert!(
        position(&ev, "r1 done") < position(&ev, "r2 piece"),
        "r2 streamed only after r1 ended: {ev:?}"
    );
    assert_eq!(p.status().upstreams[0].served, 2);
    assert_eq!(p.status().waiting, 0);
}

#[test]
fn max_concurrent_one_sends_the_second_request_to_the_other_upstream() {
    let _one = one_at_a_time();
    if peer_skipped("max_concurrent_one_sends_the_second_request_to_the_other_upstream") {
        return;
    }
    let a = Server::start();
    let b = Server::start();
    let p = Arc::new(pool(&config(
        "health_interval_ms = 0",
        &[
            format!("{}\nmax_concurrent = 1", up(&a.url())),
            up(&b.url()),
        ],
    )));
    let events = Arc::new(Mutex::new(Vec::new()));
    let (go, r1) = held_request(&p, &events, "r1");
    // r1 holds upstream 1's only permit until r2 is done: r2 can only have
    // finished on upstream 2.
    let c2 = free_request(&p, &events, "r2").join().unwrap().unwrap();
    assert_eq!(p.status().upstreams[1].served, 1);
    go.send(()).unwrap();
    let c1 = r1.join().unwrap();
    assert_eq!(c1.text, c2.text);
    let ev = events.lock().unwrap().clone();
    assert!(
        position(&ev, "r2 done") < position(&ev, "r1 done"),
        "{ev:?}"
    );
    let st = p.status();
    assert_eq!((st.upstreams[0].served, st.upstreams[1].served), (1, 1));
}

#[test]
fn a_full_pool_answers_busy_after_the_queue_timeout() {
    let _one = one_at_a_time();
    if peer_skipped("a_full_pool_answers_busy_after_the_queue_timeout") {
        return;
    }
    let a = Server::start();
    let p = Arc::new(pool(&config(
        "health_interval_ms = 0\nqueue_timeout_ms = 200",
        &[format!("{}\nmax_concurrent = 1", up(&a.url()))],
    )));
    let events = Arc::new(Mutex::new(Vec::new()));
    let (go, r1) = held_request(&p, &events, "r1");
    let e = chat(&p, &request(4)).0.unwrap_err();
    assert!(matches!(e, LlmError::Busy { slots: 1, .. }), "{e}");
    assert!(e.retryable());
    go.send(()).unwrap();
    r1.join().unwrap();
}

#[test]
fn cancel_mid_stream_returns_a_prefix_and_closes_the_connection() {
    let _one = one_at_a_time();
    if peer_skipped("cancel_mid_stream_returns_a_prefix_and_closes_the_connection") {
        return;
    }
    let a = Server::start();
    let full = {
        let p = pool(&config("health_interval_ms = 0", &[up(&a.url())]));
        chat(&p, &request(24)).0.unwrap()
    };
    let p = pool(&config("health_interval_ms = 0", &[up(&a.url())]));
    let cancel = CancellationToken::new();
    let mut pieces = Vec::new();
    let mut open_while_streaming = 0;
    let c = p
        .chat(
            &request(24),
            &mut |piece| {
                pieces.push(piece.to_string());
                if pieces.len() == 3 {
                    open_while_streaming = established_to(a.port);
                    cancel.cancel();
                }
            },
            &cancel,
        )
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert_eq!(pieces.len(), 3);
    assert_eq!(c.text, pieces.concat());
    assert!(
        full.text.starts_with(&c.text) && full.text.len() > c.text.len(),
        "{:?} is a prefix of {:?}",
        c.text,
        full.text
    );
    assert_eq!(open_while_streaming, 1, "one connection while streaming");
    assert_eq!(established_to(a.port), 0, "the connection is closed");
    // The server is still fine for the next request.
    assert_eq!(chat(&p, &request(24)).0.unwrap().text, full.text);
}

#[test]
fn upstreams_broken_before_any_piece_fail_over_to_the_real_server() {
    let _one = one_at_a_time();
    if peer_skipped("upstreams_broken_before_any_piece_fail_over_to_the_real_server") {
        return;
    }
    let a = Server::start();
    let (h500, _, _) = hostile(|mut s, _| {
        answer_status(
            &mut s,
            "500 Internal Server Error",
            r#"{"error":{"message":"boom"}}"#,
        )
    });
    let (hang, _, _) = hostile(|s, _| {
        // Never answers; holds the connection until the client goes.
        let mut buf = [0u8; 1];
        let _ = (&s).read(&mut buf);
    });
    let (bad_json, _, _) = hostile(|mut s, _| {
        let _ = sse_head(&mut s).and_then(|_| s.write_all(b"data: {\"choices\": [\n\n"));
    });
    let (error_obj, _, _) = hostile(|mut s, _| {
        let _ = sse_head(&mut s)
            .and_then(|_| s.write_all(b"data: {\"error\": {\"message\": \"model crashed\"}}\n\n"));
    });
    let (eof, _, _) = hostile(|mut s, _| {
        let _ = sse_head(&mut s).and_then(|_| s.write_all(b": nothing to say\n\n"));
    });
    let p = pool(&config(
        // Long: the real server may take a while, the cooldowns must outlast it.
        "health_interval_ms = 0\ncooldown_ms = 600000\nmax_cooldown_ms = 600000",
        &[
            up(&h500),
            format!("{}\ntimeout_ms = 300", up(&hang)),
            up(&bad_json),
            up(&error_obj),
            up(&eof),
            up(&a.url()),
        ],
    ));
    let (r, pieces) = chat(&p, &request(6));
    let c = r.unwrap();
    assert_eq!(pieces.concat(), c.text);
    assert!(!c.text.is_empty());
    let st = p.status();
    let last = |i: usize| st.upstreams[i].last_error.clone().unwrap_or_default();
    assert!(
        last(0).contains("HTTP 500") && last(0).contains("boom"),
        "{st:?}"
    );
    assert!(last(1).contains("timeout_ms (300 ms)"), "{st:?}");
    assert!(last(2).contains("bad JSON"), "{st:?}");
    assert!(last(3).contains("model crashed"), "{st:?}");
    assert!(last(4).contains("without [DONE]"), "{st:?}");
    for i in 0..5 {
        assert_eq!(st.upstreams[i].failures, 1, "{i}: {st:?}");
        assert!(st.upstreams[i].cooling_down, "{i}");
    }
    assert_eq!(st.upstreams[5].served, 1);
}

#[test]
fn the_real_servers_4xx_are_returned_not_failed_over() {
    let _one = one_at_a_time();
    if peer_skipped("the_real_servers_4xx_are_returned_not_failed_over") {
        return;
    }
    let a = Server::start_with(free_port(), &["--api_key", "right-key"]);
    let (next, tried) = never_tried();
    let with_key = |k: &str| {
        pool(&config(
            "health_interval_ms = 0",
            &[format!("{}\napi_key = \"{k}\"", up(&a.url())), up(&next)],
        ))
    };
    // A wrong key: 401 from llama-cpp-python, named, not failed over.
    let p = with_key("wrong-key");
    let e = chat(&p, &request(4)).0.unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, LlmError::Upstream { .. }), "{s}");
    assert!(
        s.contains(&a.url()) && s.contains("HTTP 401") && s.contains("api_key"),
        "{s}"
    );
    assert_eq!(p.status().upstreams[0].failures, 0);
    // The right key works.
    let p = with_key("right-key");
    let (r, pieces) = chat(&p, &request(4));
    assert_eq!(r.unwrap().text, pieces.concat());
    // A prompt longer than the server's context (2048): its HTTP 400 is
    // the request's fault.
    let mut long = request(4);
    long.messages[0].content = "word ".repeat(3000);
    let e = chat(&p, &long).0.unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, LlmError::InvalidRequest { .. }), "{s}");
    assert!(s.contains("HTTP 400") && s.contains("context"), "{s}");
    assert!(!e.retryable());
    assert_eq!(tried.load(Ordering::SeqCst), 0, "never failed over");
    assert_eq!(p.status().upstreams[0].failures, 0, "not cooled down");
}

// ---- deliberately broken upstreams only ----

/// A listener that accepts and counts, never answering: the second
/// upstream that must not be tried.
fn never_tried() -> (String, Arc<AtomicUsize>) {
    let (url, count, _) = hostile(|_, _| {});
    (url, count)
}

#[test]
fn a_stream_broken_after_pieces_is_an_error_not_a_failover() {
    let _one = one_at_a_time();
    let closes = hostile(|mut s, _| {
        let _ = sse_head(&mut s)
            .and_then(|_| sse_piece(&mut s, "Hel"))
            .and_then(|_| sse_piece(&mut s, "lo"));
        // Then closes: no finish_reason, no [DONE].
    });
    let bad_json = hostile(|mut s, _| {
        let _ = sse_head(&mut s)
            .and_then(|_| sse_piece(&mut s, "Hel"))
            .and_then(|_| sse_piece(&mut s, "lo"))
            .and_then(|_| s.write_all(b"data: {not json\n\n"));
    });
    let error_obj = hostile(|mut s, _| {
        let _ = sse_head(&mut s)
            .and_then(|_| sse_piece(&mut s, "Hel"))
            .and_then(|_| sse_piece(&mut s, "lo"))
            .and_then(|_| s.write_all(b"data: {\"error\": {\"message\": \"out of memory\"}}\n\n"));
    });
    for ((url, _, _), why) in [
        (closes, "without [DONE]"),
        (bad_json, "bad JSON"),
        (error_obj, "out of memory"),
    ] {
        let (next, tried) = never_tried();
        let p = pool(&config("health_interval_ms = 0", &[up(&url), up(&next)]));
        let (r, pieces) = chat(&p, &request(8));
        assert_eq!(pieces, ["Hel", "lo"], "no text repeated");
        let e = r.unwrap_err();
        let s = e.to_string();
        assert!(
            matches!(&e, LlmError::Upstream { url: u, .. } if u.starts_with(&url)),
            "{s}"
        );
        assert!(s.contains(why) && s.contains("2 piece(s)"), "{s}");
        assert_eq!(tried.load(Ordering::SeqCst), 0, "not failed over: {s}");
        assert_eq!(p.status().upstreams[0].failures, 1, "cooled down");
    }
}

#[test]
fn cancel_drops_the_connection_of_an_endless_stream() {
    let _one = one_at_a_time();
    let (closed_tx, closed_rx) = mpsc::channel::<String>();
    let closed_tx = Mutex::new(closed_tx);
    let (url, _, _) = hostile(move |mut s, _| {
        let mut i = 0u64;
        let r: std::io::Result<()> = sse_head(&mut s).and_then(|_| loop {
            sse_piece(&mut s, &format!("p{i} "))?;
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        });
        let _ = closed_tx
            .lock()
            .unwrap()
            .send(format!("write failed after {i} pieces: {r:?}"));
    });
    let p = pool(&config("health_interval_ms = 0", &[up(&url)]));
    let cancel = CancellationToken::new();
    let mut pieces = Vec::new();
    let c = p
        .chat(
            &request(8),
            &mut |piece| {
                pieces.push(piece.to_string());
                if pieces.len() == 3 {
                    cancel.cancel();
                }
            },
            &cancel,
        )
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert_eq!(c.text, "p0 p1 p2 ");
    let why = closed_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the upstream sees the connection closed");
    assert!(why.contains("write failed"), "{why}");
    assert_eq!(p.status().upstreams[0].served, 1);
}

#[test]
fn huge_lines_and_endless_text_are_capped() {
    let _one = one_at_a_time();
    let (huge, _, _) = hostile(|mut s, _| {
        let chunk = vec![b'x'; 16 << 10];
        let _: std::io::Result<()> = sse_head(&mut s)
            .and_then(|_| s.write_all(b"data: {\"choices\":[{\"delta\":{\"content\":\""))
            .and_then(|_| loop {
                s.write_all(&chunk)?;
            });
    });
    let p = pool(&config(
        "health_interval_ms = 0\nmax_line_bytes = 65536",
        &[up(&huge)],
    ));
    let (r, pieces) = chat(&p, &request(8));
    assert!(pieces.is_empty());
    let s = r.unwrap_err().to_string();
    assert!(
        s.contains("max_line_bytes (65536)") && s.contains(&huge),
        "{s}"
    );

    let (endless, _, _) = hostile(|mut s, _| {
        let piece = "y".repeat(1000);
        let _: std::io::Result<()> = sse_head(&mut s).and_then(|_| loop {
            sse_piece(&mut s, &piece)?;
        });
    });
    let p = pool(&config(
        "health_interval_ms = 0\nmax_text_bytes = 100000",
        &[up(&endless)],
    ));
    let (r, pieces) = chat(&p, &request(8));
    let total: usize = pieces.iter().map(String::len).sum();
    assert_eq!(total, 100_000, "pieces up to the cap, then the error");
    let e = r.unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, LlmError::Upstream { .. }), "{s}");
    assert!(s.contains("max_text_bytes (100000)"), "{s}");
}

#[test]
fn a_401_names_the_upstream_and_is_not_failed_over() {
    let _one = one_at_a_time();
    let (url, _, seen) = hostile(|mut s, _| {
        answer_status(
            &mut s,
            "401 Unauthorized",
            r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}"#,
        )
    });
    let (next, tried) = never_tried();
    std::env::set_var("OPENCLAW_TEST_UPSTREAM_KEY", "sk-test-123");
    let mut req = request(8);
    req.stop = vec!["\n\n".into()];
    req.top_p = Some(0.9);
    req.response_format = Some(openclaw::llm::ResponseFormat::JsonObject);
    let p = pool(&config(
        "health_interval_ms = 0",
        &[
            format!("{}\napi_key_env = \"OPENCLAW_TEST_UPSTREAM_KEY\"", up(&url)),
            up(&next),
        ],
    ));
    let (r, pieces) = chat(&p, &req);
    assert!(pieces.is_empty());
    let e = r.unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, LlmError::Upstream { .. }), "{s}");
    assert!(
        s.contains(&url) && s.contains("401") && s.contains("Incorrect API key provided"),
        "{s}"
    );
    assert_eq!(tried.load(Ordering::SeqCst), 0, "not failed over");
    assert_eq!(p.status().upstreams[0].failures, 0, "not cooled down");
    let seen = seen.lock().unwrap();
    assert!(seen[0]
        .request_line
        .starts_with("POST /v1/chat/completions "));
    assert!(seen[0]
        .headers
        .iter()
        .any(|(k, v)| k == "authorization" && v == "Bearer sk-test-123"));
    // What was forwarded: the upstream's model name and every option.
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "model": "qwen-upstream",
            "messages": [{"role": "user", "content": req.messages[0].content}],
            "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": 8, "temperature": 0.0, "top_p": 0.9f32, "top_k": 1, "seed": 7,
            "stop": ["\n\n"], "response_format": {"type": "json_object"},
        })
    );
}

#[test]
fn a_failed_upstream_is_skipped_until_its_cooldown_ends_then_it_doubles() {
    let _one = one_at_a_time();
    let (h500, hits, _) = hostile(|mut s, _| {
        answer_status(
            &mut s,
            "503 Service Unavailable",
            r#"{"error":{"message":"loading"}}"#,
        )
    });
    let dead = format!("http://127.0.0.1:{}", free_port());
    let p = pool(&config(
        "health_interval_ms = 0\ncooldown_ms = 3000\nmax_cooldown_ms = 10000",
        &[up(&h500), up(&dead)],
    ));
    let s = chat(&p, &request(4)).0.unwrap_err().to_string();
    assert!(
        s.contains("HTTP 503") && s.contains("loading") && s.contains(&dead),
        "{s}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Right away: both cool down, none is tried.
    let s = chat(&p, &request(4)).0.unwrap_err().to_string();
    assert!(s.contains("cooling down"), "{s}");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "skipped while cooling down");
    assert_eq!(p.status().upstreams[0].cooldown_ms, 3000);
    wait_until(60, "the cooldown ends", || {
        !p.status().upstreams[0].cooling_down
    });
    let _ = chat(&p, &request(4));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "tried again after the cooldown"
    );
    let st = p.status();
    assert_eq!(st.upstreams[0].failures, 2);
    assert_eq!(st.upstreams[0].cooldown_ms, 6000, "doubled");
}

#[test]
fn an_upstream_that_ignores_stream_true_gives_one_piece() {
    let _one = one_at_a_time();
    // Answers a plain JSON completion to a streamed request.
    let (url, _, _) = hostile(|mut s, _| {
        answer_status(
            &mut s,
            "200 OK",
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"one, two"},"finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":3}}"#,
        )
    });
    let p = pool(&config("health_interval_ms = 0", &[up(&url)]));
    let (r, pieces) = chat(&p, &request(3));
    let c = r.unwrap();
    assert_eq!(pieces, ["one, two"]);
    assert_eq!(c.text, "one, two");
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!((c.prompt_tokens, c.completion_tokens), (9, 3));
}

#[test]
fn a_stream_closed_after_its_finish_reason_is_complete_with_its_usage() {
    let _one = one_at_a_time();
    // No [DONE]: the finish_reason and the usage chunk came, then EOF.
    let (url, _, _) = hostile(|mut s, _| {
        let _ = sse_head(&mut s)
            .and_then(|_| sse_piece(&mut s, "a"))
            .and_then(|_| sse_piece(&mut s, "b"))
            .and_then(|_| {
                s.write_all(
                    b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
                )
            });
    });
    let p = pool(&config("health_interval_ms = 0", &[up(&url)]));
    let (r, pieces) = chat(&p, &request(8));
    let c = r.unwrap();
    assert_eq!(pieces, ["a", "b"]);
    assert_eq!(c.text, "ab");
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!((c.prompt_tokens, c.completion_tokens), (5, 2));
}

#[test]
fn a_stream_that_stalls_between_chunks_ends_at_read_timeout_ms() {
    let _one = one_at_a_time();
    // One piece, then silence with the connection open.
    let (url, _, _) = hostile(|mut s, _| {
        let _ = sse_head(&mut s).and_then(|_| sse_piece(&mut s, "a"));
        let mut buf = [0u8; 1];
        let _ = (&s).read(&mut buf);
    });
    let (next, tried) = never_tried();
    let p = pool(&config(
        "health_interval_ms = 0",
        &[format!("{}\nread_timeout_ms = 300", up(&url)), up(&next)],
    ));
    let (r, pieces) = chat(&p, &request(8));
    assert_eq!(pieces, ["a"]);
    let s = r.unwrap_err().to_string();
    assert!(
        s.contains("read_timeout_ms (300 ms)") && s.contains("1 piece(s)"),
        "{s}"
    );
    assert_eq!(tried.load(Ordering::SeqCst), 0, "not failed over");
}

/// One test of this file at a time: each runs llama.cpp (1 thread), and
/// llama.cpp's threads spin-wait, so two at once on 2 cores fall from ~30
/// to ~1 token/s. `cargo test` runs this file's tests 2 at a time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}
