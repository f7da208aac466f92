//! `gpio`: read, write and pulse the board's pins by name.
//!
//! Input: `{"op": "read", "pin": "button"}` → `{"pin", "high"}`;
//! `{"op": "write", "pin": "led", "value": true}` (or `"high"` / `"low"`);
//! `{"op": "pulse", "pin": "relay", "pulse_ms": 200}` drives the pin high
//! for `pulse_ms` (1..=60000) then low, and low at once if the task is
//! cancelled or times out.
//!
//! The plugin works on any [`embedded_hal::digital`] pins ([`Line`] is
//! implemented for every `InputPin + OutputPin`); only [`open_board`] knows
//! about Linux: it requests the board's `pins` on its `gpio_chip` through
//! `linux-embedded-hal`. With `simulate = true` in `[plugins.gpio]` the pins
//! are in-memory ([`SimPin`]); without it, a board without a `gpio_chip`
//! (like `sim`) is a config error.

use super::schema::{Kind, Schema};
use super::util::{config_err, failed, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::boards::Board;
use crate::protocol::Value;
use async_trait::async_trait;
use embedded_hal::digital::{ErrorType, InputPin, OutputPin};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

const NAME: &str = "gpio";
/// Longest pulse, in milliseconds.
pub const MAX_PULSE_MS: i64 = 60_000;

/// One pin as the plugin uses it: object-safe, errors as text.
pub trait Line: Send {
    fn read(&mut self) -> Result<bool, String>;
    fn write(&mut self, high: bool) -> Result<(), String>;
}

impl<P: InputPin + OutputPin + Send> Line for P {
    fn read(&mut self) -> Result<bool, String> {
        self.is_high().map_err(|e| format!("{e:?}"))
    }
    fn write(&mut self, high: bool) -> Result<(), String> {
        if high {
            self.set_high()
        } else {
            self.set_low()
        }
        .map_err(|e| format!("{e:?}"))
    }
}

/// Pins by name.
pub type PinBank = BTreeMap<String, Box<dyn Line>>;

/// An in-memory pin: reads back what was last written (low at start).
#[derive(Debug, Default, Clone, Copy)]
pub struct SimPin {
    high: bool,
}

impl ErrorType for SimPin {
    type Error = Infallible;
}

impl InputPin for SimPin {
    fn is_high(&mut self) -> Result<bool, Infallible> {
        Ok(self.high)
    }
    fn is_low(&mut self) -> Result<bool, Infallible> {
        Ok(!self.high)
    }
}

impl OutputPin for SimPin {
    fn set_high(&mut self) -> Result<(), Infallible> {
        self.high = true;
        Ok(())
    }
    fn set_low(&mut self) -> Result<(), Infallible> {
        self.high = false;
        Ok(())
    }
}

/// A simulated bank with one [`SimPin`] per board pin.
pub fn simulated_bank(board: &Board) -> PinBank {
    board
        .pins
        .keys()
        .map(|n| (n.clone(), Box::new(SimPin::default()) as Box<dyn Line>))
        .collect()
}

/// A cdev line, requested as input and switched to output on its first write.
struct CdevLine(Option<linux_embedded_hal::CdevPin>);

impl Line for CdevLine {
    fn read(&mut self) -> Result<bool, String> {
        let pin = self.0.as_mut().ok_or("line lost after a failed request")?;
        Line::read(pin)
    }
    fn write(&mut self, high: bool) -> Result<(), String> {
        let pin = self.0.take().ok_or("line lost after a failed request")?;
        let state = embedded_hal::digital::PinState::from(high);
        let mut pin = pin.into_output_pin(state).map_err(|e| e.to_string())?;
        let r = Line::write(&mut pin, high);
        self.0 = Some(pin);
        r
    }
}

/// The board's pins on its `gpio_chip` (all requested as inputs).
pub fn open_board(board: &Board) -> Result<PinBank, PluginError> {
    use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
    let path = board.gpio_chip.as_deref().ok_or_else(|| {
        config_err(
            NAME,
            "simulate",
            format!(
                "board `{}` has no gpio_chip; set simulate = true for in-memory pins",
                board.name
            ),
        )
    })?;
    let mut chip =
        Chip::new(path).map_err(|e| config_err(NAME, "gpio_chip", format!("{path}: {e}")))?;
    let mut bank = PinBank::new();
    for (name, offset) in &board.pins {
        let pin_err = |e: &dyn std::fmt::Display| {
            config_err(
                NAME,
                &format!("pins.{name}"),
                format!("{path} line {offset}: {e}"),
            )
        };
        let handle = chip
            .get_line(*offset)
            .and_then(|l| l.request(LineRequestFlags::INPUT, 0, "openclaw"))
            .map_err(|e| pin_err(&e))?;
        let pin = linux_embedded_hal::CdevPin::new(handle).map_err(|e| pin_err(&e))?;
        bank.insert(name.clone(), Box::new(CdevLine(Some(pin))));
    }
    Ok(bank)
}

/// The gpio plugin.
pub struct Gpio {
    pins: Mutex<PinBank>,
    simulated: bool,
}

impl Gpio {
    /// Config key: `simulate` (default false): in-memory pins instead of the
    /// board's `gpio_chip`.
    pub fn from_config(config: &toml::Table, board: &Board) -> Result<Gpio, PluginError> {
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
        let bank = if simulate {
            simulated_bank(board)
        } else {
            open_board(board)?
        };
        Ok(Gpio::with_bank(bank, simulate))
    }

    /// A plugin over any pins (tests use `embedded-hal-mock` pins).
    pub fn with_bank(bank: PinBank, simulated: bool) -> Gpio {
        Gpio {
            pins: Mutex::new(bank),
            simulated,
        }
    }

    fn pin_name<'a>(&self, input: &Input<'a>) -> Result<&'a str, PluginError> {
        let name = input.str("pin")?;
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if !pins.contains_key(name) {
            let known: Vec<&str> = pins.keys().map(String::as_str).collect();
            return Err(input.err(
                "pin",
                format!(
                    "no pin `{name}` on this board (known: {})",
                    known.join(", ")
                ),
            ));
        }
        Ok(name)
    }

    fn with_pin<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut dyn Line) -> Result<T, String>,
    ) -> Result<T, PluginError> {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let pin = pins
            .get_mut(name)
            .ok_or_else(|| failed(NAME, format!("pin `{name}` vanished")))?;
        f(pin.as_mut()).map_err(|e| failed(NAME, format!("`pin` `{name}`: {e}")))
    }
}

