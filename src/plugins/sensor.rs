//! `sensor`: read the board's I2C sensors by name.
//!
//! Input `{"sensor": "ambient"}` (a name from the board's `sensors`); output
//! `{"sensor", "kind", "temperature_c", "pressure_hpa", "humidity_pct"}`.
//! Supported kinds: `bme280` (driver [`Bme280`], generic over
//! [`embedded_hal::i2c::I2c`]). The Linux bus (`linux-embedded-hal`'s
//! `I2cdev` on the board's `i2c_bus`) is opened only in [`Sensor::from_config`];
//! with `simulate = true` in `[plugins.sensor]` every sensor is a
//! [`SimBme280`] register map seeded with the datasheet's example
//! calibration. Without it, a board without an `i2c_bus` is a config error.

use super::schema::Schema;
use super::util::{blocking, config_err, failed, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::boards::Board;
use crate::protocol::Value;
use async_trait::async_trait;
use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NAME: &str = "sensor";

const REG_CHIP_ID: u8 = 0xD0;
const CHIP_ID: u8 = 0x60;
const REG_CALIB_TP: u8 = 0x88; // 0x88..=0xA1: 26 bytes
const REG_CALIB_H: u8 = 0xE1; // 0xE1..=0xE7: 7 bytes
const REG_CTRL_HUM: u8 = 0xF2;
const REG_STATUS: u8 = 0xF3;
const REG_CTRL_MEAS: u8 = 0xF4;
const REG_DATA: u8 = 0xF7; // 0xF7..=0xFE: 8 bytes
/// osrs_t = x1, osrs_p = x1, mode = forced.
const CTRL_MEAS_FORCED: u8 = 0x25; // 0b001_001_01
/// osrs_h = x1.
const CTRL_HUM_X1: u8 = 0b001;

/// BME280 trimming parameters.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Calibration {
    pub t1: u16,
    pub t2: i16,
    pub t3: i16,
    pub p1: u16,
    pub p2: i16,
    pub p3: i16,
    pub p4: i16,
    pub p5: i16,
    pub p6: i16,
    pub p7: i16,
    pub p8: i16,
    pub p9: i16,
    pub h1: u8,
    pub h2: i16,
    pub h3: u8,
    pub h4: i16,
    pub h5: i16,
    pub h6: i8,
}

impl Calibration {
    /// The datasheet's example (temperature and pressure) with typical
    /// humidity parameters.
    pub const EXAMPLE: Calibration = Calibration {
        t1: 27504,
        t2: 26435,
        t3: -1000,
        p1: 36477,
        p2: -10685,
        p3: 3024,
        p4: 2855,
        p5: 140,
        p6: -7,
        p7: 15500,
        p8: -14600,
        p9: 6000,
        h1: 75,
        h2: 362,
        h3: 0,
        h4: 313,
        h5: 50,
        h6: 30,
    };

    /// Parses registers 0x88..=0xA1 and 0xE1..=0xE7.
    pub fn parse(tp: &[u8; 26], h: &[u8; 7]) -> Calibration {
        let u = |i: usize| u16::from_le_bytes([tp[i], tp[i + 1]]);
        let s = |i: usize| i16::from_le_bytes([tp[i], tp[i + 1]]);
        Calibration {
            t1: u(0),
            t2: s(2),
            t3: s(4),
            p1: u(6),
            p2: s(8),
            p3: s(10),
            p4: s(12),
            p5: s(14),
            p6: s(16),
            p7: s(18),
            p8: s(20),
            p9: s(22),
            h1: tp[25],
            h2: i16::from_le_bytes([h[0], h[1]]),
            h3: h[2],
            h4: ((h[3] as i8 as i16) << 4) | (h[4] & 0x0F) as i16,
            h5: ((h[5] as i8 as i16) << 4) | (h[4] >> 4) as i16,
            h6: h[6] as i8,
        }
    }

