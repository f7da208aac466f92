//! The wire protocol shared by the agent and the server.
//!
//! Between agent and server every MQTT payload is a postcard-encoded
//! [`Envelope`] whose first field is [`PROTOCOL_VERSION`]; a peer that speaks
//! another version gets a clear [`ProtocolError::Version`] instead of garbage.
//! JSON is used only at the external boundary (HTTP and
//! [`topics::SUBMIT`]); the types for it live in [`api`].
//!
//! The topic layout is documented in `docs/protocol.md`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version carried by every envelope. Bump on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;

/// Default largest payload either side accepts or sends (1 MiB). The embedded
/// broker is configured with the same limit, so an oversized publish is
/// refused with an error at the sender instead of silently dropped.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Deepest nesting of lists and maps in a [`Value`] that decoding accepts
/// (`[[1]]` is 2). Deeper input is refused with [`ProtocolError::TooDeep`]
/// before it can exhaust the decoding thread's stack: postcard has no
/// recursion limit of its own, and a 100 KB publish of 50,000 nested lists
/// overflowed a 2 MiB tokio worker (a stack overflow aborts the process;
/// `catch_unwind` cannot stop it). serde_json stops at 128 levels too, so
/// every input a JSON submission can carry (at most 126 levels inside the
/// request object) fits; at this depth decoding uses about 300 KiB of
/// stack in a debug build, far less optimized
/// (`decode_stack_use_at_the_depth_limit`).
pub const MAX_VALUE_DEPTH: usize = 128;

/// The longest task id an agent accepts. The server's ids are UUIDs (36
/// bytes); the bound keeps what the agent's ledger of finished ids holds
/// per entry small (`agent.ledger_size` of them).
pub const MAX_TASK_ID_BYTES: usize = 128;

/// Errors decoding or encoding a wire payload.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("protocol version {got} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version { got: u16 },
    #[error("malformed payload: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("malformed payload: a value nests lists or maps deeper than {limit} levels")]
    TooDeep { limit: usize },
}

/// One message on the wire: a version and a body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope<T> {
    pub version: u16,
    pub body: T,
}

/// Encodes `body` in a versioned envelope.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Ref<'a, T> {
        version: u16,
        body: &'a T,
    }
    // Serializing our own types into a Vec cannot fail.
    postcard::to_stdvec(&Ref {
        version: PROTOCOL_VERSION,
        body,
    })
    .expect("postcard encoding of protocol types is infallible")
}

/// Decodes a versioned envelope, checking size and version first.
///
/// Bounded in what the payload can make it do: nesting is limited to
/// [`MAX_VALUE_DEPTH`], and no declared length allocates more than the
/// bytes that follow it can fill (see [`Value`]'s decoder; postcard checks
/// string and byte lengths against the input before it copies them).
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, ProtocolError> {
    if bytes.len() > limit {
        return Err(ProtocolError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let (version, rest): (u16, _) = postcard::take_from_bytes(bytes)?;
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { got: version });
    }
    let (body, rest) = from_bytes_limited(rest)?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(
            postcard::Error::DeserializeUnexpectedEnd,
        ));
    }
    Ok(body)
}

/// `postcard::take_from_bytes`, reporting a refused nesting depth as
/// [`ProtocolError::TooDeep`] (postcard's own error carries no message).
/// Every postcard decode of a type that holds a [`Value`] goes through
/// here (the agent's journal records too).
pub fn from_bytes_limited<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), ProtocolError> {
    depth::reset();
    match postcard::take_from_bytes(bytes) {
        Ok(r) => Ok(r),
        Err(_) if depth::exceeded() => Err(ProtocolError::TooDeep {
            limit: MAX_VALUE_DEPTH,
        }),
        Err(e) => Err(ProtocolError::Malformed(e)),
    }
}

/// The nesting depth of the [`Value`] being decoded on this thread. serde
/// gives a `Deserialize` impl no context, so the count lives here; a decode
/// is synchronous on one thread, and the guard undoes its step on every
/// exit (errors and unwinding included).
mod depth {
    use std::cell::Cell;

    thread_local! {
        static DEPTH: Cell<usize> = const { Cell::new(0) };
        static EXCEEDED: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn reset() {
        DEPTH.with(|d| d.set(0));
        EXCEEDED.with(|e| e.set(false));
    }

    pub(super) fn exceeded() -> bool {
        EXCEEDED.with(Cell::get)
    }

    /// One level of list or map, held while its elements decode.
    pub(super) struct Guard(());

    impl Guard {
        /// Enters a level; `None` (and the flag set) past the limit.
        pub(super) fn enter() -> Option<Guard> {
            let d = DEPTH.with(|d| {
                let n = d.get() + 1;
                d.set(n);
                n
            });
            if d > super::MAX_VALUE_DEPTH {
                DEPTH.with(|x| x.set(x.get() - 1));
                EXCEEDED.with(|e| e.set(true));
                return None;
            }
            Some(Guard(()))
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
}

/// Elements preallocated at most for a sequence whose length the input
/// declares: the rest grows as elements actually arrive. (serde's own cap
/// is 1 MiB per sequence, and nested sequences each got it: 66 KB of
/// nested `List`s, each declaring 40,000 elements, made decoding hold
/// 128 MiB before failing; `tests/wire_alloc.rs`.)
const PREALLOC: usize = 64;

/// A `Vec` decoded as a sequence without trusting its declared length.
fn capped_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(PREALLOC));
            while let Some(x) = seq.next_element()? {
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V(std::marker::PhantomData))
}

/// MQTT topic layout (version 1).
pub mod topics {
    /// Root of everything OpenClaw publishes.
    pub const ROOT: &str = "openclaw/v1";
    /// Cross-system entry: JSON [`super::api::SubmitRequest`]s.
    pub const SUBMIT: &str = "openclaw/v1/submit";
    /// The server subscribes to every device's results.
    pub const ALL_RESULTS: &str = "openclaw/v1/devices/+/results";
    /// The server subscribes to every device's (retained) status.
    pub const ALL_STATUS: &str = "openclaw/v1/devices/+/status";

