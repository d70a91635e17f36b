//! `tributary command`: commands to devices through the HTTP API: queue
//! one (`send`), call a method and wait for its answer (`call`), and see
//! where commands are (`status`, `list`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::device::{path_id, path_segment, print_columns, time_text};
use crate::ApiArgs;
use crate::client::Api;
use crate::server::parse_duration;

#[derive(Subcommand, Debug)]
pub enum CommandCommand {
    /// Queue a command for a device; it is delivered over the device's
    /// connection now, or when it next connects within its time-to-live.
    Send {
        /// The device id.
        device: String,
        /// The command's name (1 to 128 bytes), e.g. reboot.
        name: String,
        /// The payload: JSON ('{"delay_s": 5}', '42', '"text"'); none if left out.
        payload: Option<String>,
        /// How long the command waits for the device (e.g. 30s, 5m, 2h);
        /// an hour if left out.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Queue it only once: a second send to the same device with the
        /// same key (1 to 128 bytes) shows the first command instead.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Supersede the device's commands of the same name that are still
        /// queued (not yet delivered).
        #[arg(long)]
        latest_wins: bool,
        /// Print the command as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Call a method on a connected device and print its response. Exits
    /// non-zero when the device rejects or fails it, does not answer in
    /// time, or is not connected.
    Call {
        /// The device id.
        device: String,
        /// The method's name (1 to 128 bytes), e.g. get_uptime.
        name: String,
        /// The payload: JSON; none if left out.
        payload: Option<String>,
        /// How long to wait for the answer (at most 5m).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        /// Print the whole command, with its response, as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one command: its status, and the device's reason or response.
    Status {
        /// The command id.
        id: String,
        /// Print the command as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List commands, newest first.
    List {
        /// Only this device's commands.
        #[arg(long)]
        device: Option<String>,
        /// Only commands with this status: queued, delivered, acknowledged,
        /// rejected, failed, expired or superseded.
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the commands as a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn parse_payload(payload: Option<&str>) -> Result<Value> {
    Ok(match payload {
        None => Value::Null,
        Some(text) => match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => bail!(
                "the payload is not JSON ({e}); a text payload is written as a JSON \
                 string: '\"{text}\"'"
            ),
        },
    })
}

/// Duration as text the server reads back exactly.
fn duration_text(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn text<'a>(command: &'a Value, key: &str) -> &'a str {
    command.get(key).and_then(Value::as_str).unwrap_or("")
}

pub async fn run(command: CommandCommand) -> Result<ExitCode> {
    match command {
        CommandCommand::Send {
            device,
            name,
            payload,
            ttl,
            idempotency_key,
            latest_wins,
            json,
            api,
        } => {
            let payload = parse_payload(payload.as_deref())?;
            let mut body = json!({"name": name, "payload": payload});
            if let Some(ttl) = ttl {
                body["ttl"] = json!(duration_text(ttl));
            }
            if let Some(key) = &idempotency_key {
                body["idempotency_key"] = json!(key);
            }
            if latest_wins {
                body["latest_wins"] = json!(true);
            }
            let api = Api::resolve(&api)?;
            let queued = api
                .post(&format!("/devices/{}/commands", path_id(&device)?), &body)
                .await?;
            if json {
                println!("{queued}");
            } else {
                let expires = queued
                    .get("expires_at")
                    .and_then(Value::as_i64)
                    .map(|t| format!(" (expires {})", time_text(t)))
                    .unwrap_or_default();
                let status = text(&queued, "status");
                if status == "queued" {
                    println!(
                        "command {} ({name}) queued for {device}{expires}",
                        text(&queued, "id")
                    );
                } else {
                    println!(
                        "command {} ({name}) for {device} is {status}",
                        text(&queued, "id")
                    );
                }
            }
        }
        CommandCommand::Call {
            device,
            name,
            payload,
            timeout,
            json,
            api,
        } => {
            let payload = parse_payload(payload.as_deref())?;
            let api = Api::resolve(&api)?;
            // Offline devices and timeouts come back as API errors: one line,
            // non-zero exit.
            let answered = api
                .post(
                    &format!("/devices/{}/calls", path_id(&device)?),
                    &json!({"name": name, "payload": payload, "timeout": duration_text(timeout)}),
                )
                .await?;
            let status = text(&answered, "status");
            if json {
                println!("{answered}");
            } else if status == "acknowledged" {
                let response = answered.get("response").cloned().unwrap_or(Value::Null);
                println!("{response}");
            }
            if status != "acknowledged" {
                let reason = answered
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                eprintln!(
                    "error: device {device} {status} call {} ({name}){reason}",
                    text(&answered, "id")
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        CommandCommand::Status { id, json, api } => {
            let api = Api::resolve(&api)?;
            let command = api
                .get(&format!("/commands/{}", path_segment(&id, "a command id")?))
                .await?;
            if json {
                println!("{command}");
            } else {
                print_command(&command);
            }
        }
        CommandCommand::List {
            device,
            status,
            limit,
            json,
            api,
        } => {
            let api = Api::resolve(&api)?;
            let limit = limit.to_string();
            let mut query = vec![("limit", limit.as_str())];
            if let Some(d) = &device {
                query.push(("device", d.as_str()));
            }
            if let Some(s) = &status {
                query.push(("status", s.as_str()));
            }
            let page = api.get_query("/commands", &query).await?;
            let commands = page
                .get("commands")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if json {
                println!("{}", Value::Array(commands));
            } else {
                let rows: Vec<Vec<String>> = commands
                    .iter()
                    .map(|c| {
                        let created = c
                            .get("created_at")
                            .and_then(Value::as_i64)
                            .map(time_text)
                            .unwrap_or_default();
                        vec![
                            text(c, "id").to_string(),
                            text(c, "device_id").to_string(),
                            text(c, "name").to_string(),
                            text(c, "status").to_string(),
                            created,
                            c.get("reason")
                                .and_then(Value::as_str)
                                .unwrap_or("-")
                                .to_string(),
                        ]
                    })
                    .collect();
                print_columns(
                    &["ID", "DEVICE", "NAME", "STATUS", "CREATED", "REASON"],
                    &rows,
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_command(c: &Value) {
    let time = |k: &str| c.get(k).and_then(Value::as_i64).map(time_text);
    println!("id:        {}", text(c, "id"));
    println!("device:    {}", text(c, "device_id"));
    println!("name:      {}", text(c, "name"));
    println!("status:    {}", text(c, "status"));
    if let Some(reason) = c.get("reason").and_then(Value::as_str) {
        println!("reason:    {reason}");
    }
    if let Some(response) = c.get("response").filter(|r| !r.is_null()) {
        println!("response:  {response}");
    }
    println!("payload:   {}", c.get("payload").unwrap_or(&Value::Null));
    println!("source:    {}", text(c, "source"));
    if let Some(key) = c.get("idempotency_key").and_then(Value::as_str) {
        println!("key:       {key}");
    }
    for (label, key) in [
        ("created", "created_at"),
        ("expires", "expires_at"),
        ("delivered", "delivered_at"),
        ("answered", "answered_at"),
    ] {
        if let Some(t) = time(key) {
            println!("{:<10} {t}", format!("{label}:"));
        }
    }
}
