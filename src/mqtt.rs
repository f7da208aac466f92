//! The one task that owns an MQTT event loop (agent and server share it).
//!
//! It never blocks a thread: incoming publishes go to a bounded channel, and
//! when that is full it stops reading from the broker until there is room
//! (back-pressure through TCP, never a dropped message), subscriptions are re-made on every ConnAck (rumqttc does not
//! restore them and a restarted broker has lost them), and after an error it
//! backs off, doubling up to a ceiling, because rumqttc reconnects at once
//! and would otherwise spin.

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttState, Outgoing, Packet, Publish, QoS,
    Request, StateError, Subscribe,
};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the event loop reports to its owner.
#[derive(Debug)]
pub enum MqttEvent {
    /// Connected (again); subscriptions were re-requested.
    Connected { session_present: bool },
    /// The connection failed or dropped; a reconnect follows after back-off.
    Disconnected(String),
    /// A publish arrived. With manual acks the owner must `try_ack` it.
    Message(Publish),
}

/// Exponential back-off between reconnect attempts, with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }
    /// The delay to wait now: a random point in the upper half of the
    /// current step (`step/2 ..= step`); the step doubles. Without the
    /// jitter a fleet that lost its broker at the same moment reconnected
    /// in lockstep, every agent at the same instants (issue 15, item 10).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        let spread = (step - half).as_nanos() as u64;
        half + Duration::from_nanos(random_u64() % spread.saturating_add(1))
    }
    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A random number, from the OS-seeded keys std gives every `RandomState`
/// (no dependency for a reconnect jitter).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// Creates a client with TCP_NODELAY set: our messages are small and
/// latency-bound, and Nagle plus delayed ACKs would add ~40 ms per hop.
pub fn client(opts: rumqttc::MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts, cap);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Errors setting up TLS to a `mqtts://` broker.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("mqtt.tls.{key}: cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the broker `{0}` uses TLS but mqtt.tls.ca_file is not set")]
    NoCa(String),
}

/// Switches `opts` to TLS when `broker` is a `mqtts://` URL: the broker's
/// certificate must chain to `tls.ca_file` and match the host name of the
/// URL; with a client certificate and key, the broker can check us too.
/// A plain `mqtt://` URL leaves `opts` as it is.
pub fn apply_tls(
    opts: &mut rumqttc::MqttOptions,
    broker: &str,
    tls: &crate::config::TlsSection,
) -> Result<(), TlsError> {
    if !crate::config::broker_uses_tls(broker) {
        return Ok(());
    }
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            key,
            path: path.to_path_buf(),
            source,
        })
    };
    let ca_file = tls
        .ca_file
        .as_deref()
        .ok_or_else(|| TlsError::NoCa(broker.to_string()))?;
    let ca = read("ca_file", ca_file)?;
    let client_auth = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(c), Some(k)) => Some((read("client_cert_file", c)?, read("client_key_file", k)?)),
        _ => None,
    };
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        },
    ));
    Ok(())
}

/// Spawns the task that polls `eventloop` until `stop` is cancelled or a
/// disconnect was sent.
pub fn spawn_event_loop(
    mut eventloop: EventLoop,
    subscriptions: Vec<(String, QoS)>,
    sink: mpsc::Sender<MqttEvent>,
    mut backoff: Backoff,
    stop: CancellationToken,
    name: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut waits: u64 = 0;
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    log::info!(
                        "{name}: connected (session present: {})",
                        ack.session_present
                    );
                    // Ahead of everything queued: through the client's channel
                    // a subscription could find it full (a backlog built while
                    // offline) and be lost, leaving the owner deaf.
                    for (topic, qos) in subscriptions.iter().rev() {
                        let sub = Subscribe::new(topic.clone(), *qos);
                        eventloop.pending.push_front(Request::Subscribe(sub));
                    }
                    let ev = MqttEvent::Connected {
                        session_present: ack.session_present,
                    };
                    if !deliver(&sink, ev, &stop, &mut waits, &name).await {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if !deliver(&sink, MqttEvent::Message(p), &stop, &mut waits, &name).await {
                        break;
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    log::info!("{name}: disconnected on request");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    if matches!(e, ConnectionError::MqttState(StateError::CollisionTimeout)) {
                        forget_unacked(&mut eventloop, &name);
                    }
                    let delay = backoff.next_delay();
                    log::warn!("{name}: connection error: {e}; retrying in {delay:?}");
                    let _ = sink.try_send(MqttEvent::Disconnected(e.to_string()));
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    })
}

