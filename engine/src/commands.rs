//! The command queue: durable, per-device queues of commands waiting to go out
//! over the device's own connection.
//!
//! A command is `queued` until the gateway hands it to the device (`delivered`)
//! and the device acknowledges it (`acknowledged`), or until its time-to-live
//! passes (`expired`). A delivered command that was never acknowledged is sent
//! again when the device reconnects; devices recognise repeats by `id`.
//! Inserting a command whose id already exists does nothing, so a rule that
//! replays events after a crash never queues the same command twice.
//!
//! The queue lives in a SQLite file. Callers pass `now` in (milliseconds since
//! the epoch); the queue never reads the clock.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ring::rand::SecureRandom;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{Error, Result};

/// How long a command waits for its device unless told otherwise: one hour.
pub const DEFAULT_TTL_MS: i64 = 60 * 60 * 1000;
/// Largest command payload, as JSON text.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Longest command name.
pub const MAX_NAME_LEN: usize = 128;

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Queued,
    Delivered,
    Acknowledged,
    Expired,
}

impl CommandStatus {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Delivered => "delivered",
            CommandStatus::Acknowledged => "acknowledged",
            CommandStatus::Expired => "expired",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => CommandStatus::Queued,
            "delivered" => CommandStatus::Delivered,
            "acknowledged" => CommandStatus::Acknowledged,
            "expired" => CommandStatus::Expired,
            other => return Err(Error::Internal(format!("unknown command status '{other}'"))),
        })
    }
}

/// A command to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommand {
    /// Unique id; commands from rules use a deterministic one so replays dedupe.
    pub id: String,
    pub device_id: String,
    pub name: String,
    pub payload: serde_json::Value,
    /// Who sent it: `rule:<name>`, `api`.
    pub source: String,
    pub ttl_ms: i64,
}

/// A queued command and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub device_id: String,
    pub name: String,
    pub payload: serde_json::Value,
    pub source: String,
    pub status: CommandStatus,
    pub created_at: i64,
    pub expires_at: i64,
    pub delivered_at: Option<i64>,
    pub acknowledged_at: Option<i64>,
}

/// A fresh random command id, for commands that have no natural one.
pub fn random_id() -> String {
    let mut bytes = [0u8; 12];
    // SystemRandom only fails when the OS has no entropy source at all.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("cmd_{hex}")
}

/// The durable command queue.
pub struct CommandQueue {
    conn: Mutex<Connection>,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    delivered_at INTEGER,
    acknowledged_at INTEGER
);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device_id, status, seq);
";

const COLUMNS: &str = "id, device_id, name, payload, source, status, created_at, expires_at, delivered_at, acknowledged_at";

