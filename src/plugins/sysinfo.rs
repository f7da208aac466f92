//! `sysinfo`: CPU, memory, load, temperature and disk of the device, read
//! straight from `/proc`, `/sys` and `statvfs` (no extra crate, works the same
//! on ARM). The readers are public because heartbeats use them too.

use super::schema::{Kind, Schema};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::boards::Board;
use crate::protocol::Value;
use async_trait::async_trait;
use std::time::Duration;

/// Memory figures from `/proc/meminfo`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Memory {
    pub total_kb: u64,
    pub available_kb: u64,
}

/// Reads `/proc/meminfo`.
pub fn memory() -> Memory {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        total_kb: field("MemTotal:"),
        available_kb: field("MemAvailable:"),
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> [f32; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|s| s.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// Resident memory of this process, KiB.
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Temperature in °C from a thermal-zone file (millidegrees), if readable.
pub fn temperature(zone: Option<&str>) -> Option<f32> {
    let text = std::fs::read_to_string(zone?).ok()?;
    let milli: f32 = text.trim().parse().ok()?;
    Some(milli / 1000.0)
}

/// Total and free bytes of the file system holding `path`.
pub fn disk(path: &str) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `s` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

/// Aggregate CPU (busy, total) jiffies from `/proc/stat`.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU use in percent over `window`.
pub async fn cpu_percent(window: Duration) -> Option<f32> {
    let (b0, t0) = cpu_jiffies()?;
    tokio::time::sleep(window).await;
    let (b1, t1) = cpu_jiffies()?;
    let dt = t1.saturating_sub(t0);
    (dt > 0).then(|| (b1.saturating_sub(b0)) as f32 * 100.0 / dt as f32)
}

/// The sysinfo plugin.
#[derive(Debug)]
pub struct SysInfo {
    thermal_zone: Option<String>,
    disk_path: String,
}

impl SysInfo {
    /// Config keys: `disk_path` (default `/`).
    pub fn from_config(config: &toml::Table, board: &Board) -> Result<SysInfo, PluginError> {
        check_keys("sysinfo", config, &["disk_path"])?;
        let disk_path = match config.get("disk_path") {
            None => "/".to_string(),
            Some(toml::Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(PluginError::Config {
                    plugin: "sysinfo".into(),
                    key: "disk_path".into(),
                    message: format!("expected a string, found {v}"),
                })
            }
        };
        Ok(SysInfo {
            thermal_zone: board.thermal_zone.clone(),
            disk_path,
        })
    }
}

#[async_trait]
impl Plugin for SysInfo {
    fn name(&self) -> &'static str {
        "sysinfo"
    }

    fn description(&self) -> String {
        "The device's CPU count and usage, memory, load, temperature and disk, read from /proc and /sys.".into()
    }

    fn input_schema(&self) -> Schema {
        Schema {
            additional: false,
            ..Schema::of(&[Kind::Null, Kind::Object]).desc("nothing, or an empty object")
        }
    }

    fn concurrency(&self) -> usize {
        // Each task samples the CPU for 100 ms; two is plenty.
        2
    }

    fn validate(&self) -> Result<(), PluginError> {
        if disk(&self.disk_path).is_none() {
            return Err(PluginError::Config {
                plugin: "sysinfo".into(),
                key: "disk_path".into(),
                message: format!("`{}` is not a readable file system path", self.disk_path),
            });
        }
        Ok(())
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        if !matches!(task.input, Value::Null | Value::Map(_)) {
            return Err(PluginError::InvalidInput {
                plugin: "sysinfo".into(),
                field: "input".into(),
                message: "expected nothing or an empty object".into(),
            });
        }
        let cpu = cpu_percent(Duration::from_millis(100)).await;
        let mem = memory();
        let [l1, l5, l15] = load_average();
        let (disk_total, disk_free) = disk(&self.disk_path).unwrap_or((0, 0));
        let f = |x: f32| Value::Float((x as f64 * 100.0).round() / 100.0);
        Ok(Value::Map(vec![
            ("cpu_percent".into(), cpu.map(f).unwrap_or(Value::Null)),
            (
                "cpus".into(),
                Value::Int(std::thread::available_parallelism().map_or(1, |n| n.get()) as i64),
            ),
            ("mem_total_kb".into(), Value::Int(mem.total_kb as i64)),
            (
                "mem_available_kb".into(),
                Value::Int(mem.available_kb as i64),
            ),
            ("load".into(), Value::List(vec![f(l1), f(l5), f(l15)])),
            (
                "temperature_c".into(),
                temperature(self.thermal_zone.as_deref())
                    .map(f)
                    .unwrap_or(Value::Null),
            ),
            ("disk_path".into(), Value::Str(self.disk_path.clone())),
            ("disk_total_bytes".into(), Value::Int(disk_total as i64)),
            ("disk_free_bytes".into(), Value::Int(disk_free as i64)),
            ("agent_rss_kb".into(), Value::Int(rss_kb() as i64)),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_real_proc() {
        let m = memory();
        assert!(m.total_kb > 0 && m.available_kb <= m.total_kb);
        assert!(rss_kb() > 0);
        let (total, free) = disk("/").unwrap();
        assert!(total > 0 && free <= total);
        assert!(disk("/no/such/path").is_none());
        assert_eq!(temperature(Some("/no/such/zone")), None);
    }
}
