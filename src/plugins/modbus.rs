//! `modbus`: reads and writes registers and coils of configured Modbus
//! devices (PLCs, drives, meters: how factory equipment is reached), over
//! TCP or RTU on a serial line.
//!
//! Tasks name a device from the config's `devices` table, never an address,
//! so the agent talks only to configured peers. TCP: one connection per
//! task: connect, one request, disconnect, all within the device's
//! `timeout_ms`. RTU: the serial port is opened per task (termios via libc,
//! [`super::serial`]; no tokio-serial, no libudev), one request at a time
//! per line (devices sharing a port share its lock), then closed.

use super::schema::{Kind, Schema};
use super::serial::{LineSettings, Parity, SerialPort, BAUDS};
use super::util::{cfg_u64, config_err, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_modbus::prelude::*;

const NAME: &str = "modbus";
/// Registers per read (Modbus spec: 125) and per write (123).
const MAX_READ_REGS: i64 = 125;
const MAX_WRITE_REGS: i64 = 123;
/// Coils or discrete inputs per read (2000) and coils per write (1968).
const MAX_READ_BITS: i64 = 2000;
const MAX_WRITE_BITS: i64 = 1968;

/// How a device is reached.
#[derive(Debug, Clone)]
enum Link {
    /// `host:port` as configured.
    Tcp(String),
    /// A serial port; the lock is shared by the devices on that port.
    Rtu {
        path: PathBuf,
        line: LineSettings,
        lock: Arc<tokio::sync::Mutex<()>>,
    },
}

/// One configured device.
#[derive(Debug, Clone)]
struct Device {
    link: Link,
    /// For messages: `host:port` or `serial PATH`.
    address: String,
    unit: u8,
    timeout: Duration,
}

/// The modbus plugin.
#[derive(Debug, Clone)]
pub struct Modbus {
    devices: BTreeMap<String, Device>,
}

const DEVICE_KEYS: &[&str] = &[
    "address",
    "serial",
    "baud",
    "parity",
    "data_bits",
    "stop_bits",
    "unit",
    "timeout_ms",
];

/// One parsed request.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    ReadHolding { count: u16 },
    ReadInput { count: u16 },
    ReadCoils { count: u16 },
    ReadDiscrete { count: u16 },
    WriteRegister { value: u16 },
    WriteRegisters { values: Vec<u16> },
    WriteCoil { value: bool },
    WriteCoils { values: Vec<bool> },
}

const OPS: &str = "read_holding, read_input, read_coils, read_discrete, write_register, \
                   write_registers, write_coil, write_coils";

#[derive(Debug, Clone)]
struct Request {
    device: String,
    op_name: String,
    address: u16,
    op: Op,
}

