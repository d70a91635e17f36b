//! The command queue: durable, per-device queues of commands waiting to go out
//! over the device's own connection, and their answers.
//!
//! A command is `queued` until the gateway hands it to the device
//! (`delivered`). The device answers it: `acknowledged` (done; a call's
//! answer comes with a `response`), `rejected` (it will not do it, with its
//! reason) or `failed` (it tried and failed, with its reason). A command
//! still queued or delivered when its time-to-live passes is `expired` and
//! never delivered again; a queued latest-wins command is `superseded` by a
//! newer one of the same name for the same device. A delivered command that
//! was never answered is sent again, in queue order, when the device
//! reconnects; devices recognise repeats by `id`.
//!
//! Inserting a command whose id already exists does nothing, so a rule that
//! replays events after a crash never queues the same command twice; a
//! command with an idempotency key already used for the same device is not
//! queued again either.
//!
//! The queue lives in a SQLite file whose schema version is kept in
//! `PRAGMA user_version`; older files are upgraded in place when opened.
//! Callers pass `now` in (milliseconds since the epoch); the queue never
//! reads the clock.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use ring::rand::SecureRandom;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::event::TIME_ZONE;
use crate::{Error, Result};

/// How long a command waits for its device unless told otherwise: one hour.
pub const DEFAULT_TTL_MS: i64 = 60 * 60 * 1000;
/// Largest command payload, and largest call response, as JSON text.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Longest command name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Longest reason kept from a device's answer; longer ones are cut.
pub const MAX_REASON_LEN: usize = 1024;

/// The schema version this code writes (`PRAGMA user_version`). 0: the first
/// table (no answers); 1: reasons, responses, idempotency keys, latest-wins.
const SCHEMA_VERSION: i64 = 1;

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Queued,
    Delivered,
    Acknowledged,
    Rejected,
    Failed,
    Expired,
    Superseded,
}

impl CommandStatus {
    /// Every status, in life order.
    pub const ALL: [CommandStatus; 7] = [
        CommandStatus::Queued,
        CommandStatus::Delivered,
        CommandStatus::Acknowledged,
        CommandStatus::Rejected,
        CommandStatus::Failed,
        CommandStatus::Expired,
        CommandStatus::Superseded,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Delivered => "delivered",
            CommandStatus::Acknowledged => "acknowledged",
            CommandStatus::Rejected => "rejected",
            CommandStatus::Failed => "failed",
            CommandStatus::Expired => "expired",
            CommandStatus::Superseded => "superseded",
        }
    }

    /// The status named `s`, if there is one.
    pub fn from_name(s: &str) -> Option<Self> {
        CommandStatus::ALL.into_iter().find(|c| c.as_str() == s)
    }

    fn parse(s: &str) -> Result<Self> {
        Self::from_name(s).ok_or_else(|| Error::Internal(format!("unknown command status '{s}'")))
    }

    /// Whether the command is settled: nothing changes it any more.
    pub fn is_final(self) -> bool {
        !matches!(self, CommandStatus::Queued | CommandStatus::Delivered)
    }
}

/// A command to queue.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewCommand {
    /// Unique id; commands from rules use a deterministic one so replays dedupe.
    pub id: String,
    pub device_id: String,
    pub name: String,
    pub payload: serde_json::Value,
    /// Who sent it: `rule:<name>`, `api`.
    pub source: String,
    pub ttl_ms: i64,
    /// A second command for the same device with the same key is not queued.
    pub idempotency_key: Option<String>,
    /// Queuing it supersedes the device's still-queued commands of the same name.
    pub latest_wins: bool,
    /// A caller waits for the device's answer (a direct method call).
    pub call: bool,
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
    /// When the device answered (acknowledged, rejected or failed).
    pub answered_at: Option<i64>,
    /// Why it was rejected, failed or superseded.
    pub reason: Option<String>,
    /// A call's answer from the device.
    pub response: Option<serde_json::Value>,
    pub idempotency_key: Option<String>,
    pub latest_wins: bool,
    pub call: bool,
}

/// A device's answer to one of its commands.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// `Acknowledged`, `Rejected` or `Failed`.
    pub status: CommandStatus,
    pub reason: Option<String>,
    pub response: Option<serde_json::Value>,
}

impl Answer {
    /// A plain acknowledgement.
    pub fn acknowledged() -> Self {
        Answer {
            status: CommandStatus::Acknowledged,
            reason: None,
            response: None,
        }
    }
}

/// What [`CommandQueue::submit`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub command: Command,
    /// False when the idempotency key (or id) matched an existing command,
    /// which is returned instead and not queued again.
    pub created: bool,
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
    /// The SQLite write-ahead log, which the queue fsyncs itself (the
    /// connection commits with `synchronous = NORMAL`); `None` for a queue
    /// in memory.
    wal: Option<PathBuf>,
    /// Commits so far, counted as each one finishes.
    written: AtomicU64,
    /// Commits known to be durable: held while the WAL is fsynced, so calls
    /// that wait for the disk share one fsync, and none holds `conn`.
    synced: Mutex<u64>,
    /// Per device: fired when a command is queued for it.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    /// Per command id: fired when the command may have settled.
    answers: Mutex<HashMap<String, Arc<Notify>>>,
}

/// The first schema (version 0); kept as is so that old files and new ones
/// take the same upgrade path.
const SCHEMA_V0: &str = "
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

