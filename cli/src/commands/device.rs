//! `tributary device add | list | remove`.

use std::process::ExitCode;

use anyhow::{Result, anyhow};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::ApiArgs;
use crate::client::Api;

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a device and print its secret token (shown only once).
    Add {
        /// The device id: letters, digits, '.', '_', '-', ':' (at most 128).
        id: String,
        /// A tag, as key=value; repeat for more.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Print {"id": ..., "token": ...} as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List registered devices.
    List {
        /// Print the devices as a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a device: its token stops working and its connection closes.
    Remove {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{text}' is not a tag; write key=value")),
    }
}

pub async fn run(command: DeviceCommand) -> Result<ExitCode> {
    match command {
        DeviceCommand::Add {
            id,
            tags,
            json,
            api,
        } => {
            let api = Api::resolve(&api)?;
            let tags: serde_json::Map<String, Value> = tags
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let created = api
                .post("/devices", &json!({"id": id, "tags": tags}))
                .await?;
            let token = created
                .get("token")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("the server's answer has no token"))?;
            if json {
                println!("{}", json!({"id": id, "token": token}));
            } else {
                println!("device {id} created");
                println!("token: {token}");
                eprintln!(
                    "(the token is shown only once; the device connects with --device {id} --token <token>)"
                );
            }
        }
        DeviceCommand::List { json, api } => {
            let api = Api::resolve(&api)?;
            let listed = api.get("/devices").await?;
            let devices = listed
                .get("devices")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if json {
                println!("{}", Value::Array(devices));
            } else if devices.is_empty() {
                println!("no devices yet (add one with `tributary device add <id>`)");
            } else {
                print_table(&devices);
            }
        }
        DeviceCommand::Remove { id, api } => {
            let api = Api::resolve(&api)?;
            api.delete(&format!("/devices/{id}")).await?;
            println!("device {id} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(devices: &[Value]) {
    let rows: Vec<[String; 4]> = devices
        .iter()
        .map(|d| {
            let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let connected = d.get("connected").and_then(Value::as_bool).unwrap_or(false);
            let tags = d
                .get("tags")
                .and_then(Value::as_object)
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            [
                s("id"),
                s("status"),
                if connected { "yes" } else { "no" }.to_string(),
                tags,
            ]
        })
        .collect();
    let headers = ["ID", "STATUS", "CONNECTED", "TAGS"];
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: [&str; 4]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            out.push_str(&format!("{c:<width$}  ", width = widths[i]));
        }
        out.trim_end().to_string()
    };
    println!("{}", line(headers));
    for r in &rows {
        println!("{}", line([&r[0], &r[1], &r[2], &r[3]]));
    }
}
