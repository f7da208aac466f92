//! `publish`: puts a message on an MQTT topic outside OpenClaw's own tree.
//!
//! One connection per plugin to the broker named in its config, opened on
//! the first task and kept (rumqttc reconnects with back-off through
//! [`crate::mqtt::spawn_event_loop`]). A task waits for the connection up to
//! `connect_timeout_ms`, so a dead broker fails the task clearly instead of
//! queueing messages forever.

use super::schema::Schema;
use super::util::{base64_decode, cfg_str, cfg_u64, config_err, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::mqtt::{Backoff, MqttEvent};
use crate::protocol::Value;
use async_trait::async_trait;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OnceCell};
use tokio_util::sync::CancellationToken;

const NAME: &str = "publish";

#[derive(Debug, Clone, PartialEq)]
enum Link {
    Connecting,
    Up,
    Down(String),
}

struct Conn {
    client: AsyncClient,
    link: watch::Receiver<Link>,
}

/// The publish plugin.
pub struct Publish {
    broker: String,
    host: String,
    port: u16,
    client_id: String,
    max_payload_bytes: usize,
    connect_timeout: Duration,
    conn: OnceCell<Conn>,
    stop: CancellationToken,
}

/// `mqtt://HOST[:PORT]` to host and port (default 1883).
fn parse_broker(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| format!("`{url}`: expected mqtt://HOST:PORT"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{url}`: bad port `{p}`"))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("`{url}`: expected mqtt://HOST:PORT"));
    }
    Ok((host.to_string(), port))
}

/// Checks a topic a task may publish to.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 65_535 {
        return Err("must be 1 to 65535 bytes".into());
    }
    if topic == "openclaw" || topic.starts_with("openclaw/") {
        return Err(format!(
            "`{topic}` is inside OpenClaw's own tree (openclaw/...)"
        ));
    }
    if topic.starts_with('$') {
        return Err(format!(
            "`{topic}`: broker system topics ($...) are not allowed"
        ));
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(format!(
            "`{topic}`: wildcards (+, #) and NUL are not allowed"
        ));
    }
    Ok(())
}

impl Publish {
    /// Config keys: `broker` (required, `mqtt://HOST:PORT`), `client_id`
    /// (default `openclaw-publish-<uuid>`), `max_payload_bytes` (default
    /// 256 KiB), `connect_timeout_ms` (default 5000).
    pub fn from_config(config: &toml::Table) -> Result<Publish, PluginError> {
        check_keys(
            NAME,
            config,
            &[
                "broker",
                "client_id",
                "max_payload_bytes",
                "connect_timeout_ms",
            ],
        )?;
        let broker = cfg_str(NAME, config, "broker")?
            .ok_or_else(|| config_err(NAME, "broker", "required: mqtt://HOST:PORT"))?;
        let (host, port) = parse_broker(&broker).map_err(|m| config_err(NAME, "broker", m))?;
        let client_id = cfg_str(NAME, config, "client_id")?
            .unwrap_or_else(|| format!("openclaw-publish-{}", uuid::Uuid::new_v4().simple()));
        Ok(Publish {
            broker,
            host,
            port,
            client_id,
            max_payload_bytes: cfg_u64(NAME, config, "max_payload_bytes", 256 << 10, 1, 64 << 20)?
                as usize,
            connect_timeout: Duration::from_millis(cfg_u64(
                NAME,
                config,
                "connect_timeout_ms",
                5000,
                1,
                600_000,
            )?),
            conn: OnceCell::new(),
            stop: CancellationToken::new(),
        })
    }

    async fn connect(&self) -> Conn {
        let mut opts = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        opts.set_keep_alive(Duration::from_secs(15));
        let max = (self.max_payload_bytes + 70_000).max(1 << 16);
        opts.set_max_packet_size(max, max);
        let (client, eventloop) = crate::mqtt::client(opts, 256);
        let (tx, mut rx) = mpsc::channel(16);
        crate::mqtt::spawn_event_loop(
            eventloop,
            Vec::new(),
            tx,
            Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            self.stop.clone(),
            format!("plugin publish ({})", self.broker),
        );
        let (link_tx, link) = watch::channel(Link::Connecting);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    MqttEvent::Connected { .. } => {
                        let _ = link_tx.send(Link::Up);
                    }
                    MqttEvent::Disconnected(e) => {
                        let _ = link_tx.send(Link::Down(e));
                    }
                    MqttEvent::Message(_) => {}
                }
            }
        });
        Conn { client, link }
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[async_trait]
impl Plugin for Publish {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Puts a message on an MQTT topic outside OpenClaw's own tree.".into()
    }

    fn effects(&self) -> super::Effects {
        // One table, which the server also holds catalogs to.
        crate::schema::builtin_effects("publish").unwrap_or(super::Effects::Always)
    }

    fn input_schema(&self) -> Schema {
        Schema::object()
            .req(
                "topic",
                Schema::string()
                    .len(1, 65_535)
                    .desc("outside openclaw/..., no $ or wildcards"),
            )
            .field("payload", Schema::string())
            .field("json", Schema::any())
            .field("payload_base64", Schema::string())
            .field("qos", Schema::integer(0, 1))
            .field("retain", Schema::boolean())
    }

    fn concurrency(&self) -> usize {
        16
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let input = Input::new(NAME, &task.input)?;
        let topic = input.str("topic")?;
        check_topic(topic).map_err(|m| input.err("topic", m))?;
        let payload: Vec<u8> = match (
            input.get("payload"),
            input.get("json"),
            input.get("payload_base64"),
        ) {
            (Some(Value::Str(s)), None, None) => s.as_bytes().to_vec(),
            (Some(_), None, None) => return Err(input.err("payload", "expected a string")),
            (None, Some(j), None) => {
                serde_json::to_vec(&serde_json::Value::from(j.clone())).unwrap_or_default()
            }
            (None, None, Some(Value::Str(b))) => {
                base64_decode(b).map_err(|m| input.err("payload_base64", m))?
            }
            (None, None, Some(_)) => return Err(input.err("payload_base64", "expected a string")),
            _ => {
                return Err(input.err(
                    "payload",
                    "give exactly one of `payload` (text), `json` or `payload_base64`",
                ))
            }
        };
        if payload.len() > self.max_payload_bytes {
            return Err(input.err(
                "payload",
                format!(
                    "{} bytes, more than max_payload_bytes ({})",
                    payload.len(),
                    self.max_payload_bytes
                ),
            ));
        }
        let qos = match input.opt_int("qos", 0, 1)? {
            None | Some(0) => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        };
        let retain = input.opt_bool("retain")?.unwrap_or(false);
        let conn = self.conn.get_or_init(|| self.connect()).await;
        let mut link = conn.link.clone();
        let wait = self
            .connect_timeout
            .min(task.deadline.saturating_duration_since(Instant::now()));
        let up = tokio::select! {
            r = tokio::time::timeout(wait, link.wait_for(|l| *l == Link::Up)) => matches!(r, Ok(Ok(_))),
            _ = task.cancel.cancelled() => return Err(PluginError::Cancelled(NAME.into())),
        };
        if !up {
            let why = match &*link.borrow() {
                Link::Down(e) => e.clone(),
                _ => "no connection yet".into(),
            };
            return Err(PluginError::Failed {
                plugin: NAME.into(),
                message: format!(
                    "`broker` {} unreachable within {} ms: {why}",
                    self.broker,
                    wait.as_millis()
                ),
                retryable: true,
            });
        }
        let bytes = payload.len();
        tokio::time::timeout(wait, conn.client.publish(topic, qos, retain, payload))
            .await
            .map_err(|_| super::util::failed(NAME, "the outgoing queue stayed full"))?
            .map_err(|e| super::util::failed(NAME, format!("`broker` {}: {e}", self.broker)))?;
        Ok(map(vec![
            ("topic", Value::Str(topic.into())),
            ("bytes", Value::Int(bytes as i64)),
            (
                "qos",
                Value::Int(if qos == QoS::AtMostOnce { 0 } else { 1 }),
            ),
            ("retain", Value::Bool(retain)),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn topics_and_brokers_are_checked() {
        assert!(check_topic("plant/line1/temp").is_ok());
        for bad in ["", "openclaw/x", "openclaw", "a/+/b", "a/#", "$SYS/x"] {
            assert!(check_topic(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_broker("mqtt://h:1884").unwrap(), ("h".into(), 1884));
        assert_eq!(parse_broker("mqtt://h").unwrap(), ("h".into(), 1883));
        assert!(parse_broker("tcp://h:1").is_err());
        assert!(parse_broker("mqtt://h:x").is_err());
        let e = Publish::from_config(&toml::Table::new())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("broker"), "{e}");
    }

    #[tokio::test]
    async fn bad_input_and_a_dead_broker_fail_clearly() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg: toml::Table = toml::from_str(&format!(
            "broker = \"mqtt://127.0.0.1:{dead}\"\nconnect_timeout_ms = 300\nmax_payload_bytes = 10"
        ))
        .unwrap();
        let p = Publish::from_config(&cfg).unwrap();
        let ctx = |v: serde_json::Value| TaskContext {
            id: "t".into(),
            input: Value::from(v),
            deadline: Instant::now() + Duration::from_secs(10),
            cancel: CancellationToken::new(),
            attempt: 1,
            output: Default::default(),
        };
        for (input, field) in [
            (json!({"payload": "x"}), "`topic`"),
            (
                json!({"topic": "openclaw/devices/x/tasks", "payload": "x"}),
                "`topic`",
            ),
            (json!({"topic": "a/#", "payload": "x"}), "`topic`"),
            (json!({"topic": "a"}), "`payload`"),
            (
                json!({"topic": "a", "payload": "01234567890"}),
                "max_payload_bytes",
            ),
            (json!({"topic": "a", "payload": "x", "qos": 2}), "`qos`"),
            (
                json!({"topic": "a", "payload": "x", "retain": "yes"}),
                "`retain`",
            ),
            (json!({"topic": "a", "payload": "x"}), "`broker`"),
        ] {
            let e = p.execute(ctx(input.clone())).await.unwrap_err().to_string();
            assert!(e.contains("`publish`") && e.contains(field), "{input}: {e}");
        }
    }
}
