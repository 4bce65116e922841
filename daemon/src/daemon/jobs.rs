//! The persisted job queue (`state.db`, SQLite). A job is one checkpoint path to audit.
//! Jobs left `running` by a crash are queued again at start; the audit log, not this table,
//! decides whether a checkpoint was already audited, so a crash between appending a record and
//! marking its job done never yields a second record.

use std::path::Path;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};

pub struct Jobs {
    conn: Connection,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub path: String,
    pub watch: usize,
}

/// A finished job, for `mechwatch status`.
#[derive(Debug, Clone)]
pub struct Finished {
    pub path: String,
    pub state: String,
    pub verdict: Option<String>,
    pub seq: Option<i64>,
    pub message: Option<String>,
    pub updated_at: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    watch INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped')),
    verdict TEXT,
    seq INTEGER,
    message TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_by_path ON jobs (path, state);
";

impl Jobs {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    pub fn open_read_only(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { conn })
    }

    /// Jobs a crash left running go back to the queue.
    pub fn requeue_running(&self) -> anyhow::Result<usize> {
        Ok(self.conn.execute(
            "UPDATE jobs SET state = 'queued', updated_at = ?1 WHERE state = 'running'",
            params![now()],
        )?)
    }

    /// [`Jobs::enqueue`] for each of `paths` (with its watch), in one transaction: ten
    /// thousand new checkpoints cost one commit, not ten thousand. Whether each was queued.
    pub fn enqueue_all(&mut self, paths: &[(String, usize)]) -> anyhow::Result<Vec<bool>> {
        let tx = self.conn.transaction()?;
        let mut queued = Vec::with_capacity(paths.len());
        for (path, watch) in paths {
            queued.push(Self::enqueue_in(&tx, path, *watch)?);
        }
        tx.commit()?;
        Ok(queued)
    }

    /// Queue `path` unless it is already queued or running; whether it was queued.
    fn enqueue_in(conn: &Connection, path: &str, watch: usize) -> anyhow::Result<bool> {
        let open: Option<i64> = conn
            .query_row(
                "SELECT id FROM jobs WHERE path = ?1 AND state IN ('queued', 'running')",
                params![path],
                |r| r.get(0),
            )
            .optional()?;
        if open.is_some() {
            return Ok(false);
        }
        let t = now();
        conn.execute(
            "INSERT INTO jobs (path, watch, state, created_at, updated_at) VALUES (?1, ?2, 'queued', ?3, ?3)",
            params![path, watch as i64, t],
        )?;
        Ok(true)
    }

    /// The oldest queued job, marked running.
    pub fn start_next(&self) -> anyhow::Result<Option<Job>> {
        let job = self
            .conn
            .query_row(
                "SELECT id, path, watch FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1",
                [],
                |r| {
                    Ok(Job {
                        id: r.get(0)?,
                        path: r.get(1)?,
                        watch: r.get::<_, i64>(2)? as usize,
                    })
                },
            )
            .optional()?;
        if let Some(j) = &job {
            self.conn.execute(
                "UPDATE jobs SET state = 'running', updated_at = ?2 WHERE id = ?1",
                params![j.id, now()],
            )?;
        }
        Ok(job)
    }

    pub fn finish(
        &self,
        id: i64,
        state: &str,
        verdict: Option<&str>,
        seq: Option<u64>,
        message: Option<&str>,
    ) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE jobs SET state = ?2, verdict = ?3, seq = ?4, message = ?5, updated_at = ?6 WHERE id = ?1",
            params![id, state, verdict, seq.map(|s| s as i64), message, now()],
        )?;
        Ok(())
    }

    pub fn requeue(&self, id: i64, why: &str) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE jobs SET state = 'queued', message = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, why, now()],
        )?;
        Ok(())
    }

    /// Queued and running jobs, oldest first.
    pub fn open_jobs(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut st = self.conn.prepare(
            "SELECT path, state FROM jobs WHERE state IN ('queued', 'running') ORDER BY id",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn queued(&self) -> anyhow::Result<usize> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE state = 'queued'",
            [],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }

    pub fn recent(&self, n: usize) -> anyhow::Result<Vec<Finished>> {
        let mut st = self.conn.prepare(
            "SELECT path, state, verdict, seq, message, updated_at FROM jobs
             WHERE state IN ('done', 'failed', 'skipped') ORDER BY updated_at DESC, id DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![n as i64], |r| {
            Ok(Finished {
                path: r.get(0)?,
                state: r.get(1)?,
                verdict: r.get(2)?,
                seq: r.get(3)?,
                message: r.get(4)?,
                updated_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn now() -> String {
    audit_log::record::now_rfc3339()
}

#[cfg(test)]
mod tests {
    use super::Jobs;

    /// Ten thousand new checkpoints used to cost ten thousand commits (and a scan of the
    /// table each), holding the daemon's main loop for minutes.
    #[test]
    fn many_checkpoints_queue_in_one_transaction_each_once() {
        let tmp = tempfile::tempdir().unwrap();
        let mut jobs = Jobs::open(&tmp.path().join("state.db")).unwrap();
        let paths: Vec<(String, usize)> =
            (0..10_000).map(|i| (format!("/m/{i}.gguf"), 0)).collect();
        let queued = jobs.enqueue_all(&paths).unwrap();
        assert!(queued.iter().all(|q| *q));
        assert_eq!(jobs.queued().unwrap(), 10_000);
        // Already queued: not again.
        let again = jobs.enqueue_all(&paths[..3]).unwrap();
        assert_eq!(again, vec![false; 3]);
        assert_eq!(jobs.queued().unwrap(), 10_000);
    }
}