/// Version 0 → 1.
const MIGRATE_V1: &str = "
ALTER TABLE commands ADD COLUMN answered_at INTEGER;
ALTER TABLE commands ADD COLUMN reason TEXT;
ALTER TABLE commands ADD COLUMN response TEXT;
ALTER TABLE commands ADD COLUMN idempotency_key TEXT;
ALTER TABLE commands ADD COLUMN latest_wins INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN is_call INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX IF NOT EXISTS commands_by_key ON commands (device_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS commands_by_status ON commands (status, expires_at);
";

const COLUMNS: &str = "id, device_id, name, payload, source, status, created_at, expires_at, \
    delivered_at, acknowledged_at, answered_at, reason, response, idempotency_key, latest_wins, is_call";

const OPEN: &str = "('queued', 'delivered')";

impl CommandQueue {
    /// Opens (or creates) the queue in the SQLite file at `path`, upgrading
    /// an older file in place.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Self::init(Connection::open(path)?, Some(PathBuf::from(wal)))
    }

    /// A queue that lives only in memory, for tests.
    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?, None)
    }

    fn init(mut conn: Connection, wal: Option<PathBuf>) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let tx = conn.transaction()?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(Error::User(format!(
                "the command queue was written by a newer Tributary (schema version {version}, \
                 this one knows up to {SCHEMA_VERSION})"
            )));
        }
        tx.execute_batch(SCHEMA_V0)?;
        if version < 1 {
            tx.execute_batch(MIGRATE_V1)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        // From here on commits are written, not fsynced, under the lock;
        // the calls that promise durability fsync the WAL after letting
        // go of it (`write_durably`).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(CommandQueue {
            conn: Mutex::new(conn),
            wal,
            written: AtomicU64::new(0),
            synced: Mutex::new(0),
            waiters: Mutex::new(HashMap::new()),
            answers: Mutex::new(HashMap::new()),
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
        if let Some(key) = &cmd.idempotency_key
            && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN)
        {
            return Err(Error::User(format!(
                "command '{}': the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes, got {}",
                cmd.name,
                key.len()
            )));
        }
        Ok(())
    }

    /// Inserts one command unless its id or idempotency key is taken, and
    /// supersedes what it replaces. Returns whether it was inserted.
    fn insert(tx: &Transaction<'_>, c: &NewCommand, status: &str, now: i64) -> Result<bool> {
        let inserted =
            tx.prepare_cached(
                "INSERT OR IGNORE INTO commands (id, device_id, name, payload, source, status,
                     created_at, expires_at, idempotency_key, latest_wins, is_call)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                c.id,
                c.device_id,
                c.name,
                c.payload.to_string(),
                c.source,
                status,
                now,
                now.saturating_add(c.ttl_ms),
                c.idempotency_key,
                c.latest_wins,
                c.call
            ])? > 0;
        if inserted && c.latest_wins && status == "queued" {
            tx.prepare_cached(
                "UPDATE commands SET status = 'superseded', reason = 'superseded by ' || ?1
                 WHERE device_id = ?2 AND name = ?3 AND status = 'queued' AND id <> ?1",
            )?
            .execute(params![c.id, c.device_id, c.name])?;
        }
        Ok(inserted)
    }

    /// Queues commands in one transaction and wakes their devices' connections.
    /// Commands whose id, or idempotency key for their device, is already
    /// known are skipped. Returns how many were new.
    pub fn enqueue(&self, commands: &[NewCommand], now: i64) -> Result<usize> {
        self.enqueue_with(commands, now, true)
    }

    /// [`enqueue`](CommandQueue::enqueue) without waiting for the disk:
    /// the commands are written to the queue's file, so they survive a
    /// crash of the process, but a power cut may lose them until the next
    /// [`sync`](CommandQueue::sync) (or the next change that is fsynced).
    ///
    /// For a rule's commands, which sit on the path from event to command:
    /// the rule syncs the queue before its checkpoint moves past the events
    /// they came from. Commands a power cut took are then queued again when
    /// the rule replays those events, with the same ids.
    pub fn enqueue_unsynced(&self, commands: &[NewCommand], now: i64) -> Result<usize> {
        self.enqueue_with(commands, now, false)
    }

    fn enqueue_with(&self, commands: &[NewCommand], now: i64, fsync: bool) -> Result<usize> {
        for c in commands {
            Self::validate(c)?;
        }
        let (inserted, ticket) = self.write(|conn| {
            let tx = conn.transaction()?;
            let mut inserted = 0;
            for c in commands {
                inserted += usize::from(Self::insert(&tx, c, "queued", now)?);
            }
            tx.commit()?;
            Ok(inserted)
        })?;
        if fsync {
            self.sync_to(ticket)?;
        }
        self.wake_devices(commands.iter().map(|c| c.device_id.as_str()));
        if commands.iter().any(|c| c.latest_wins) {
            self.wake_all_answers();
        }
        Ok(inserted)
    }

    /// Runs a write with the connection, and returns what it returned with
    /// the number of its commit, for [`sync_to`](CommandQueue::sync_to).
    fn write<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<(T, u64)> {
        let mut conn = self.conn();
        let out = f(&mut conn)?;
        Ok((out, self.written.fetch_add(1, Ordering::SeqCst) + 1))
    }

    /// [`write`](CommandQueue::write), then waits until it is durable.
    fn write_durably<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let (out, ticket) = self.write(f)?;
        self.sync_to(ticket)?;
        Ok(out)
    }

    /// Runs one UPDATE; if it changed rows, waits until they are durable.
    fn update_durably(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
        let (changed, ticket) = self.write(|conn| Ok(conn.execute(sql, params)?))?;
        if changed > 0 {
            self.sync_to(ticket)?;
        }
        Ok(changed)
    }

    /// Waits until commit `ticket` is durable: fsyncs the WAL unless an
    /// fsync that began after that commit already did. One fsync covers
    /// every commit before it, so callers waiting together share one.
    fn sync_to(&self, ticket: u64) -> Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= ticket {
            return Ok(());
        }
        // Every commit counted here has been written to the WAL.
        let target = self.written.load(Ordering::SeqCst);
        if let Some(wal) = &self.wal {
            // An fsync through any handle of the file flushes all of it.
            // SQLite removes its WAL only when the last connection closes,
            // after copying it into the database file and syncing that.
            match File::open(wal) {
                Ok(f) => f.sync_data(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
            .map_err(|e| Error::io(format!("fsync {}", wal.display()), e))?;
        }
        *synced = target;
        Ok(())
    }

    /// Makes every change so far durable, including commands queued by
    /// [`enqueue_unsynced`](CommandQueue::enqueue_unsynced). Cheap when
    /// there is nothing to sync.
    pub fn sync(&self) -> Result<()> {
        self.sync_to(self.written.load(Ordering::SeqCst))
    }

    /// Whether the queue holds changes a power cut could lose (commands
    /// queued since the last [`sync`](CommandQueue::sync), say).
    pub fn has_unsynced(&self) -> bool {
        let synced = *self.synced.lock().unwrap_or_else(|p| p.into_inner());
        self.written.load(Ordering::SeqCst) > synced
    }

    /// Queues one command, or finds the one its id or idempotency key
    /// already names (for the same device).
    pub fn submit(&self, command: &NewCommand, now: i64) -> Result<Submitted> {
        Self::validate(command)?;
        let submitted = self.write_durably(|conn| {
            let tx = conn.transaction()?;
            let created = Self::insert(&tx, command, "queued", now)?;
            let found = if created {
                get_in(&tx, "id = ?1", params![command.id])?
            } else {
                match &command.idempotency_key {
                    Some(key) => get_in(
                        &tx,
                        "device_id = ?1 AND idempotency_key = ?2",
                        params![command.device_id, key],
                    )?,
                    None => None,
                }
                .map_or_else(
                    || get_in(&tx, "id = ?1", params![command.id]),
                    |c| Ok(Some(c)),
                )?
            };
            tx.commit()?;
            let command = found
                .ok_or_else(|| Error::Internal(format!("command {} was not stored", command.id)))?;
            Ok(Submitted { command, created })
        })?;
        if submitted.created {
            self.wake_devices([command.device_id.as_str()]);
            if command.latest_wins {
                self.wake_all_answers();
            }
        }
        Ok(submitted)
    }

    /// Records a command that failed before it could be queued (a call to a
    /// device that is not connected): it is stored `failed` with `reason`,
    /// and never delivered.
    pub fn record_failed(&self, command: &NewCommand, reason: &str, now: i64) -> Result<Command> {
        Self::validate(command)?;
        let stored = self.write_durably(|conn| {
            let tx = conn.transaction()?;
            Self::insert(&tx, command, "failed", now)?;
            tx.execute(
                "UPDATE commands SET reason = ?2 WHERE id = ?1 AND status = 'failed' AND reason IS NULL",
                params![command.id, reason],
            )?;
            let stored = get_in(&tx, "id = ?1", params![command.id])?;
            tx.commit()?;
            Ok(stored)
        })?;
        stored.ok_or_else(|| Error::Internal(format!("command {} was not stored", command.id)))
    }

    /// The commands still to deliver to `device`, in queue order: queued, or
    /// delivered but never answered. Commands past their time-to-live are
    /// marked expired on the way and not returned.
    pub fn pending(&self, device: &str, now: i64) -> Result<Vec<Command>> {
        let conn = self.conn();
        let expired = conn.execute(
            &format!(
                "UPDATE commands SET status = 'expired'
                 WHERE device_id = ?1 AND status IN {OPEN} AND expires_at <= ?2"
            ),
            params![device, now],
        )?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM commands
             WHERE device_id = ?1 AND status IN {OPEN} ORDER BY seq"
        ))?;
        let rows = stmt.query_map(params![device], row_to_command)?;
        let pending = rows.map(|r| r?).collect();
        drop(stmt);
        drop(conn);
        if expired > 0 {
            self.wake_all_answers();
        }
        pending
    }

    /// Records that the gateway is handing a command to its device (again,
    /// after a reconnect: `delivered_at` is the latest time). Returns false,
    /// changing nothing, when the command is no longer open (superseded,
    /// expired or answered meanwhile): it must not go out.
    pub fn mark_delivered(&self, id: &str, now: i64) -> Result<bool> {
        Ok(self.mark_all_delivered(&[id], now)?.first() == Some(&true))
    }

    /// [`mark_delivered`](CommandQueue::mark_delivered) for several
    /// commands in one transaction: whether each may go out.
    ///
    /// The mark is not fsynced: it stands between the queue and the
    /// device's frame, on the path from event to command, and it needs no
    /// durability. A mark lost to a power cut leaves the command queued, so
    /// it goes out again, as it does after any reconnect (delivery is at
    /// least once; the device knows a repeat by its id). A process crash
    /// loses nothing: SQLite has written it to the file by then. The next
    /// fsync makes it durable too.
    pub fn mark_all_delivered(&self, ids: &[&str], now: i64) -> Result<Vec<bool>> {
        let (out, _) = self.write(|conn| {
            let tx = conn.transaction()?;
            let mut out = Vec::with_capacity(ids.len());
            {
                let mut update = tx.prepare_cached(&format!(
                    "UPDATE commands SET status = 'delivered', delivered_at = ?2
                     WHERE id = ?1 AND status IN {OPEN} AND expires_at > ?2"
                ))?;
                for id in ids {
                    out.push(update.execute(params![id, now])? > 0);
                }
            }
            tx.commit()?;
            Ok(out)
        })?;
        Ok(out)
    }

    /// Records the device's acknowledgement; see [`CommandQueue::answer`].
    pub fn acknowledge(&self, device: &str, id: &str, now: i64) -> Result<bool> {
        self.answer(device, id, &Answer::acknowledged(), now)
    }

    /// Records the device's answer. Only the command's own device may answer
    /// it, and only while it is open (queued or delivered, time-to-live not
    /// passed); returns false, changing nothing, otherwise. A reason longer
    /// than [`MAX_REASON_LEN`] is cut; a response over [`MAX_PAYLOAD_BYTES`]
    /// turns the answer into `failed`.
    pub fn answer(&self, device: &str, id: &str, answer: &Answer, now: i64) -> Result<bool> {
        Ok(self.answer_all(device, &[(id, answer)], now)?.first() == Some(&true))
    }

    /// [`answer`](CommandQueue::answer) for several of a device's answers
    /// in one transaction, in order: whether each was taken. It returns once
    /// they are durable; the fsync is shared with any other call waiting
    /// for one, and holds nobody else up.
    pub fn answer_all(
        &self,
        device: &str,
        answers: &[(&str, &Answer)],
        now: i64,
    ) -> Result<Vec<bool>> {
        let mut rows = Vec::with_capacity(answers.len());
        for (id, answer) in answers {
            let mut status = answer.status;
            if !matches!(
                status,
                CommandStatus::Acknowledged | CommandStatus::Rejected | CommandStatus::Failed
            ) {
                return Err(Error::Internal(format!(
                    "a device cannot answer a command with status '{}'",
                    status.as_str()
                )));
            }
            let mut reason = answer.reason.as_deref().map(|r| cut(r, MAX_REASON_LEN));
            let mut response = answer.response.as_ref().map(|r| r.to_string());
            if let Some(size) = response.as_ref().map(String::len)
                && size > MAX_PAYLOAD_BYTES
            {
                status = CommandStatus::Failed;
                reason = Some(format!(
                    "the device's response is {size} bytes, the limit is {MAX_PAYLOAD_BYTES}"
                ));
                response = None;
            }
            rows.push((*id, status, reason, response));
        }
        let taken = self.write_durably(|conn| {
            let tx = conn.transaction()?;
            let mut taken = Vec::with_capacity(rows.len());
            {
                let mut update = tx.prepare_cached(&format!(
                    "UPDATE commands SET status = ?3, answered_at = ?4, reason = ?5, response = ?6,
                         acknowledged_at = CASE WHEN ?3 = 'acknowledged' THEN ?4 END
                     WHERE id = ?1 AND device_id = ?2 AND status IN {OPEN} AND expires_at > ?4"
                ))?;
                for (id, status, reason, response) in &rows {
                    let changed = update.execute(params![
                        id,
                        device,
                        status.as_str(),
                        now,
                        reason,
                        response
                    ])?;
                    taken.push(changed > 0);
                }
            }
            tx.commit()?;
            Ok(taken)
        })?;
        for ((id, ..), taken) in rows.iter().zip(&taken) {
            if *taken {
                self.wake_answer(id);
            }
        }
        Ok(taken)
    }

    /// Marks every command past its time-to-live as expired; returns how many.
    pub fn expire(&self, now: i64) -> Result<usize> {
        let expired = self.update_durably(
            &format!(
                "UPDATE commands SET status = 'expired' WHERE status IN {OPEN} AND expires_at <= ?1"
            ),
            params![now],
        )?;
        if expired > 0 {
            self.wake_all_answers();
        }
        Ok(expired)
    }

    /// Expires one open command now (a call whose caller stopped waiting).
    /// Returns false when it had already settled.
    pub fn expire_now(&self, id: &str, now: i64) -> Result<bool> {
        let changed = self.update_durably(
            &format!(
                "UPDATE commands SET status = 'expired', expires_at = MIN(expires_at, ?2)
                 WHERE id = ?1 AND status IN {OPEN}"
            ),
            params![id, now],
        )?;
        if changed > 0 {
            self.wake_answer(id);
        }
        Ok(changed > 0)
    }

    /// One command by id.
    pub fn get(&self, id: &str) -> Result<Option<Command>> {
        get_in(&self.conn(), "id = ?1", params![id])
    }

    /// The newest commands, for one device or all, newest first.
    pub fn list(&self, device: Option<&str>, limit: usize) -> Result<Vec<Command>> {
        self.list_by(device, None, limit)
    }

    /// The newest commands, optionally of one device and one status, newest first.
    pub fn list_by(
        &self,
        device: Option<&str>,
        status: Option<CommandStatus>,
        limit: usize,
    ) -> Result<Vec<Command>> {
        let conn = self.conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM commands
             WHERE (?1 IS NULL OR device_id = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY seq DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![device, status.map(CommandStatus::as_str), limit],
            row_to_command,
        )?;
        rows.map(|r| r?).collect()
    }

    /// How many commands there are in each status (statuses with none left out).
    pub fn status_counts(&self) -> Result<Vec<(CommandStatus, u64)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT status, COUNT(*) FROM commands GROUP BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut counts = Vec::new();
        for row in rows {
            let (status, n) = row?;
            counts.push((
                CommandStatus::parse(&status)?,
                u64::try_from(n).unwrap_or(0),
            ));
        }
        counts.sort_by_key(|(s, _)| CommandStatus::ALL.iter().position(|a| a == s));
        Ok(counts)
    }

    /// Every command, oldest first, as the SQL table `commands`
    /// (see [`command_schema`]).
    pub fn table(&self) -> Result<RecordBatch> {
        let commands = {
            let conn = self.conn();
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM commands ORDER BY seq"))?;
            let rows = stmt.query_map([], row_to_command)?;
            rows.map(|r| r?).collect::<Result<Vec<_>>>()?
        };
        commands_batch(&commands)
    }

    /// Drops every open command of a device (when it is removed): they expire now.
    pub fn expire_device(&self, device: &str, now: i64) -> Result<usize> {
        let expired = self.update_durably(
            &format!(
                "UPDATE commands SET status = 'expired', expires_at = MIN(expires_at, ?2)
                 WHERE device_id = ?1 AND status IN {OPEN}"
            ),
            params![device, now],
        )?;
        if expired > 0 {
            self.wake_all_answers();
        }
        Ok(expired)
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
        release(&self.waiters, device);
    }

    /// A notifier that fires (`notify_waiters`) whenever command `id` may
    /// have settled (answered, expired, superseded); a caller waiting for a
    /// call's answer holds it, enables its `notified()` future, then reads
    /// the command. Release it with [`CommandQueue::release_answer_notifier`].
    pub fn answer_notifier(&self, id: &str) -> Arc<Notify> {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Forgets a command's answer notifier once nobody else holds it.
    pub fn release_answer_notifier(&self, id: &str) {
        release(&self.answers, id);
    }

    fn wake_devices<'a>(&self, devices: impl IntoIterator<Item = &'a str>) {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for device in devices {
            if let Some(n) = waiters.get(device) {
                n.notify_waiters();
            }
        }
    }

    fn wake_answer(&self, id: &str) {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = answers.get(id) {
            n.notify_waiters();
        }
    }

    /// Bulk changes (expiry, superseding) do not say which ids they touched;
    /// the waiting callers are few, and each re-reads its command.
    fn wake_all_answers(&self) {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        for n in answers.values() {
            n.notify_waiters();
        }
    }
}

