//! Issue 15, item 9: MQTT submission is at least once only as far as the
//! embedded broker keeps `openclaw/v1/submit` for a server that is behind.
//! rumqttd keeps each topic's publishes in a bounded in-memory log and a
//! subscriber further behind than it skips ahead, so those submissions are
//! lost with nobody to re-send them (the publisher had its PubAck). The
//! log was the default 4 x 1 MiB; it is `mqtt.submit_log_bytes` (16 MiB by
//! default) now. Here the "server" is a persistent-session subscriber that
//! is away while 12 MiB of submissions arrive, as a server is behind while
//! its store is slow, and comes back: it must get every one of them. With
//! a log smaller than the backlog it does not (the limit is real).
#![cfg(all(feature = "server", feature = "agent"))]

use openclaw::protocol::topics::SUBMIT;
use openclaw::server::broker::{start, Limits};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashSet;
use std::time::Duration;

const MESSAGE_BYTES: usize = 128 << 10;
const MESSAGES: u32 = 96; // 12 MiB

fn opts(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(false)
        .set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Polls until the subscription is acknowledged (or the connection fails).
async fn until_suback(el: &mut rumqttc::EventLoop) {
    loop {
        match el.poll().await.expect("broker connection") {
            Event::Incoming(Packet::SubAck(_)) => return,
            _ => continue,
        }
    }
}

/// Subscribes as the server would, goes away, lets `MESSAGES` submissions
/// of `MESSAGE_BYTES` and an end marker arrive, comes back, and returns the
/// numbers of the submissions it was then given (up to the marker).
async fn backlog_delivered(submit_log_bytes: usize) -> HashSet<u32> {
    let addr = start(
        "127.0.0.1",
        0,
        &Limits {
            max_payload: 1 << 20,
            max_connections: 16,
            submit_log_bytes,
        },
        None,
        None,
    )
    .unwrap();
    let port = addr.public.port();

    let (server, mut sloop) = AsyncClient::new(opts("server", port), 16);
    server.subscribe(SUBMIT, QoS::AtLeastOnce).await.unwrap();
    until_suback(&mut sloop).await;
    server.disconnect().await.unwrap();
    while sloop.poll().await.is_ok() {}
    drop(sloop);

    let (publisher, mut ploop) = AsyncClient::new(opts("submitter", port), 256);
    let pump = tokio::spawn(async move {
        let mut acked = 0;
        while acked < MESSAGES + 1 {
            if let Event::Incoming(Packet::PubAck(_)) = ploop.poll().await.expect("publisher") {
                acked += 1;
            }
        }
    });
    for n in 0..=MESSAGES {
        let mut payload = vec![b' '; MESSAGE_BYTES];
        payload[..4].copy_from_slice(&n.to_be_bytes());
        publisher
            .publish(SUBMIT, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    // Every submission is in the broker's log (the publisher has its acks).
    pump.await.unwrap();

    let (_server, mut sloop) = AsyncClient::new(opts("server", port), 16);
    let mut got = HashSet::new();
    loop {
        if let Event::Incoming(Packet::Publish(p)) = sloop.poll().await.expect("server") {
            let n = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
            if n == MESSAGES {
                return got;
            }
            got.insert(n);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_behind_by_12_mib_of_submissions_gets_them_all() {
    let default: usize = toml::from_str::<toml::Table>(openclaw::server::config::DEFAULTS).unwrap()
        ["mqtt"]["submit_log_bytes"]
        .as_integer()
        .unwrap() as usize;
    assert!(
        default >= 16 << 20,
        "default mqtt.submit_log_bytes {default}"
    );
    let got = backlog_delivered(default).await;
    assert_eq!(got.len(), MESSAGES as usize, "missing: {:?}", missing(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_submit_log_the_oldest_submissions_are_lost() {
    // 4 MiB, the size every topic's log had before: a third of the backlog.
    let got = backlog_delivered(4 << 20).await;
    assert!(
        got.len() < MESSAGES as usize / 2,
        "{} of {MESSAGES} arrived through a 4 MiB log",
        got.len()
    );
    // What is lost is the oldest.
    assert!(!got.contains(&0) && got.contains(&(MESSAGES - 1)));
}

fn missing(got: &HashSet<u32>) -> Vec<u32> {
    (0..MESSAGES).filter(|n| !got.contains(n)).collect()
}
