//! The hardware plugins (gpio, sensor) through a real server and agent on the
//! `sim` board, with their simulated banks (`simulate = true`): pins by name,
//! a BME280 reading with the datasheet's example values, and bad input
//! failing its task with an error naming plugin and field while the agent
//! keeps serving.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, Server};
use openclaw::protocol::api::TaskState;
use serde_json::{json, Value};
use std::time::Instant;

fn ok(server: &Server, plugin: &str, input: Value) -> Value {
    let t = server.wait(&server.submit(task(plugin, input.clone())));
    assert_eq!(t.state, TaskState::Succeeded, "{plugin} {input}: {t:?}");
    t.result.unwrap()
}

fn fails(server: &Server, plugin: &str, input: Value, needle: &str) {
    let t = server.wait(&server.submit(task(plugin, input.clone())));
    assert_eq!(t.state, TaskState::Failed, "{plugin} {input}: {t:?}");
    let e = t.error.unwrap_or_default();
    assert!(
        e.contains(&format!("`{plugin}`")) && e.contains(needle),
        "{plugin} {input}: {e}"
    );
}

#[test]
fn gpio_and_sensor_through_a_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let config = "[plugins.gpio]\nsimulate = true\n[plugins.sensor]\nsimulate = true\n";
    let mut agent = Agent::start(dir.path(), "hw-1", &server.broker(), config);
    server.wait_online("hw-1");
    let d = server.client.devices().unwrap();
    let caps = &d.iter().find(|d| d.id == "hw-1").unwrap().capabilities;
    for c in [
        "plugin:gpio",
        "gpio:led",
        "gpio:simulated",
        "plugin:sensor",
        "sensor:ambient",
    ] {
        assert!(caps.contains(&c.to_string()), "{c}: {caps:?}");
    }

    // gpio: the simulated pins read back what was written.
    let r = ok(&server, "gpio", json!({"op": "read", "pin": "led"}));
    assert_eq!(r["high"], false);
    ok(
        &server,
        "gpio",
        json!({"op": "write", "pin": "led", "value": "high"}),
    );
    let r = ok(&server, "gpio", json!({"op": "read", "pin": "led"}));
    assert_eq!(r["high"], true);
    let t0 = Instant::now();
    ok(
        &server,
        "gpio",
        json!({"op": "pulse", "pin": "button", "pulse_ms": 100}),
    );
    assert!(t0.elapsed().as_millis() >= 100);
    let r = ok(&server, "gpio", json!({"op": "read", "pin": "button"}));
    assert_eq!(r["high"], false);

    // sensor: the datasheet's example raw values.
    let r = ok(&server, "sensor", json!({"sensor": "ambient"}));
    assert_eq!(r["temperature_c"].as_f64().unwrap(), 25.08);
    let p = r["pressure_hpa"].as_f64().unwrap();
    assert!((p - 1006.53).abs() < 0.01, "{r}");
    let h = r["humidity_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&h), "{r}");

    // Bad input fails its task only.
    fails(
        &server,
        "gpio",
        json!({"op": "read", "pin": "lamp"}),
        "`lamp` is not one of: button, led",
    );
    fails(
        &server,
        "gpio",
        json!({"op": "write", "pin": "led", "value": 2}),
        "`value`",
    );
    fails(
        &server,
        "gpio",
        json!({"op": "pulse", "pin": "led", "pulse_ms": 600000}),
        "`pulse_ms`",
    );
    fails(
        &server,
        "sensor",
        json!({"sensor": "outdoor"}),
        "`outdoor` is not one of: ambient",
    );
    fails(&server, "sensor", json!({"sensor": 1}), "`sensor`");
    assert!(agent.alive());
    let r = ok(&server, "sensor", json!({"sensor": "ambient"}));
    assert_eq!(r["temperature_c"].as_f64().unwrap(), 25.08);
    agent.stop();
}