impl Modbus {
    /// Config: `[plugins.modbus.devices.NAME]` tables with either `address`
    /// (`host:port`: Modbus TCP) or `serial` (a tty path: Modbus RTU, with
    /// `baud` (9600), `parity` (`none`, `even`, `odd`; default `even`, the
    /// Modbus RTU default), `data_bits` (8; 7 or 8), `stop_bits` (1; 1 or 2)),
    /// `unit` (TCP 0..=255, RTU 1..=247; default 1) and `timeout_ms`
    /// (default 2000).
    pub fn from_config(config: &toml::Table) -> Result<Modbus, PluginError> {
        check_keys(NAME, config, &["devices"])?;
        let mut devices = BTreeMap::new();
        match config.get("devices") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (name, d) in t {
                    let key = format!("devices.{name}");
                    let toml::Value::Table(d) = d else {
                        return Err(config_err(NAME, &key, "expected a table"));
                    };
                    devices.insert(name.clone(), Self::device(&key, d)?);
                }
                // Devices on one serial port share one lock: one frame on
                // the wire at a time.
                let mut locks: BTreeMap<PathBuf, Arc<tokio::sync::Mutex<()>>> = BTreeMap::new();
                for d in devices.values_mut() {
                    if let Link::Rtu { path, lock, .. } = &mut d.link {
                        *lock = locks
                            .entry(path.clone())
                            .or_insert_with(|| lock.clone())
                            .clone();
                    }
                }
            }
            Some(v) => {
                return Err(config_err(
                    NAME,
                    "devices",
                    format!("expected tables [plugins.modbus.devices.NAME], found {v}"),
                ))
            }
        }
        Ok(Modbus { devices })
    }

    fn device(key: &str, d: &toml::Table) -> Result<Device, PluginError> {
        for k in d.keys() {
            if !DEVICE_KEYS.contains(&k.as_str()) {
                return Err(config_err(
                    NAME,
                    &format!("{key}.{k}"),
                    format!("unknown key (known: {})", DEVICE_KEYS.join(", ")),
                ));
            }
        }
        let timeout_ms = cfg_u64(NAME, d, "timeout_ms", 2000, 1, 600_000)
            .map_err(|e| rekey(e, &format!("{key}.timeout_ms")))?;
        if d.contains_key("serial") {
            return Self::rtu_device(key, d, Duration::from_millis(timeout_ms));
        }
        for k in ["baud", "parity", "data_bits", "stop_bits"] {
            if d.contains_key(k) {
                return Err(config_err(
                    NAME,
                    &format!("{key}.{k}"),
                    "only for serial (RTU) devices: set `serial` instead of `address`",
                ));
            }
        }
        let akey = format!("{key}.address");
        let address =
            match d.get("address") {
                Some(toml::Value::String(s)) => s.clone(),
                Some(v) => {
                    return Err(config_err(
                        NAME,
                        &akey,
                        format!("expected a string, found {v}"),
                    ))
                }
                None => return Err(config_err(
                    NAME,
                    &akey,
                    "missing (expected \"host:port\" for TCP, or `serial` = a tty path for RTU)",
                )),
            };
        let ok = address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok());
        if !ok {
            return Err(config_err(
                NAME,
                &akey,
                format!("`{address}`: expected host:port, e.g. \"192.168.1.20:502\""),
            ));
        }
        let unit = cfg_u64(NAME, d, "unit", 1, 0, 255)
            .map_err(|e| rekey(e, &format!("{key}.unit")))? as u8;
        Ok(Device {
            link: Link::Tcp(address.clone()),
            address,
            unit,
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    fn rtu_device(key: &str, d: &toml::Table, timeout: Duration) -> Result<Device, PluginError> {
        if d.contains_key("address") {
            return Err(config_err(
                NAME,
                &format!("{key}.address"),
                "give either `address` (TCP) or `serial` (RTU), not both",
            ));
        }
        let skey = format!("{key}.serial");
        let path = match d.get("serial") {
            Some(toml::Value::String(s)) if s.starts_with('/') => PathBuf::from(s),
            Some(v) => {
                return Err(config_err(
                    NAME,
                    &skey,
                    format!("expected an absolute tty path such as \"/dev/ttyUSB0\", found {v}"),
                ))
            }
            None => unreachable!("checked by the caller"),
        };
        let baud = cfg_u64(NAME, d, "baud", 9600, 1, 4_000_000)
            .map_err(|e| rekey(e, &format!("{key}.baud")))? as u32;
        if !BAUDS.contains(&baud) {
            let known: Vec<String> = BAUDS.iter().map(|b| b.to_string()).collect();
            return Err(config_err(
                NAME,
                &format!("{key}.baud"),
                format!("{baud} is not a standard rate ({})", known.join(", ")),
            ));
        }
        let parity = match d.get("parity") {
            None => Parity::Even,
            Some(toml::Value::String(s)) if s == "none" => Parity::None,
            Some(toml::Value::String(s)) if s == "even" => Parity::Even,
            Some(toml::Value::String(s)) if s == "odd" => Parity::Odd,
            Some(v) => {
                return Err(config_err(
                    NAME,
                    &format!("{key}.parity"),
                    format!("expected \"none\", \"even\" or \"odd\", found {v}"),
                ))
            }
        };
        let data_bits = cfg_u64(NAME, d, "data_bits", 8, 7, 8)
            .map_err(|e| rekey(e, &format!("{key}.data_bits")))? as u8;
        let stop_bits = cfg_u64(NAME, d, "stop_bits", 1, 1, 2)
            .map_err(|e| rekey(e, &format!("{key}.stop_bits")))? as u8;
        // 0 is broadcast (no device answers) and 248..=255 are reserved on
        // a serial line.
        let unit = cfg_u64(NAME, d, "unit", 1, 1, 247)
            .map_err(|e| rekey(e, &format!("{key}.unit")))? as u8;
        Ok(Device {
            address: format!("serial {}", path.display()),
            link: Link::Rtu {
                path,
                line: LineSettings {
                    baud,
                    parity,
                    data_bits,
                    stop_bits,
                },
                lock: Arc::new(tokio::sync::Mutex::new(())),
            },
            unit,
            timeout,
        })
    }

    fn known(&self) -> String {
        if self.devices.is_empty() {
            "none configured: add [plugins.modbus.devices.NAME]".into()
        } else {
            let names: Vec<&str> = self.devices.keys().map(String::as_str).collect();
            format!("known: {}", names.join(", "))
        }
    }

    fn parse(&self, input: &Input) -> Result<Request, PluginError> {
        let device = match input.opt_str("device")? {
            Some(d) if self.devices.contains_key(d) => d.to_string(),
            Some(d) => {
                return Err(input.err("device", format!("unknown device `{d}` ({})", self.known())))
            }
            // With one device configured, it is the default.
            None if self.devices.len() == 1 => self.devices.keys().next().unwrap().clone(),
            None => {
                return Err(input.err(
                    "device",
                    format!("missing (expected a device name; {})", self.known()),
                ))
            }
        };
        let op_name = input.str("op")?.to_string();
        let address = input
            .opt_int("address", 0, 65535)?
            .ok_or_else(|| input.err("address", "missing (expected an integer from 0 to 65535)"))?;
        let count = |max: i64| -> Result<u16, PluginError> {
            let c = input.opt_int("count", 1, max)?.unwrap_or(1);
            Ok(c as u16)
        };
        let op = match op_name.as_str() {
            "read_holding" => Op::ReadHolding {
                count: count(MAX_READ_REGS)?,
            },
            "read_input" => Op::ReadInput {
                count: count(MAX_READ_REGS)?,
            },
            "read_coils" => Op::ReadCoils {
                count: count(MAX_READ_BITS)?,
            },
            "read_discrete" => Op::ReadDiscrete {
                count: count(MAX_READ_BITS)?,
            },
            "write_register" => Op::WriteRegister {
                value: register(input, "value", input.get("value"))?,
            },
            "write_coil" => Op::WriteCoil {
                value: coil(input, "value", input.get("value"))?,
            },
            "write_registers" => Op::WriteRegisters {
                values: list(input, MAX_WRITE_REGS)?
                    .iter()
                    .enumerate()
                    .map(|(i, v)| register(input, &format!("values[{i}]"), Some(v)))
                    .collect::<Result<_, _>>()?,
            },
            "write_coils" => Op::WriteCoils {
                values: list(input, MAX_WRITE_BITS)?
                    .iter()
                    .enumerate()
                    .map(|(i, v)| coil(input, &format!("values[{i}]"), Some(v)))
                    .collect::<Result<_, _>>()?,
            },
            other => return Err(input.err("op", format!("`{other}` is not one of {OPS}"))),
        };
        let n = match &op {
            Op::ReadHolding { count }
            | Op::ReadInput { count }
            | Op::ReadCoils { count }
            | Op::ReadDiscrete { count } => *count as i64,
            Op::WriteRegisters { values } => values.len() as i64,
            Op::WriteCoils { values } => values.len() as i64,
            Op::WriteRegister { .. } | Op::WriteCoil { .. } => 1,
        };
        if address + n > 65536 {
            return Err(input.err(
                "address",
                format!("{address} + {n} items runs past the last address (65535)"),
            ));
        }
        Ok(Request {
            device,
            op_name,
            address: address as u16,
            op,
        })
    }

    async fn run(&self, r: Request) -> Result<Value, PluginError> {
        let dev = &self.devices[&r.device];
        let what = format!("device `{}` ({})", r.device, dev.address);
        let ms = dev.timeout.as_millis();
        let fail = |message: String, retryable: bool| PluginError::Failed {
            plugin: NAME.into(),
            message,
            retryable,
        };
        let work = async {
            let (mut ctx, _line) = match &dev.link {
                Link::Tcp(address) => {
                    let addr = tokio::net::lookup_host(address)
                        .await
                        .map_err(|e| {
                            fail(format!("{what}: cannot resolve the address: {e}"), true)
                        })?
                        .next()
                        .ok_or_else(|| {
                            fail(format!("{what}: the address resolves to nothing"), true)
                        })?;
                    let ctx = tcp::connect_slave(addr, Slave(dev.unit))
                        .await
                        .map_err(|e| fail(format!("{what}: cannot connect: {e}"), true))?;
                    (ctx, None)
                }
                Link::Rtu { path, line, lock } => {
                    // Held until the answer is in: one frame on the line.
                    let guard = lock.clone().lock_owned().await;
                    let port = SerialPort::open(path, line).map_err(|e| {
                        fail(format!("{what}: cannot open the serial port: {e}"), true)
                    })?;
                    (rtu::attach_slave(port, Slave(dev.unit)), Some(guard))
                }
            };
            let a = r.address;
            let values = match &r.op {
                Op::ReadHolding { count } => {
                    outcome(ctx.read_holding_registers(a, *count).await).map(words)
                }
                Op::ReadInput { count } => {
                    outcome(ctx.read_input_registers(a, *count).await).map(words)
                }
                Op::ReadCoils { count } => outcome(ctx.read_coils(a, *count).await).map(bits),
                Op::ReadDiscrete { count } => {
                    outcome(ctx.read_discrete_inputs(a, *count).await).map(bits)
                }
                Op::WriteRegister { value } => outcome(ctx.write_single_register(a, *value).await)
                    .map(|()| words(vec![*value])),
                Op::WriteRegisters { values } => {
                    outcome(ctx.write_multiple_registers(a, values).await)
                        .map(|()| words(values.clone()))
                }
                Op::WriteCoil { value } => {
                    outcome(ctx.write_single_coil(a, *value).await).map(|()| bits(vec![*value]))
                }
                Op::WriteCoils { values } => outcome(ctx.write_multiple_coils(a, values).await)
                    .map(|()| bits(values.clone())),
            };
            let _ = ctx.disconnect().await;
            values.map_err(|e| match e {
                ModbusOutcome::Exception(code) => fail(
                    format!(
                        "{what}: `{}` at `address` {a}: the device answered with Modbus exception {code}",
                        r.op_name
                    ),
                    false,
                ),
                ModbusOutcome::Io(e) => fail(format!("{what}: {e}"), true),
            })
        };
        let values = tokio::time::timeout(dev.timeout, work)
            .await
            .map_err(|_| {
                fail(
                    format!(
                        "{what}: no answer from unit {} within timeout_ms ({ms} ms)",
                        dev.unit
                    ),
                    true,
                )
            })??;
        let mut out = vec![
            ("device", Value::Str(r.device.clone())),
            ("op", Value::Str(r.op_name.clone())),
            ("address", Value::Int(r.address as i64)),
        ];
        if r.op_name.starts_with("write") {
            out.push(("written", Value::Int(values.len() as i64)));
        }
        out.push(("values", Value::List(values)));
        Ok(map(out))
    }
}

/// The outer error of a Modbus call: transport/protocol, or an exception.
enum ModbusOutcome {
    Io(tokio_modbus::Error),
    Exception(tokio_modbus::ExceptionCode),
}

fn outcome<T>(r: tokio_modbus::Result<T>) -> Result<T, ModbusOutcome> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(code)) => Err(ModbusOutcome::Exception(code)),
        Err(e) => Err(ModbusOutcome::Io(e)),
    }
}

