//! The `modbus` plugin through a real server and agent, against a real
//! Modbus TCP server (pymodbus, tests/fixtures/modbus_server.py) on
//! loopback: writes, reads them back, and fails bad input, a dead peer and a
//! silent one with errors naming the plugin and field while the agent keeps
//! serving. pymodbus is required: without it the test fails and says how to
//! install it.
#![cfg(all(feature = "server", feature = "agent", feature = "admin"))]

mod common;

use common::{task, Agent, Server};
use openclaw::protocol::api::{TaskState, TaskView};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

const PYMODBUS: &str = "pip install pymodbus==3.16.1";

/// tests/fixtures/modbus_server.py on a free port.
struct ModbusServer {
    child: Child,
    port: u16,
}

impl ModbusServer {
    fn start() -> ModbusServer {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/modbus_server.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .arg("0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 is needed for the modbus tests ({e}); {PYMODBUS}"));
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        if !line.starts_with("ready ") {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the Modbus test server (pymodbus) did not start: {}\n=> {PYMODBUS}",
                err.trim()
            );
        }
        let port = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        ModbusServer { child, port }
    }
}

impl Drop for ModbusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(server: &Server, input: Value) -> TaskView {
    server.wait(&server.submit(task("modbus", input)))
}

fn ok(server: &Server, input: Value) -> Value {
    let t = run(server, input.clone());
    assert_eq!(t.state, TaskState::Succeeded, "{input}: {t:?}");
    t.result.unwrap()
}

fn fails(server: &Server, input: Value, needles: &[&str]) {
    let t = run(server, input.clone());
    assert_eq!(t.state, TaskState::Failed, "{input}: {t:?}");
    let e = t.error.unwrap_or_default();
    assert!(e.contains("`modbus`"), "{input}: {e}");
    for n in needles {
        assert!(e.contains(n), "{input}: `{n}` not in: {e}");
    }
}