    /// Server to agent: [`super::ToAgent`] messages.
    pub fn tasks(device: &str) -> String {
        format!("{ROOT}/devices/{device}/tasks")
    }
    /// Agent to server: [`super::FromAgent`] messages.
    pub fn results(device: &str) -> String {
        format!("{ROOT}/devices/{device}/results")
    }
    /// Agent to server, retained: [`super::DeviceStatus`]; the last will too.
    pub fn status(device: &str) -> String {
        format!("{ROOT}/devices/{device}/status")
    }

    /// Which device topic this is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Tasks,
        Results,
        Status,
    }

    /// Splits `openclaw/v1/devices/{id}/{kind}` into its id and kind.
    pub fn parse(topic: &str) -> Option<(&str, Kind)> {
        let rest = topic.strip_prefix(ROOT)?.strip_prefix("/devices/")?;
        let (id, kind) = rest.rsplit_once('/')?;
        if id.is_empty() || id.contains('/') {
            return None;
        }
        let kind = match kind {
            "tasks" => Kind::Tasks,
            "results" => Kind::Results,
            "status" => Kind::Status,
            _ => return None,
        };
        Some((id, kind))
    }

    /// A device id must be usable as one topic level.
    pub fn valid_device_id(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    }
}

/// A self-describing value that postcard can carry (postcard cannot encode
/// `serde_json::Value`, which needs `deserialize_any`). Converts to JSON
/// losslessly except that `Bytes` become an array of numbers. From JSON,
/// integers above `i64::MAX` become floats (rounded); the submit boundary
/// uses [`Value::try_from_json`], which refuses them instead.
///
/// Decoding refuses lists and maps nested deeper than [`MAX_VALUE_DEPTH`]
/// and preallocates little for a declared length (see [`decode`]).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Map(Vec<(String, Value)>),
}

/// `Value` as the derived decoder reads it (same variants, same order, so
/// the same wire format), with its sequences read by [`Level`].
#[derive(Deserialize)]
#[serde(rename = "Value")]
enum ValueRepr {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(#[serde(deserialize_with = "capped_vec")] Vec<u8>),
    List(Level<Value>),
    Map(Level<(String, Value)>),
}

/// The elements of one list or map: decoded under a [`depth::Guard`].
struct Level<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Level<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Some(_guard) = depth::Guard::enter() else {
            return Err(serde::de::Error::custom(format_args!(
                "value nested deeper than {MAX_VALUE_DEPTH} levels"
            )));
        };
        capped_vec(d).map(Level)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match ValueRepr::deserialize(d)? {
            ValueRepr::Null => Value::Null,
            ValueRepr::Bool(b) => Value::Bool(b),
            ValueRepr::Int(i) => Value::Int(i),
            ValueRepr::Float(f) => Value::Float(f),
            ValueRepr::Str(s) => Value::Str(s),
            ValueRepr::Bytes(b) => Value::Bytes(b),
            ValueRepr::List(Level(l)) => Value::List(l),
            ValueRepr::Map(Level(m)) => Value::Map(m),
        })
    }
}

impl Value {
    /// Looks a key up in a map value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// How deep lists and maps nest in it (a scalar is 0, `[[1]]` is 2),
    /// counted without recursion. A value deeper than [`MAX_VALUE_DEPTH`]
    /// encodes but does not decode: the agent checks a plugin's result
    /// with this before it sends it.
    pub fn depth(&self) -> usize {
        let mut deepest = 0;
        let mut stack: Vec<(&Value, usize)> = vec![(self, 0)];
        while let Some((v, d)) = stack.pop() {
            match v {
                Value::List(l) => {
                    deepest = deepest.max(d + 1);
                    stack.extend(l.iter().map(|x| (x, d + 1)));
                }
                Value::Map(m) => {
                    deepest = deepest.max(d + 1);
                    stack.extend(m.iter().map(|(_, x)| (x, d + 1)));
                }
                _ => {}
            }
        }
        deepest
    }
}

impl Value {
    /// Converts JSON exactly, or says where it cannot: an integer above
    /// `i64::MAX` has no exact form here. The error names the number and
    /// its path (`.a[2]`).
    pub fn try_from_json(v: &serde_json::Value) -> Result<Value, String> {
        fn walk(v: &serde_json::Value, path: &mut String) -> Result<Value, String> {
            Ok(match v {
                serde_json::Value::Number(n) if n.as_i64().is_none() && n.is_u64() => {
                    let at = if path.is_empty() {
                        "the top level"
                    } else {
                        path.as_str()
                    };
                    return Err(format!(
                        "integer {n} at {at} is out of range (-2^63 to 2^63-1); send it as a string"
                    ));
                }
                serde_json::Value::Array(a) => {
                    let mut out = Vec::with_capacity(a.len());
                    for (i, x) in a.iter().enumerate() {
                        let len = path.len();
                        path.push_str(&format!("[{i}]"));
                        out.push(walk(x, path)?);
                        path.truncate(len);
                    }
                    Value::List(out)
                }
                serde_json::Value::Object(o) => {
                    let mut out = Vec::with_capacity(o.len());
                    for (k, x) in o {
                        let len = path.len();
                        path.push('.');
                        path.push_str(k);
                        out.push((k.clone(), walk(x, path)?));
                        path.truncate(len);
                    }
                    Value::Map(out)
                }
                other => Value::from(other.clone()),
            })
        }
        walk(v, &mut String::new())
    }
}

impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s),
            serde_json::Value::Array(a) => Value::List(a.into_iter().map(Value::from).collect()),
            serde_json::Value::Object(o) => {
                Value::Map(o.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
            }
        }
    }
}