fn words(w: Vec<u16>) -> Vec<Value> {
    w.into_iter().map(|x| Value::Int(x as i64)).collect()
}

fn bits(b: Vec<bool>) -> Vec<Value> {
    b.into_iter().map(Value::Bool).collect()
}

/// Moves a config error onto a nested key.
fn rekey(e: PluginError, key: &str) -> PluginError {
    match e {
        PluginError::Config {
            plugin, message, ..
        } => PluginError::Config {
            plugin,
            key: key.into(),
            message,
        },
        other => other,
    }
}

/// A register value: an integer 0..=65535.
fn register(input: &Input, field: &str, v: Option<&Value>) -> Result<u16, PluginError> {
    match v {
        Some(Value::Int(i)) if (0..=65535).contains(i) => Ok(*i as u16),
        Some(Value::Int(i)) => Err(input.err(
            field,
            format!("{i} does not fit a register (expected an integer from 0 to 65535)"),
        )),
        None => Err(input.err(field, "missing (expected an integer from 0 to 65535)")),
        Some(_) => Err(input.err(field, "expected an integer from 0 to 65535")),
    }
}

/// A coil value: true/false (or 1/0).
fn coil(input: &Input, field: &str, v: Option<&Value>) -> Result<bool, PluginError> {
    match v {
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::Int(0)) => Ok(false),
        Some(Value::Int(1)) => Ok(true),
        None => Err(input.err(field, "missing (expected true or false)")),
        Some(_) => Err(input.err(field, "expected true or false (or 1/0)")),
    }
}