#[test]
fn modbus_writes_and_reads_back_through_a_real_agent() {
    let plc = ModbusServer::start();
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Accepts connections and never answers: the timeout case.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let config = format!(
        "[plugins.modbus.devices.press1]\naddress = \"127.0.0.1:{}\"\nunit = 1\ntimeout_ms = 2000\n\
         [plugins.modbus.devices.dead]\naddress = \"127.0.0.1:{dead}\"\n\
         [plugins.modbus.devices.silent]\naddress = \"127.0.0.1:{silent_port}\"\ntimeout_ms = 300\n\
         [plugins.echo]\n",
        plc.port
    );
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "mb-1", &server.broker(), &config);
    server.wait_online("mb-1");
    let d = server.client.devices().unwrap();
    let caps = &d.iter().find(|d| d.id == "mb-1").unwrap().capabilities;
    for c in [
        "plugin:modbus",
        "modbus:press1",
        "modbus:dead",
        "modbus:silent",
    ] {
        assert!(caps.contains(&c.to_string()), "{c}: {caps:?}");
    }

    // The known register map, then writes read back.
    let r = ok(
        &server,
        json!({"device": "press1", "op": "read_holding", "address": 0, "count": 4}),
    );
    assert_eq!(r["values"], json!([1000, 1001, 1002, 1003]));
    let r = ok(
        &server,
        json!({"device": "press1", "op": "write_register", "address": 3, "value": 42}),
    );
    assert_eq!(r["written"], 1);
    ok(
        &server,
        json!({"device": "press1", "op": "write_registers", "address": 20, "values": [1, 2, 65535]}),
    );
    let r = ok(
        &server,
        json!({"device": "press1", "op": "read_holding", "address": 0, "count": 4}),
    );
    assert_eq!(r["values"], json!([1000, 1001, 1002, 42]));
    let r = ok(
        &server,
        json!({"device": "press1", "op": "read_holding", "address": 20, "count": 3}),
    );
    assert_eq!(r["values"], json!([1, 2, 65535]));
    let r = ok(
        &server,
        json!({"device": "press1", "op": "read_input", "address": 7, "count": 2}),
    );
    assert_eq!(r["values"], json!([2007, 2008]));
    ok(
        &server,
        json!({"device": "press1", "op": "write_coil", "address": 1, "value": true}),
    );
    ok(
        &server,
        json!({"device": "press1", "op": "write_coils", "address": 2, "values": [false, true]}),
    );
    let r = ok(
        &server,
        json!({"device": "press1", "op": "read_coils", "address": 0, "count": 5}),
    );
    assert_eq!(r["values"], json!([true, true, false, true, true]));
    let r = ok(
        &server,
        json!({"device": "press1", "op": "read_discrete", "address": 0, "count": 4}),
    );
    assert_eq!(r["values"], json!([true, false, false, true]));

    // Bad input, each naming plugin and field.
    let p = "press1";
    for (input, needles) in [
        (
            json!({"device": "press9", "op": "read_holding", "address": 0}),
            &["`device`", "`press9`", "dead, press1, silent"][..],
        ),
        (
            json!({"op": "read_holding", "address": 0}),
            &["`device`", "missing"][..],
        ),
        (
            json!({"device": p, "op": "read_holding", "address": 0, "count": 0}),
            &["`count`", "out of range"][..],
        ),
        (
            json!({"device": p, "op": "read_holding", "address": 0, "count": 126}),
            &["`count`", "1 to 125"][..],
        ),
        (
            json!({"device": p, "op": "read_holding", "address": 70000}),
            &["`address`", "0 to 65535"][..],
        ),
        (
            json!({"device": p, "op": "read_holding", "address": 65530, "count": 10}),
            &["`address`", "65535"][..],
        ),
        (
            json!({"device": p, "op": "write_register", "address": 3, "value": 65536}),
            &["`value`", "0 to 65535"][..],
        ),
        (
            json!({"device": p, "op": "write_register", "address": "3", "value": 1}),
            &["`address`", "integer"][..],
        ),
        (
            json!({"device": p, "op": "write_registers", "address": 3, "values": [1, "x"]}),
            &["`values[1]`"][..],
        ),
        (
            json!({"device": p, "op": "write_coil", "address": 3, "value": "on"}),
            &["`value`", "boolean"][..],
        ),
        (
            json!({"device": p, "op": "format_disk", "address": 0}),
            &["`op`", "read_holding"][..],
        ),
        (json!("read press1"), &["`input`"][..]),
        // Outside the PLC's map: its Modbus exception, with the address.
        (
            json!({"device": p, "op": "read_holding", "address": 60000, "count": 2}),
            &["exception", "60000"][..],
        ),
    ] {
        fails(&server, input, needles);
    }
    // Nothing of those writes reached the PLC.
    let r = ok(
        &server,
        json!({"device": "press1", "op": "read_holding", "address": 3, "count": 1}),
    );
    assert_eq!(r["values"], json!([42]));

    // A dead peer and a silent one.
    fails(
        &server,
        json!({"device": "dead", "op": "read_holding", "address": 0}),
        &["`dead`", "cannot connect"],
    );
    fails(
        &server,
        json!({"device": "silent", "op": "read_coils", "address": 0}),
        &["`silent`", "timeout_ms (300 ms)"],
    );

    // After all that the agent is still the same process, still serving.
    assert!(agent.alive());
    let r = ok(
        &server,
        json!({"device": "press1", "op": "read_holding", "address": 3, "count": 1}),
    );
    assert_eq!(r["values"], json!([42]));
    drop(silent);
}

/// A `socat` pty pair: two linked ttys, the stand-in for an RS-485 cable.
struct PtyPair {
    child: Child,
}

impl PtyPair {
    fn start(a: &std::path::Path, b: &std::path::Path) -> PtyPair {
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("socat is needed for the RTU test ({e}): apt-get install socat")
            });
        let mut pair = PtyPair { child };
        // socat creates the links once both ptys are open.
        let t0 = std::time::Instant::now();
        while !(a.exists() && b.exists()) {
            if let Some(st) = pair.child.try_wait().unwrap() {
                panic!("socat exited: {st}");
            }
            assert!(t0.elapsed().as_secs() < 20, "socat made no ptys");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        pair
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tests/fixtures/modbus_server.py --serial: a pymodbus RTU server on a tty.
fn rtu_server(tty: &std::path::Path, parity: &str) -> ModbusServer {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/modbus_server.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .arg("--serial")
        .arg(tty)
        .arg("19200")
        .arg(parity)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is needed for the modbus tests ({e}); {PYMODBUS}"));
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    if !line.starts_with("ready ") {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the Modbus RTU test server did not start: {}\n=> {PYMODBUS} pyserial",
            err.trim()
        );
    }
    ModbusServer { child, port: 0 }
}

