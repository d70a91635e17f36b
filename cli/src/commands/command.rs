//! `tributary command send`: commands to devices through the HTTP API.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::device::{path_id, time_text};
use crate::ApiArgs;
use crate::client::Api;

#[derive(Subcommand, Debug)]
pub enum CommandCommand {
    /// Queue a command for a device; it is delivered over the device's
    /// connection now, or when it next connects within an hour.
    Send {
        /// The device id.
        device: String,
        /// The command's name (1 to 128 bytes), e.g. reboot.
        name: String,
        /// The payload: JSON ('{"delay_s": 5}', '42', '"text"'); none if left out.
        payload: Option<String>,
        /// Print the queued command as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(command: CommandCommand) -> Result<ExitCode> {
    match command {
        CommandCommand::Send {
            device,
            name,
            payload,
            json,
            api,
        } => {
            let payload: Value = match payload.as_deref() {
                None => Value::Null,
                Some(text) => match serde_json::from_str(text) {
                    Ok(v) => v,
                    Err(e) => bail!(
                        "the payload is not JSON ({e}); a text payload is written as a JSON \
                         string: '\"{text}\"'"
                    ),
                },
            };
            let api = Api::resolve(&api)?;
            let queued = api
                .post(
                    &format!("/devices/{}/commands", path_id(&device)?),
                    &json!({"name": name, "payload": payload}),
                )
                .await?;
            if json {
                println!("{queued}");
            } else {
                let s = |k: &str| queued.get(k).and_then(Value::as_str).unwrap_or("");
                let expires = queued
                    .get("expires_at")
                    .and_then(Value::as_i64)
                    .map(|t| format!(" (expires {})", time_text(t)))
                    .unwrap_or_default();
                println!("command {} ({name}) queued for {device}{expires}", s("id"));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