impl CommandQueue {
    /// Opens (or creates) the queue in the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        Self::init(Connection::open(path)?)
    }

    /// A queue that lives only in memory, for tests.
    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(CommandQueue {
            conn: Mutex::new(conn),
            waiters: Mutex::new(HashMap::new()),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a queue call (SQLite with fsync) on a blocking thread, so async
    /// tasks (rules, gateway sessions) never stall on the disk.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&CommandQueue) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let queue = self.clone();
        tokio::task::spawn_blocking(move || f(&queue))
            .await
            .map_err(|e| Error::Internal(format!("command queue task failed: {e}")))?
    }

    /// Checks a command before it is queued.
    pub fn validate(cmd: &NewCommand) -> Result<()> {
        if cmd.name.is_empty() || cmd.name.len() > MAX_NAME_LEN {
            return Err(Error::User(format!(
                "command for device '{}': the name must be 1 to {MAX_NAME_LEN} bytes, got {}",
                cmd.device_id,
                cmd.name.len()
            )));
        }
        if cmd.device_id.is_empty() {
            return Err(Error::User(format!(
                "command '{}': the device id is empty",
                cmd.name
            )));
        }
        let size = cmd.payload.to_string().len();
        if size > MAX_PAYLOAD_BYTES {
            return Err(Error::User(format!(
                "command '{}' for device '{}': payload is {size} bytes, the limit is {MAX_PAYLOAD_BYTES}",
                cmd.name, cmd.device_id
            )));
        }
        if cmd.ttl_ms <= 0 {
            return Err(Error::User(format!(
                "command '{}': the time-to-live must be positive",
                cmd.name
            )));
        }
        Ok(())
    }

    /// Queues commands in one transaction and wakes their devices' connections.
    /// Commands whose id is already known are skipped. Returns how many were new.
    pub fn enqueue(&self, commands: &[NewCommand], now: i64) -> Result<usize> {
        for c in commands {
            Self::validate(c)?;
        }
        let inserted = {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let mut inserted = 0;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO commands (id, device_id, name, payload, source, status, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7)",
                )?;
                for c in commands {
                    inserted += stmt.execute(params![
                        c.id,
                        c.device_id,
                        c.name,
                        c.payload.to_string(),
                        c.source,
                        now,
                        now.saturating_add(c.ttl_ms)
                    ])?;
                }
            }
            tx.commit()?;
            inserted
        };
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for c in commands {
            if let Some(n) = waiters.get(&c.device_id) {
                n.notify_waiters();
            }
        }
        Ok(inserted)
    }

    /// The commands still to deliver to `device`, oldest first: queued, or
    /// delivered but never acknowledged. Commands past their time-to-live are
    /// marked expired on the way and not returned.
    pub fn pending(&self, device: &str, now: i64) -> Result<Vec<Command>> {
        let conn = self.conn();
        conn.execute(
            "UPDATE commands SET status = 'expired'
             WHERE device_id = ?1 AND status IN ('queued', 'delivered') AND expires_at <= ?2",
            params![device, now],
        )?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM commands
             WHERE device_id = ?1 AND status IN ('queued', 'delivered') ORDER BY seq"
        ))?;
        let rows = stmt.query_map(params![device], row_to_command)?;
        rows.map(|r| r?).collect()
    }

    /// Records that the gateway handed a command to its device.
    pub fn mark_delivered(&self, id: &str, now: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE commands SET status = 'delivered', delivered_at = ?2 WHERE id = ?1 AND status = 'queued'",
            params![id, now],
        )?;
        Ok(())
    }

    /// Records the device's acknowledgement. Only the command's own device may
    /// acknowledge it; returns false when `device` has no such open command.
    pub fn acknowledge(&self, device: &str, id: &str, now: i64) -> Result<bool> {
        let changed = self.conn().execute(
            "UPDATE commands SET status = 'acknowledged', acknowledged_at = ?3
             WHERE id = ?1 AND device_id = ?2 AND status IN ('queued', 'delivered')",
            params![id, device, now],
        )?;
        Ok(changed > 0)
    }

    /// Marks every command past its time-to-live as expired; returns how many.
    pub fn expire(&self, now: i64) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE commands SET status = 'expired' WHERE status IN ('queued', 'delivered') AND expires_at <= ?1",
            params![now],
        )?)
    }

    /// One command by id.
    pub fn get(&self, id: &str) -> Result<Option<Command>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {COLUMNS} FROM commands WHERE id = ?1"))?;
        stmt.query_row(params![id], row_to_command)
            .optional()?
            .transpose()
    }

    /// The newest commands, for one device or all, newest first.
    pub fn list(&self, device: Option<&str>, limit: usize) -> Result<Vec<Command>> {
        let conn = self.conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM commands WHERE ?1 IS NULL OR device_id = ?1 ORDER BY seq DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![device, limit], row_to_command)?;
        rows.map(|r| r?).collect()
    }

    /// Drops every open command of a device (when it is removed): they expire now.
    pub fn expire_device(&self, device: &str, now: i64) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE commands SET status = 'expired', expires_at = MIN(expires_at, ?2)
             WHERE device_id = ?1 AND status IN ('queued', 'delivered')",
            params![device, now],
        )?)
    }

    /// A notifier that fires (`notify_waiters`) whenever a command is queued
    /// for `device`; every session of the device waits on it. A waiter must
    /// create and `enable` its `notified()` future before it reads the queue,
    /// so a command queued in between still wakes it.
    pub fn notifier(&self, device: &str) -> Arc<Notify> {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(device.to_string())
            .or_default()
            .clone()
    }

    /// Forgets a device's notifier once its connection is gone, unless
    /// someone (a newer connection of the same device) still holds it.
    pub fn release_notifier(&self, device: &str) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if waiters
            .get(device)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            waiters.remove(device);
        }
    }
}