/// Modbus RTU over a serial line: the agent opens its end of a socat pty
/// pair with termios (no tokio-serial), a real pymodbus RTU server sits on
/// the other. Reads, writes read back, a unit that does not answer, a
/// missing port, and a dead peer, all through a real server and agent.
#[test]
fn modbus_rtu_over_a_serial_line_through_a_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (plc_end, agent_end) = (dir.path().join("plc"), dir.path().join("agent"));
    let pair = PtyPair::start(&plc_end, &agent_end);
    // No parity: this VM's kernel (6.18) refuses PARENB on socat's ptys
    // (tcsetattr EINVAL, in pyserial too); a UART takes all three.
    let plc = rtu_server(&plc_end, "N");
    let tty = agent_end.display().to_string();
    let config = format!(
        "[plugins.modbus.devices.line1]\nserial = \"{tty}\"\nbaud = 19200\nparity = \"none\"\nunit = 1\ntimeout_ms = 2000\n\
         [plugins.modbus.devices.unit7]\nserial = \"{tty}\"\nbaud = 19200\nparity = \"none\"\nunit = 7\ntimeout_ms = 300\n\
         [plugins.modbus.devices.unplugged]\nserial = \"{}\"\n",
        dir.path().join("ttyNONE").display()
    );
    let server = Server::start(&dir.path().join("srv"), &[]);
    let mut agent = Agent::start(dir.path(), "rtu-1", &server.broker(), &config);
    server.wait_online("rtu-1");

    let r = ok(
        &server,
        json!({"device": "line1", "op": "read_holding", "address": 0, "count": 4}),
    );
    assert_eq!(r["values"], json!([1000, 1001, 1002, 1003]));
    ok(
        &server,
        json!({"device": "line1", "op": "write_registers", "address": 5, "values": [11, 65535]}),
    );
    let r = ok(
        &server,
        json!({"device": "line1", "op": "read_holding", "address": 4, "count": 3}),
    );
    assert_eq!(r["values"], json!([1004, 11, 65535]));
    ok(
        &server,
        json!({"device": "line1", "op": "write_coil", "address": 1, "value": true}),
    );
    let r = ok(
        &server,
        json!({"device": "line1", "op": "read_coils", "address": 0, "count": 3}),
    );
    assert_eq!(r["values"], json!([true, true, true]));
    let r = ok(
        &server,
        json!({"device": "line1", "op": "read_input", "address": 9, "count": 1}),
    );
    assert_eq!(r["values"], json!([2009]));

    // Several at once on one line: the line lock keeps frames apart.
    let ids: Vec<String> = (0..4)
        .map(|i| {
            server.submit(task(
                "modbus",
                json!({"device": "line1", "op": "read_holding", "address": i, "count": 1}),
            ))
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let t = server.wait(id);
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(t.result.unwrap()["values"][0], 1000 + i as i64);
    }

    // A unit the PLC does not serve (pymodbus answers with an exception;
    // silence is the dead-peer case below), a port that is not there, bad
    // input.
    fails(
        &server,
        json!({"device": "unit7", "op": "read_holding", "address": 0}),
        &["`unit7`", "Modbus exception"],
    );
    fails(
        &server,
        json!({"device": "unplugged", "op": "read_holding", "address": 0}),
        &["`unplugged`", "cannot open the serial port", "ttyNONE"],
    );
    fails(
        &server,
        json!({"device": "line9", "op": "read_holding", "address": 0}),
        &["`device`", "line9"],
    );
    fails(
        &server,
        json!({"device": "line1", "op": "read_holding", "address": 0, "count": 126}),
        &["`count`", "1 to 125"],
    );

    // Dead peer: the PLC process is gone, the line stays silent.
    drop(plc);
    fails(
        &server,
        json!({"device": "line1", "op": "read_holding", "address": 0}),
        &["`line1`", "no answer from unit 1"],
    );
    // The cable is gone (socat exited, the pty links vanish).
    drop(pair);
    fails(
        &server,
        json!({"device": "line1", "op": "read_holding", "address": 0}),
        &["`line1`", "serial"],
    );
    assert!(agent.alive());
}
