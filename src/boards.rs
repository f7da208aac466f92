//! Board profiles: what a device is (target, CPU, buses, pins, sensors,
//! models) and what it may do (limits). Built-in profiles are embedded in the
//! binary so one file is all a device needs; a path loads a custom one.

use crate::config::{self, ConfigError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Largest agent queue; the agent's inbox is a fixed-capacity `heapless` deque.
pub const MAX_QUEUE_CAPACITY: u32 = 256;

/// Built-in profiles: (name, TOML text).
pub const BUILTIN: &[(&str, &str)] = &[
    ("sim", include_str!("../boards/sim.toml")),
    ("rpi5", include_str!("../boards/rpi5.toml")),
    ("rpi4", include_str!("../boards/rpi4.toml")),
    ("rpi3", include_str!("../boards/rpi3.toml")),
    ("zero2w", include_str!("../boards/zero2w.toml")),
    (
        "generic-aarch64",
        include_str!("../boards/generic-aarch64.toml"),
    ),
    ("pc", include_str!("../boards/pc.toml")),
    ("gpu-cuda", include_str!("../boards/gpu-cuda.toml")),
];

/// What a board is for: the scheduler's route classes (`class:edge`,
/// `class:heavy` in the agent's capabilities).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BoardClass {
    /// A small board at the edge: plugins, sensors, small ONNX models.
    #[default]
    Edge,
    /// A PC or GPU box: language models (`llm`), heavy computation.
    Heavy,
}

/// A board profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Board {
    pub name: String,
    pub description: String,
    /// Rust target triple the agent is built for.
    pub target: String,
    /// CPU to tune for (`-C target-cpu`).
    pub cpu: String,
    /// Where the SoC temperature is read (millidegrees Celsius), if any.
    #[serde(default)]
    pub thermal_zone: Option<String>,
    /// GPIO character device, if the board has one.
    #[serde(default)]
    pub gpio_chip: Option<String>,
    /// I2C bus device, if any.
    #[serde(default)]
    pub i2c_bus: Option<String>,
    /// Pin names to GPIO line offsets.
    #[serde(default)]
    pub pins: BTreeMap<String, u32>,
    /// Attached sensors.
    #[serde(default)]
    pub sensors: Vec<Sensor>,
    /// Models this board carries: ONNX names in `models/`, GGUF names in
    /// `models/llm/` (heavy boards).
    #[serde(default)]
    pub models: Vec<String>,
    /// Edge board or heavy node.
    #[serde(default)]
    pub class: BoardClass,
    /// GPU memory for placing models (0: none).
    #[serde(default)]
    pub vram_bytes: u64,
    pub limits: Limits,
}

/// An attached sensor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sensor {
    pub name: String,
    /// Driver, e.g. `bme280` or `sht3x`.
    pub kind: String,
    /// I2C address.
    pub address: u8,
}

/// What the board may take on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Tasks run at once.
    pub max_concurrency: u32,
    /// Tasks accepted and waiting beyond those running.
    pub queue_capacity: u32,
    /// Bytes of loaded models kept in memory.
    pub model_cache_bytes: u64,
}

impl Board {
    /// Loads a built-in profile by name, or a profile file by path.
    pub fn load(name_or_path: &str) -> Result<Board, ConfigError> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            let file = format!("boards/{name}.toml (built in)");
            return Self::parse(text, Path::new(&file));
        }
        let path = Path::new(name_or_path);
        if path.exists() || name_or_path.contains('/') || name_or_path.ends_with(".toml") {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                file: path.to_path_buf(),
                source,
            })?;
            return Self::parse(&text, path);
        }
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        Err(ConfigError::UnknownBoard(
            name_or_path.to_string(),
            names.join(", "),
        ))
    }

    /// Parses and validates a profile; errors name `file` and the key.
    pub fn parse(text: &str, file: &Path) -> Result<Board, ConfigError> {
        let table = config::parse_table(text, file)?;
        let board: Board = config::deserialize(table, file)?;
        board.validate(file)?;
        Ok(board)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_concurrency == 0 || l.max_concurrency > 64 {
            return Err(ConfigError::invalid(
                file,
                "limits.max_concurrency",
                format!("{} is out of range 1..=64", l.max_concurrency),
            ));
        }
        if l.queue_capacity > MAX_QUEUE_CAPACITY {
            return Err(ConfigError::invalid(
                file,
                "limits.queue_capacity",
                format!("{} exceeds {MAX_QUEUE_CAPACITY}", l.queue_capacity),
            ));
        }
        if self.name.is_empty() {
            return Err(ConfigError::invalid(file, "name", "must not be empty"));
        }
        let mut seen = BTreeMap::new();
        for (pin, line) in &self.pins {
            if let Some(other) = seen.insert(*line, pin) {
                return Err(ConfigError::invalid(
                    file,
                    &format!("pins.{pin}"),
                    format!("line {line} is already used by pin `{other}`"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_parses() {
        for (name, _) in BUILTIN {
            let b = Board::load(name).unwrap();
            assert_eq!(&b.name, name);
        }
    }

    #[test]
    fn bad_profiles_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        let good = BUILTIN[0].1;
        std::fs::write(
            &f,
            good.replace("max_concurrency = 4", "max_concurrency = 0"),
        )
        .unwrap();
        let e = Board::load(f.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            e.contains("bad.toml") && e.contains("limits.max_concurrency"),
            "{e}"
        );
        std::fs::write(&f, format!("{good}\nturbo = true\n")).unwrap();
        let e = Board::load(f.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("turbo"), "{e}");
        let e = Board::load("no-such-board").unwrap_err().to_string();
        assert!(e.contains("rpi4"), "{e}");
    }
}