/// Drops rumqttc's own record of unacknowledged outgoing publishes.
///
/// rumqttc numbers publishes 1..=inflight and, when the next number is still
/// unacknowledged, parks the publish as a "collision" and takes no new
/// requests until that number's ack arrives; after two keep-alives it fails
/// the connection, and its reconnect keeps the parked publish and replays
/// the old ones (upstream rumqtt#1014, #1056). The netns partition test
/// caught an agent (1 run in 6) colliding on every publish for minutes after
/// the link healed, sending no heartbeat. Everything we publish is either
/// periodic (status) or re-sent by its owner until the peer confirms it
/// (results, dispatches), so starting from a fresh state loses nothing.
fn forget_unacked(eventloop: &mut EventLoop, name: &str) {
    let opts = &eventloop.mqtt_options;
    let fresh = MqttState::new(opts.inflight(), opts.manual_acks());
    // The failed poll already moved the unacknowledged publishes to `pending`.
    eventloop.state = fresh;
    log::warn!(
        "{name}: packet ids stuck in collision; dropping {} queued request(s), their owners re-send them",
        eventloop.pending.len()
    );
    eventloop.pending.clear();
}

/// Hands `ev` to the owner. When its queue is full the loop stops reading
/// from the broker until there is room (TCP holds the rest) rather than drop
/// the message: a dropped publish stays unacknowledged, and a broker
/// redelivers it only after the next reconnect, so a submission or result
/// would sit unseen until then. Owners never wait on this loop (they use
/// `try_publish`/`try_ack`), so the wait cannot deadlock. False when the
/// loop should end (stop requested, or the owner is gone).
async fn deliver(
    sink: &mpsc::Sender<MqttEvent>,
    ev: MqttEvent,
    stop: &CancellationToken,
    waits: &mut u64,
    name: &str,
) -> bool {
    match sink.try_send(ev) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(ev)) => {
            *waits += 1;
            if waits.is_power_of_two() {
                log::warn!("{name}: inbound queue full, reading paused ({waits} times so far)");
            }
            tokio::select! {
                _ = stop.cancelled() => false,
                r = sink.send(ev) => r.is_ok(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_waits_instead_of_dropping() {
        let (tx, mut rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let mut waits = 0;
        let ev = |n: u16| {
            let mut p = Publish::new("t", QoS::AtLeastOnce, vec![]);
            p.pkid = n;
            MqttEvent::Message(p)
        };
        assert!(deliver(&tx, ev(1), &stop, &mut waits, "t").await);
        // The queue is full: the second waits until the owner takes the first.
        let consumer = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(MqttEvent::Message(p)) = rx.recv().await {
                got.push(p.pkid);
                if got.len() == 2 {
                    break;
                }
            }
            got
        });
        assert!(deliver(&tx, ev(2), &stop, &mut waits, "t").await);
        assert_eq!(consumer.await.unwrap(), vec![1, 2]);
        // Stop while waiting on a full queue ends the wait; a closed queue too.
        let (tx, rx) = mpsc::channel(1);
        tx.try_send(ev(3)).unwrap();
        stop.cancel();
        assert!(!deliver(&tx, ev(4), &stop, &mut waits, "t").await);
        drop(rx);
        assert!(!deliver(&tx, ev(5), &CancellationToken::new(), &mut waits, "t").await);
    }

    #[test]
    fn backoff_doubles_to_ceiling_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(350));
        for step in [100, 200, 350, 350] {
            let d = b.next_delay();
            assert!(d >= ms(step) / 2 && d <= ms(step), "{d:?} for step {step}");
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    /// Issue 15, item 10: a fleet whose broker restarts must not come back
    /// in lockstep. Agents that start backing off at the same moment wait
    /// different times (the old delays were all exactly `min`).
    #[test]
    fn backoff_is_jittered_across_agents() {
        let first: std::collections::HashSet<Duration> = (0..32)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(10)).next_delay())
            .collect();
        assert!(first.len() > 16, "{} distinct delays of 32", first.len());
    }
}
