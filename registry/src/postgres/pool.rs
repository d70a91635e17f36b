//! A few PostgreSQL connections, shared.
//!
//! Registry calls are short, so a handful of connections serve a server
//! well. A caller takes a free one (or waits for one, in turn), and a
//! connection that broke (the server restarted, the network dropped it) is
//! made again when next taken, so the registry outlives the outage.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use super::describe;
use crate::{Error, Result};

pub(super) struct Pool {
    config: Config,
    slots: Box<[Mutex<Option<Client>>]>,
    next: AtomicUsize,
}

/// A connection, the caller's until dropped.
pub(super) type Conn<'a> = MappedMutexGuard<'a, Client>;

impl Pool {
    /// A pool of up to `size` connections (at least one); none is made yet.
    pub(super) fn new(config: Config, size: usize) -> Self {
        Self {
            config,
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A connection: a free one if there is one, else the next in turn once
    /// it is free.
    pub(super) async fn get(&self) -> Result<Conn<'_>> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let free = (0..n).find_map(|i| self.slots[(start + i) % n].try_lock().ok());
        let slot = match free {
            Some(slot) => slot,
            None => self.slots[start].lock().await,
        };
        self.ready(slot).await
    }

    async fn ready<'a>(&self, mut slot: MutexGuard<'a, Option<Client>>) -> Result<Conn<'a>> {
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.connect().await?);
        }
        MutexGuard::try_map(slot, Option::as_mut)
            .map_err(|_| Error::Internal("a pooled PostgreSQL connection vanished".into()))
    }

    /// A new connection, outside the pool; its I/O runs on a task of its own
    /// until the client is dropped.
    pub(super) async fn connect(&self) -> Result<Client> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| {
            Error::Postgres(format!(
                "cannot connect to {}: {}",
                target(&self.config),
                describe(&e)
            ))
        })?;
        // Its error, if any, reaches the client's callers as "connection
        // closed"; the pool then connects again.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

/// Where `config` points, for messages: hosts, ports and database, never
/// the password.
pub(super) fn target(config: &Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            Host::Tcp(name) if name.contains(':') => format!("[{name}]:{}", port(i)),
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            #[cfg(unix)]
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), port(i)),
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "PostgreSQL (no host given)".to_string()
    } else {
        format!("PostgreSQL at {}", hosts.join(", "))
    };
    match config.get_dbname() {
        Some(db) => format!("{hosts}, database '{db}'"),
        None => hosts,
    }
}
