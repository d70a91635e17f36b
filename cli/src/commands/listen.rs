//! `tributary listen`: connect as a device and print the commands it gets.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use tributary_ingest::Error as IngestError;
use tributary_ingest::client::Client;
use tributary_ingest::protocol::ErrorCode;

use crate::DeviceArgs;
use crate::client::device_options;

#[derive(clap::Args, Debug)]
pub struct ListenArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Exit after this many commands.
    #[arg(long)]
    pub count: Option<usize>,
    /// Do not acknowledge commands (they will be delivered again on the next connection).
    #[arg(long)]
    pub no_ack: bool,
}

/// Prints each command as one JSON line and acknowledges it. Reconnects when
/// the connection drops, until the server refuses the device.
pub async fn run(args: ListenArgs) -> Result<ExitCode> {
    let options = device_options(&args.device, true)?;
    let mut received = 0usize;
    let mut backoff = Duration::from_millis(250);
    eprintln!(
        "listening for commands to device {} (Ctrl-C to stop)",
        args.device.device
    );
    loop {
        let client = match Client::connect(options.clone()).await {
            Ok(c) => c,
            Err(e) if is_final(&e) => return Err(e.into()),
            Err(e) => {
                eprintln!("warning: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(250);
        let ended = loop {
            let command = tokio::select! {
                c = client.next_command() => c,
                _ = tokio::signal::ctrl_c() => {
                    client.close().await;
                    return Ok(ExitCode::SUCCESS);
                }
            };
            let command = match command {
                Ok(Some(c)) => c,
                Ok(None) => break None,
                Err(e) => break Some(e),
            };
            let line = json!({"id": command.id, "name": command.name, "payload": command.payload});
            {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            if !args.no_ack {
                client.ack_command(&command.id).await?;
            }
            received += 1;
            if args.count.is_some_and(|n| received >= n) {
                client.close().await;
                return Ok(ExitCode::SUCCESS);
            }
        };
        match ended {
            Some(e) if is_final(&e) => return Err(e.into()),
            Some(e) => eprintln!("warning: {e}; reconnecting"),
            None => eprintln!("warning: the connection ended; reconnecting"),
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Errors no retry can fix.
fn is_final(e: &IngestError) -> bool {
    matches!(
        e,
        IngestError::Server {
            code: ErrorCode::Unauthorized
                | ErrorCode::UnsupportedVersion
                | ErrorCode::ProtocolError,
            ..
        } | IngestError::Tls(_)
    )
}