    /// The inverse of [`Calibration::parse`] (for the simulated sensor).
    pub fn to_registers(&self) -> ([u8; 26], [u8; 7]) {
        let mut tp = [0u8; 26];
        let words: [[u8; 2]; 12] = [
            self.t1.to_le_bytes(),
            self.t2.to_le_bytes(),
            self.t3.to_le_bytes(),
            self.p1.to_le_bytes(),
            self.p2.to_le_bytes(),
            self.p3.to_le_bytes(),
            self.p4.to_le_bytes(),
            self.p5.to_le_bytes(),
            self.p6.to_le_bytes(),
            self.p7.to_le_bytes(),
            self.p8.to_le_bytes(),
            self.p9.to_le_bytes(),
        ];
        for (i, w) in words.iter().enumerate() {
            tp[2 * i..2 * i + 2].copy_from_slice(w);
        }
        tp[25] = self.h1;
        let h2 = self.h2.to_le_bytes();
        let h = [
            h2[0],
            h2[1],
            self.h3,
            (self.h4 >> 4) as u8,
            (self.h4 & 0x0F) as u8 | ((self.h5 & 0x0F) << 4) as u8,
            (self.h5 >> 4) as u8,
            self.h6 as u8,
        ];
        (tp, h)
    }

    /// Temperature in 0.01 °C and `t_fine` (datasheet 4.2.3, 32-bit).
    pub fn temperature(&self, adc_t: i32) -> (i32, i32) {
        let (t1, t2, t3) = (self.t1 as i32, self.t2 as i32, self.t3 as i32);
        let var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11;
        let var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14;
        let t_fine = var1 + var2;
        ((t_fine * 5 + 128) >> 8, t_fine)
    }

    /// Pressure in Pa as Q24.8 (datasheet 4.2.3, 64-bit).
    pub fn pressure(&self, adc_p: i32, t_fine: i32) -> u32 {
        let mut var1 = t_fine as i64 - 128000;
        let mut var2 = var1 * var1 * self.p6 as i64;
        var2 += (var1 * self.p5 as i64) << 17;
        var2 += (self.p4 as i64) << 35;
        var1 = ((var1 * var1 * self.p3 as i64) >> 8) + ((var1 * self.p2 as i64) << 12);
        var1 = (((1i64 << 47) + var1) * self.p1 as i64) >> 33;
        if var1 == 0 {
            return 0; // avoid a division by zero
        }
        let mut p: i64 = 1048576 - adc_p as i64;
        p = (((p << 31) - var2) * 3125) / var1;
        var1 = (self.p9 as i64 * (p >> 13) * (p >> 13)) >> 25;
        var2 = (self.p8 as i64 * p) >> 19;
        p = ((p + var1 + var2) >> 8) + ((self.p7 as i64) << 4);
        p as u32
    }

    /// Relative humidity in %RH as Q22.10 (datasheet 4.2.3, 32-bit).
    pub fn humidity(&self, adc_h: i32, t_fine: i32) -> u32 {
        let (h1, h2, h3) = (self.h1 as i32, self.h2 as i32, self.h3 as i32);
        let (h4, h5, h6) = (self.h4 as i32, self.h5 as i32, self.h6 as i32);
        let x = t_fine - 76800;
        let a = (((adc_h << 14) - (h4 << 20) - (h5 * x)) + 16384) >> 15;
        let b = (((((x * h6) >> 10) * (((x * h3) >> 11) + 32768)) >> 10) + 2097152) * h2 + 8192;
        let mut v = a * (b >> 14);
        v -= ((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4;
        v = v.clamp(0, 419430400);
        (v >> 12) as u32
    }
}

/// One compensated reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub temperature_c: f64,
    pub pressure_hpa: f64,
    pub humidity_pct: f64,
}

/// Where a driver call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Bme280Error<E> {
    Bus(&'static str, E),
    ChipId(u8),
    NotReady,
}

impl<E: std::fmt::Debug> std::fmt::Display for Bme280Error<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bme280Error::Bus(step, e) => write!(f, "i2c error during {step}: {e:?}"),
            Bme280Error::ChipId(id) => {
                write!(f, "chip id is {id:#04x}, not {CHIP_ID:#04x} (not a BME280)")
            }
            Bme280Error::NotReady => write!(f, "measurement did not finish"),
        }
    }
}

