//! `openclaw-admin workflow run|show|list|cancel|approve|deny`: workflow runs from the
//! terminal, each step's progress printed as the server stores it (the
//! run's `events` stream), then the output.

use super::{AdminError, Client};
use serde_json::{json, Map, Value};
use std::io::Write;

/// `KEY=VALUE` of `--input`: the value as JSON when it parses as JSON
/// (`3`, `true`, `{"a":1}`), else as a string.
pub fn parse_input(kv: &str) -> Result<(String, Value), AdminError> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| AdminError::Invalid(format!("--input {kv:?}: expected KEY=VALUE")))?;
    if k.is_empty() {
        return Err(AdminError::Invalid(format!(
            "--input {kv:?}: the key is empty"
        )));
    }
    let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.to_string(), v))
}

impl Client {
    /// `POST /v1/workflows/runs` with the file's TOML text: the run's id.
    pub fn workflow_start(
        &self,
        toml: &str,
        inputs: &Map<String, Value>,
    ) -> Result<String, AdminError> {
        let url = format!("{}/v1/workflows/runs", self.base);
        let body = json!({"workflow": toml, "inputs": inputs});
        let v: Value = self.answer(&url, self.post(&url).send_json(body))?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AdminError::BadAnswer {
                url,
                message: "no `id` in the answer".into(),
            })
    }

    /// `GET /v1/workflows/runs/{id}[?wait_ms=N]`.
    pub fn workflow_get(&self, id: &str, wait_ms: Option<u64>) -> Result<Value, AdminError> {
        let url = match wait_ms {
            Some(w) => format!("{}/v1/workflows/runs/{id}?wait_ms={w}", self.base),
            None => format!("{}/v1/workflows/runs/{id}", self.base),
        };
        self.answer(&url, self.get(&url).call())
    }

    /// `GET /v1/workflows/runs`.
    pub fn workflow_list(&self, limit: u32) -> Result<Value, AdminError> {
        let url = format!("{}/v1/workflows/runs?limit={limit}", self.base);
        self.answer(&url, self.get(&url).call())
    }

    /// `POST /v1/workflows/runs/{id}/cancel`.
    pub fn workflow_cancel(&self, id: &str) -> Result<Value, AdminError> {
        let url = format!("{}/v1/workflows/runs/{id}/cancel", self.base);
        self.answer(&url, self.post(&url).send_empty())
    }

    /// `POST /v1/workflows/runs/{id}/approve` (or `/deny`), naming the
    /// step when more than one awaits approval.
    pub fn workflow_decide(
        &self,
        id: &str,
        step: Option<&str>,
        approve: bool,
    ) -> Result<Value, AdminError> {
        let verb = if approve { "approve" } else { "deny" };
        let mut url = format!("{}/v1/workflows/runs/{id}/{verb}", self.base);
        if let Some(s) = step {
            url.push_str(&format!("?step={s}"));
        }
        self.answer(&url, self.post(&url).send_empty())
    }

    /// Follows a run to its end, printing each step's changes to `out`;
    /// the run as it ended. A cut stream is opened again (the first
    /// events repeat what is already printed, which is not printed twice).
    pub fn workflow_follow(&self, id: &str, out: &mut dyn Write) -> Result<Value, AdminError> {
        let mut printed = std::collections::HashSet::new();
        let url = format!("{}/v1/workflows/runs/{id}/events", self.base);
        let mut cuts = 0;
        loop {
            let got = self.read_events(&url, &mut |event, v| match event {
                "step" => {
                    if let Some(l) = step_line(&v) {
                        if printed.insert(l.clone()) {
                            let _ = writeln!(out, "{l}");
                            let _ = out.flush();
                        }
                    }
                    None
                }
                "end" => Some(v),
                _ => None,
            });
            match got {
                Ok(Some(v)) => return Ok(v),
                Ok(None) | Err(AdminError::BadAnswer { .. }) if cuts < 100 => {
                    cuts += 1;
                    let v = self.workflow_get(id, None)?;
                    if v["state"] != "running" {
                        return Ok(v);
                    }
                    // The server restarting: give it a moment.
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                Ok(None) => return self.workflow_get(id, None),
                Err(e) => return Err(e),
            }
        }
    }
}

/// One line for a step's state: `[cpu] running (task t-1)`,
/// `[cpu] succeeded on pi-1: {...}`, `[sum] failed: ...`, `[x] skipped`.
pub fn step_line(s: &Value) -> Option<String> {
    let id = s["id"].as_str()?;
    let state = s["state"].as_str()?;
    Some(match state {
        "waiting" => return None,
        "running" => match s["task_id"].as_str() {
            Some(t) => format!("[{id}] running (task {t})"),
            None => return None,
        },
        "succeeded" => format!(
            "[{id}] succeeded{}: {}",
            s["device"]
                .as_str()
                .map(|d| format!(" on {d}"))
                .unwrap_or_default(),
            super::agent::short(&s["output"], 400)
        ),
        "failed" | "cancelled" => format!("[{id}] {state}: {}", s["error"].as_str().unwrap_or("")),
        "awaiting_approval" => format!(
            "[{id}] awaiting approval (openclaw-admin workflow approve RUN --step {id}): {}",
            super::agent::short(&s["proposed"], 600)
        ),
        other => format!("[{id}] {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_json_when_they_parse() {
        assert_eq!(parse_input("n=3").unwrap(), ("n".into(), json!(3)));
        assert_eq!(parse_input("d=pi-1").unwrap(), ("d".into(), json!("pi-1")));
        assert_eq!(parse_input("e=").unwrap(), ("e".into(), json!("")));
        assert!(parse_input("nokey").is_err());
    }
}
