//! `openclaw-admin agent run|show|approve|deny|cancel` and `tools`: agent
//! runs from the terminal, their steps printed as the server stores them
//! (its `events` stream, read as it comes).

use super::{AdminError, Client};
use serde_json::{json, Value};
use std::io::{BufRead, Write};

/// What `agent run` asks for (the body of `POST /v1/agent/runs`); also
/// the command's arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunOptions {
    /// What the run is to find out or do.
    pub goal: String,
    /// A model a heavy node serves.
    #[arg(long)]
    pub model: String,
    /// Plugins the model may call, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tools: Vec<String>,
    /// Only this device's plugins.
    #[arg(long)]
    pub target: Option<String>,
    /// Only plugins of devices with this capability.
    #[arg(long)]
    pub capability: Option<String>,
    /// Plugins whose world-changing calls need no approval.
    #[arg(long, value_delimiter = ',')]
    pub allow: Vec<String>,
    #[arg(long)]
    pub max_steps: Option<u32>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// `auto` or `required` (the first reply must be a call).
    #[arg(long)]
    pub tool_choice: Option<String>,
}

impl RunOptions {
    fn body(&self) -> Value {
        let mut b = json!({"goal": self.goal, "model": self.model, "tools": self.tools,
                           "allow": self.allow});
        let mut opt = |k: &str, v: Value| {
            if !v.is_null() {
                b[k] = v;
            }
        };
        opt("target", json!(self.target));
        opt("capability", json!(self.capability));
        opt("max_steps", json!(self.max_steps));
        opt("max_tokens", json!(self.max_tokens));
        opt("timeout_ms", json!(self.timeout_ms));
        opt("tool_choice", json!(self.tool_choice));
        b
    }
}

impl Client {
    /// `GET /v1/tools`.
    pub fn tools(&self) -> Result<Value, AdminError> {
        let url = format!("{}/v1/tools", self.base);
        self.answer(&url, self.get(&url).call())
    }

