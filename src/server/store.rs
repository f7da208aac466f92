//! Durable task and device store: one SQLite file in WAL mode.
//!
//! The scheduler writes a batch of changes inside one transaction and only
//! answers clients, dispatches or acknowledges MQTT messages after the commit
//! (group commit), so nothing is acknowledged before it is on disk.

use crate::protocol::api::{Route, TaskState, TaskView};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open task store {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create data dir {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("task store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("task store: row {id} has unknown state `{state}`")]
    BadState { id: String, state: String },
    #[error("task store: row {id}, column `{column}`: {source}")]
    BadRow {
        id: String,
        column: &'static str,
        source: rusqlite::Error,
    },
}

/// The column names of [`COLUMNS`], by index (for errors).
const COLUMN_NAMES: [&str; 21] = [
    "id",
    "plugin",
    "input",
    "priority",
    "target",
    "capability",
    "timeout_ms",
    "max_attempts",
    "reply_to",
    "correlation",
    "state",
    "attempts",
    "device",
    "result",
    "error",
    "created_ms",
    "dispatched_ms",
    "started_ms",
    "finished_ms",
    "route",
    "placement",
];

/// Names the row and the column of a conversion error.
fn bad_row(r: &Row, e: rusqlite::Error) -> StoreError {
    let index = match &e {
        rusqlite::Error::IntegralValueOutOfRange(i, _)
        | rusqlite::Error::InvalidColumnType(i, _, _)
        | rusqlite::Error::FromSqlConversionFailure(i, _, _) => Some(*i),
        _ => None,
    };
    let id = r
        .get::<_, String>(0)
        .unwrap_or_else(|_| "(unreadable id)".to_string());
    StoreError::BadRow {
        id,
        column: index
            .and_then(|i| COLUMN_NAMES.get(i).copied())
            .unwrap_or("?"),
        source: e,
    }
}

/// One task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub id: String,
    pub plugin: String,
    /// The input as JSON text.
    pub input: String,
    pub priority: u8,
    pub target: Option<String>,
    pub capability: Option<String>,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub reply_to: Option<String>,
    pub correlation: Option<String>,
    pub state: TaskState,
    pub attempts: u32,
    pub device: Option<String>,
    /// The result as JSON text.
    pub result: Option<String>,
    pub error: Option<String>,
    pub created_ms: u64,
    pub dispatched_ms: Option<u64>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// The route asked for at submission (`auto` unless named); the view
    /// shows it resolved.
    pub route: Route,
    /// Why its latest dispatch went where it did.
    pub placement: Option<String>,
}

impl TaskRow {
    /// The API view of this row.
    pub fn view(&self) -> TaskView {
        let json = |s: &str| serde_json::from_str(s).unwrap_or(serde_json::Value::Null);
        TaskView {
            id: self.id.clone(),
            plugin: self.plugin.clone(),
            state: self.state,
            priority: self.priority,
            target: self.target.clone(),
            capability: self.capability.clone(),
            device: self.device.clone(),
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            input: json(&self.input),
            result: self.result.as_deref().map(json),
            error: self.error.clone(),
            created_ms: self.created_ms,
            dispatched_ms: self.dispatched_ms,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            output: None,
            route: crate::server::scheduler::resolve_route(
                self.route,
                &self.plugin,
                self.reply_to.is_some(),
            ),
            placement: self.placement.clone(),
        }
    }
}

/// The SQLite store.
pub struct Store {
    conn: Connection,
    in_tx: bool,
}

const COLUMNS: &str = "id, plugin, input, priority, target, capability, timeout_ms, max_attempts, \
     reply_to, correlation, state, attempts, device, result, error, created_ms, dispatched_ms, \
     started_ms, finished_ms, route, placement";

impl Store {
    /// Opens (creating if needed) `DIR/openclaw.db`.
    pub fn open(dir: &Path, synchronous: &str) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("openclaw.db");
        let conn = Connection::open(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let sync = if synchronous == "normal" {
            "NORMAL"
        } else {
            "FULL"
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS tasks (
                id TEXT PRIMARY KEY, plugin TEXT NOT NULL, input TEXT NOT NULL,
                priority INTEGER NOT NULL, target TEXT, capability TEXT,
                timeout_ms INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
                reply_to TEXT, correlation TEXT, state TEXT NOT NULL,
                attempts INTEGER NOT NULL, device TEXT, result TEXT, error TEXT,
                created_ms INTEGER NOT NULL, dispatched_ms INTEGER, started_ms INTEGER,
                finished_ms INTEGER);
             CREATE INDEX IF NOT EXISTS tasks_open ON tasks(state)
                WHERE state IN ('queued', 'dispatched', 'running');
             CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_ms);
             CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_ms)
                WHERE finished_ms IS NOT NULL;
             CREATE TABLE IF NOT EXISTS devices (
                id TEXT PRIMARY KEY, status BLOB NOT NULL, last_seen_ms INTEGER NOT NULL);"
        ))
        .and_then(|()| Self::create_dispatches(&conn))
        .and_then(|()| Self::add_route_columns(&conn))
        .map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Store { conn, in_tx: false })
    }

    /// The dispatch history: which devices each task was sent to, per
    /// attempt. A store made before it existed gets it seeded from the open
    /// tasks' current devices, so a result from the device that holds a
    /// task across the upgrade still counts.
    fn create_dispatches(conn: &Connection) -> rusqlite::Result<()> {
        let exists = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dispatches'",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Ok(());
        }
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS dispatches (
                task_id TEXT NOT NULL, attempt INTEGER NOT NULL, device TEXT NOT NULL,
                PRIMARY KEY (task_id, attempt, device)) WITHOUT ROWID;
             INSERT OR IGNORE INTO dispatches (task_id, attempt, device)
                SELECT id, attempts, device FROM tasks
                WHERE device IS NOT NULL AND state IN ('queued', 'dispatched', 'running');
             COMMIT;",
        )
    }

    /// `route` and `placement` (issue 11's routes), added to a store made
    /// before them; their rows read as `auto` with no placement.
    /// Each column is looked for on its own, inside one write transaction:
    /// a store left with `route` but not `placement` (a crash between the
    /// two statements) still gets `placement`, instead of every later
    /// open failing on `no such column`; and a second process opening the
    /// same store meanwhile waits instead of adding a column twice.
    fn add_route_columns(conn: &Connection) -> rusqlite::Result<()> {
        let has = |name: &str| -> rusqlite::Result<bool> {
            conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('tasks') WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
        };
        if has("route")? && has("placement")? {
            return Ok(());
        }
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let added = (|| {
            for name in ["route", "placement"] {
                if !has(name)? {
                    conn.execute_batch(&format!("ALTER TABLE tasks ADD COLUMN {name} TEXT"))?;
                }
            }
            Ok(())
        })();
        match added {
            Ok(()) => conn.execute_batch("COMMIT"),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Records that task `id`'s attempt `attempt` was sent to `device`.
    pub fn add_dispatch(&mut self, id: &str, attempt: u32, device: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO dispatches (task_id, attempt, device) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![id, attempt, device])?;
        Ok(())
    }

    /// Forgets one entry of task `id`'s dispatch history (the bound per task).
    pub fn drop_dispatch(
        &mut self,
        id: &str,
        attempt: u32,
        device: &str,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "DELETE FROM dispatches WHERE task_id = ?1 AND attempt = ?2 AND device = ?3",
            )?
            .execute(params![id, attempt, device])?;
        Ok(())
    }

    /// The dispatch history of every task not in a terminal state:
    /// task id → (attempt, device), by attempt.
    pub fn open_dispatches(&self) -> Result<HashMap<String, Vec<(u32, String)>>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT d.task_id, d.attempt, d.device FROM dispatches d JOIN tasks t \
             ON t.id = d.task_id WHERE t.state IN ('queued', 'dispatched', 'running') \
             ORDER BY d.task_id, d.attempt",
        )?;
        let mut rows = stmt.query([])?;
        let mut out: HashMap<String, Vec<(u32, String)>> = HashMap::new();
        while let Some(r) = rows.next()? {
            let read = || -> rusqlite::Result<(String, u32, String)> {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            };
            match read() {
                Ok((id, attempt, device)) => out.entry(id).or_default().push((attempt, device)),
                // Left out: at worst a result from that device is refused.
                Err(e) => log::error!("task store: unreadable dispatch row: {e}; left out"),
            }
        }
        Ok(out)
    }

    /// The dispatch history of one task, by attempt.
    pub fn dispatches(&self, id: &str) -> Result<Vec<(u32, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT attempt, device FROM dispatches WHERE task_id = ?1 ORDER BY attempt",
        )?;
        let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Starts a batch.
    pub fn begin(&mut self) -> Result<(), StoreError> {
        if !self.in_tx {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.in_tx = true;
        }
        Ok(())
    }

    /// Makes the batch durable.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.in_tx {
            self.in_tx = false;
            if let Err(e) = self.conn.execute_batch("COMMIT") {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Abandons the batch (after a failed statement or commit).
    pub fn rollback(&mut self) {
        self.in_tx = false;
        if !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                log::warn!("task store: rollback: {e}");
            }
        }
    }

    /// Deletes the oldest tasks that finished before `cutoff_ms`: at most
    /// `max_rows`, and no more than `max_bytes` of inputs and results (but
    /// at least one task). It runs inside the scheduler's transaction, so a
    /// large backlog must be taken in bites that keep one commit small.
    /// Returns how many were deleted and whether more are due.
    pub fn delete_finished_before(
        &mut self,
        cutoff_ms: u64,
        max_rows: u32,
        max_bytes: u64,
    ) -> Result<(usize, bool), StoreError> {
        let cutoff = cutoff_ms.min(i64::MAX as u64) as i64;
        // `octet_length` reads the size from the record header, not the
        // (possibly megabytes of) text itself.
        let mut ids = Vec::new();
        let mut more = false;
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, octet_length(input) + coalesce(octet_length(result), 0) FROM tasks \
                 WHERE finished_ms IS NOT NULL AND finished_ms < ?1 ORDER BY finished_ms LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![cutoff, i64::from(max_rows) + 1])?;
            let mut bytes = 0u64;
            while let Some(r) = rows.next()? {
                let size = r.get::<_, Option<i64>>(1)?.unwrap_or(0).max(0) as u64;
                if ids.len() == max_rows as usize
                    || (!ids.is_empty() && bytes.saturating_add(size) > max_bytes)
                {
                    more = true;
                    break;
                }
                bytes = bytes.saturating_add(size);
                ids.push(r.get::<_, String>(0)?);
            }
        }
        let mut del = self
            .conn
            .prepare_cached("DELETE FROM tasks WHERE id = ?1")?;
        let mut del_history = self
            .conn
            .prepare_cached("DELETE FROM dispatches WHERE task_id = ?1")?;
        for id in &ids {
            del.execute([id])?;
            del_history.execute([id])?;
        }
        Ok((ids.len(), more))
    }

    /// Inserts a task, or updates the columns that change over its life.
    /// An upsert, not `INSERT OR REPLACE`: a replace deletes and re-inserts
    /// the row and every index entry, the upsert rewrites the row in place
    /// and only the index entries whose columns changed.
    pub fn save(&mut self, t: &TaskRow) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "INSERT INTO tasks ({COLUMNS}) VALUES \
             (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21) \
             ON CONFLICT(id) DO UPDATE SET state = excluded.state, \
             attempts = excluded.attempts, device = excluded.device, \
             result = excluded.result, error = excluded.error, \
             dispatched_ms = excluded.dispatched_ms, started_ms = excluded.started_ms, \
             finished_ms = excluded.finished_ms, placement = excluded.placement"
        ))?;
        stmt.execute(params![
            t.id,
            t.plugin,
            t.input,
            t.priority,
            t.target,
            t.capability,
            t.timeout_ms as i64,
            t.max_attempts,
            t.reply_to,
            t.correlation,
            t.state.as_str(),
            t.attempts,
            t.device,
            t.result,
            t.error,
            t.created_ms as i64,
            t.dispatched_ms.map(|v| v as i64),
            t.started_ms.map(|v| v as i64),
            t.finished_ms.map(|v| v as i64),
            t.route.as_str(),
            t.placement,
        ])?;
        Ok(())
    }

    fn row(r: &Row) -> rusqlite::Result<(TaskRow, String)> {
        let state: String = r.get(10)?;
        let u = |i: usize| -> rusqlite::Result<Option<u64>> {
            Ok(r.get::<_, Option<i64>>(i)?.map(|v| v as u64))
        };
        Ok((
            TaskRow {
                id: r.get(0)?,
                plugin: r.get(1)?,
                input: r.get(2)?,
                priority: r.get(3)?,
                target: r.get(4)?,
                capability: r.get(5)?,
                timeout_ms: r.get::<_, i64>(6)? as u64,
                max_attempts: r.get(7)?,
                reply_to: r.get(8)?,
                correlation: r.get(9)?,
                state: TaskState::Queued,
                attempts: r.get(11)?,
                device: r.get(12)?,
                result: r.get(13)?,
                error: r.get(14)?,
                created_ms: r.get::<_, i64>(15)? as u64,
                dispatched_ms: u(16)?,
                started_ms: u(17)?,
                finished_ms: u(18)?,
                route: r
                    .get::<_, Option<String>>(19)?
                    .as_deref()
                    .and_then(Route::parse)
                    .unwrap_or(Route::Auto),
                placement: r.get(20)?,
            },
            state,
        ))
    }

    fn rows(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<TaskRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        // Errors name the row and the column.
        let rows = stmt.query_map(args, |r| Ok(Self::row(r).map_err(|e| bad_row(r, e))))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(Self::with_state(r??)?);
        }
        Ok(out)
    }

    /// One task by id.
    pub fn get(&self, id: &str) -> Result<Option<TaskRow>, StoreError> {
        Ok(self
            .rows(&format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"), [id])?
            .pop())
    }

    /// Every task not in a terminal state that can be read, oldest first.
    /// A row that cannot (a value out of range, an unknown state, written
    /// by something else) is logged, naming the row and the column, and
    /// left out: one bad row must not keep the server from starting.
    pub fn unfinished_readable(&self) -> Result<Vec<TaskRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tasks WHERE state IN ('queued', 'dispatched', 'running') \
             ORDER BY created_ms"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            match Self::row(r)
                .map_err(|e| bad_row(r, e))
                .and_then(Self::with_state)
            {
                Ok(row) => out.push(row),
                Err(e) => log::error!("{e}; the task is left out"),
            }
        }
        Ok(out)
    }

    fn with_state((mut row, state): (TaskRow, String)) -> Result<TaskRow, StoreError> {
        row.state = TaskState::parse(&state).ok_or(StoreError::BadState {
            id: row.id.clone(),
            state,
        })?;
        Ok(row)
    }

    /// Every task not in a terminal state, oldest first.
    pub fn unfinished(&self) -> Result<Vec<TaskRow>, StoreError> {
        self.rows(
            &format!(
                "SELECT {COLUMNS} FROM tasks WHERE state IN ('queued', 'dispatched', 'running') \
                 ORDER BY created_ms"
            ),
            [],
        )
    }

    /// The newest tasks, optionally in one state.
    pub fn list(&self, state: Option<TaskState>, limit: u32) -> Result<Vec<TaskRow>, StoreError> {
        match state {
            Some(s) => self.rows(
                &format!(
                    "SELECT {COLUMNS} FROM tasks WHERE state = ?1 ORDER BY created_ms DESC LIMIT ?2"
                ),
                params![s.as_str(), limit],
            ),
            None => self.rows(
                &format!("SELECT {COLUMNS} FROM tasks ORDER BY created_ms DESC LIMIT ?1"),
                params![limit],
            ),
        }
    }

    /// Counts of tasks per state.
    pub fn counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a device's last status (postcard bytes).
    pub fn save_device(
        &mut self,
        id: &str,
        status: &[u8],
        last_seen_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO devices (id, status, last_seen_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![id, status, last_seen_ms as i64])?;
        Ok(())
    }

    /// Every known device: (id, status bytes, last seen).
    pub fn devices(&self) -> Result<Vec<(String, Vec<u8>, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, status, last_seen_ms FROM devices")?;
        let rows = stmt.query_map([], |r| {
            let read = || -> rusqlite::Result<(String, Vec<u8>, u64)> {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            };
            Ok(read().map_err(|e| {
                let id = r
                    .get::<_, String>(0)
                    .unwrap_or_else(|_| "(unreadable id)".into());
                format!("task store: device row `{id}`: {e}")
            }))
        })?;
        let mut out = Vec::new();
        for r in rows {
            match r? {
                Ok(d) => out.push(d),
                // Left out, like an unreadable task: the device re-announces itself.
                Err(e) => log::error!("{e}; the device is left out"),
            }
        }
        Ok(out)
    }

    /// The connection, for tests that make the store fail.
    #[cfg(test)]
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Whether a task with this id exists (any state).
    pub fn exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM tasks WHERE id = ?1")?
            .query_row([id], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

/// One task as a list shows it: borrowed from the current row, with the
/// stored JSON text of `input` and `result` (when asked for) unparsed.
#[derive(Debug)]
pub struct ListedTask<'a> {
    pub id: &'a str,
    pub plugin: &'a str,
    pub state: TaskState,
    pub priority: u8,
    pub target: Option<&'a str>,
    pub capability: Option<&'a str>,
    pub device: Option<&'a str>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    /// `None` unless the input was asked for.
    pub input: Option<&'a str>,
    /// `None` unless asked for or when the task has none.
    pub result: Option<&'a str>,
    pub error: Option<&'a str>,
    pub created_ms: u64,
    pub dispatched_ms: Option<u64>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub route: Route,
    pub placement: Option<&'a str>,
}

