//! Arbitrary bytes as a user's agent and server config file: loading never
//! panics; an error names the file (and, for a bad value, the key); an agent
//! config that loads also builds its board and plugins without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw::agent::{config::AgentConfig, Agent};
use openclaw::config::ConfigError;
use openclaw::server::config::ServerConfig;

fn check(e: &ConfigError, file: &std::path::Path) {
    let msg = e.to_string();
    match e {
        ConfigError::Invalid { key, .. } => {
            assert!(!key.is_empty(), "no key named: {msg}");
            assert!(msg.contains(&file.display().to_string()), "{msg}");
        }
        ConfigError::Syntax { .. } | ConfigError::Io { .. } => {
            assert!(msg.contains(&file.display().to_string()), "{msg}");
        }
        ConfigError::UnknownBoard(..) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fuzz.toml");
    std::fs::write(&file, data).unwrap();
    match AgentConfig::load(Some(&file), toml::Table::new()) {
        Ok(mut cfg) => {
            // Keep whatever the input names away from real paths.
            cfg.data_dir = dir.path().join("data");
            let _ = Agent::new(cfg);
        }
        Err(e) => check(&e, &file),
    }
    match ServerConfig::load(Some(&file), toml::Table::new()) {
        Ok(cfg) => {
            let _ = cfg.broker_addr();
        }
        Err(e) => check(&e, &file),
    }
});
