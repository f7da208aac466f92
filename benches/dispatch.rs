//! The scheduler with many devices and many parked lanes (review finding 5).
//!
//! D online devices with one slot each: every one runs a task and has one
//! more waiting for it, so the queue holds D lanes (one per target) that no
//! device can serve. One more device, `big`, has room for everything. The
//! bench then times sequential submissions through the scheduler's public
//! handle, each one a batch of its own (one commit, one dispatch pass that
//! sends the task to `big`): the cost of a pass with D lanes and D devices
//! shows as submissions per second. It uses only the public API, so the same
//! file measures the code before and after a change.
//!
//! `cargo bench --profile profiling --features server --bench dispatch [-- D...]`

use openclaw::mqtt::MqttEvent;
use openclaw::protocol::api::SubmitRequest;
use openclaw::protocol::{self, topics, DeviceStatus};
use openclaw::server::config::ServerConfig;
use openclaw::server::scheduler::{Command, Scheduler, SchedulerHandle};
use openclaw::server::store::Store;
use rumqttc::{AsyncClient, MqttOptions, Publish, QoS};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn status(id: &str, slots: u32) -> Command {
    let st = DeviceStatus {
        device_id: id.into(),
        online: true,
        board: "sim".into(),
        plugins: vec!["echo".into()],
        max_concurrency: slots,
        queue_capacity: 0,
        heartbeat_ms: 600_000,
        ..Default::default()
    };
    Command::Mqtt(MqttEvent::Message(Publish::new(
        topics::status(id),
        QoS::AtLeastOnce,
        protocol::encode(&st),
    )))
}

fn req(target: Option<String>) -> SubmitRequest {
    SubmitRequest {
        plugin: "echo".into(),
        input: serde_json::json!(1),
        priority: None,
        target,
        capability: None,
        timeout_ms: Some(3_600_000),
        max_attempts: None,
        reply_to: None,
        correlation: None,
        route: None,
    }
}

async fn submit(h: &SchedulerHandle, target: Option<String>) {
    h.ask(|resp| Command::Submit {
        req: req(target),
        resp,
    })
    .await
    .expect("scheduler answers")
    .expect("submission accepted");
}

/// Sequential submissions per second with `n` full devices and `n` lanes.
async fn run(n: usize, submissions: usize) -> (f64, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), "normal").unwrap();
    let mut cfg = ServerConfig::load(None, toml::Table::new())
        .unwrap()
        .scheduler;
    cfg.max_devices = n + 10;
    cfg.retention_ms = 0;
    // Never polled: its request channel just holds what would be sent.
    let (client, _el) = AsyncClient::new(MqttOptions::new("bench", "127.0.0.1", 1), 1 << 22);
    let (s, h, rx) = Scheduler::new(cfg, store, client, 1 << 20).unwrap();
    let h = h.with_deadline(Duration::from_secs(3600));
    let stop = CancellationToken::new();
    let task = tokio::spawn(s.run(rx, stop.clone()));
    let tx = h.sender();
    tx.send(Command::Mqtt(MqttEvent::Connected {
        session_present: false,
    }))
    .await
    .unwrap();
    for i in 0..n {
        tx.send(status(&format!("d{i:05}"), 1)).await.unwrap();
    }
    tx.send(status("big", 1_000_000)).await.unwrap();
    // Two tasks per device, sent at once (batched): one runs, one waits.
    let mut setup = Vec::new();
    for i in 0..n {
        for _ in 0..2 {
            let h = h.clone();
            let target = Some(format!("d{i:05}"));
            setup.push(tokio::spawn(async move { submit(&h, target).await }));
        }
    }
    for s in setup {
        s.await.unwrap();
    }
    let start = Instant::now();
    for _ in 0..submissions {
        submit(&h, None).await;
    }
    let took = start.elapsed();
    stop.cancel();
    task.await.unwrap().unwrap();
    (
        submissions as f64 / took.as_secs_f64(),
        took / submissions as u32,
    )
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000, 3000]
    } else {
        sizes
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for n in sizes {
        let (rate, per) = rt.block_on(run(n, 300));
        println!(
            "devices {n:>5} (+1 with room), parked lanes {n:>5}: {rate:>9.0} submissions/s, {per:?} per batch"
        );
    }
}
