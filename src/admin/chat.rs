//! `openclaw-admin chat` and `models list`: the server's OpenAI-compatible
//! gateway from the terminal (server-sent events read as they come).

use super::{AdminError, Client};
use serde_json::{json, Value};
use std::io::BufRead;
use std::time::{Duration, Instant};

/// One chat request.
#[derive(Debug, Clone, Default)]
pub struct ChatOptions {
    pub model: String,
    pub prompt: String,
    pub system: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

/// What a streamed chat gave.
#[derive(Debug, Clone)]
pub struct ChatSummary {
    pub text: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// From sending the request to the first piece of text.
    pub first_piece: Option<Duration>,
    pub total: Duration,
    /// The server's task for it (`openclaw-task` header).
    pub task: Option<String>,
}

/// A model the gateway serves and the nodes that serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedModel {
    pub name: String,
    pub nodes: Vec<String>,
}

/// The message of an OpenAI-shaped error body, or the body itself.
fn oai_message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.to_string())
}

impl Client {
    /// `GET /v1/models`.
    pub fn llm_models(&self) -> Result<Vec<ServedModel>, AdminError> {
        let url = format!("{}/v1/models", self.base);
        let v: Value = self.answer(&url, self.get(&url).call())?;
        let bad = |m: &str| AdminError::BadAnswer {
            url: url.clone(),
            message: m.to_string(),
        };
        let data = v["data"].as_array().ok_or_else(|| bad("no `data` list"))?;
        Ok(data
            .iter()
            .map(|m| ServedModel {
                name: m["id"].as_str().unwrap_or_default().to_string(),
                nodes: m["nodes"]
                    .as_array()
                    .map(|n| {
                        n.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// `POST /v1/chat/completions` with `stream: true`: each piece of text
    /// goes to `on_piece` as the server sends it.
    pub fn chat_stream(
        &self,
        o: &ChatOptions,
        mut on_piece: impl FnMut(&str),
    ) -> Result<ChatSummary, AdminError> {
        let url = format!("{}/v1/chat/completions", self.base);
        let mut messages = Vec::new();
        if let Some(s) = &o.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": o.prompt}));
        let mut body = json!({"model": o.model, "messages": messages, "stream": true,
                              "stream_options": {"include_usage": true}});
        if let Some(n) = o.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = o.temperature {
            body["temperature"] = json!(t);
        }
        let start = Instant::now();
        let mut resp = self
            .post(&url)
            .send_json(&body)
            .map_err(|e| AdminError::Unreachable {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        let task = resp
            .headers()
            .get("openclaw-task")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bad = |m: String| AdminError::BadAnswer {
            url: url.clone(),
            message: m,
        };
        if status >= 400 {
            let text = resp
                .body_mut()
                .read_to_string()
                .map_err(|e| bad(e.to_string()))?;
            return Err(AdminError::Api {
                status,
                message: oai_message(&text),
            });
        }
        let mut s = ChatSummary {
            text: String::new(),
            finish_reason: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            first_piece: None,
            total: Duration::ZERO,
            task,
        };
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| bad(format!("the stream broke: {e}")))?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                s.total = start.elapsed();
                return Ok(s);
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| bad(format!("an event is not JSON ({e}): {data}")))?;
            if v.get("error").is_some() {
                return Err(AdminError::Api {
                    status: 200,
                    message: oai_message(data),
                });
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                s.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                s.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
            }
            for c in v["choices"].as_array().into_iter().flatten() {
                if let Some(t) = c["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
                    s.first_piece.get_or_insert_with(|| start.elapsed());
                    s.text.push_str(t);
                    on_piece(t);
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    s.finish_reason = Some(f.to_string());
                }
            }
        }
        Err(bad("the stream ended without [DONE]".into()))
    }
}