impl From<Value> for serde_json::Value {
    fn from(v: Value) -> Self {
        match v {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => b.into(),
            Value::Int(i) => i.into(),
            Value::Float(f) => serde_json::Number::from_f64(f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => s.into(),
            Value::Bytes(b) => b.into(),
            Value::List(l) => l.into_iter().map(serde_json::Value::from).collect(),
            Value::Map(m) => serde_json::Value::Object(
                m.into_iter()
                    .map(|(k, v)| (k, serde_json::Value::from(v)))
                    .collect(),
            ),
        }
    }
}

/// A task as the agent receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: String,
    pub plugin: String,
    pub input: Value,
    /// Time the agent gives the task once it starts running it.
    pub timeout_ms: u64,
    /// 1 for the first dispatch, then counting retries.
    pub attempt: u32,
}

/// Server to agent, on [`topics::tasks`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToAgent {
    /// Run this task (a repeat of an id the agent has seen is answered, not rerun).
    Task(TaskSpec),
    /// Stop this task if it is queued or running.
    Cancel { task_id: String },
    /// The server has stored this result; the agent may drop it from its outbox.
    ResultAck { task_id: String },
    /// Install this release (over-the-air update; `agent::ota`). Sent only
    /// to agents whose status has a `release`, which older ones lack.
    Update(UpdateOffer),
    /// The server has seen this release running here: the agent keeps it
    /// (its trial ends) rather than switching back at the deadline.
    UpdateConfirmed { release: String },
    /// Send your catalog ([`FromAgent::Catalog`]): the server asks when it
    /// sees a device come online whose plugins it does not know yet.
    Describe,
    /// Say which tasks you hold ([`FromAgent::Holding`]): the server asks
    /// when a device's status counts more tasks than it has open there.
    /// A cancel the broker dropped (its log for a lagging subscriber rolls
    /// over), or one never sent because the task had gone back to the
    /// queue when the device was away, left the agent working on tasks
    /// nobody wanted, in slots new work waited for.
    ListTasks,
}

/// Most task ids one [`FromAgent::Holding`] lists: an agent holds at most
/// `max_concurrency` (64) plus `queue_capacity` (256) tasks.
pub const MAX_HELD_TASKS: usize = 512;

/// Most plugins one catalog may list.
pub const MAX_CATALOG_PLUGINS: usize = 256;
/// Longest input schema of one plugin in a catalog, in bytes of JSON.
pub const MAX_TOOL_SCHEMA_BYTES: usize = 64 * 1024;

/// One plugin as a device offers it: what the server turns into a tool
/// for a language model (`GET /v1/tools`, agent runs, MCP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDecl {
    pub name: String,
    pub version: String,
    pub description: String,
    /// Its input as JSON Schema (2020-12), the text of
    /// [`crate::schema::Schema::to_json`]: JSON, so that the server's
    /// parser (depth-limited) reads it, not a recursive postcard decode.
    pub input_schema: String,
    /// Which of its tasks change the world.
    pub effects: crate::schema::Effects,
}

/// A device's plugins with their schemas, sent on its results topic when
/// the server asks ([`ToAgent::Describe`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Catalog {
    #[serde(deserialize_with = "capped_vec")]
    pub plugins: Vec<ToolDecl>,
}

/// An update the server asks an agent to install.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateOffer {
    /// The signed manifest file's text (`release`): the agent trusts
    /// nothing here that its signature does not cover.
    pub manifest: String,
    /// Sent as `Authorization: Bearer` with the download: the binary is
    /// served only with the release's grant, which the server sends only
    /// in its offers (one grant per release, not per device).
    pub grant: String,
}

/// Where an agent is with an update, as its status reports it (and the
/// API, in lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// Downloading, checking and installing it beside the running release.
    Installing,
    /// Installed and switched to; restarting into it.
    Switching,
    /// Running it on trial: it switches back unless the server confirms
    /// it (`ToAgent::UpdateConfirmed`) before the deadline.
    Trial,
    /// Confirmed: this is the release it keeps.
    Confirmed,
    /// Refused or failed before the switch (the old release runs on).
    Failed,
    /// Switched to, then back: it did not start, or was not confirmed.
    RolledBack,
}

/// An agent's last update and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReport {
    pub release: String,
    pub state: UpdateState,
    /// Why it failed or was rolled back (empty otherwise).
    pub message: String,
    /// For a refused or failed offer: the sha256 of the manifest text it
    /// was about, so the server counts it only against the offer it made
    /// (an id read from a manifest that did not verify proves nothing).
    pub offer_sha256: String,
}

/// Why an agent refused a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// Its queue is full: route elsewhere or later.
    Busy,
    /// It is shutting down.
    ShuttingDown,
    /// Its journal's disk is full: it cannot record the task durably, so it
    /// does not take it (counted in [`StorageCounters::write_errors`]).
    NoSpace,
    /// Its journal could not record the task for another I/O error.
    StorageFailed,
}

/// Category of a task failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    UnknownPlugin,
    InvalidInput,
    Failed,
    Timeout,
    Cancelled,
    Panicked,
    TooLarge,
}

/// A task failure, as reported by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    pub kind: ErrorKind,
    pub message: String,
    /// Whether another attempt (maybe on another device) could succeed.
    pub retryable: bool,
}

/// The end of one task on an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub task_id: String,
    pub result: Result<Value, TaskError>,
    /// Execution time on the agent, microseconds.
    pub elapsed_us: u64,
}

/// Agent to server, on [`topics::results`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromAgent {
    /// The task started running on the agent.
    Started { task_id: String },
    /// The agent will not run it.
    Rejected {
        task_id: String,
        reason: RejectReason,
    },
    /// The task finished (successfully or not).
    Finished(TaskOutcome),
    /// A piece of a streaming task's output (an `llm` task's text), sent
    /// as it is made. `seq` counts from 0 per task and attempt, so the
    /// server drops what an MQTT reconnect sends twice and notices a gap.
    /// Not journaled: the `Finished` result holds the whole output.
    Chunk {
        task_id: String,
        seq: u32,
        text: String,
    },
    /// Its plugins with their schemas, in answer to [`ToAgent::Describe`].
    Catalog(Catalog),
    /// The tasks it holds (running or waiting), in answer to
    /// [`ToAgent::ListTasks`]; the server cancels those it has closed.
    /// At most [`MAX_HELD_TASKS`] (the agent sends no more).
    Holding {
        #[serde(deserialize_with = "capped_vec")]
        tasks: Vec<String>,
    },
}