    /// `POST /v1/agent/runs`: the new run's id.
    pub fn agent_start(&self, o: &RunOptions) -> Result<String, AdminError> {
        let url = format!("{}/v1/agent/runs", self.base);
        let v: Value = self.answer(&url, self.post(&url).send_json(o.body()))?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AdminError::BadAnswer {
                url,
                message: "no `id` in the answer".into(),
            })
    }

    /// `GET /v1/agent/runs/{id}[?wait_ms=N]`.
    pub fn agent_get(&self, id: &str, wait_ms: Option<u64>) -> Result<Value, AdminError> {
        let url = match wait_ms {
            Some(w) => format!("{}/v1/agent/runs/{id}?wait_ms={w}", self.base),
            None => format!("{}/v1/agent/runs/{id}", self.base),
        };
        self.answer(&url, self.get(&url).call())
    }

    /// Approves or denies the call run `id` waits on, naming the approval
    /// step seen (`?approval=N`), after writing that call to `out`: what is
    /// decided is what was shown, never a call that came to wait since.
    pub fn agent_decide_seen(
        &self,
        id: &str,
        approve: bool,
        out: &mut dyn Write,
    ) -> Result<Value, AdminError> {
        let v = self.agent_get(id, None)?;
        let pending = v["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .find(|s| s["kind"] == "approval" && s["decision"] == "pending")
            .filter(|_| v["state"] == "awaiting_approval")
            .ok_or_else(|| {
                AdminError::Invalid(format!(
                    "agent run {id} is {}, not awaiting_approval",
                    v["state"].as_str().unwrap_or("?")
                ))
            })?;
        let n = pending["n"].as_u64().unwrap_or_default();
        let _ = writeln!(
            out,
            "{} the call of run {id} (approval step {n}): {}",
            if approve { "approving" } else { "denying" },
            serde_json::to_string_pretty(&pending["call"]).unwrap_or_default()
        );
        let action = if approve { "approve" } else { "deny" };
        let url = format!("{}/v1/agent/runs/{id}/{action}?approval={n}", self.base);
        self.answer(&url, self.post(&url).send_empty())
    }

    /// `POST /v1/agent/runs/{id}/{approve|deny|cancel}`.
    pub fn agent_act(&self, id: &str, action: &str) -> Result<Value, AdminError> {
        let url = format!("{}/v1/agent/runs/{id}/{action}", self.base);
        self.answer(&url, self.post(&url).send_empty())
    }

    /// Follows a run's events to its end, printing each step to `out`;
    /// the run as it ended. A stream cut (the client's 330 s limit on one
    /// request, a proxy) is opened again; steps already printed are not
    /// printed twice.
    pub fn agent_follow(&self, id: &str, out: &mut dyn Write) -> Result<Value, AdminError> {
        let mut printed = std::collections::HashSet::new();
        let mut cuts = 0;
        loop {
            match self.follow_once(id, out, &mut printed) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => return self.agent_get(id, None),
                Err(AdminError::BadAnswer { .. }) if cuts < 100 => {
                    cuts += 1;
                    let v = self.agent_get(id, None)?;
                    if v["state"] != "running" && v["state"] != "awaiting_approval" {
                        return Ok(v);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn follow_once(
        &self,
        id: &str,
        out: &mut dyn Write,
        printed: &mut std::collections::HashSet<String>,
    ) -> Result<Option<Value>, AdminError> {
        let url = format!("{}/v1/agent/runs/{id}/events", self.base);
        self.read_events(&url, &mut |event, v| {
            match event {
                "step" => {
                    if let Some(l) = step_line(&v) {
                        if printed.insert(l.clone()) {
                            let _ = writeln!(out, "{l}");
                        }
                    }
                }
                "state" if v["state"] == "awaiting_approval" => {
                    let _ = writeln!(
                        out,
                        "    waiting for approval: `openclaw-admin agent approve {id}` or `deny {id}`"
                    );
                }
                "end" => return Some(v),
                _ => {}
            }
            let _ = out.flush();
            None
        })
    }

    /// Reads the server-sent events at `url`, handing each (name, data) to
    /// `on` until it returns a value; `None` when the stream ended first.
    pub(crate) fn read_events(
        &self,
        url: &str,
        on: &mut dyn FnMut(&str, Value) -> Option<Value>,
    ) -> Result<Option<Value>, AdminError> {
        let mut resp = self.get(url).call().map_err(|e| AdminError::Unreachable {
            url: url.to_string(),
            message: e.to_string(),
        })?;
        let bad = |m: String| AdminError::BadAnswer {
            url: url.to_string(),
            message: m,
        };
        let status = resp.status().as_u16();
        if status >= 400 {
            let text = resp
                .body_mut()
                .read_to_string()
                .map_err(|e| bad(e.to_string()))?;
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(AdminError::Api { status, message });
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut event = String::new();
        for line in reader.lines() {
            let line = line.map_err(|e| bad(format!("the stream broke: {e}")))?;
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
                continue;
            }
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let v: Value = serde_json::from_str(data).map_err(|e| bad(e.to_string()))?;
            if let Some(end) = on(&event, v) {
                return Ok(Some(end));
            }
        }
        // The stream ended without `end` (the server stopping).
        Ok(None)
    }
}

pub(crate) fn short(v: &Value, max: usize) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    if s.chars().count() > max {
        let t: String = s.chars().take(max).collect();
        format!("{t}...")
    } else {
        s
    }
}

/// One line for a step, or None for a step that is not done yet.
pub fn step_line(s: &Value) -> Option<String> {
    let n = s["n"].as_u64().unwrap_or(0);
    match s["kind"].as_str()? {
        "llm" => {
            let out = s.get("output").filter(|o| !o.is_null())?;
            let mut l = format!("[{n}] model: {}", short(out, 400));
            if let Some(e) = s["error"].as_str() {
                l.push_str(&format!("\n    refused: {e}"));
            }
            Some(l)
        }
        "tool_call" => {
            let task = s["task_id"].as_str()?;
            Some(format!(
                "[{n}] call {} on {}: {} (task {task})",
                // The plugin: the tool's name repeats the device.
                s["plugin"].as_str().or(s["tool"].as_str()).unwrap_or("?"),
                s["device"].as_str().unwrap_or("?"),
                short(&s["arguments"], 300)
            ))
        }
        "tool_result" => Some(match s["error"].as_str() {
            Some(e) => format!("[{n}] {} failed: {e}", s["tool"].as_str().unwrap_or("?")),
            None => format!(
                "[{n}] result of {}: {}",
                s["tool"].as_str().unwrap_or("?"),
                short(&s["result"], 400)
            ),
        }),
        "approval" => Some(format!(
            "[{n}] approval for {} on {} {}: {}",
            s["call"]["plugin"]
                .as_str()
                .or(s["call"]["tool"].as_str())
                .unwrap_or("?"),
            s["call"]["device"].as_str().unwrap_or("?"),
            short(&s["call"]["arguments"], 200),
            s["decision"].as_str().unwrap_or("?")
        )),
        _ => None,
    }
}