fn release(map: &Mutex<HashMap<String, Arc<Notify>>>, key: &str) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(key).is_some_and(|n| Arc::strong_count(n) == 1) {
        map.remove(key);
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn get_in(conn: &Connection, filter: &str, args: impl rusqlite::Params) -> Result<Option<Command>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM commands WHERE {filter}"))?;
    stmt.query_row(args, row_to_command).optional()?.transpose()
}

fn row_to_command(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Command>> {
    let payload: String = row.get(3)?;
    let status: String = row.get(5)?;
    let response: Option<String> = row.get(12)?;
    let json = |text: &str, what: &str| {
        serde_json::from_str(text)
            .map_err(|e| Error::Internal(format!("stored command {what} is not JSON: {e}")))
    };
    let build = || -> Result<Command> {
        Ok(Command {
            id: row.get(0)?,
            device_id: row.get(1)?,
            name: row.get(2)?,
            payload: json(&payload, "payload")?,
            source: row.get(4)?,
            status: CommandStatus::parse(&status)?,
            created_at: row.get(6)?,
            expires_at: row.get(7)?,
            delivered_at: row.get(8)?,
            acknowledged_at: row.get(9)?,
            answered_at: row.get(10)?,
            reason: row.get(11)?,
            response: response
                .as_deref()
                .map(|r| json(r, "response"))
                .transpose()?,
            idempotency_key: row.get(13)?,
            latest_wins: row.get(14)?,
            call: row.get(15)?,
        })
    };
    Ok(build())
}

/// The columns of the SQL table `commands`: `id`, `device_id`, `name`,
/// `payload` (JSON text), `source`, `status`, `reason`, `response` (JSON
/// text), `idempotency_key`, `latest_wins`, `call`, and the times
/// `created_at`, `expires_at`, `delivered_at`, `answered_at`.
pub fn command_schema() -> SchemaRef {
    let time =
        |name: &str, nullable: bool| Field::new(name, crate::event::timestamp_type(), nullable);
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("device_id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("payload", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("response", DataType::Utf8, true),
        Field::new("idempotency_key", DataType::Utf8, true),
        Field::new("latest_wins", DataType::Boolean, false),
        Field::new("call", DataType::Boolean, false),
        time("created_at", false),
        time("expires_at", false),
        time("delivered_at", true),
        time("answered_at", true),
    ]))
}

