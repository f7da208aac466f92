//! `openclaw-admin workflow run|show|list|cancel|approve|deny`: workflow runs from the
//! terminal, each step's progress printed as the server stores it (the
//! run's `events` stream), then the output.

use super::{AdminError, Client};
use serde_json::{json, Map, Value};
use std::io::Write;

/// `KEY=VALUE` of `--input`: the value as JSON when it parses as JSON
/// (`3`, `true`, `{"a":1}`), else as a string.
pub fn parse_input(kv: &str) -> Result<(String, Value), AdminError> {
    parse_input_for(kv, &Map::new())
}

/// [`parse_input`] for a workflow that declares `declared` (its `[inputs]`
/// with their defaults): an input whose default is a string stays a
/// string, so `--input device=123` names device `123`, not the number.
pub fn parse_input_for(
    kv: &str,
    declared: &Map<String, Value>,
) -> Result<(String, Value), AdminError> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| AdminError::Invalid(format!("--input {kv:?}: expected KEY=VALUE")))?;
    if k.is_empty() {
        return Err(AdminError::Invalid(format!(
            "--input {kv:?}: the key is empty"
        )));
    }
    let v = match declared.get(k) {
        // A quoted value (`device="pi-1"`, as one writes a JSON string) is
        // that string, not one with quotes in it.
        Some(Value::String(_)) => {
            Value::String(serde_json::from_str::<String>(v).unwrap_or_else(|_| v.to_string()))
        }
        _ => serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string())),
    };
    Ok((k.to_string(), v))
}

/// The `[inputs]` table of a workflow file's TOML text, as JSON (empty
/// when the text does not parse: the server names what is wrong with it).
pub fn declared_inputs(toml_text: &str) -> Map<String, Value> {
    toml::from_str::<toml::Table>(toml_text)
        .ok()
        .and_then(|t| t.get("inputs").cloned())
        .and_then(|i| serde_json::to_value(i).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default()
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
        let mut url = format!("{}/v1/workflows/runs/{}/{verb}", self.base, escape(id));
        if let Some(s) = step {
            url.push_str(&format!("?step={}", escape(s)));
        }
        self.answer(&url, self.post(&url).send_empty())
    }

    /// Approves or denies the step awaiting approval that the operator
    /// names, or the only one; the step's id and the call it makes (printed
    /// in full before the decision, so what is approved is what was seen).
    pub fn workflow_decide_seen(
        &self,
        id: &str,
        step: Option<&str>,
        approve: bool,
        out: &mut dyn Write,
    ) -> Result<Value, AdminError> {
        let v = self.workflow_get(id, None)?;
        let waiting: Vec<&Value> = v["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["state"] == "awaiting_approval")
            .collect();
        let chosen = match step {
            Some(want) => waiting
                .iter()
                .find(|s| s["id"] == want)
                .copied()
                .ok_or_else(|| {
                    AdminError::Invalid(format!(
                        "workflow run {id}: step `{want}` does not await approval"
                    ))
                })?,
            None => match waiting.as_slice() {
                [one] => *one,
                [] => {
                    return Err(AdminError::Invalid(format!(
                        "workflow run {id}: no step awaits approval"
                    )))
                }
                many => {
                    let ids: Vec<&str> = many.iter().filter_map(|s| s["id"].as_str()).collect();
                    return Err(AdminError::Invalid(format!(
                        "workflow run {id}: steps {} await approval; name one with --step",
                        ids.join(", ")
                    )));
                }
            },
        };
        let sid = chosen["id"].as_str().unwrap_or_default().to_string();
        let _ = writeln!(
            out,
            "{} step `{sid}` of run {id}: {}",
            if approve { "approving" } else { "denying" },
            serde_json::to_string_pretty(&chosen["proposed"]).unwrap_or_default()
        );
        self.workflow_decide(id, Some(&sid), approve)
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
                    if let Some(l) = step_line(&v, id) {
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
/// `[cpu] succeeded on pi-1: {...}`, `[sum] failed: ...`, `[x] skipped`;
/// a step awaiting approval shows its whole call (never shortened: it is
/// what the operator approves) and the command that approves it.
pub fn step_line(s: &Value, run: &str) -> Option<String> {
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
            "[{id}] awaiting approval (openclaw-admin workflow approve {run} --step {id}): {}",
            s["proposed"]
        ),
        other => format!("[{id}] {other}"),
    })
}

/// A path segment or query value, percent-encoded (ids are plain, but a
/// typo must not change the URL's meaning).
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_escaped_in_urls_and_calls_shown_whole() {
        assert_eq!(escape("wf-1_a.b"), "wf-1_a.b");
        assert_eq!(escape("a/../b?c=d"), "a%2F..%2Fb%3Fc%3Dd");
        let script = "x".repeat(5000);
        let s = json!({"id": "fix", "state": "awaiting_approval",
                       "proposed": {"plugin": "exec", "input": {"stdin": script}}});
        let l = step_line(&s, "wf-9").unwrap();
        assert!(
            l.contains(&script) && l.contains("approve wf-9 --step fix"),
            "{l}"
        );
    }

    #[test]
    fn inputs_are_json_when_they_parse() {
        assert_eq!(parse_input("n=3").unwrap(), ("n".into(), json!(3)));
        assert_eq!(parse_input("d=pi-1").unwrap(), ("d".into(), json!("pi-1")));
        assert_eq!(parse_input("e=").unwrap(), ("e".into(), json!("")));
        assert!(parse_input("nokey").is_err());
    }

    #[test]
    fn an_input_declared_with_a_text_default_stays_text() {
        let declared =
            declared_inputs("[inputs]\ndevice = \"pi-1\"\nn = 2\n[[steps]]\nid = \"a\"\n");
        assert_eq!(
            parse_input_for("device=\"pi-1\"", &declared).unwrap(),
            ("device".into(), json!("pi-1"))
        );
        assert_eq!(
            parse_input_for("device=123", &declared).unwrap(),
            ("device".into(), json!("123"))
        );
        assert_eq!(
            parse_input_for("n=3", &declared).unwrap(),
            ("n".into(), json!(3))
        );
        assert_eq!(
            parse_input_for("other=true", &declared).unwrap(),
            ("other".into(), json!(true))
        );
        assert!(declared_inputs("not toml [").is_empty());
    }
}