fn row_to_command(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Command>> {
    let payload: String = row.get(3)?;
    let status: String = row.get(5)?;
    let build = || -> Result<Command> {
        Ok(Command {
            id: row.get(0)?,
            device_id: row.get(1)?,
            name: row.get(2)?,
            payload: serde_json::from_str(&payload)
                .map_err(|e| Error::Internal(format!("stored command payload is not JSON: {e}")))?,
            source: row.get(4)?,
            status: CommandStatus::parse(&status)?,
            created_at: row.get(6)?,
            expires_at: row.get(7)?,
            delivered_at: row.get(8)?,
            acknowledged_at: row.get(9)?,
        })
    };
    Ok(build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cmd(id: &str, device: &str, ttl: i64) -> NewCommand {
        NewCommand {
            id: id.into(),
            device_id: device.into(),
            name: "fan_on".into(),
            payload: json!({"speed": 3}),
            source: "api".into(),
            ttl_ms: ttl,
        }
    }

    #[test]
    fn lifecycle_queued_delivered_acknowledged() {
        let q = CommandQueue::open_in_memory().unwrap();
        assert_eq!(
            q.enqueue(&[cmd("a", "d1", 1000), cmd("b", "d1", 1000)], 0)
                .unwrap(),
            2
        );
        let pending = q.pending("d1", 10).unwrap();
        assert_eq!(
            pending.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(pending[0].payload, json!({"speed": 3}));
        q.mark_delivered("a", 20).unwrap();
        assert_eq!(
            q.get("a").unwrap().unwrap().status,
            CommandStatus::Delivered
        );
        // Delivered but unacknowledged commands are still pending, for redelivery.
        assert_eq!(q.pending("d1", 30).unwrap().len(), 2);
        assert!(!q.acknowledge("someone-else", "a", 40).unwrap());
        assert!(q.acknowledge("d1", "a", 40).unwrap());
        let a = q.get("a").unwrap().unwrap();
        assert_eq!(
            (a.status, a.acknowledged_at),
            (CommandStatus::Acknowledged, Some(40))
        );
        assert_eq!(q.pending("d1", 50).unwrap().len(), 1);
    }

    #[test]
    fn duplicate_ids_are_ignored_and_ttl_expires() {
        let q = CommandQueue::open_in_memory().unwrap();
        assert_eq!(q.enqueue(&[cmd("x", "d", 100)], 0).unwrap(), 1);
        assert_eq!(q.enqueue(&[cmd("x", "d", 100)], 5).unwrap(), 0);
        assert_eq!(q.pending("d", 99).unwrap().len(), 1);
        assert!(q.pending("d", 100).unwrap().is_empty());
        assert_eq!(q.get("x").unwrap().unwrap().status, CommandStatus::Expired);
        assert!(!q.acknowledge("d", "x", 101).unwrap());
    }

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commands.db");
        {
            let q = CommandQueue::open(&path).unwrap();
            q.enqueue(&[cmd("keep", "d", DEFAULT_TTL_MS)], 0).unwrap();
        }
        let q = CommandQueue::open(&path).unwrap();
        assert_eq!(q.pending("d", 1).unwrap()[0].id, "keep");
    }

    #[test]
    fn bad_commands_are_refused_whole() {
        let q = CommandQueue::open_in_memory().unwrap();
        let mut big = cmd("big", "d", 10);
        big.payload = json!("x".repeat(MAX_PAYLOAD_BYTES + 1));
        let err = q.enqueue(&[cmd("ok", "d", 10), big], 0).unwrap_err();
        assert!(err.to_string().contains("payload"), "{err}");
        assert!(q.pending("d", 0).unwrap().is_empty());
    }

    #[tokio::test]
    async fn enqueue_wakes_the_device() {
        let q = CommandQueue::open_in_memory().unwrap();
        let n = q.notifier("d");
        let first = n.notified();
        let second = n.notified();
        tokio::pin!(first, second);
        first.as_mut().enable();
        second.as_mut().enable();
        q.enqueue(&[cmd("w", "d", 1000)], 0).unwrap();
        let wait = std::time::Duration::from_secs(1);
        tokio::time::timeout(wait, first).await.unwrap();
        tokio::time::timeout(wait, second).await.unwrap();
    }
}