/// Commands as one record batch of [`command_schema`].
pub fn commands_batch(commands: &[Command]) -> Result<RecordBatch> {
    let text = |f: fn(&Command) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(commands.iter().map(f)))
    };
    let optional = |f: fn(&Command) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from_iter(commands.iter().map(f)))
    };
    let flag = |f: fn(&Command) -> bool| -> ArrayRef {
        Arc::new(BooleanArray::from_iter(commands.iter().map(|c| Some(f(c)))))
    };
    let time = |f: fn(&Command) -> Option<i64>| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from_iter(commands.iter().map(f)).with_timezone(TIME_ZONE),
        )
    };
    let columns = vec![
        text(|c| c.id.clone()),
        text(|c| c.device_id.clone()),
        text(|c| c.name.clone()),
        text(|c| c.payload.to_string()),
        text(|c| c.source.clone()),
        text(|c| c.status.as_str().to_string()),
        optional(|c| c.reason.clone()),
        optional(|c| c.response.as_ref().map(ToString::to_string)),
        optional(|c| c.idempotency_key.clone()),
        flag(|c| c.latest_wins),
        flag(|c| c.call),
        time(|c| Some(c.created_at)),
        time(|c| Some(c.expires_at)),
        time(|c| c.delivered_at),
        time(|c| c.answered_at),
    ];
    RecordBatch::try_new(command_schema(), columns)
        .map_err(|e| Error::Internal(format!("building the commands table: {e}")))
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
            ..NewCommand::default()
        }
    }

    fn status(q: &CommandQueue, id: &str) -> CommandStatus {
        q.get(id).unwrap().unwrap().status
    }

    fn ids(commands: &[Command]) -> Vec<&str> {
        commands.iter().map(|c| c.id.as_str()).collect()
    }

    /// Commands queued without an fsync are in the file at once (a crash
    /// of the process loses none of them), and `sync` is what the queue
    /// waits for before it says they are durable.
    #[test]
    fn commands_queued_without_fsync_are_written_and_synced_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commands.db");
        let q = CommandQueue::open(&path).unwrap();
        q.enqueue(&[cmd("synced", "d", 1000)], 0).unwrap();
        assert!(!q.has_unsynced());
        assert_eq!(
            q.enqueue_unsynced(&[cmd("a", "d", 1000), cmd("b", "d", 1000)], 0)
                .unwrap(),
            2
        );
        assert!(q.has_unsynced());
        // Read from another connection, as after a restart: they are there.
        let other = CommandQueue::open(&path).unwrap();
        let ids: Vec<String> = other
            .pending("d", 1)
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, ["synced", "a", "b"]);
        // A rule that reads their events again queues none of them twice.
        assert_eq!(q.enqueue_unsynced(&[cmd("a", "d", 1000)], 0).unwrap(), 0);
        q.sync().unwrap();
        assert!(!q.has_unsynced());
        q.sync().unwrap();
        drop(other);
        drop(q);
        let reopened = CommandQueue::open(&path).unwrap();
        assert_eq!(reopened.pending("d", 1).unwrap().len(), 3);
        // A queue in memory has no file to fsync.
        let in_memory = CommandQueue::open_in_memory().unwrap();
        in_memory
            .enqueue_unsynced(&[cmd("m", "d", 1000)], 0)
            .unwrap();
        in_memory.sync().unwrap();
        assert!(!in_memory.has_unsynced());
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
        assert_eq!(ids(&pending), ["a", "b"]);
        assert_eq!(pending[0].payload, json!({"speed": 3}));
        q.mark_delivered("a", 20).unwrap();
        assert_eq!(status(&q, "a"), CommandStatus::Delivered);
        // Delivered but unanswered commands are still pending, for redelivery.
        assert_eq!(q.pending("d1", 30).unwrap().len(), 2);
        assert!(!q.acknowledge("someone-else", "a", 40).unwrap());
        assert!(q.acknowledge("d1", "a", 40).unwrap());
        let a = q.get("a").unwrap().unwrap();
        assert_eq!(
            (a.status, a.acknowledged_at, a.answered_at),
            (CommandStatus::Acknowledged, Some(40), Some(40))
        );
        assert_eq!(q.pending("d1", 50).unwrap().len(), 1);
        // A settled command takes no second answer.
        let reject = Answer {
            status: CommandStatus::Rejected,
            reason: Some("late".into()),
            response: None,
        };
        assert!(!q.answer("d1", "a", &reject, 60).unwrap());
        assert_eq!(status(&q, "a"), CommandStatus::Acknowledged);
    }

    #[test]
    fn batches_mark_and_answer_each_command_on_its_own_merits() {
        let q = CommandQueue::open_in_memory().unwrap();
        q.enqueue(
            &[
                cmd("a", "d", 1000),
                cmd("b", "d", 1000),
                cmd("gone", "d", 5),
            ],
            0,
        )
        .unwrap();
        // "gone" is past its time-to-live: it may not go out; the others may.
        assert_eq!(
            q.mark_all_delivered(&["a", "gone", "b"], 10).unwrap(),
            [true, false, true]
        );
        assert_eq!(status(&q, "a"), CommandStatus::Delivered);
        assert_eq!(status(&q, "b"), CommandStatus::Delivered);
        let ack = Answer::acknowledged();
        let reject = Answer {
            status: CommandStatus::Rejected,
            reason: Some("busy".into()),
            response: None,
        };
        // One transaction, each answer judged alone: an unknown id and a
        // second answer to "a" change nothing.
        assert_eq!(
            q.answer_all(
                "d",
                &[("a", &ack), ("nope", &ack), ("b", &reject), ("a", &reject)],
                20
            )
            .unwrap(),
            [true, false, true, false]
        );
        assert_eq!(status(&q, "a"), CommandStatus::Acknowledged);
        let b = q.get("b").unwrap().unwrap();
        assert_eq!(
            (b.status, b.reason.as_deref()),
            (CommandStatus::Rejected, Some("busy"))
        );
        // Another device cannot answer them.
        assert_eq!(q.answer_all("other", &[("b", &ack)], 30).unwrap(), [false]);
    }

    #[test]
    fn rejected_and_failed_keep_the_reason() {
        let q = CommandQueue::open_in_memory().unwrap();
        q.enqueue(&[cmd("r", "d", 1000), cmd("f", "d", 1000)], 0)
            .unwrap();
        q.mark_delivered("r", 1).unwrap();
        let answer = |status, reason: &str| Answer {
            status,
            reason: Some(reason.into()),
            response: None,
        };
        assert!(
            q.answer("d", "r", &answer(CommandStatus::Rejected, "busy"), 5)
                .unwrap()
        );
        // Failed straight from queued: the device may answer before the
        // gateway records the delivery.
        assert!(
            q.answer(
                "d",
                "f",
                &answer(CommandStatus::Failed, &"x".repeat(5000)),
                6
            )
            .unwrap()
        );
        let r = q.get("r").unwrap().unwrap();
        assert_eq!(
            (
                r.status,
                r.reason.as_deref(),
                r.answered_at,
                r.acknowledged_at
            ),
            (CommandStatus::Rejected, Some("busy"), Some(5), None)
        );
        let f = q.get("f").unwrap().unwrap();
        assert_eq!(f.status, CommandStatus::Failed);
        assert_eq!(f.reason.unwrap().len(), MAX_REASON_LEN);
        assert!(q.pending("d", 7).unwrap().is_empty());
        // Not an answer a device can give.
        assert!(
            q.answer("d", "r", &answer(CommandStatus::Expired, ""), 8)
                .is_err()
        );
    }

    #[test]
    fn a_call_answer_carries_the_response() {
        let q = CommandQueue::open_in_memory().unwrap();
        let mut call = cmd("c", "d", 1000);
        call.call = true;
        assert!(q.submit(&call, 0).unwrap().created);
        assert!(q.pending("d", 1).unwrap()[0].call);
        let answer = Answer {
            status: CommandStatus::Acknowledged,
            reason: None,
            response: Some(json!({"uptime_s": 42})),
        };
        assert!(q.answer("d", "c", &answer, 2).unwrap());
        let c = q.get("c").unwrap().unwrap();
        assert_eq!(c.response, Some(json!({"uptime_s": 42})));
        // A response over the limit turns the answer into a failure.
        q.enqueue(&[cmd("big", "d", 1000)], 0).unwrap();
        let big = Answer {
            status: CommandStatus::Acknowledged,
            reason: None,
            response: Some(json!("x".repeat(MAX_PAYLOAD_BYTES + 1))),
        };
        assert!(q.answer("d", "big", &big, 3).unwrap());
        let b = q.get("big").unwrap().unwrap();
        assert_eq!((b.status, b.response), (CommandStatus::Failed, None));
        assert!(b.reason.unwrap().contains("limit"));
    }

    #[test]
    fn duplicate_ids_are_ignored_and_ttl_expires() {
        let q = CommandQueue::open_in_memory().unwrap();
        assert_eq!(q.enqueue(&[cmd("x", "d", 100)], 0).unwrap(), 1);
        assert_eq!(q.enqueue(&[cmd("x", "d", 100)], 5).unwrap(), 0);
        assert_eq!(q.pending("d", 99).unwrap().len(), 1);
        assert!(q.pending("d", 100).unwrap().is_empty());
        assert_eq!(status(&q, "x"), CommandStatus::Expired);
        assert!(!q.acknowledge("d", "x", 101).unwrap());
    }

    #[test]
    fn the_sweep_expires_queued_and_delivered_commands_of_offline_devices() {
        let q = CommandQueue::open_in_memory().unwrap();
        q.enqueue(
            &[
                cmd("q", "d", 100),
                cmd("v", "d", 100),
                cmd("later", "d", 1000),
            ],
            0,
        )
        .unwrap();
        q.mark_delivered("v", 10).unwrap();
        assert_eq!(q.expire(99).unwrap(), 0);
        assert_eq!(q.expire(100).unwrap(), 2);
        assert_eq!(status(&q, "q"), CommandStatus::Expired);
        assert_eq!(status(&q, "v"), CommandStatus::Expired);
        assert_eq!(status(&q, "later"), CommandStatus::Queued);
        // An answer after the time-to-live does not count, even before a sweep.
        assert!(!q.acknowledge("d", "later", 1000).unwrap());
        assert!(q.expire_now("later", 500).unwrap());
        let later = q.get("later").unwrap().unwrap();
        assert_eq!(
            (later.status, later.expires_at),
            (CommandStatus::Expired, 500)
        );
        assert!(!q.expire_now("later", 600).unwrap());
    }

    #[test]
    fn an_idempotency_key_queues_once_per_device() {
        let q = CommandQueue::open_in_memory().unwrap();
        let keyed = |id: &str, device: &str| NewCommand {
            idempotency_key: Some("k1".into()),
            ..cmd(id, device, 1000)
        };
        let first = q.submit(&keyed("a", "d"), 0).unwrap();
        assert!(first.created);
        let second = q.submit(&keyed("b", "d"), 1).unwrap();
        assert!(!second.created);
        assert_eq!(second.command.id, "a");
        assert!(q.get("b").unwrap().is_none());
        // Another device may use the same key.
        assert!(q.submit(&keyed("c", "other"), 2).unwrap().created);
        // The key stays taken after the command settled.
        q.acknowledge("d", "a", 3).unwrap();
        assert!(!q.submit(&keyed("e", "d"), 4).unwrap().created);
        assert_eq!(q.enqueue(&[keyed("f", "d")], 5).unwrap(), 0);
        assert_eq!(ids(&q.pending("d", 6).unwrap()), Vec::<&str>::new());
        let long = NewCommand {
            idempotency_key: Some("k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1)),
            ..cmd("g", "d", 1000)
        };
        assert!(matches!(q.submit(&long, 7), Err(Error::User(_))));
    }

    #[test]
    fn latest_wins_supersedes_only_queued_commands_of_the_same_name() {
        let q = CommandQueue::open_in_memory().unwrap();
        let named = |id: &str, name: &str| NewCommand {
            name: name.into(),
            ..cmd(id, "d", 1000)
        };
        q.enqueue(
            &[
                named("s1", "setpoint"),
                named("s2", "setpoint"),
                named("o", "other"),
            ],
            0,
        )
        .unwrap();
        q.enqueue(&[named("x", "setpoint")], 0).unwrap();
        q.enqueue(&[cmd("elsewhere", "d2", 1000)], 0).unwrap();
        q.mark_delivered("s1", 1).unwrap();
        let latest = NewCommand {
            latest_wins: true,
            ..named("s3", "setpoint")
        };
        assert!(q.submit(&latest, 2).unwrap().created);
        // s1 was delivered already: it stays open.
        assert_eq!(status(&q, "s1"), CommandStatus::Delivered);
        let s2 = q.get("s2").unwrap().unwrap();
        assert_eq!(s2.status, CommandStatus::Superseded);
        assert_eq!(s2.reason.as_deref(), Some("superseded by s3"));
        assert_eq!(status(&q, "x"), CommandStatus::Superseded);
        assert_eq!(status(&q, "o"), CommandStatus::Queued);
        assert_eq!(status(&q, "elsewhere"), CommandStatus::Queued);
        assert_eq!(ids(&q.pending("d", 3).unwrap()), ["s1", "o", "s3"]);
        // A superseded command takes no answer.
        assert!(!q.acknowledge("d", "s2", 4).unwrap());
    }

    #[test]
    fn order_holds_across_redelivery() {
        let q = CommandQueue::open_in_memory().unwrap();
        let batch: Vec<_> = (1..=5).map(|i| cmd(&format!("c{i}"), "d", 1000)).collect();
        q.enqueue(&batch, 0).unwrap();
        q.mark_delivered("c1", 1).unwrap();
        q.mark_delivered("c2", 1).unwrap();
        // A reconnect reads the queue again: the delivered ones come first.
        assert_eq!(
            ids(&q.pending("d", 2).unwrap()),
            ["c1", "c2", "c3", "c4", "c5"]
        );
        q.acknowledge("d", "c3", 3).unwrap();
        assert_eq!(ids(&q.pending("d", 4).unwrap()), ["c1", "c2", "c4", "c5"]);
    }

    #[test]
    fn a_failed_call_is_recorded_and_never_delivered() {
        let q = CommandQueue::open_in_memory().unwrap();
        let call = NewCommand {
            call: true,
            ..cmd("off", "d", 1000)
        };
        let stored = q.record_failed(&call, "device offline", 5).unwrap();
        assert_eq!(stored.status, CommandStatus::Failed);
        assert_eq!(stored.reason.as_deref(), Some("device offline"));
        assert!(q.pending("d", 6).unwrap().is_empty());
    }

    #[test]
    fn counts_and_lists_by_status() {
        let q = CommandQueue::open_in_memory().unwrap();
        q.enqueue(
            &[cmd("a", "d", 100), cmd("b", "d", 100), cmd("c", "e", 100)],
            0,
        )
        .unwrap();
        q.acknowledge("d", "a", 1).unwrap();
        assert_eq!(
            q.status_counts().unwrap(),
            [(CommandStatus::Queued, 2), (CommandStatus::Acknowledged, 1)]
        );
        assert_eq!(
            ids(&q.list_by(None, Some(CommandStatus::Queued), 10).unwrap()),
            ["c", "b"]
        );
        assert_eq!(ids(&q.list_by(Some("d"), None, 1).unwrap()), ["b"]);
        let table = q.table().unwrap();
        assert_eq!(table.num_rows(), 3);
        assert_eq!(table.schema(), command_schema());
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

    /// The connection commits without an fsync; the calls that promise
    /// durability fsync the WAL themselves, after letting go of it. A
    /// delivery mark waits for none, and the next durable change covers it.
    #[test]
    fn a_delivery_mark_waits_for_no_fsync_and_the_next_answer_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commands.db");
        {
            let q = CommandQueue::open(&path).unwrap();
            let synchronous: i64 = q
                .conn()
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap();
            assert_eq!(synchronous, 1, "NORMAL: the queue fsyncs on its own");
            q.enqueue(
                &[cmd("a", "d", DEFAULT_TTL_MS), cmd("b", "d", DEFAULT_TTL_MS)],
                0,
            )
            .unwrap();
            assert!(!q.has_unsynced(), "enqueue returned before its fsync");
            assert_eq!(
                q.mark_all_delivered(&["a", "gone"], 5).unwrap(),
                [true, false]
            );
            assert!(q.has_unsynced(), "the mark waited for an fsync");
            assert!(q.acknowledge("d", "b", 6).unwrap());
            assert!(!q.has_unsynced(), "the answer returned before its fsync");
        }
        let q = CommandQueue::open(&path).unwrap();
        let a = q.get("a").unwrap().unwrap();
        assert_eq!(a.status, CommandStatus::Delivered);
        assert_eq!(a.delivered_at, Some(5));
        assert_eq!(status(&q, "b"), CommandStatus::Acknowledged);
    }

    /// Answers recorded from many threads at once, sharing fsyncs, are each
    /// durable when their call returns.
    #[test]
    fn answers_from_many_threads_are_durable_when_they_return() {
        let dir = tempfile::tempdir().unwrap();
        let q = Arc::new(CommandQueue::open(&dir.path().join("commands.db")).unwrap());
        let ids: Vec<String> = (0..64).map(|i| format!("c{i}")).collect();
        let commands: Vec<NewCommand> = ids.iter().map(|id| cmd(id, "d", DEFAULT_TTL_MS)).collect();
        q.enqueue(&commands, 0).unwrap();
        let threads: Vec<_> = ids
            .chunks(8)
            .map(|chunk| {
                let (q, chunk) = (q.clone(), chunk.to_vec());
                std::thread::spawn(move || {
                    for id in chunk {
                        // Its commit is numbered after every one before the call.
                        let before = q.written.load(Ordering::SeqCst);
                        assert!(q.acknowledge("d", &id, 1).unwrap());
                        let synced = *q.synced.lock().unwrap();
                        assert!(synced > before, "answer {id} returned before its fsync");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!q.has_unsynced());
        assert!(
            ids.iter()
                .all(|id| status(&q, id) == CommandStatus::Acknowledged)
        );
    }

    #[test]
    fn an_old_queue_file_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commands.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(SCHEMA_V0).unwrap();
            old.execute(
                "INSERT INTO commands (id, device_id, name, payload, source, status, created_at, expires_at, delivered_at)
                 VALUES ('old', 'd', 'reboot', '{\"delay_s\":5}', 'api', 'delivered', 0, 1000, 10)",
                [],
            )
            .unwrap();
            old.execute(
                "INSERT INTO commands (id, device_id, name, payload, source, status, created_at, expires_at, acknowledged_at)
                 VALUES ('done', 'd', 'reboot', 'null', 'api', 'acknowledged', 0, 1000, 20)",
                [],
            )
            .unwrap();
        }
        for _ in 0..2 {
            // Twice: opening an upgraded file again changes nothing.
            let q = CommandQueue::open(&path).unwrap();
            let old = q.get("old").unwrap().unwrap();
            assert_eq!(
                (old.status, old.delivered_at, old.reason, old.call),
                (CommandStatus::Delivered, Some(10), None, false)
            );
            assert_eq!(status(&q, "done"), CommandStatus::Acknowledged);
        }
        let q = CommandQueue::open(&path).unwrap();
        assert_eq!(ids(&q.pending("d", 50).unwrap()), ["old"]);
        let reject = Answer {
            status: CommandStatus::Rejected,
            reason: Some("no".into()),
            response: None,
        };
        assert!(q.answer("d", "old", &reject, 60).unwrap());
        let keyed = NewCommand {
            idempotency_key: Some("k".into()),
            ..cmd("new", "d", 1000)
        };
        assert!(q.submit(&keyed, 70).unwrap().created);
        assert!(
            !q.submit(
                &NewCommand {
                    id: "new2".into(),
                    ..keyed
                },
                71
            )
            .unwrap()
            .created
        );
        let version: i64 = q
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
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

    #[tokio::test]
    async fn answers_and_expiry_wake_the_caller() {
        let q = CommandQueue::open_in_memory().unwrap();
        q.enqueue(&[cmd("a", "d", 1000), cmd("b", "d", 100)], 0)
            .unwrap();
        let wait = std::time::Duration::from_secs(1);
        for (id, settle) in [
            (
                "a",
                Box::new(|q: &CommandQueue| assert!(q.acknowledge("d", "a", 1).unwrap()))
                    as Box<dyn Fn(&CommandQueue)>,
            ),
            (
                "b",
                Box::new(|q: &CommandQueue| assert_eq!(q.expire(100).unwrap(), 1)),
            ),
        ] {
            let n = q.answer_notifier(id);
            {
                let notified = n.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                settle(&q);
                tokio::time::timeout(wait, notified).await.unwrap();
            }
            drop(n);
            q.release_answer_notifier(id);
        }
        assert!(q.answers.lock().unwrap().is_empty());
    }
}