/// A device's heartbeat, retained on [`topics::status`]. The last will is
/// the same message with `online: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DeviceStatus {
    pub device_id: String,
    pub online: bool,
    pub board: String,
    pub agent_version: String,
    #[serde(deserialize_with = "capped_vec")]
    pub plugins: Vec<String>,
    #[serde(deserialize_with = "capped_vec")]
    pub capabilities: Vec<String>,
    pub max_concurrency: u32,
    pub queue_capacity: u32,
    pub running: u32,
    pub queued: u32,
    pub load1: f32,
    pub mem_total_kb: u64,
    pub mem_available_kb: u64,
    pub rss_kb: u64,
    pub temperature_c: Option<f32>,
    /// How often the agent sends this, so the server knows when it is late.
    pub heartbeat_ms: u32,
    /// Payloads the agent could not decode since it started.
    pub malformed: u64,
    /// Unix time in milliseconds when sent.
    pub sent_ms: u64,
    /// The agent's journal counters.
    pub storage: StorageCounters,
    /// The release it runs (`PREFIX/releases/ID`), when it can be updated
    /// over the air (`[ota]` set up); `None` for an agent that cannot.
    pub release: Option<String>,
    /// Its last over-the-air update.
    pub update: Option<UpdateReport>,
}

impl DeviceStatus {
    /// Decodes a status, accepting each earlier shape of the struct too.
    ///
    /// `DeviceStatus` grows only at its end, without a version bump, and
    /// every earlier shape stays readable here: a status from an older agent
    /// (or one stored by an older server) decodes with the missing fields at
    /// their defaults. The reverse does not hold: an older server rejects a
    /// newer, longer status as malformed (trailing bytes), so upgrade the
    /// server first. Shapes: 1.0 ends at `sent_ms`; 1.1 adds `storage`;
    /// 1.2 adds `release` and `update`.
    pub fn decode(bytes: &[u8], limit: usize) -> Result<DeviceStatus, ProtocolError> {
        match decode::<DeviceStatus>(bytes, limit) {
            Err(ProtocolError::Malformed(e)) => decode::<DeviceStatusV1_1>(bytes, limit)
                .map(DeviceStatus::from)
                .or_else(|_| decode::<DeviceStatusV1_0>(bytes, limit).map(DeviceStatus::from))
                .map_err(|_| ProtocolError::Malformed(e)),
            r => r,
        }
    }
}

/// `DeviceStatus` 1.1: 1.0 and its `storage` (before `release`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct DeviceStatusV1_1 {
    v1_0: DeviceStatusV1_0,
    storage: StorageCounters,
}

impl From<DeviceStatusV1_1> for DeviceStatus {
    fn from(o: DeviceStatusV1_1) -> DeviceStatus {
        DeviceStatus {
            storage: o.storage,
            ..DeviceStatus::from(o.v1_0)
        }
    }
}

/// `DeviceStatus` as protocol 1 first shipped it (before `storage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct DeviceStatusV1_0 {
    device_id: String,
    online: bool,
    board: String,
    agent_version: String,
    #[serde(deserialize_with = "capped_vec")]
    plugins: Vec<String>,
    #[serde(deserialize_with = "capped_vec")]
    capabilities: Vec<String>,
    max_concurrency: u32,
    queue_capacity: u32,
    running: u32,
    queued: u32,
    load1: f32,
    mem_total_kb: u64,
    mem_available_kb: u64,
    rss_kb: u64,
    temperature_c: Option<f32>,
    heartbeat_ms: u32,
    malformed: u64,
    sent_ms: u64,
}

impl From<DeviceStatusV1_0> for DeviceStatus {
    fn from(o: DeviceStatusV1_0) -> DeviceStatus {
        DeviceStatus {
            device_id: o.device_id,
            online: o.online,
            board: o.board,
            agent_version: o.agent_version,
            plugins: o.plugins,
            capabilities: o.capabilities,
            max_concurrency: o.max_concurrency,
            queue_capacity: o.queue_capacity,
            running: o.running,
            queued: o.queued,
            load1: o.load1,
            mem_total_kb: o.mem_total_kb,
            mem_available_kb: o.mem_available_kb,
            rss_kb: o.rss_kb,
            temperature_c: o.temperature_c,
            heartbeat_ms: o.heartbeat_ms,
            malformed: o.malformed,
            sent_ms: o.sent_ms,
            storage: StorageCounters::default(),
            release: None,
            update: None,
        }
    }
}

/// Counters of an agent's durable journal, since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StorageCounters {
    /// Torn or corrupt records skipped when the journal was recovered at start.
    pub recovered_skipped: u64,
    /// Tasks recovered at start that had been accepted but not finished (run again).
    pub replayed_tasks: u64,
    /// Whole segments dropped, oldest first, to stay within `storage.max_bytes`.
    pub segments_dropped: u64,
    /// Journal writes that failed (a full disk included); the agent carried on.
    /// A task it could not record is rejected ([`RejectReason::NoSpace`]).
    pub write_errors: u64,
}

/// JSON types of the external boundary (HTTP API and `openclaw/v1/submit`).
pub mod api {
    use serde::{Deserialize, Serialize};