/// The `values` list of a multiple write, 1..=max items.
fn list<'a>(input: &Input<'a>, max: i64) -> Result<&'a [Value], PluginError> {
    match input.get("values") {
        Some(Value::List(l)) if !l.is_empty() && l.len() as i64 <= max => Ok(l),
        Some(Value::List(l)) => {
            Err(input.err("values", format!("{} items (expected 1 to {max})", l.len())))
        }
        None => Err(input.err("values", "missing (expected a list)")),
        Some(_) => Err(input.err("values", "expected a list")),
    }
}

#[async_trait]
impl Plugin for Modbus {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Reads and writes registers and coils of the Modbus devices (PLCs, drives, meters) the device reaches.".into()
    }

    fn effects(&self) -> super::Effects {
        // One table, which the server also holds catalogs to.
        crate::schema::builtin_effects("modbus").unwrap_or(super::Effects::Always)
    }

    fn input_schema(&self) -> Schema {
        let names: Vec<&str> = self.devices.keys().map(String::as_str).collect();
        Schema::object()
            .field(
                "device",
                Schema::enumeration(&names).desc("a configured device (optional when only one)"),
            )
            .req(
                "op",
                Schema::enumeration(&[
                    "read_holding",
                    "read_input",
                    "read_coils",
                    "read_discrete",
                    "write_register",
                    "write_registers",
                    "write_coil",
                    "write_coils",
                ]),
            )
            .req(
                "address",
                Schema::integer(0, 65535).desc("0-based protocol address"),
            )
            .field(
                "count",
                Schema::integer(1, MAX_READ_BITS).desc("registers 1..=125, bits 1..=2000"),
            )
            .field(
                "value",
                Schema::of(&[Kind::Integer, Kind::Boolean]).desc("register 0..=65535 or coil"),
            )
            .field(
                "values",
                Schema::array(Schema::of(&[Kind::Integer, Kind::Boolean]))
                    .len(1, MAX_WRITE_BITS as usize),
            )
            .when("op", "write_register", &["value"])
            .when("op", "write_coil", &["value"])
            .when("op", "write_registers", &["values"])
            .when("op", "write_coils", &["values"])
    }

    fn concurrency(&self) -> usize {
        // Devices often take few connections; an RTU line one request.
        4
    }

    fn capabilities(&self) -> Vec<String> {
        self.devices.keys().map(|d| format!("modbus:{d}")).collect()
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let req = self.parse(&Input::new(NAME, &task.input)?)?;
        tokio::select! {
            r = self.run(req) => r,
            _ = task.cancel.cancelled() => Err(PluginError::Cancelled(NAME.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};

    /// The pymodbus server of tests/fixtures/modbus_server.py; fails (not
    /// skips) when pymodbus is missing.
    pub(crate) struct PyServer {
        child: Child,
        pub port: u16,
    }

    impl PyServer {
        pub fn start() -> PyServer {
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/modbus_server.py"
            );
            let mut child = Command::new("python3")
                .arg(script)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python3 is needed for the modbus tests");
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            if !line.starts_with("ready ") {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                let _ = child.kill();
                panic!(
                    "the Modbus test server did not start ({}): pip install pymodbus==3.16.1",
                    err.trim()
                );
            }
            let port = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            PyServer { child, port }
        }
    }

    impl Drop for PyServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn plugin(devices: &[(&str, u16, u64)]) -> Modbus {
        let mut cfg = String::new();
        for (name, port, timeout) in devices {
            cfg.push_str(&format!(
                "[devices.{name}]\naddress = \"127.0.0.1:{port}\"\nunit = 1\ntimeout_ms = {timeout}\n"
            ));
        }
        Modbus::from_config(&toml::from_str(&cfg).unwrap()).unwrap()
    }

    async fn call(p: &Modbus, v: serde_json::Value) -> Result<serde_json::Value, String> {
        let v = Value::from(v);
        let r = p
            .parse(&Input::new(NAME, &v).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        p.run(r)
            .await
            .map(serde_json::Value::from)
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn reads_and_writes_a_real_modbus_server() {
        let s = PyServer::start();
        let p = plugin(&[("press1", s.port, 2000)]);
        let r = call(
            &p,
            json!({"device": "press1", "op": "read_holding", "address": 0, "count": 4}),
        )
        .await
        .unwrap();
        assert_eq!(r["values"], json!([1000, 1001, 1002, 1003]));
        let r = call(&p, json!({"op": "read_input", "address": 5, "count": 2}))
            .await
            .unwrap();
        assert_eq!(r["values"], json!([2005, 2006]));
        let r = call(&p, json!({"op": "read_coils", "address": 0, "count": 3}))
            .await
            .unwrap();
        assert_eq!(r["values"], json!([true, false, true]));
        let r = call(&p, json!({"op": "read_discrete", "address": 2, "count": 3}))
            .await
            .unwrap();
        assert_eq!(r["values"], json!([false, true, false]));

        let r = call(
            &p,
            json!({"op": "write_register", "address": 3, "value": 42}),
        )
        .await
        .unwrap();
        assert_eq!(r["written"], 1);
        let r = call(
            &p,
            json!({"op": "write_registers", "address": 10, "values": [7, 65535]}),
        )
        .await
        .unwrap();
        assert_eq!(r["values"], json!([7, 65535]));
        let r = call(&p, json!({"op": "read_holding", "address": 2, "count": 10}))
            .await
            .unwrap();
        assert_eq!(
            r["values"],
            json!([1002, 42, 1004, 1005, 1006, 1007, 1008, 1009, 7, 65535])
        );
        call(&p, json!({"op": "write_coil", "address": 1, "value": true}))
            .await
            .unwrap();
        call(
            &p,
            json!({"op": "write_coils", "address": 4, "values": [false, 1]}),
        )
        .await
        .unwrap();
        let r = call(&p, json!({"op": "read_coils", "address": 0, "count": 6}))
            .await
            .unwrap();
        assert_eq!(r["values"], json!([true, true, true, false, false, true]));

        // Past the server's map: a Modbus exception, reported with the address.
        let e = call(
            &p,
            json!({"op": "read_holding", "address": 60000, "count": 2}),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("`modbus`") && e.contains("exception") && e.contains("60000"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn bad_input_names_plugin_and_field() {
        let p = plugin(&[("press1", 1, 100), ("press2", 1, 100)]);
        for (input, field, needle) in [
            (
                json!({"device": "nope", "op": "read_holding", "address": 0}),
                "`device`",
                "press1, press2",
            ),
            (
                json!({"op": "read_holding", "address": 0}),
                "`device`",
                "press1, press2",
            ),
            (
                json!({"device": 3, "op": "read_holding", "address": 0}),
                "`device`",
                "string",
            ),
            (json!({"device": "press1", "address": 0}), "`op`", "missing"),
            (
                json!({"device": "press1", "op": "erase", "address": 0}),
                "`op`",
                "read_holding",
            ),
            (
                json!({"device": "press1", "op": "read_holding"}),
                "`address`",
                "missing",
            ),
            (
                json!({"device": "press1", "op": "read_holding", "address": -1}),
                "`address`",
                "0 to 65535",
            ),
            (
                json!({"device": "press1", "op": "read_holding", "address": 65536}),
                "`address`",
                "0 to 65535",
            ),
            (
                json!({"device": "press1", "op": "read_holding", "address": "0"}),
                "`address`",
                "integer",
            ),
            (
                json!({"device": "press1", "op": "read_holding", "address": 65535, "count": 2}),
                "`address`",
                "65535",
            ),
            (
                json!({"device": "press1", "op": "read_holding", "address": 0, "count": 0}),
                "`count`",
                "1 to 125",
            ),
            (
                json!({"device": "press1", "op": "read_input", "address": 0, "count": 126}),
                "`count`",
                "1 to 125",
            ),
            (
                json!({"device": "press1", "op": "read_coils", "address": 0, "count": 2001}),
                "`count`",
                "1 to 2000",
            ),
            (
                json!({"device": "press1", "op": "write_register", "address": 0}),
                "`value`",
                "missing",
            ),
            (
                json!({"device": "press1", "op": "write_register", "address": 0, "value": 65536}),
                "`value`",
                "65535",
            ),
            (
                json!({"device": "press1", "op": "write_register", "address": 0, "value": -1}),
                "`value`",
                "65535",
            ),
            (
                json!({"device": "press1", "op": "write_register", "address": 0, "value": 1.5}),
                "`value`",
                "integer",
            ),
            (
                json!({"device": "press1", "op": "write_coil", "address": 0, "value": "on"}),
                "`value`",
                "true or false",
            ),
            (
                json!({"device": "press1", "op": "write_registers", "address": 0, "values": []}),
                "`values`",
                "1 to 123",
            ),
            (
                json!({"device": "press1", "op": "write_registers", "address": 0, "values": 5}),
                "`values`",
                "list",
            ),
            (
                json!({"device": "press1", "op": "write_registers", "address": 0, "values": [1, 70000]}),
                "`values[1]`",
                "65535",
            ),
            (
                json!({"device": "press1", "op": "write_coils", "address": 0, "values": [true, 2]}),
                "`values[1]`",
                "true or false",
            ),
        ] {
            let e = call(&p, input.clone()).await.unwrap_err();
            assert!(
                e.contains("`modbus`") && e.contains(field) && e.contains(needle),
                "{input}: {e}"
            );
        }
    }

    #[test]
    fn config_is_checked() {
        for (cfg, key) in [
            ("devices = 1", "`devices`"),
            ("[devices.a]\nunit = 1", "`devices.a.address`"),
            ("[devices.a]\naddress = \"10.0.0.1\"", "`devices.a.address`"),
            (
                "[devices.a]\naddress = \"tcp://x:1/\"",
                "`devices.a.address`",
            ),
            (
                "[devices.a]\naddress = \"x:502\"\nunit = 256",
                "`devices.a.unit`",
            ),
            (
                "[devices.a]\naddress = \"x:502\"\ntimeout_ms = 0",
                "`devices.a.timeout_ms`",
            ),
            (
                "[devices.a]\naddress = \"x:502\"\nport = 1",
                "`devices.a.port`",
            ),
            ("allow = []", "`allow`"),
            // RTU: unit 0 is broadcast (nobody answers), 248.. reserved.
            (
                "[devices.a]\nserial = \"/dev/ttyS0\"\nunit = 0",
                "`devices.a.unit`",
            ),
            (
                "[devices.a]\nserial = \"/dev/ttyS0\"\nunit = 248",
                "`devices.a.unit`",
            ),
            (
                "[devices.a]\nserial = \"/dev/ttyS0\"\nbaud = 12345",
                "`devices.a.baud`",
            ),
            (
                "[devices.a]\nserial = \"/dev/ttyS0\"\nparity = \"mark\"",
                "`devices.a.parity`",
            ),
            (
                "[devices.a]\nserial = \"/dev/ttyS0\"\ndata_bits = 9",
                "`devices.a.data_bits`",
            ),
            (
                "[devices.a]\nserial = \"/dev/ttyS0\"\nstop_bits = 3",
                "`devices.a.stop_bits`",
            ),
            ("[devices.a]\nserial = \"ttyS0\"", "`devices.a.serial`"),
            (
                "[devices.a]\nserial = \"/dev/ttyS0\"\naddress = \"x:1\"",
                "`devices.a.address`",
            ),
            (
                "[devices.a]\naddress = \"x:502\"\nbaud = 9600",
                "`devices.a.baud`",
            ),
        ] {
            let e = Modbus::from_config(&toml::from_str(cfg).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains("`modbus`") && e.contains(key), "{cfg}: {e}");
        }
        let p = plugin(&[("press1", 502, 100)]);
        assert_eq!(p.capabilities(), vec!["modbus:press1".to_string()]);
    }

    #[tokio::test]
    async fn dead_peer_and_timeout_fail_clearly() {
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Accepts connections and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        let p = plugin(&[("dead", dead, 2000), ("silent", silent_port, 300)]);
        let e = call(
            &p,
            json!({"device": "dead", "op": "read_holding", "address": 0}),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("`modbus`") && e.contains("`dead`") && e.contains("connect"),
            "{e}"
        );
        let started = std::time::Instant::now();
        let e = call(
            &p,
            json!({"device": "silent", "op": "write_register", "address": 0, "value": 1}),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("`silent`") && e.contains("timeout_ms (300 ms)"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(silent);
    }
}