/// What a list reads.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only tasks stored in these states (all when empty).
    pub states: Vec<TaskState>,
    /// Only tasks older than this `(created_ms, id)` (the paging cursor).
    pub before: Option<(u64, String)>,
    pub input: bool,
    pub result: bool,
}

/// A text column without copying it.
fn column_text<'r>(r: &'r Row<'_>, i: usize) -> rusqlite::Result<Option<&'r str>> {
    r.get_ref(i)?.as_str_or_null().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// A read-only connection for the HTTP API's lists: they run on it outside
/// the scheduler, which keeps the only writing connection.
pub struct ReadStore {
    conn: Connection,
}

impl ReadStore {
    /// Opens `DIR/openclaw.db` (created by [`Store::open`]) read-only.
    pub fn open(dir: &Path) -> Result<ReadStore, StoreError> {
        use rusqlite::OpenFlags;
        let path = dir.join("openclaw.db");
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=1;")?;
            Ok(c)
        })
        .map_err(|source| StoreError::Open { path, source })?;
        Ok(ReadStore { conn })
    }

    /// Tasks newest first (`created_ms`, then `id`, descending), handed one
    /// at a time to `each` until it returns false or the rows run out.
    /// A row that cannot be read (a value out of range, an unknown state) is
    /// logged, naming the row and the column, and left out, as at start:
    /// one bad row must not make every list that reaches it fail. Returns
    /// how many rows were left out.
    pub fn list(
        &self,
        f: &ListFilter,
        mut each: impl FnMut(ListedTask<'_>) -> bool,
    ) -> Result<usize, StoreError> {
        let input = if f.input { "input" } else { "NULL" };
        let result = if f.result { "result" } else { "NULL" };
        let mut sql = format!(
            "SELECT id, plugin, priority, target, capability, device, attempts, max_attempts, \
             timeout_ms, state, {input}, {result}, error, created_ms, dispatched_ms, started_ms, \
             finished_ms, route, placement, reply_to IS NOT NULL FROM tasks WHERE 1"
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if !f.states.is_empty() {
            let marks: Vec<String> = f
                .states
                .iter()
                .map(|s| {
                    args.push(s.as_str().to_string().into());
                    format!("?{}", args.len())
                })
                .collect();
            sql.push_str(&format!(" AND state IN ({})", marks.join(",")));
        }
        if let Some((ms, id)) = &f.before {
            args.push((*ms as i64).into());
            let m = args.len();
            args.push(id.clone().into());
            let i = args.len();
            sql.push_str(&format!(
                " AND created_ms <= ?{m} AND (created_ms < ?{m} OR id < ?{i})"
            ));
        }
        sql.push_str(" ORDER BY created_ms DESC, id DESC");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut left_out = 0;
        while let Some(r) = rows.next()? {
            match Self::listed(r) {
                Ok(t) => {
                    if !each(t) {
                        break;
                    }
                }
                Err(e) => {
                    log::warn!("{e}; the task is left out of the list");
                    left_out += 1;
                }
            }
        }
        Ok(left_out)
    }

    /// One row of [`ReadStore::list`]'s query; errors name the row and the column.
    fn listed<'r>(r: &'r Row<'_>) -> Result<ListedTask<'r>, StoreError> {
        // The query's column order, by index (for errors).
        const NAMES: [&str; 20] = [
            "id",
            "plugin",
            "priority",
            "target",
            "capability",
            "device",
            "attempts",
            "max_attempts",
            "timeout_ms",
            "state",
            "input",
            "result",
            "error",
            "created_ms",
            "dispatched_ms",
            "started_ms",
            "finished_ms",
            "route",
            "placement",
            "reply_to",
        ];
        let id = || {
            column_text(r, 0)
                .ok()
                .flatten()
                .unwrap_or("(unreadable id)")
                .to_string()
        };
        let named = |i: usize| {
            move |source: rusqlite::Error| StoreError::BadRow {
                id: id(),
                column: NAMES[i],
                source,
            }
        };
        let text = |i: usize| column_text(r, i).map_err(named(i));
        let int = |i: usize| r.get::<_, i64>(i).map_err(named(i));
        let u = |i: usize| -> Result<Option<u64>, StoreError> {
            Ok(r.get::<_, Option<i64>>(i)
                .map_err(named(i))?
                .map(|v| v as u64))
        };
        let state = text(9)?.unwrap_or_default();
        let state = TaskState::parse(state).ok_or_else(|| StoreError::BadState {
            id: id(),
            state: state.to_string(),
        })?;
        Ok(ListedTask {
            id: text(0)?.unwrap_or_default(),
            plugin: text(1)?.unwrap_or_default(),
            priority: r.get(2).map_err(named(2))?,
            target: text(3)?,
            capability: text(4)?,
            device: text(5)?,
            attempts: r.get(6).map_err(named(6))?,
            max_attempts: r.get(7).map_err(named(7))?,
            timeout_ms: int(8)? as u64,
            state,
            input: text(10)?,
            result: text(11)?,
            error: text(12)?,
            created_ms: int(13)? as u64,
            dispatched_ms: u(14)?,
            started_ms: u(15)?,
            finished_ms: u(16)?,
            route: crate::server::scheduler::resolve_route(
                text(17)?.and_then(Route::parse).unwrap_or(Route::Auto),
                text(1)?.unwrap_or_default(),
                r.get::<_, bool>(19).map_err(named(19))?,
            ),
            placement: text(18)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, state: TaskState) -> TaskRow {
        TaskRow {
            id: id.into(),
            plugin: "echo".into(),
            input: "{\"a\":1}".into(),
            priority: 50,
            target: None,
            capability: None,
            timeout_ms: 1000,
            max_attempts: 3,
            reply_to: None,
            correlation: None,
            state,
            attempts: 0,
            device: None,
            result: None,
            error: None,
            created_ms: 1,
            dispatched_ms: None,
            started_ms: None,
            finished_ms: None,
            route: Route::Auto,
            placement: None,
        }
    }

    /// A store made before the dispatch history: opening it seeds the
    /// history from the open tasks' devices, so the device that holds a
    /// task across the upgrade still has its result counted. The history
    /// survives a reopen and goes with the task at retention.
    #[test]
    fn the_dispatch_history_is_seeded_kept_and_deleted_with_its_task() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), "full").unwrap();
            s.conn.execute_batch("DROP TABLE dispatches").unwrap();
            let mut held = row("held", TaskState::Dispatched);
            held.attempts = 2;
            held.device = Some("pi-1".into());
            s.save(&held).unwrap();
            let mut done = row("done", TaskState::Succeeded);
            done.device = Some("pi-2".into());
            done.finished_ms = Some(5);
            s.save(&done).unwrap();
        }
        let mut s = Store::open(dir.path(), "full").unwrap();
        assert_eq!(s.dispatches("held").unwrap(), [(2, "pi-1".to_string())]);
        assert!(s.dispatches("done").unwrap().is_empty());
        s.add_dispatch("held", 3, "pi-3").unwrap();
        s.add_dispatch("done", 1, "pi-2").unwrap();
        drop(s);
        let mut s = Store::open(dir.path(), "full").unwrap();
        let open = s.open_dispatches().unwrap();
        assert_eq!(
            open["held"],
            [(2, "pi-1".to_string()), (3, "pi-3".to_string())]
        );
        assert!(!open.contains_key("done"), "only open tasks: {open:?}");
        s.drop_dispatch("held", 2, "pi-1").unwrap();
        assert_eq!(s.dispatches("held").unwrap(), [(3, "pi-3".to_string())]);
        assert_eq!(s.delete_finished_before(10, 10, 1 << 20).unwrap().0, 1);
        assert!(s.dispatches("done").unwrap().is_empty());
    }

    /// A store made before routes (no `route`, no `placement`) opens with
    /// its rows as `auto` with no placement, in the task rows and in the
    /// lists; so does one whose upgrade stopped after the first column.
    #[test]
    fn a_store_from_before_routes_opens_and_lists() {
        let old_schema = "CREATE TABLE tasks (
                id TEXT PRIMARY KEY, plugin TEXT NOT NULL, input TEXT NOT NULL,
                priority INTEGER NOT NULL, target TEXT, capability TEXT,
                timeout_ms INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
                reply_to TEXT, correlation TEXT, state TEXT NOT NULL,
                attempts INTEGER NOT NULL, device TEXT, result TEXT, error TEXT,
                created_ms INTEGER NOT NULL, dispatched_ms INTEGER, started_ms INTEGER,
                finished_ms INTEGER);
             INSERT INTO tasks (id, plugin, input, priority, timeout_ms, max_attempts,
                reply_to, state, attempts, created_ms)
                VALUES ('old', 'llm', '1', 50, 1000, 3, 'erp/r', 'queued', 0, 7);";
        for partial in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            {
                let c = Connection::open(dir.path().join("openclaw.db")).unwrap();
                c.execute_batch(old_schema).unwrap();
                if partial {
                    c.execute_batch("ALTER TABLE tasks ADD COLUMN route TEXT")
                        .unwrap();
                }
            }
            let s = Store::open(dir.path(), "full").unwrap();
            let rows = s.unfinished_readable().unwrap();
            assert_eq!(rows.len(), 1, "partial {partial}");
            assert_eq!(
                (rows[0].route, rows[0].placement.as_deref()),
                (Route::Auto, None)
            );
            // The view resolves `auto`: the `llm` plugin goes heavy.
            assert_eq!(rows[0].view().route, Route::Heavy);
            let read = ReadStore::open(dir.path()).unwrap();
            let mut seen = Vec::new();
            let left_out = read
                .list(&ListFilter::default(), |t| {
                    seen.push((t.id.to_string(), t.route, t.placement.map(String::from)));
                    true
                })
                .unwrap();
            assert_eq!(left_out, 0);
            assert_eq!(seen, [("old".to_string(), Route::Heavy, None)]);
            drop(s);
            Store::open(dir.path(), "full").unwrap();
        }
    }

    #[test]
    fn survives_reopen_and_filters_unfinished() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), "full").unwrap();
            s.begin().unwrap();
            s.save(&row("a", TaskState::Queued)).unwrap();
            s.save(&row("b", TaskState::Succeeded)).unwrap();
            s.save(&row("c", TaskState::Running)).unwrap();
            s.commit().unwrap();
            // Uncommitted work is not visible after reopen.
            s.begin().unwrap();
            s.save(&row("d", TaskState::Queued)).unwrap();
        }
        let s = Store::open(dir.path(), "full").unwrap();
        let ids: Vec<String> = s.unfinished().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec!["a", "c"]);
        assert_eq!(s.get("b").unwrap().unwrap().state, TaskState::Succeeded);
        assert!(s.get("d").unwrap().is_none());
        assert!(s.exists("a").unwrap());
        assert_eq!(s.get("a").unwrap().unwrap().view().input["a"], 1);
    }

    /// Issue 18 item 7: a row the server cannot read (here a priority of
    /// 999 in a `u8` column) stopped it from starting with "Integer 999 out
    /// of range at index 3". Now the error names the row and the column, and
    /// loading the unfinished tasks leaves that row out.
    #[test]
    fn a_bad_row_is_named_and_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "full").unwrap();
        s.begin().unwrap();
        s.save(&row("good", TaskState::Queued)).unwrap();
        s.save(&row("bad", TaskState::Queued)).unwrap();
        s.save(&row("odd", TaskState::Queued)).unwrap();
        s.commit().unwrap();
        s.conn
            .execute_batch(
                "UPDATE tasks SET priority = 999 WHERE id = 'bad';
                 UPDATE tasks SET state = 'queued', attempts = 'many' WHERE id = 'odd';",
            )
            .unwrap();
        let e = s.get("bad").unwrap_err().to_string();
        assert!(
            e.contains("row bad") && e.contains("`priority`") && e.contains("999"),
            "{e}"
        );
        let e = s.get("odd").unwrap_err().to_string();
        assert!(e.contains("row odd") && e.contains("`attempts`"), "{e}");
        let ids: Vec<String> = s
            .unfinished_readable()
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec!["good"]);
    }

    /// Review finding 6: one bad row made every list page that reached it
    /// fail (the HTTP list answered 503). It is named in the log and left
    /// out; the rows around it are listed.
    #[test]
    fn a_list_leaves_out_a_bad_row_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "full").unwrap();
        s.begin().unwrap();
        for (i, id) in ["a", "bad", "b", "odd", "c"].iter().enumerate() {
            let mut r = row(id, TaskState::Succeeded);
            r.created_ms = 10 - i as u64;
            s.save(&r).unwrap();
        }
        s.commit().unwrap();
        s.conn
            .execute_batch(
                "UPDATE tasks SET priority = 999 WHERE id = 'bad';
                 UPDATE tasks SET state = 'exploded' WHERE id = 'odd';",
            )
            .unwrap();
        let read = ReadStore::open(dir.path()).unwrap();
        let mut seen = Vec::new();
        let left_out = read
            .list(&ListFilter::default(), |t| {
                seen.push(t.id.to_string());
                true
            })
            .unwrap();
        assert_eq!(seen, vec!["a", "b", "c"]);
        assert_eq!(left_out, 2);
        // The error it logs names the row and the column.
        let mut stmt = read
            .conn
            .prepare(
                "SELECT id, plugin, priority, target, capability, device, attempts, \
                      max_attempts, timeout_ms, state, input, result, error, created_ms, \
                      dispatched_ms, started_ms, finished_ms, route, placement, \
                      reply_to IS NOT NULL FROM tasks WHERE id = 'bad'",
            )
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        let e = ReadStore::listed(rows.next().unwrap().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("row bad") && e.contains("`priority`"), "{e}");
    }
}
