//! `DATA/workflows.db`: each workflow run (its checked definition, its
//! inputs, its state and end) and its steps, every change written before
//! the runner goes on (`synchronous = FULL`), so a restart resumes where
//! it stopped.

use super::runner::{RunView, StepView, WorkflowState};
use super::Workflow;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value as J;
use std::path::{Path, PathBuf};

/// Errors of the workflow store.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowsError {
    #[error("workflow store {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("workflow store {path}: run `{id}`: {message}")]
    Corrupt {
        path: PathBuf,
        id: String,
        message: String,
    },
}

pub struct WorkflowStore {
    conn: Connection,
    path: PathBuf,
}

/// A run's summary, for the list.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RunSummary {
    pub id: String,
    pub name: String,
    pub state: WorkflowState,
    pub created_ms: u64,
    pub updated_ms: u64,
}

impl WorkflowStore {
    pub fn open(data_dir: &Path) -> Result<WorkflowStore, WorkflowsError> {
        let path = data_dir.join("workflows.db");
        let conn = Connection::open(&path).map_err(|source| WorkflowsError::Sql {
            path: path.clone(),
            source,
        })?;
        let s = WorkflowStore { conn, path };
        s.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
                 CREATE TABLE IF NOT EXISTS runs (
                    id TEXT PRIMARY KEY, name TEXT NOT NULL, definition TEXT NOT NULL,
                    inputs TEXT NOT NULL, state TEXT NOT NULL, output TEXT, error TEXT,
                    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
                 CREATE INDEX IF NOT EXISTS runs_created ON runs (created_ms);
                 CREATE TABLE IF NOT EXISTS steps (
                    run_id TEXT NOT NULL, n INTEGER NOT NULL, body TEXT NOT NULL,
                    PRIMARY KEY (run_id, n));",
            )
            .map_err(|e| s.sql(e))?;
        Ok(s)
    }

    fn sql(&self, source: rusqlite::Error) -> WorkflowsError {
        WorkflowsError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, id: &str, message: String) -> WorkflowsError {
        WorkflowsError::Corrupt {
            path: self.path.clone(),
            id: id.into(),
            message,
        }
    }