    /// The product's three routes: where a task runs and how its answer
    /// returns. `auto` (the default) lets the scheduler decide from the
    /// plugin: `llm` (a language model) goes `heavy`, a submission with
    /// `reply_to` is `queue`, anything else `edge`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Route {
        #[default]
        Auto,
        /// A plugin next to its data, on a device. Asked for explicitly, only
        /// devices of class `edge`; resolved from `auto`, any device that
        /// offers the plugin (heavy nodes run edge plugins too).
        Edge,
        /// Nodes of class `heavy` only (language models; a model is offered
        /// only by a node whose memory holds it).
        Heavy,
        /// Cross-system and asynchronous: submitted over MQTT, answered on
        /// its `reply_to` topic; any device that offers the plugin.
        Queue,
    }

    /// Only a string: serde's derived enum answers a number, `true` or an
    /// array with serde_json's bare "expected value at line 1 column N",
    /// which reads as if the JSON itself were broken; this says what
    /// `route` takes.
    impl<'de> Deserialize<'de> for Route {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Route, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Route;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a route: \"auto\", \"edge\", \"heavy\" or \"queue\"")
                }
                fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Route, E> {
                    Route::parse(s).ok_or_else(|| E::unknown_variant(s, Route::NAMES))
                }
            }
            d.deserialize_str(V)
        }
    }

    impl Route {
        /// The names `route` takes.
        pub const NAMES: &'static [&'static str] = &["auto", "edge", "heavy", "queue"];

        pub fn as_str(self) -> &'static str {
            match self {
                Route::Auto => "auto",
                Route::Edge => "edge",
                Route::Heavy => "heavy",
                Route::Queue => "queue",
            }
        }

        pub fn parse(s: &str) -> Option<Route> {
            Some(match s {
                "auto" => Route::Auto,
                "edge" => Route::Edge,
                "heavy" => Route::Heavy,
                "queue" => Route::Queue,
                _ => return None,
            })
        }
    }

    /// A task submission.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct SubmitRequest {
        /// Plugin that runs the task (`echo`, `sysinfo`, ...).
        pub plugin: String,
        /// Plugin input.
        #[serde(default)]
        pub input: serde_json::Value,
        /// 0 (lowest) to 100 (highest); the server's default when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub priority: Option<u8>,
        /// Run on this device only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub target: Option<String>,
        /// Run on a device advertising this capability.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub capability: Option<String>,
        /// Execution time limit, milliseconds, counted from the moment the
        /// agent starts the task (the server adds a grace period for transport).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub timeout_ms: Option<u64>,
        /// Dispatch attempts before giving up (retries after device loss or retryable errors).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub max_attempts: Option<u32>,
        /// MQTT only: topic that gets the acceptance and the final result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reply_to: Option<String>,
        /// MQTT only: echoed back in replies so the submitter can match them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub correlation: Option<String>,
        /// `auto` (default), `edge`, `heavy` or `queue`: see [`Route`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub route: Option<Route>,
    }

    impl SubmitRequest {
        /// A submission with every optional field left to the server's defaults.
        pub fn new(plugin: impl Into<String>, input: serde_json::Value) -> Self {
            SubmitRequest {
                plugin: plugin.into(),
                input,
                priority: None,
                target: None,
                capability: None,
                timeout_ms: None,
                max_attempts: None,
                reply_to: None,
                correlation: None,
                route: None,
            }
        }
    }

    /// Task states.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
    #[serde(rename_all = "snake_case")]
    pub enum TaskState {
        Queued,
        Dispatched,
        Running,
        Succeeded,
        Failed,
        TimedOut,
        Cancelled,
    }

    impl TaskState {
        /// Whether no further transition happens.
        pub fn is_terminal(self) -> bool {
            matches!(
                self,
                TaskState::Succeeded
                    | TaskState::Failed
                    | TaskState::TimedOut
                    | TaskState::Cancelled
            )
        }
        /// The stored name.
        pub fn as_str(self) -> &'static str {
            match self {
                TaskState::Queued => "queued",
                TaskState::Dispatched => "dispatched",
                TaskState::Running => "running",
                TaskState::Succeeded => "succeeded",
                TaskState::Failed => "failed",
                TaskState::TimedOut => "timed_out",
                TaskState::Cancelled => "cancelled",
            }
        }
        /// Parses a stored name.
        pub fn parse(s: &str) -> Option<Self> {
            Some(match s {
                "queued" => TaskState::Queued,
                "dispatched" => TaskState::Dispatched,
                "running" => TaskState::Running,
                "succeeded" => TaskState::Succeeded,
                "failed" => TaskState::Failed,
                "timed_out" => TaskState::TimedOut,
                "cancelled" => TaskState::Cancelled,
                _ => return None,
            })
        }
    }

    /// Reply to a submission.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct SubmitResponse {
        pub id: String,
        pub state: TaskState,
    }

    /// A task as the API shows it. Times are Unix milliseconds.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct TaskView {
        pub id: String,
        pub plugin: String,
        pub state: TaskState,
        pub priority: u8,
        pub target: Option<String>,
        pub capability: Option<String>,
        pub device: Option<String>,
        pub attempts: u32,
        pub max_attempts: u32,
        pub timeout_ms: u64,
        /// Absent from `GET /v1/tasks` unless asked for (`null` then).
        #[serde(default)]
        pub input: serde_json::Value,
        pub result: Option<serde_json::Value>,
        pub error: Option<String>,
        pub created_ms: u64,
        pub dispatched_ms: Option<u64>,
        pub started_ms: Option<u64>,
        pub finished_ms: Option<u64>,
        /// A streaming task's output so far (an `llm` task's text), while
        /// it runs; the result has all of it once it ends.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub output: Option<String>,
        /// The route the task took (`auto` resolved at submission).
        #[serde(default)]
        pub route: Route,
        /// Why its device was chosen, from its latest dispatch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub placement: Option<String>,
    }

    /// A device as the API shows it.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct DeviceView {
        pub id: String,
        pub board: String,
        pub online: bool,
        pub agent_version: String,
        pub plugins: Vec<String>,
        pub capabilities: Vec<String>,
        /// Tasks the server has assigned and not seen finish.
        pub assigned: u32,
        pub max_concurrency: u32,
        pub queue_capacity: u32,
        pub running: u32,
        pub queued: u32,
        pub load1: f32,
        pub mem_total_kb: u64,
        pub mem_available_kb: u64,
        pub temperature_c: Option<f32>,
        pub last_heartbeat_ms: u64,
        /// Payloads the agent could not decode since it started.
        pub malformed: u64,
        /// The agent's journal counters, from its last status.
        #[serde(default)]
        pub storage: super::StorageCounters,
        /// The release it runs, if it can be updated over the air.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub release: Option<String>,
        /// Its last over-the-air update.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub update: Option<super::UpdateReport>,
        /// Its plugins with their schemas, once it has sent its catalog
        /// (`server::tools`). Shared, not copied, with every view.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tools: Option<std::sync::Arc<[ToolView]>>,
    }

    /// A plugin of one device as the API shows it (`GET /v1/devices`).
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct ToolView {
        pub name: String,
        pub version: String,
        pub description: String,
        /// Its input, as JSON Schema (2020-12).
        pub input_schema: serde_json::Value,
        /// Which of its calls change the world: `"none"`, `"always"`, or
        /// `{"when": [{"field", "values"}]}` (no values: the field given).
        pub effects: crate::schema::Effects,
    }

    /// Every error body of the API.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct ErrorBody {
        pub error: String,
    }

    /// Message published on a submitter's `reply_to` topic.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct Reply {
        /// `accepted`, `rejected` or a terminal state.
        pub event: String,
        pub id: Option<String>,
        pub correlation: Option<String>,
        pub result: Option<serde_json::Value>,
        pub error: Option<String>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_every_message() {
        let spec = TaskSpec {
            id: "t1".into(),
            plugin: "echo".into(),
            input: Value::from(serde_json::json!({"a": [1, 2.5, "x", null, true]})),
            timeout_ms: 1000,
            attempt: 1,
        };
        for msg in [
            ToAgent::Task(spec.clone()),
            ToAgent::Cancel {
                task_id: "t1".into(),
            },
            ToAgent::ResultAck {
                task_id: "t1".into(),
            },
        ] {
            let bytes = encode(&msg);
            assert_eq!(decode::<ToAgent>(&bytes, DEFAULT_MAX_PAYLOAD).unwrap(), msg);
        }
        let out = FromAgent::Finished(TaskOutcome {
            task_id: "t1".into(),
            result: Err(TaskError {
                kind: ErrorKind::Failed,
                message: "boom".into(),
                retryable: false,
            }),
            elapsed_us: 7,
        });
        assert_eq!(
            decode::<FromAgent>(&encode(&out), DEFAULT_MAX_PAYLOAD).unwrap(),
            out
        );
    }

    #[test]
    fn rejects_other_versions_oversize_and_garbage() {
        let mut bytes = postcard::to_stdvec(&Envelope {
            version: 9,
            body: ToAgent::Cancel {
                task_id: "x".into(),
            },
        })
        .unwrap();
        assert!(matches!(
            decode::<ToAgent>(&bytes, 1024),
            Err(ProtocolError::Version { got: 9 })
        ));
        bytes = encode(&ToAgent::Cancel {
            task_id: "x".into(),
        });
        assert!(matches!(
            decode::<ToAgent>(&bytes, 2),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            decode::<ToAgent>(&[1, 0xff, 0xff, 0xff], 1024),
            Err(ProtocolError::Malformed(_))
        ));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode::<ToAgent>(&trailing, 1024).is_err());
        assert!(decode::<ToAgent>(&[], 1024).is_err());
        // Found by the envelope_decode fuzz target: an overlong varint is
        // still version 1 (postcard does not insist on the shortest form).
        assert_eq!(
            decode::<ToAgent>(&[0x81, 0x00, 0x01, 0x00], 1024).unwrap(),
            ToAgent::Cancel {
                task_id: String::new()
            }
        );
    }

    /// A status in the shape protocol 1 first shipped (before `storage`)
    /// still decodes, with zero counters; the current shape round-trips;
    /// garbage stays an error.
    #[test]
    fn device_status_accepts_the_older_shape() {
        let old = DeviceStatusV1_0 {
            device_id: "pi-1".into(),
            online: true,
            board: "sim".into(),
            agent_version: "0.1.0".into(),
            plugins: vec!["echo".into()],
            max_concurrency: 4,
            heartbeat_ms: 1000,
            sent_ms: 42,
            ..Default::default()
        };
        let bytes = encode(&old);
        // The plain decoder sees a truncated struct...
        assert!(matches!(
            decode::<DeviceStatus>(&bytes, 1024),
            Err(ProtocolError::Malformed(_))
        ));
        // ...the status decoder reads it with default counters.
        let got = DeviceStatus::decode(&bytes, 1024).unwrap();
        assert_eq!(got.device_id, "pi-1");
        assert_eq!(got.plugins, vec!["echo".to_string()]);
        assert_eq!(
            (got.max_concurrency, got.heartbeat_ms, got.sent_ms),
            (4, 1000, 42)
        );
        assert_eq!(got.storage, StorageCounters::default());
        let mut new = got.clone();
        new.storage.write_errors = 3;
        // 1.1: with `storage`, before `release`.
        let v1_1 = DeviceStatusV1_1 {
            v1_0: old.clone(),
            storage: new.storage,
        };
        assert_eq!(DeviceStatus::decode(&encode(&v1_1), 1024).unwrap(), new);
        new.release = Some("rpi4-7".into());
        new.update = Some(UpdateReport {
            release: "rpi4-8".into(),
            state: UpdateState::RolledBack,
            message: "it did not start".into(),
            offer_sha256: String::new(),
        });
        assert_eq!(DeviceStatus::decode(&encode(&new), 1024).unwrap(), new);
        assert!(matches!(
            DeviceStatus::decode(&[1, 0xff, 0xff], 1024),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            DeviceStatus::decode(&bytes, 3),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn json_value_conversion_is_lossless() {
        let j = serde_json::json!({"n": -3, "f": 1.5, "s": "ü", "l": [true, null], "m": {}});
        assert_eq!(serde_json::Value::from(Value::from(j.clone())), j);
    }

    /// `route` over HTTP and MQTT: the four lowercase names (and `null`,
    /// the default); anything else is an error naming the field's values,
    /// never a silent `auto`.
    #[test]
    fn routes_parse_strictly() {
        let parse = |route: &str| {
            serde_json::from_str::<api::SubmitRequest>(&format!(
                r#"{{"plugin":"echo","input":1,"route":{route}}}"#
            ))
        };
        for (text, want) in [
            ("\"auto\"", Some(api::Route::Auto)),
            ("\"edge\"", Some(api::Route::Edge)),
            ("\"heavy\"", Some(api::Route::Heavy)),
            ("\"queue\"", Some(api::Route::Queue)),
            ("null", None),
        ] {
            assert_eq!(parse(text).unwrap().route, want, "{text}");
        }
        for bad in [
            "\"HEAVY\"",
            "\"Heavy\"",
            "\" edge\"",
            "\"\"",
            "5",
            "true",
            "[]",
            "{}",
        ] {
            let e = parse(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            let m = e.to_string();
            assert!(
                m.contains("expected one of `auto`, `edge`, `heavy`, `queue`")
                    || m.contains("expected a route: \"auto\", \"edge\", \"heavy\" or \"queue\""),
                "{bad}: {m}"
            );
        }
        for r in [
            api::Route::Auto,
            api::Route::Edge,
            api::Route::Heavy,
            api::Route::Queue,
        ] {
            assert_eq!(api::Route::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
    }

    /// Found by the `submit_json` fuzz target: without serde_json's
    /// `float_roundtrip` a long number was parsed 1 ulp off, so the input the
    /// server stored (as JSON text) and parsed again for the agent was not
    /// the number submitted. Correctly rounded now: text, value, text agree.
    #[test]
    fn long_numbers_parse_the_same_after_a_round_trip() {
        let body =
            "{\"plugin\":\"ec{\"\n,\"input\":491111111111111199999999999999999999999999999999}";
        let req: api::SubmitRequest = serde_json::from_str(body).unwrap();
        let stored = req.input.to_string();
        let again: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(again, req.input, "{stored}");
        assert_eq!(req.input.as_f64(), Some(4.911111111111112e47));
    }

    /// Found by the `submit_json` fuzz target: a JSON integer above
    /// `i64::MAX` became a rounded float on its way to the agent. The submit
    /// boundary now refuses it, naming where it is; everything in range
    /// converts exactly.
    #[test]
    fn integers_beyond_i64_are_refused_not_rounded() {
        let j: serde_json::Value =
            serde_json::from_str(r#"{"a": [1, {"b": 9333333999999299993}]}"#).unwrap();
        let lossy = serde_json::Value::from(Value::from(j.clone()));
        assert_ne!(lossy, j, "From still rounds (documented)");
        let e = Value::try_from_json(&j).unwrap_err();
        assert!(
            e.contains("9333333999999299993") && e.contains(".a[1].b"),
            "{e}"
        );
        let e = Value::try_from_json(&serde_json::json!(u64::MAX)).unwrap_err();
        assert!(e.contains("top level"), "{e}");
        for ok in [
            serde_json::json!({"max": i64::MAX, "min": i64::MIN, "f": -0.0, "g": 1e300}),
            serde_json::json!([[[]], {}, "", null, 9_223_372_036_854_775_807u64]),
        ] {
            let v = Value::try_from_json(&ok).unwrap();
            let wire: Value = decode(&encode(&v), usize::MAX).unwrap();
            assert_eq!(serde_json::Value::from(wire), ok);
        }
    }

    /// Fuzz-like, fixed seed (the cargo-fuzz target needs nightly): 10,000
    /// random and mutated payloads never panic `decode`, and whatever it
    /// accepts re-encodes to a canonical form that is stable under another
    /// round trip. (Not always the input bytes: postcard accepts overlong
    /// varints, so `81 00` also reads as version 1.)
    #[test]
    fn decode_survives_random_input() {
        let mut x: u64 = 0x0C1A_F022;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = encode(&ToAgent::Task(TaskSpec {
            id: "t".into(),
            plugin: "echo".into(),
            input: Value::from(serde_json::json!({"a": [1, "b", 2.5]})),
            timeout_ms: 5,
            attempt: 1,
        }));
        for i in 0..10_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                (0..next() % 64).map(|_| next() as u8).collect()
            } else {
                let mut b = valid.clone();
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
                b.truncate(b.len() - (next() as usize % 3));
                b
            };
            if let Ok(m) = decode::<ToAgent>(&buf, 1024) {
                let canonical = encode(&m);
                let again = decode::<ToAgent>(&canonical, 1024).unwrap();
                assert_eq!(encode(&again), canonical);
            }
            let _ = decode::<FromAgent>(&buf, 1024);
            let _ = DeviceStatus::decode(&buf, 1024);
        }
    }

    /// `levels` nested lists around `Null`, built without recursion.
    fn deep(levels: usize) -> Value {
        let mut v = Value::Null;
        for _ in 0..levels {
            v = Value::List(vec![v]);
        }
        v
    }

    /// Drops a deep value without recursing (the derived drop would).
    fn drop_deep(mut v: Value) {
        while let Value::List(mut l) = v {
            v = l.pop().unwrap_or_default();
        }
    }

    /// Envelope bytes of a `TaskSpec` whose input is `levels` nested lists,
    /// by hand (`6 1` per level, then `Null`).
    fn nested_task(levels: usize, tag: u8) -> Vec<u8> {
        let mut b = vec![1, 0, 1, b't', 1, b'e'];
        for _ in 0..levels {
            b.extend_from_slice(&[tag, 1]);
            if tag == 7 {
                // A map entry: an empty key, then the value.
                b.push(0);
            }
        }
        b.extend_from_slice(&[0, 5, 1]);
        b
    }

    /// Decodes on a thread with `stack` bytes of stack.
    fn decode_on_stack(bytes: Vec<u8>, stack: usize) -> Result<ToAgent, String> {
        std::thread::Builder::new()
            .stack_size(stack)
            .spawn(move || decode::<ToAgent>(&bytes, usize::MAX).map_err(|e| e.to_string()))
            .unwrap()
            .join()
            .unwrap()
    }

    /// The input the `envelope_decode` fuzz target built by itself, from
    /// the small seeds only, with the depth limit taken out (issue 15: a
    /// `FromAgent` of 15,509 bytes, ~7,000 nested lists): it overflowed the
    /// 2 MiB stack there. Refused here, on a thread of that size.
    #[test]
    fn the_nesting_the_fuzzer_found_is_refused() {
        let bytes = include_bytes!("../fuzz/seeds/envelope_decode/issue15_found_by_fuzzing.bin");
        let e = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| decode::<FromAgent>(bytes, usize::MAX).map_err(|e| e.to_string()))
            .unwrap()
            .join()
            .unwrap()
            .unwrap_err();
        assert!(e.contains("deeper than 128 levels"), "{e}");
    }

    /// Issue 15: 50,000 nested lists in one 100 KB publish overflowed a
    /// tokio worker's 2 MiB stack. Refused now, with a clear error, on a
    /// thread of that size; the limit itself decodes.
    #[test]
    fn nesting_beyond_the_limit_is_refused_not_a_stack_overflow() {
        for tag in [6, 7] {
            let e = decode_on_stack(nested_task(50_000, tag), 2 << 20).unwrap_err();
            assert!(e.contains("deeper than 128 levels"), "{e}");
            let e = decode_on_stack(nested_task(MAX_VALUE_DEPTH + 1, tag), 2 << 20).unwrap_err();
            assert!(e.contains("deeper than 128 levels"), "{e}");
            let ok = decode_on_stack(nested_task(MAX_VALUE_DEPTH, tag), 2 << 20).unwrap();
            let ToAgent::Task(spec) = ok else {
                panic!("{ok:?}")
            };
            assert_eq!(spec.input.depth(), MAX_VALUE_DEPTH);
            assert_eq!(spec.timeout_ms, 5);
        }
        assert!(matches!(
            decode::<ToAgent>(&nested_task(200, 6), usize::MAX),
            Err(ProtocolError::TooDeep { limit: 128 })
        ));
        // The counter is per decode: a refused one leaves nothing behind.
        let v = deep(MAX_VALUE_DEPTH);
        let back: Value = decode(&encode(&v), usize::MAX).unwrap();
        assert_eq!(back, v);
        drop_deep(back);
        drop_deep(v);
        // Encoding a deeper value works (it is ours); decoding refuses it.
        let v = deep(MAX_VALUE_DEPTH + 1);
        assert_eq!(v.depth(), MAX_VALUE_DEPTH + 1);
        assert!(matches!(
            decode::<Value>(&encode(&v), usize::MAX),
            Err(ProtocolError::TooDeep { .. })
        ));
        drop_deep(v);
        assert_eq!(Value::Int(1).depth(), 0);
        assert_eq!(Value::List(vec![]).depth(), 1);
        assert_eq!(Value::from(serde_json::json!([{"a": [1]}, 2])).depth(), 3);
    }

    /// At the limit, decoding needs far less stack than a tokio worker has,
    /// even unoptimized (measured: between 288 and 320 KiB in a debug
    /// build, about 2.4 KiB a level): the limit leaves room for whatever
    /// the thread was already doing.
    #[test]
    fn decode_stack_use_at_the_depth_limit() {
        for tag in [6, 7] {
            decode_on_stack(nested_task(MAX_VALUE_DEPTH, tag), 512 << 10).unwrap();
        }
    }

    /// The deepest input a JSON submission can carry (serde_json refuses a
    /// 128th level, the request object being one) converts and decodes.
    #[test]
    fn every_json_submission_fits_the_depth_limit() {
        let mut body = String::from("{\"plugin\":\"echo\",\"input\":");
        body.push_str(&"[".repeat(126));
        body.push_str(&"]".repeat(126));
        body.push('}');
        let req: api::SubmitRequest = serde_json::from_str(&body).unwrap();
        let v = Value::try_from_json(&req.input).unwrap();
        assert_eq!(v.depth(), 126);
        let back: Value = decode(&encode(&v), usize::MAX).unwrap();
        assert_eq!(back, v);
        let deeper = body.replacen('[', "[[", 1).replacen(']', "]]", 1);
        assert!(serde_json::from_str::<api::SubmitRequest>(&deeper).is_err());
    }

    /// Map and Bytes keep their wire format (the decoder is hand-written).
    #[test]
    fn every_value_variant_round_trips() {
        let v = Value::Map(vec![
            ("n".into(), Value::Null),
            ("b".into(), Value::Bool(true)),
            ("i".into(), Value::Int(-7)),
            ("f".into(), Value::Float(2.5)),
            ("s".into(), Value::Str("x".into())),
            ("y".into(), Value::Bytes(vec![0, 255, 3])),
            (
                "l".into(),
                Value::List(vec![Value::Int(1), Value::Map(vec![])]),
            ),
        ]);
        let bytes = encode(&v);
        let back: Value = decode(&bytes, 1024).unwrap();
        assert_eq!(back, v);
        // The same bytes as a derived decoder reads: a known encoding.
        assert_eq!(&bytes[..4], &[1, 7, 7, 1]);
    }

    #[test]
    fn topic_parsing() {
        assert_eq!(
            topics::parse(&topics::results("pi-1")),
            Some(("pi-1", topics::Kind::Results))
        );
        assert_eq!(topics::parse("openclaw/v1/devices//status"), None);
        assert_eq!(topics::parse("openclaw/v1/devices/a/b/status"), None);
        assert_eq!(topics::parse("other/v1/devices/a/status"), None);
        assert!(topics::valid_device_id("pi-1.factory_2"));
        assert!(!topics::valid_device_id("a/b"));
        assert!(!topics::valid_device_id("a+"));
        assert!(!topics::valid_device_id(""));
    }
}
