//! `DATA/runs.db`: each agent run (its request, the tools it was given,
//! its state and end) and its steps, written before the loop goes on
//! (`synchronous = FULL`), so a restart resumes where it stopped.

use super::{RunRequest, RunState, RunView, Step};
use crate::server::tools::FleetTool;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};

/// Errors of the run store.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("agent run store {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("agent run store {path}: run `{id}`: {message}")]
    Corrupt {
        path: PathBuf,
        id: String,
        message: String,
    },
}

pub struct RunStore {
    conn: Connection,
    path: PathBuf,
}

impl RunStore {
    pub fn open(data_dir: &Path) -> Result<RunStore, RunsError> {
        let path = data_dir.join("runs.db");
        let conn = Connection::open(&path).map_err(|source| RunsError::Sql {
            path: path.clone(),
            source,
        })?;
        let s = RunStore { conn, path };
        s.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
                 CREATE TABLE IF NOT EXISTS runs (
                    id TEXT PRIMARY KEY, request TEXT NOT NULL, tools TEXT NOT NULL,
                    state TEXT NOT NULL, answer TEXT, error TEXT,
                    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS steps (
                    run_id TEXT NOT NULL, n INTEGER NOT NULL, body TEXT NOT NULL,
                    PRIMARY KEY (run_id, n));",
            )
            .map_err(|e| s.sql(e))?;
        Ok(s)
    }

    fn sql(&self, source: rusqlite::Error) -> RunsError {
        RunsError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, id: &str, message: String) -> RunsError {
        RunsError::Corrupt {
            path: self.path.clone(),
            id: id.into(),
            message,
        }
    }