fn level(input: &Input) -> Result<bool, PluginError> {
    match input.get("value") {
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::Str(s)) if s == "high" => Ok(true),
        Some(Value::Str(s)) if s == "low" => Ok(false),
        Some(Value::Int(1)) => Ok(true),
        Some(Value::Int(0)) => Ok(false),
        None => Err(input.err("value", "missing (expected true/false or \"high\"/\"low\")")),
        Some(_) => Err(input.err("value", "expected true/false, \"high\"/\"low\" or 1/0")),
    }
}

#[async_trait]
impl Plugin for Gpio {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Reads, writes and pulses the board's pins by name.".into()
    }

    fn effects(&self) -> super::Effects {
        // One table, which the server also holds catalogs to.
        crate::schema::builtin_effects("gpio").unwrap_or(super::Effects::Always)
    }

    fn input_schema(&self) -> Schema {
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let names: Vec<&str> = pins.keys().map(String::as_str).collect();
        Schema::object()
            .req("op", Schema::enumeration(&["read", "write", "pulse"]))
            .req(
                "pin",
                Schema::enumeration(&names).desc("a pin of the board's pin map"),
            )
            .field(
                "value",
                Schema::of(&[Kind::Boolean, Kind::String, Kind::Integer])
                    .desc("true/false, \"high\"/\"low\" or 1/0"),
            )
            .field("pulse_ms", Schema::integer(1, MAX_PULSE_MS))
            .when("op", "write", &["value"])
            .when("op", "pulse", &["pulse_ms"])
    }

    fn concurrency(&self) -> usize {
        // Pins are independent; each call holds the bank only briefly.
        4
    }

    fn capabilities(&self) -> Vec<String> {
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let mut caps: Vec<String> = pins.keys().map(|p| format!("gpio:{p}")).collect();
        if self.simulated {
            caps.push("gpio:simulated".into());
        }
        caps
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let input = Input::new(NAME, &task.input)?;
        let op = input.str("op")?;
        match op {
            "read" => {
                let name = self.pin_name(&input)?;
                let high = self.with_pin(name, |p| p.read())?;
                Ok(map(vec![
                    ("pin", Value::Str(name.into())),
                    ("high", Value::Bool(high)),
                ]))
            }
            "write" => {
                let name = self.pin_name(&input)?;
                let high = level(&input)?;
                self.with_pin(name, |p| p.write(high))?;
                Ok(map(vec![
                    ("pin", Value::Str(name.into())),
                    ("high", Value::Bool(high)),
                ]))
            }
            "pulse" => {
                let name = self.pin_name(&input)?;
                let ms = input
                    .opt_int("pulse_ms", 1, MAX_PULSE_MS)?
                    .ok_or_else(|| input.err("pulse_ms", "missing (expected milliseconds)"))?;
                self.with_pin(name, |p| p.write(true))?;
                let cancelled = tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms as u64)) => false,
                    _ = task.cancel.cancelled() => true,
                };
                // Low again whatever happened: a relay must not stay on.
                self.with_pin(name, |p| p.write(false))?;
                if cancelled {
                    return Err(PluginError::Cancelled(NAME.into()));
                }
                Ok(map(vec![
                    ("pin", Value::Str(name.into())),
                    ("pulse_ms", Value::Int(ms)),
                ]))
            }
            other => Err(input.err("op", format!("`{other}` is not one of read, write, pulse"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction as T};
    use embedded_hal_mock::eh1::MockError;
    use std::time::Instant;
    use tokio_util::sync::CancellationToken;

    fn ctx(input: serde_json::Value) -> TaskContext {
        TaskContext {
            id: "t".into(),
            input: Value::from(input),
            deadline: Instant::now() + Duration::from_secs(10),
            cancel: CancellationToken::new(),
            attempt: 1,
            output: Default::default(),
        }
    }

    fn bank(pins: &[(&str, &Mock)]) -> PinBank {
        pins.iter()
            .map(|(n, m)| (n.to_string(), Box::new((*m).clone()) as Box<dyn Line>))
            .collect()
    }

    #[tokio::test]
    async fn read_write_pulse_drive_the_pins() {
        let mut led = Mock::new(&[
            T::set(State::High),
            T::set(State::Low),
            T::set(State::High),
            T::set(State::Low),
        ]);
        let mut button = Mock::new(&[T::get(State::High), T::get(State::Low)]);
        let g = Gpio::with_bank(bank(&[("led", &led), ("button", &button)]), false);
        let r = g
            .execute(ctx(
                serde_json::json!({"op": "write", "pin": "led", "value": true}),
            ))
            .await
            .unwrap();
        assert_eq!(r.get("high"), Some(&Value::Bool(true)));
        g.execute(ctx(
            serde_json::json!({"op": "write", "pin": "led", "value": "low"}),
        ))
        .await
        .unwrap();
        let r = g
            .execute(ctx(serde_json::json!({"op": "read", "pin": "button"})))
            .await
            .unwrap();
        assert_eq!(r.get("high"), Some(&Value::Bool(true)));
        let r = g
            .execute(ctx(serde_json::json!({"op": "read", "pin": "button"})))
            .await
            .unwrap();
        assert_eq!(r.get("high"), Some(&Value::Bool(false)));
        let t0 = Instant::now();
        g.execute(ctx(
            serde_json::json!({"op": "pulse", "pin": "led", "pulse_ms": 30}),
        ))
        .await
        .unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(30));
        drop(g);
        led.done();
        button.done();
    }

    #[tokio::test]
    async fn a_cancelled_pulse_ends_low_at_once() {
        let mut led = Mock::new(&[T::set(State::High), T::set(State::Low)]);
        let g = Gpio::with_bank(bank(&[("led", &led)]), false);
        let c = ctx(serde_json::json!({"op": "pulse", "pin": "led", "pulse_ms": 60000}));
        let cancel = c.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel.cancel();
        });
        let t0 = Instant::now();
        let e = g.execute(c).await.unwrap_err();
        assert_eq!(e, PluginError::Cancelled("gpio".into()));
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(g);
        led.done();
    }

    #[tokio::test]
    async fn bad_input_names_plugin_and_field() {
        let mut led =
            Mock::new(&[T::set(State::High).with_error(MockError::Io(std::io::ErrorKind::Other))]);
        let g = Gpio::with_bank(bank(&[("led", &led)]), false);
        for (input, needle) in [
            (
                serde_json::json!({"op": "read", "pin": "lamp"}),
                "known: led",
            ),
            (serde_json::json!({"op": "read", "pin": 3}), "`pin`"),
            (
                serde_json::json!({"op": "write", "pin": "led", "value": "on"}),
                "`value`",
            ),
            (serde_json::json!({"op": "write", "pin": "led"}), "`value`"),
            (
                serde_json::json!({"op": "pulse", "pin": "led", "pulse_ms": 0}),
                "`pulse_ms`",
            ),
            (
                serde_json::json!({"op": "pulse", "pin": "led", "pulse_ms": 60001}),
                "`pulse_ms`",
            ),
            (
                serde_json::json!({"op": "pulse", "pin": "led", "pulse_ms": "5"}),
                "`pulse_ms`",
            ),
            (serde_json::json!({"op": "blink", "pin": "led"}), "`op`"),
            (serde_json::json!("read"), "`input`"),
            // The bus error: the mock's set_high fails.
            (
                serde_json::json!({"op": "write", "pin": "led", "value": 1}),
                "`pin` `led`",
            ),
        ] {
            let e = g.execute(ctx(input.clone())).await.unwrap_err().to_string();
            assert!(e.contains("`gpio`") && e.contains(needle), "{input}: {e}");
        }
        drop(g);
        led.done();
    }

    #[test]
    fn sim_board_needs_simulate() {
        let board = Board::load("sim").unwrap();
        let e = Gpio::from_config(&toml::Table::new(), &board)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`gpio`") && e.contains("simulate = true"), "{e}");
        let cfg: toml::Table = toml::from_str("simulate = true").unwrap();
        let g = Gpio::from_config(&cfg, &board).unwrap();
        assert!(g.capabilities().contains(&"gpio:led".to_string()));
    }
}
