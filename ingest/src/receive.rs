//! The gateway's receive thread: quinn's endpoint driver on a thread of its
//! own.
//!
//! Every device's packets arrive on the gateway's one UDP socket, and one
//! task, quinn's endpoint driver, reads them all and hands each to its
//! connection. It reads for at most 50 µs at a time, then yields. On the
//! server's runtime it then waited behind every session and connection task
//! that was ready, so with many devices sending at once it read too slowly:
//! the socket's buffer overflowed, and each lost packet cost its connection
//! a retransmission timeout. With 1,000 devices sending one-event Arrow
//! frames, acknowledgements took up to 10 s and the rate fell to a fifth of
//! JSON's (docs/benchmarks.md, "The gateway reads its socket on a thread of
//! its own").
//!
//! Here the driver runs on a current-thread runtime on a thread of its own,
//! whose reactor also owns the socket's read readiness. The kernel schedules
//! that thread beside the runtime's workers instead of behind their queued
//! tasks. Every connection's driver, and everything else, still runs on the
//! runtime that bound the gateway.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The thread that runs quinn's endpoint driver; it stops when dropped.
pub(crate) struct ReceiveThread {
    handle: Handle,
    /// Dropping the sender ends the thread's runtime.
    _stop: oneshot::Sender<()>,
}

impl ReceiveThread {
    /// Starts the thread, named `quic-receive`.
    pub(crate) fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("quic-receive".into())
            .spawn(move || {
                // Sent or dropped: either way the gateway is gone.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(ReceiveThread {
            handle,
            _stop: stop,
        })
    }

    /// An endpoint on `socket` whose driver runs on this thread. Called
    /// within a Tokio runtime, whose workers run the connections.
    pub(crate) fn endpoint(
        &self,
        config: quinn::EndpointConfig,
        server: Option<quinn::ServerConfig>,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<quinn::Endpoint> {
        let connections = Handle::try_current().map_err(std::io::Error::other)?;
        let runtime = Arc::new(GatewayRuntime {
            connections,
            driver: Mutex::new(Some(self.handle.clone())),
        });
        // The socket is registered with this thread's reactor, so that its
        // readiness to read wakes the driver without waiting for a busy
        // worker to poll the runtime's I/O.
        let socket = {
            let _inside = self.handle.enter();
            quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?
        };
        quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
    }
}

impl fmt::Debug for ReceiveThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReceiveThread")
    }
}

/// quinn's runtime for the gateway: Tokio's, except that the first future
/// quinn spawns goes to the receive thread. That is the endpoint driver,
/// spawned by `Endpoint::new_with_abstract_socket` before any connection
/// can exist; every later one (a connection's driver) goes to the
/// connections' runtime. Were quinn to spawn in another order, a connection
/// would run on the receive thread: slower, never wrong.
struct GatewayRuntime {
    connections: Handle,
    driver: Mutex<Option<Handle>>,
}

impl fmt::Debug for GatewayRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayRuntime")
    }
}

impl quinn::Runtime for GatewayRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let driver = self
            .driver
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match driver {
            Some(receive) => drop(receive.spawn(future)),
            None => drop(self.connections.spawn(future)),
        }
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        // Only for `Endpoint::rebind`, which the gateway does not use.
        let _inside = self.connections.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The endpoint driver runs on the receive thread, connections on the
    /// caller's runtime: spawned futures report the thread they ran on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_first_spawn_runs_on_the_receive_thread_and_the_rest_on_the_caller() {
        let thread = ReceiveThread::start().expect("the receive thread");
        let runtime = GatewayRuntime {
            connections: Handle::current(),
            driver: Mutex::new(Some(thread.handle.clone())),
        };
        let mut names = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel();
            quinn::Runtime::spawn(
                &runtime,
                Box::pin(async move {
                    let name = std::thread::current().name().map(str::to_owned);
                    let _ = tx.send(name);
                }),
            );
            names.push(rx.await.expect("the spawned future ran"));
        }
        assert_eq!(names[0].as_deref(), Some("quic-receive"));
        for name in &names[1..] {
            assert_ne!(name.as_deref(), Some("quic-receive"));
        }
    }

    /// Dropping the thread's handle ends the thread.
    #[test]
    fn dropping_it_stops_the_thread() {
        let thread = ReceiveThread::start().expect("the receive thread");
        let handle = thread.handle.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            std::future::pending::<()>().await;
            let _ = tx.send(());
        });
        drop(thread);
        // The pending task is dropped with the runtime, and its sender
        // with it (had the thread lived on, this would time out).
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