    /// The run and all its steps (`waiting`), in one transaction.
    pub fn create(&self, v: &RunView, wf: &Workflow) -> Result<(), WorkflowsError> {
        let def = serde_json::to_string(wf).unwrap_or_default();
        let inputs = v.inputs.to_string();
        let tx = self.conn.unchecked_transaction().map_err(|e| self.sql(e))?;
        tx.execute(
            "INSERT INTO runs (id, name, definition, inputs, state, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            params![
                v.id,
                v.name,
                def,
                inputs,
                v.state.as_str(),
                v.created_ms as i64
            ],
        )
        .map_err(|e| self.sql(e))?;
        for (n, s) in v.steps.iter().enumerate() {
            tx.execute(
                "INSERT INTO steps (run_id, n, body) VALUES (?1, ?2, ?3)",
                params![v.id, n as i64, serde_json::to_string(s).unwrap_or_default()],
            )
            .map_err(|e| self.sql(e))?;
        }
        tx.commit().map_err(|e| self.sql(e))
    }

    /// Writes step `n` as it is now.
    pub fn put_step(&self, id: &str, n: usize, s: &StepView) -> Result<(), WorkflowsError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.sql(e))?;
        tx.execute(
            "UPDATE steps SET body = ?3 WHERE run_id = ?1 AND n = ?2",
            params![id, n as i64, serde_json::to_string(s).unwrap_or_default()],
        )
        .map_err(|e| self.sql(e))?;
        tx.execute(
            "UPDATE runs SET updated_ms = ?2 WHERE id = ?1",
            params![id, crate::now_ms() as i64],
        )
        .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))
    }

    /// Ends run `id` with `state` unless it has ended already: true when
    /// this call ended it. The first end stored wins (a cancel stored
    /// while the driver finishes, or the other way round).
    pub fn finish(
        &self,
        id: &str,
        state: WorkflowState,
        output: Option<&J>,
        error: Option<&str>,
    ) -> Result<bool, WorkflowsError> {
        let n = self
            .conn
            .execute(
                "UPDATE runs SET state = ?2, output = ?3, error = ?4, updated_ms = ?5
                 WHERE id = ?1 AND state = 'running'",
                params![
                    id,
                    state.as_str(),
                    output.map(|o| o.to_string()),
                    error,
                    crate::now_ms() as i64
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(n > 0)
    }

    /// Deletes up to `limit` runs that ended before `cutoff_ms`, with
    /// their steps; how many (see `runs::store::prune_ended`).
    pub fn prune(&self, cutoff_ms: u64, limit: u32) -> Result<usize, WorkflowsError> {
        crate::server::runs::store::prune_ended(&self.conn, cutoff_ms, limit)
            .map_err(|e| self.sql(e))
    }

    pub fn get(&self, id: &str) -> Result<Option<RunView>, WorkflowsError> {
        Ok(self.get_full(id)?.map(|(v, _)| v))
    }

    fn get_full(&self, id: &str) -> Result<Option<(RunView, Workflow)>, WorkflowsError> {
        type Row = (
            String,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            i64,
            i64,
        );
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT name, definition, inputs, state, output, error, created_ms, updated_ms
                 FROM runs WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        let Some((name, def, inputs, state, output, error, created, updated)) = row else {
            return Ok(None);
        };
        let wf: Workflow =
            serde_json::from_str(&def).map_err(|e| self.corrupt(id, format!("definition: {e}")))?;
        let inputs: J =
            serde_json::from_str(&inputs).map_err(|e| self.corrupt(id, format!("inputs: {e}")))?;
        let output = match output {
            Some(o) => Some(
                serde_json::from_str(&o).map_err(|e| self.corrupt(id, format!("output: {e}")))?,
            ),
            None => None,
        };
        let mut stmt = self
            .conn
            .prepare("SELECT body FROM steps WHERE run_id = ?1 ORDER BY n")
            .map_err(|e| self.sql(e))?;
        let bodies: Vec<String> = stmt
            .query_map(params![id], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.sql(e))?;
        let mut steps = Vec::with_capacity(bodies.len());
        for b in bodies {
            steps.push(
                serde_json::from_str(&b).map_err(|e| self.corrupt(id, format!("step: {e}")))?,
            );
        }
        let view = RunView {
            id: id.into(),
            name,
            state: WorkflowState::parse(&state),
            inputs,
            steps,
            output,
            error,
            created_ms: created as u64,
            updated_ms: updated as u64,
        };
        Ok(Some((view, wf)))
    }

    /// The runs still in progress, to resume. A row that cannot be read is
    /// marked failed with the reason, not left to stop the server.
    pub fn open_runs(&self) -> Result<Vec<(RunView, Workflow)>, WorkflowsError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM runs WHERE state = 'running'")
            .map_err(|e| self.sql(e))?;
        let ids: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for id in ids {
            match self.get_full(&id) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e @ WorkflowsError::Corrupt { .. }) => {
                    log::error!("{e}; marked failed");
                    self.finish(&id, WorkflowState::Failed, None, Some(&e.to_string()))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The newest `limit` runs, newest first.
    pub fn list(&self, limit: u32) -> Result<Vec<RunSummary>, WorkflowsError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, name, state, created_ms, updated_ms FROM runs
                 ORDER BY created_ms DESC, id DESC LIMIT ?1",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params![limit as i64], |r| {
                Ok(RunSummary {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    state: WorkflowState::parse(&r.get::<_, String>(2)?),
                    created_ms: r.get::<_, i64>(3)? as u64,
                    updated_ms: r.get::<_, i64>(4)? as u64,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sql(e))?;
        Ok(rows)
    }
}