/// BME280 driver over any `embedded-hal` 1.0 I2C bus.
pub struct Bme280<I> {
    i2c: I,
    address: u8,
    calibration: Calibration,
}

impl<I: I2c> Bme280<I> {
    /// Checks the chip id and reads the calibration.
    pub fn new(mut i2c: I, address: u8) -> Result<Self, Bme280Error<I::Error>> {
        let mut id = [0u8];
        i2c.write_read(address, &[REG_CHIP_ID], &mut id)
            .map_err(|e| Bme280Error::Bus("chip id read", e))?;
        if id[0] != CHIP_ID {
            return Err(Bme280Error::ChipId(id[0]));
        }
        let mut tp = [0u8; 26];
        i2c.write_read(address, &[REG_CALIB_TP], &mut tp)
            .map_err(|e| Bme280Error::Bus("calibration read", e))?;
        let mut h = [0u8; 7];
        i2c.write_read(address, &[REG_CALIB_H], &mut h)
            .map_err(|e| Bme280Error::Bus("calibration read", e))?;
        Ok(Bme280 {
            i2c,
            address,
            calibration: Calibration::parse(&tp, &h),
        })
    }

    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// One forced-mode measurement; `wait` is called between status polls.
    pub fn measure(&mut self, mut wait: impl FnMut()) -> Result<Reading, Bme280Error<I::Error>> {
        let a = self.address;
        // ctrl_hum takes effect only after a ctrl_meas write.
        self.i2c
            .write(a, &[REG_CTRL_HUM, CTRL_HUM_X1])
            .map_err(|e| Bme280Error::Bus("ctrl_hum write", e))?;
        self.i2c
            .write(a, &[REG_CTRL_MEAS, CTRL_MEAS_FORCED])
            .map_err(|e| Bme280Error::Bus("ctrl_meas write", e))?;
        let mut ready = false;
        for _ in 0..50 {
            wait();
            let mut status = [0u8];
            self.i2c
                .write_read(a, &[REG_STATUS], &mut status)
                .map_err(|e| Bme280Error::Bus("status read", e))?;
            if status[0] & 0x08 == 0 {
                ready = true;
                break;
            }
        }
        if !ready {
            return Err(Bme280Error::NotReady);
        }
        let mut d = [0u8; 8];
        self.i2c
            .write_read(a, &[REG_DATA], &mut d)
            .map_err(|e| Bme280Error::Bus("data read", e))?;
        let adc_p = (d[0] as i32) << 12 | (d[1] as i32) << 4 | (d[2] as i32) >> 4;
        let adc_t = (d[3] as i32) << 12 | (d[4] as i32) << 4 | (d[5] as i32) >> 4;
        let adc_h = (d[6] as i32) << 8 | d[7] as i32;
        let c = &self.calibration;
        let (t, t_fine) = c.temperature(adc_t);
        Ok(Reading {
            temperature_c: t as f64 / 100.0,
            pressure_hpa: c.pressure(adc_p, t_fine) as f64 / 256.0 / 100.0,
            humidity_pct: c.humidity(adc_h, t_fine) as f64 / 1024.0,
        })
    }
}

/// A simulated BME280: a register map behind [`I2c`], seeded with
/// [`Calibration::EXAMPLE`] and the datasheet's example raw values
/// (25.08 °C, 1006.53 hPa) and a humidity of about 50 %.
#[derive(Debug, Clone)]
pub struct SimBme280 {
    /// Addresses that answer.
    pub addresses: Vec<u8>,
    pub regs: [u8; 256],
    pointer: u8,
}