    pub fn create(
        &self,
        v: &RunView,
        req: &RunRequest,
        tools: &[FleetTool],
    ) -> Result<(), RunsError> {
        let req = serde_json::to_string(req).unwrap_or_default();
        let tools = serde_json::to_string(tools).unwrap_or_default();
        self.conn
            .execute(
                "INSERT INTO runs (id, request, tools, state, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![v.id, req, tools, v.state.as_str(), v.created_ms as i64],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Writes a step (a new one, or a later form of one) and the state.
    pub fn put_step(&self, id: &str, step: &Step, state: RunState) -> Result<(), RunsError> {
        let body = serde_json::to_string(step).unwrap_or_default();
        let tx = self.conn.unchecked_transaction().map_err(|e| self.sql(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO steps (run_id, n, body) VALUES (?1, ?2, ?3)",
            params![id, step.n(), body],
        )
        .map_err(|e| self.sql(e))?;
        // A run already ended (a cancel stored first) keeps its end.
        tx.execute(
            "UPDATE runs SET state = ?2, updated_ms = ?3
             WHERE id = ?1 AND state IN ('running', 'awaiting_approval')",
            params![id, state.as_str(), crate::now_ms() as i64],
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
        state: RunState,
        answer: Option<&str>,
        error: Option<&str>,
    ) -> Result<bool, RunsError> {
        let n = self
            .conn
            .execute(
                "UPDATE runs SET state = ?2, answer = ?3, error = ?4, updated_ms = ?5
                 WHERE id = ?1 AND state IN ('running', 'awaiting_approval')",
                params![id, state.as_str(), answer, error, crate::now_ms() as i64],
            )
            .map_err(|e| self.sql(e))?;
        Ok(n > 0)
    }

    pub fn get(&self, id: &str) -> Result<Option<RunView>, RunsError> {
        Ok(self.get_full(id)?.map(|(v, _, _)| v))
    }

    fn get_full(
        &self,
        id: &str,
    ) -> Result<Option<(RunView, RunRequest, Vec<FleetTool>)>, RunsError> {
        type Row = (
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
                "SELECT request, tools, state, answer, error, created_ms, updated_ms
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
                    ))
                },
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        let Some((req, tools, state, answer, error, created, updated)) = row else {
            return Ok(None);
        };
        let req: RunRequest =
            serde_json::from_str(&req).map_err(|e| self.corrupt(id, format!("request: {e}")))?;
        let tools: Vec<FleetTool> =
            serde_json::from_str(&tools).map_err(|e| self.corrupt(id, format!("tools: {e}")))?;
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
            state: RunState::parse(&state),
            goal: req.goal.clone(),
            model: req.model.clone(),
            tools: tools.iter().map(|t| t.name.clone()).collect(),
            answer,
            error,
            steps,
            created_ms: created as u64,
            updated_ms: updated as u64,
        };
        Ok(Some((view, req, tools)))
    }

    /// The runs still in progress, to resume. A row that cannot be read is
    /// marked failed with the reason, not left to stop the server.
    pub fn open_runs(&self) -> Result<Vec<(RunView, RunRequest, Vec<FleetTool>)>, RunsError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM runs WHERE state IN ('running', 'awaiting_approval')")
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
                Err(e @ RunsError::Corrupt { .. }) => {
                    log::error!("{e}; marked failed");
                    self.finish(&id, RunState::Failed, None, Some(&e.to_string()))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Runs deleted per sweep transaction (then the next batch).
pub(crate) const PRUNE_BATCH: u32 = 500;

/// Deletes up to `limit` runs that ended before `cutoff_ms`, with their
/// steps, from a store with this shape (`runs` and `steps`; agent runs
/// and workflow runs share it); how many. Runs in progress are kept
/// however old.
pub(crate) fn prune_ended(
    conn: &Connection,
    cutoff_ms: u64,
    limit: u32,
) -> Result<usize, rusqlite::Error> {
    let tx = conn.unchecked_transaction()?;
    let ids: Vec<String> = {
        let mut q = tx.prepare(
            "SELECT id FROM runs WHERE state IN ('succeeded', 'failed', 'cancelled')
             AND updated_ms < ?1 ORDER BY updated_ms LIMIT ?2",
        )?;
        let rows = q.query_map(params![cutoff_ms as i64, limit], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for id in &ids {
        tx.execute("DELETE FROM steps WHERE run_id = ?1", params![id])?;
        tx.execute("DELETE FROM runs WHERE id = ?1", params![id])?;
    }
    tx.commit()?;
    Ok(ids.len())
}

impl RunStore {
    /// See [`prune_ended`].
    pub fn prune(&self, cutoff_ms: u64, limit: u32) -> Result<usize, RunsError> {
        prune_ended(&self.conn, cutoff_ms, limit).map_err(|e| self.sql(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str) -> RunView {
        RunView {
            id: id.into(),
            state: RunState::Running,
            goal: "g".into(),
            model: "m".into(),
            tools: Vec::new(),
            answer: None,
            error: None,
            steps: Vec::new(),
            created_ms: 1,
            updated_ms: 1,
        }
    }

    fn llm_step(task: Option<&str>) -> Step {
        Step::Llm {
            n: 0,
            task_id: task.map(Into::into),
            output: None,
            error: None,
            answer_only: false,
            prompt_tokens: 0,
            completion_tokens: 0,
        }
    }

    #[test]
    fn retention_deletes_ended_runs_and_their_steps_not_running_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunStore::open(dir.path()).unwrap();
        let req: RunRequest =
            serde_json::from_value(serde_json::json!({"goal": "g", "model": "m", "tools": []}))
                .unwrap();
        for id in ["old-ended", "old-running", "new-ended"] {
            s.create(&run(id), &req, &[]).unwrap();
            s.put_step(id, &llm_step(None), RunState::Running).unwrap();
        }
        s.finish("old-ended", RunState::Failed, None, Some("x"))
            .unwrap();
        s.finish("new-ended", RunState::Succeeded, Some("a"), None)
            .unwrap();
        s.conn
            .execute_batch(
                "UPDATE runs SET updated_ms = 5 WHERE id LIKE 'old-%';
                 UPDATE runs SET updated_ms = 50 WHERE id = 'new-ended';",
            )
            .unwrap();
        assert_eq!(s.prune(10, PRUNE_BATCH).unwrap(), 1);
        assert!(s.get("old-ended").unwrap().is_none());
        let steps: i64 = s
            .conn
            .query_row(
                "SELECT COUNT(*) FROM steps WHERE run_id = 'old-ended'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(steps, 0, "its steps went with it");
        assert!(s.get("old-running").unwrap().is_some(), "in progress: kept");
        assert!(
            s.get("new-ended").unwrap().is_some(),
            "ended recently: kept"
        );
        assert_eq!(s.prune(10, PRUNE_BATCH).unwrap(), 0);
    }

    #[test]
    fn the_first_end_stored_wins_and_a_cancelled_run_is_not_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunStore::open(dir.path()).unwrap();
        let req: RunRequest =
            serde_json::from_value(serde_json::json!({"goal": "g", "model": "m", "tools": []}))
                .unwrap();
        s.create(&run("run-1"), &req, &[]).unwrap();
        // A cancel stored while the driver is still at work...
        assert!(s
            .finish("run-1", RunState::Cancelled, None, Some("cancelled"))
            .unwrap());
        // ...is neither revived by the driver's next step nor overwritten
        // by the end it reaches.
        s.put_step("run-1", &llm_step(Some("t")), RunState::Running)
            .unwrap();
        assert!(!s
            .finish("run-1", RunState::Succeeded, Some("42"), None)
            .unwrap());
        let got = s.get("run-1").unwrap().unwrap();
        assert_eq!(got.state, RunState::Cancelled);
        assert_eq!(got.answer, None);
        assert_eq!(got.steps.len(), 1, "the step itself is kept");
        assert!(s.open_runs().unwrap().is_empty(), "not resumed at a start");
    }
}