impl SimBme280 {
    pub fn new(addresses: Vec<u8>) -> SimBme280 {
        let mut regs = [0u8; 256];
        regs[REG_CHIP_ID as usize] = CHIP_ID;
        let (tp, h) = Calibration::EXAMPLE.to_registers();
        regs[0x88..0x88 + 26].copy_from_slice(&tp);
        regs[0xE1..0xE1 + 7].copy_from_slice(&h);
        let adc_p: u32 = 415148;
        let adc_t: u32 = 519888;
        let adc_h: u16 = 0x7E00;
        let raw = [
            (adc_p >> 12) as u8,
            (adc_p >> 4) as u8,
            ((adc_p & 0xF) << 4) as u8,
            (adc_t >> 12) as u8,
            (adc_t >> 4) as u8,
            ((adc_t & 0xF) << 4) as u8,
            (adc_h >> 8) as u8,
            adc_h as u8,
        ];
        regs[REG_DATA as usize..REG_DATA as usize + 8].copy_from_slice(&raw);
        SimBme280 {
            addresses,
            regs,
            pointer: 0,
        }
    }
}

impl ErrorType for SimBme280 {
    type Error = ErrorKind;
}

impl I2c for SimBme280 {
    fn transaction(&mut self, address: u8, ops: &mut [Operation<'_>]) -> Result<(), ErrorKind> {
        if !self.addresses.contains(&address) {
            return Err(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address));
        }
        for op in ops {
            match op {
                Operation::Write(bytes) => {
                    if let Some((reg, data)) = bytes.split_first() {
                        self.pointer = *reg;
                        for (i, b) in data.iter().enumerate() {
                            let r = reg.wrapping_add(i as u8);
                            // Status and data are read-only; the measurement is instant.
                            if r == REG_CTRL_HUM || r == REG_CTRL_MEAS {
                                self.regs[r as usize] = *b;
                            }
                        }
                    }
                }
                Operation::Read(buf) => {
                    for b in buf.iter_mut() {
                        *b = self.regs[self.pointer as usize];
                        self.pointer = self.pointer.wrapping_add(1);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Any bus the plugin can drive: errors as text, shareable across threads.
trait Bus: Send {
    fn read_bme280(&mut self, address: u8) -> Result<Reading, String>;
}

impl<I: I2c + Send> Bus for I {
    fn read_bme280(&mut self, address: u8) -> Result<Reading, String> {
        let mut dev = Bme280::new(&mut *self, address).map_err(|e| e.to_string())?;
        dev.measure(|| std::thread::sleep(Duration::from_millis(2)))
            .map_err(|e| e.to_string())
    }
}

/// The sensor plugin.
pub struct Sensor {
    bus: Arc<Mutex<Box<dyn Bus>>>,
    /// name → (kind, address)
    sensors: BTreeMap<String, (String, u8)>,
    simulated: bool,
}

const KINDS: &[&str] = &["bme280"];

impl Sensor {
    /// Config key: `simulate` (default false): simulated sensors instead of
    /// the board's `i2c_bus`.
    pub fn from_config(config: &toml::Table, board: &Board) -> Result<Sensor, PluginError> {
        check_keys(NAME, config, &["simulate"])?;
        let simulate = match config.get("simulate") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(v) => {
                return Err(config_err(
                    NAME,
                    "simulate",
                    format!("expected true or false, found {v}"),
                ))
            }
        };
        if simulate {
            let addrs = board.sensors.iter().map(|s| s.address).collect();
            return Sensor::with_bus(SimBme280::new(addrs), board, true);
        }
        Sensor::with_bus(open_board(board)?, board, false)
    }

    /// A plugin over any I2C bus for the board's sensors.
    pub fn with_bus<I: I2c + Send + 'static>(
        bus: I,
        board: &Board,
        simulated: bool,
    ) -> Result<Sensor, PluginError> {
        let mut sensors = BTreeMap::new();
        for s in &board.sensors {
            if !KINDS.contains(&s.kind.as_str()) {
                return Err(config_err(
                    NAME,
                    &format!("sensors.{}", s.name),
                    format!(
                        "kind `{}` is not supported (supported: {})",
                        s.kind,
                        KINDS.join(", ")
                    ),
                ));
            }
            sensors.insert(s.name.clone(), (s.kind.clone(), s.address));
        }
        Ok(Sensor {
            bus: Arc::new(Mutex::new(Box::new(bus))),
            sensors,
            simulated,
        })
    }
}

/// The board's `i2c_bus` as a `linux-embedded-hal` `I2cdev`.
pub fn open_board(board: &Board) -> Result<linux_embedded_hal::I2cdev, PluginError> {
    let path = board.i2c_bus.as_deref().ok_or_else(|| {
        config_err(
            NAME,
            "simulate",
            format!(
                "board `{}` has no i2c_bus; set simulate = true for simulated sensors",
                board.name
            ),
        )
    })?;
    linux_embedded_hal::I2cdev::new(path)
        .map_err(|e| config_err(NAME, "i2c_bus", format!("{path}: {e}")))
}

#[async_trait]
impl Plugin for Sensor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Reads the board's I2C sensors by name.".into()
    }

    fn input_schema(&self) -> Schema {
        let names: Vec<&str> = self.sensors.keys().map(String::as_str).collect();
        Schema::object().req(
            "sensor",
            Schema::enumeration(&names).desc("a sensor of the board profile"),
        )
    }

    fn concurrency(&self) -> usize {
        // One I2C bus: one transaction sequence at a time.
        1
    }

    fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = self.sensors.keys().map(|s| format!("sensor:{s}")).collect();
        if self.simulated {
            caps.push("sensor:simulated".into());
        }
        caps
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let input = Input::new(NAME, &task.input)?;
        let name = input.str("sensor")?;
        let Some((kind, address)) = self.sensors.get(name).cloned() else {
            let known: Vec<&str> = self.sensors.keys().map(String::as_str).collect();
            return Err(input.err(
                "sensor",
                format!(
                    "no sensor `{name}` on this board (known: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let bus = self.bus.clone();
        let label = format!("`sensor` `{name}` ({kind} at {address:#04x})");
        let r = blocking(NAME, &task, move || {
            let mut bus = bus.lock().unwrap_or_else(|e| e.into_inner());
            bus.read_bme280(address)
                .map_err(|e| failed(NAME, format!("{label}: {e}")))
        })
        .await?;
        Ok(map(vec![
            ("sensor", Value::Str(name.into())),
            ("kind", Value::Str(kind)),
            ("temperature_c", Value::Float(r.temperature_c)),
            ("pressure_hpa", Value::Float(r.pressure_hpa)),
            ("humidity_pct", Value::Float(r.humidity_pct)),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};

    const A: u8 = 0x76;

    fn traffic(data: [u8; 8]) -> Vec<T> {
        let (tp, h) = Calibration::EXAMPLE.to_registers();
        vec![
            T::write_read(A, vec![0xD0], vec![0x60]),
            T::write_read(A, vec![0x88], tp.to_vec()),
            T::write_read(A, vec![0xE1], h.to_vec()),
            T::write(A, vec![0xF2, 0x01]),
            T::write(A, vec![0xF4, 0x25]),
            T::write_read(A, vec![0xF3], vec![0x08]),
            T::write_read(A, vec![0xF3], vec![0x00]),
            T::write_read(A, vec![0xF7], data.to_vec()),
        ]
    }

    #[test]
    fn datasheet_compensation() {
        let c = Calibration::EXAMPLE;
        let (t, t_fine) = c.temperature(519888);
        assert_eq!(t, 2508);
        assert_eq!(t_fine, 128422);
        let p = c.pressure(415148, t_fine) as f64 / 256.0;
        assert!((p - 100653.27).abs() < 1.0, "{p}");
        let h = c.humidity(0x7E00, t_fine) as f64 / 1024.0;
        assert!((0.0..=100.0).contains(&h), "{h}");
        let (tp, hr) = c.to_registers();
        assert_eq!(Calibration::parse(&tp, &hr), c);
    }

    #[test]
    fn exact_bus_traffic_and_values() {
        let sim = SimBme280::new(vec![A]);
        let data: [u8; 8] = sim.regs[0xF7..0xFF].try_into().unwrap();
        let mut bus = Mock::new(&traffic(data));
        let mut dev = Bme280::new(&mut bus, A).unwrap();
        assert_eq!(dev.calibration(), &Calibration::EXAMPLE);
        let r = dev.measure(|| {}).unwrap();
        assert!((r.temperature_c - 25.08).abs() < 1e-9, "{r:?}");
        assert!((r.pressure_hpa - 1006.53).abs() < 0.01, "{r:?}");
        assert!((20.0..80.0).contains(&r.humidity_pct), "{r:?}");
        bus.done();
        // The simulated chip answers the same way.
        let mut sim = sim;
        let r2 = Bme280::new(&mut sim, A).unwrap().measure(|| {}).unwrap();
        assert_eq!(r, r2);
    }

    #[test]
    fn wrong_chip_and_bus_errors() {
        let mut bus = Mock::new(&[T::write_read(A, vec![0xD0], vec![0x58])]);
        let e = Bme280::new(&mut bus, A).err().unwrap().to_string();
        assert!(e.contains("0x58"), "{e}");
        bus.done();
        let mut bus =
            Mock::new(&[T::write_read(A, vec![0xD0], vec![0x60])
                .with_error(embedded_hal::i2c::ErrorKind::Bus)]);
        let e = Bme280::new(&mut bus, A).err().unwrap().to_string();
        assert!(e.contains("chip id"), "{e}");
        bus.done();
    }

    fn ctx(input: serde_json::Value) -> TaskContext {
        TaskContext {
            id: "t".into(),
            input: Value::from(input),
            deadline: std::time::Instant::now() + Duration::from_secs(10),
            cancel: tokio_util::sync::CancellationToken::new(),
            attempt: 1,
            output: Default::default(),
        }
    }

    #[tokio::test]
    async fn plugin_reads_by_name_and_names_bad_input() {
        let board = Board::load("rpi4").unwrap();
        let sim = SimBme280::new(vec![A]);
        let data: [u8; 8] = sim.regs[0xF7..0xFF].try_into().unwrap();
        let mut t = traffic(data);
        t.push(
            T::write_read(A, vec![0xD0], vec![0x60]).with_error(embedded_hal::i2c::ErrorKind::Bus),
        );
        let mut bus = Mock::new(&t);
        let p = Sensor::with_bus(bus.clone(), &board, false).unwrap();
        let r = p
            .execute(ctx(serde_json::json!({"sensor": "ambient"})))
            .await
            .unwrap();
        assert_eq!(r.get("temperature_c"), Some(&Value::Float(25.08)));
        let e = p
            .execute(ctx(serde_json::json!({"sensor": "ambient"})))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`sensor`") && e.contains("`ambient`") && e.contains("chip id"),
            "{e}"
        );
        for (input, needle) in [
            (serde_json::json!({"sensor": "outdoor"}), "known: ambient"),
            (serde_json::json!({"sensor": 7}), "`sensor`"),
            (serde_json::json!({}), "`sensor`"),
            (serde_json::json!([1]), "`input`"),
        ] {
            let e = p.execute(ctx(input.clone())).await.unwrap_err().to_string();
            assert!(e.contains("`sensor`") && e.contains(needle), "{input}: {e}");
        }
        drop(p);
        bus.done();
    }

    #[test]
    fn sim_board_needs_simulate() {
        let board = Board::load("sim").unwrap();
        let e = Sensor::from_config(&toml::Table::new(), &board)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("simulate = true"), "{e}");
    }
}
