//! `tributary device add | list | get | update | disable | enable | remove |
//! rotate-key | token | import`: the device registry through the HTTP API.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::{Map, Value, json};

use crate::ApiArgs;
use crate::client::Api;

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a device and print its keys and a token (shown only once).
    Add {
        /// The device id: letters, digits, '.', '_', '-', ':' (at most 128).
        id: String,
        /// A tag, as key=value; repeat for more.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Metadata, a JSON object (at most 64 KiB).
        #[arg(long, value_parser = parse_metadata)]
        metadata: Option<Map<String, Value>>,
        /// Register the device disabled: it may not connect until enabled.
        #[arg(long)]
        disabled: bool,
        /// Print the device, its keys and token as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List registered devices, ordered by id.
    List {
        /// Only devices with this tag, as key=value; repeat for more (all must match).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Only enabled or only disabled devices.
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// At most this many devices (default: all of them).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Only devices whose id sorts after this one (to continue a listing).
        #[arg(long)]
        after: Option<String>,
        /// Print the devices as a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one device.
    Get {
        id: String,
        /// Print the device as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Replace a device's tags or metadata.
    Update {
        id: String,
        /// The new tags, as key=value; repeat for more. They replace all old tags.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Remove every tag.
        #[arg(long, conflicts_with = "tags")]
        clear_tags: bool,
        /// The new metadata, a JSON object; it replaces the old ('{}' clears it).
        #[arg(long, value_parser = parse_metadata)]
        metadata: Option<Map<String, Value>>,
        /// Print the updated device as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Disable a device: it is disconnected and may not connect again until enabled.
    Disable {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Enable a disabled device.
    Enable {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a device: its credentials stop working, its connection closes
    /// and its pending commands expire.
    Remove {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Replace one of a device's two keys with a fresh one and print it.
    RotateKey {
        id: String,
        /// Which key.
        #[arg(long, value_enum)]
        key: KeySlot,
        /// Print {"id", "slot", "key"} as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Issue a new token for a device.
    Token {
        id: String,
        /// How long the token lasts: 3600s, 12h, 30d, 10y ... (default 10y, at most 100y).
        #[arg(long, value_parser = parse_expiry)]
        expires_in: Option<i64>,
        /// Print {"id", "token", "expires_at"} as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Register many devices from a CSV (id,tags,metadata,status) or JSON-lines file.
    ///
    /// Good rows are created and bad rows reported by line; exits 2 if any row failed.
    Import {
        /// The file; its extension (.csv, .jsonl, .ndjson, .json) gives its format.
        file: PathBuf,
        /// The file's format, when its extension does not say.
        #[arg(long, value_enum)]
        format: Option<ImportFormat>,
        /// Print the whole report, with every created device's keys and token, as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Status {
    Enabled,
    Disabled,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum KeySlot {
    Primary,
    Secondary,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportFormat {
    /// A header line `id,tags,metadata,status`; tags as k=v;k2=v2, metadata a JSON object.
    Csv,
    /// One JSON object {"id", "tags"?, "metadata"?, "status"?} per line.
    Jsonl,
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{text}' is not a tag; write key=value")),
    }
}

fn parse_metadata(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("metadata must be a JSON object, like '{\"model\": \"x1\"}'".into()),
        Err(e) => Err(format!("metadata is not JSON: {e}")),
    }
}

/// A token lifetime in seconds. Years are read here; everything else by the
/// engine's duration parser, which stops at a year (tokens go up to 100).
fn parse_expiry(text: &str) -> Result<i64, String> {
    const YEAR_S: i64 = 31_557_600;
    let t = text.trim();
    let digits = t.chars().take_while(char::is_ascii_digit).count();
    let (number, unit) = t.split_at(digits);
    if matches!(unit.trim(), "y" | "year" | "years") {
        return number
            .parse::<i64>()
            .ok()
            .and_then(|n| n.checked_mul(YEAR_S))
            .filter(|s| *s > 0)
            .ok_or_else(|| format!("'{text}' is not a number of years, like '10y'"));
    }
    let ms = tributary_engine::duration::parse_duration(t)
        .map_err(|e| format!("{e} (for longer, give years, like '10y')"))?;
    if ms < 1000 {
        return Err(format!("'{text}' is shorter than a second"));
    }
    Ok(ms / 1000)
}

fn tag_map(tags: Vec<(String, String)>) -> Map<String, Value> {
    tags.into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect()
}

pub async fn run(command: DeviceCommand) -> Result<ExitCode> {
    match command {
        DeviceCommand::Add {
            id,
            tags,
            metadata,
            disabled,
            json,
            api,
        } => {
            let api = Api::resolve(&api)?;
            let mut body = json!({"id": id, "tags": tag_map(tags)});
            if let Some(m) = metadata {
                body["metadata"] = Value::Object(m);
            }
            if disabled {
                body["status"] = json!("disabled");
            }
            let created = api.post("/devices", &body).await?;
            let field = |k: &str| created.get(k).and_then(Value::as_str).unwrap_or_default();
            if created.get("token").and_then(Value::as_str).is_none() {
                bail!("the server's answer has no token");
            }
            if json {
                println!("{created}");
            } else {
                println!(
                    "device {id} created{}",
                    if disabled { " (disabled)" } else { "" }
                );
                println!("primary key:   {}", field("primary_key"));
                println!("secondary key: {}", field("secondary_key"));
                println!("token:         {}", field("token"));
                if let Some(at) = created.get("token_expires_at").and_then(Value::as_i64) {
                    println!("token expires: {}", time_text(at * 1000));
                }
                println!(
                    "The keys and the token are shown only once: store them now. The device \
                     connects with --device {id} --token <token>."
                );
            }
        }
        DeviceCommand::List {
            tags,
            status,
            limit,
            after,
            json,
            api,
        } => {
            let api = Api::resolve(&api)?;
            let (devices, more) = list_all(&api, tags, status, limit, after).await?;
            if json {
                println!("{}", Value::Array(devices));
            } else if devices.is_empty() {
                println!("no devices (add one with `tributary device add <id>`)");
            } else {
                print_table(&devices);
            }
            if let Some(next) = more {
                eprintln!("(more devices follow; continue with --after {next})");
            }
        }
        DeviceCommand::Get { id, json, api } => {
            let api = Api::resolve(&api)?;
            let device = api.get(&format!("/devices/{}", path_id(&id)?)).await?;
            print_device(&device, json);
        }
        DeviceCommand::Update {
            id,
            tags,
            clear_tags,
            metadata,
            json,
            api,
        } => {
            let mut body = json!({});
            if !tags.is_empty() || clear_tags {
                body["tags"] = Value::Object(tag_map(tags));
            }
            if let Some(m) = metadata {
                body["metadata"] = Value::Object(m);
            }
            if body.as_object().is_some_and(Map::is_empty) {
                bail!(
                    "nothing to change: pass --tag, --clear-tags or --metadata \
                     (`device disable` / `device enable` change the status)"
                );
            }
            let api = Api::resolve(&api)?;
            let device = api
                .patch(&format!("/devices/{}", path_id(&id)?), &body)
                .await?;
            print_device(&device, json);
        }
        DeviceCommand::Disable { id, api } => {
            let api = Api::resolve(&api)?;
            api.post(&format!("/devices/{}/disable", path_id(&id)?), &json!({}))
                .await?;
            println!("device {id} disabled");
        }
        DeviceCommand::Enable { id, api } => {
            let api = Api::resolve(&api)?;
            api.post(&format!("/devices/{}/enable", path_id(&id)?), &json!({}))
                .await?;
            println!("device {id} enabled");
        }
        DeviceCommand::Remove { id, api } => {
            let api = Api::resolve(&api)?;
            api.delete(&format!("/devices/{}", path_id(&id)?)).await?;
            println!("device {id} removed");
        }
        DeviceCommand::RotateKey { id, key, json, api } => {
            let api = Api::resolve(&api)?;
            let slot = match key {
                KeySlot::Primary => "primary",
                KeySlot::Secondary => "secondary",
            };
            let rotated = api
                .post(
                    &format!("/devices/{}/keys/{slot}/rotate", path_id(&id)?),
                    &json!({}),
                )
                .await?;
            let new_key = rotated
                .get("key")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("the server's answer has no key"))?;
            if json {
                println!("{rotated}");
            } else {
                println!("new {slot} key of {id}: {new_key}");
                println!(
                    "Tokens signed with the old {slot} key stop working; \
                     `tributary device token {id}` issues a new one."
                );
            }
        }
        DeviceCommand::Token {
            id,
            expires_in,
            json,
            api,
        } => {
            let api = Api::resolve(&api)?;
            let body = match expires_in {
                Some(s) => json!({ "expires_in_s": s }),
                None => json!({}),
            };
            let issued = api
                .post(&format!("/devices/{}/token", path_id(&id)?), &body)
                .await?;
            let token = issued
                .get("token")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("the server's answer has no token"))?;
            if json {
                println!("{issued}");
            } else {
                println!("token:   {token}");
                if let Some(at) = issued.get("expires_at").and_then(Value::as_i64) {
                    println!("expires: {}", time_text(at * 1000));
                }
            }
        }
        DeviceCommand::Import {
            file,
            format,
            json,
            api,
        } => return import(&file, format, json, &api).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// A device id as a URL path segment. Valid ids need no escaping; anything
/// else is refused here rather than sent to some other path.
fn path_id(id: &str) -> Result<&str> {
    if id.is_empty() || id.contains(['/', '?', '#', '%']) || id == "." || id == ".." {
        bail!("'{id}' is not a device id; ids are letters, digits, '.', '_', '-' and ':'");
    }
    Ok(id)
}

/// Pages through `GET /devices` until `limit` devices or the end; returns
/// the devices and, when `limit` cut the listing short, where it goes on.
async fn list_all(
    api: &Api,
    tags: Vec<(String, String)>,
    status: Option<Status>,
    limit: Option<u64>,
    mut after: Option<String>,
) -> Result<(Vec<Value>, Option<String>)> {
    const PAGE: u64 = 1000;
    let tag_filters: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let status = status.map(|s| match s {
        Status::Enabled => "enabled",
        Status::Disabled => "disabled",
    });
    let mut devices = Vec::new();
    loop {
        let want = match limit {
            Some(l) => (l - devices.len() as u64).min(PAGE),
            None => PAGE,
        };
        let want_text = want.to_string();
        let mut query: Vec<(&str, &str)> =
            tag_filters.iter().map(|t| ("tag", t.as_str())).collect();
        query.push(("limit", &want_text));
        if let Some(s) = status {
            query.push(("status", s));
        }
        if let Some(a) = &after {
            query.push(("after", a));
        }
        let page = api.get_query("/devices", &query).await?;
        devices.extend(
            page.get("devices")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        );
        after = page.get("next").and_then(Value::as_str).map(str::to_string);
        let full = limit.is_some_and(|l| devices.len() as u64 >= l);
        if after.is_none() || full {
            return Ok((devices, after));
        }
    }
}

async fn import(
    file: &Path,
    format: Option<ImportFormat>,
    json: bool,
    api: &crate::ApiArgs,
) -> Result<ExitCode> {
    let format = match format {
        Some(f) => f,
        None => match file
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => ImportFormat::Csv,
            Some("jsonl" | "ndjson" | "json") => ImportFormat::Jsonl,
            _ => bail!(
                "cannot tell the format of {} from its extension; pass --format csv or --format jsonl",
                file.display()
            ),
        },
    };
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let api = Api::resolve(api)?;
    let content_type = match format {
        ImportFormat::Csv => "text/csv",
        ImportFormat::Jsonl => "application/x-ndjson",
    };
    // The server imports in one request; on a terminal, say that a big file
    // is on its way rather than sit silent.
    let progress = std::io::stderr().is_terminal() && body.len() > 1 << 20;
    if progress {
        eprint!(
            "importing {} ({:.1} MiB)...",
            file.display(),
            body.len() as f64 / f64::from(1 << 20)
        );
    }
    let report = api.post_bytes("/devices/import", content_type, body).await;
    if progress {
        eprint!("\r\x1b[K");
    }
    let report = report?;
    let count = |k: &str| report.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (created, failed) = (count("created"), count("failed"));
    if json {
        println!("{report}");
    } else {
        println!("created {created}, failed {failed}");
        for r in report
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|r| r.get("ok") == Some(&Value::Bool(false)))
        {
            let line = r.get("line").and_then(Value::as_u64).unwrap_or(0);
            let id = r
                .get("id")
                .and_then(Value::as_str)
                .map(|id| format!(" ({id})"))
                .unwrap_or_default();
            let error = r.get("error");
            let text = |k: &str| error.and_then(|e| e.get(k)?.as_str()).unwrap_or("");
            println!("line {line}{id}: {} [{}]", text("message"), text("code"));
        }
        if created > 0 {
            eprintln!(
                "(the new devices' keys and tokens are printed only with --json; \
                 `tributary device token ID` issues a token later)"
            );
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Milliseconds since the epoch as RFC 3339 UTC.
fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

fn tags_text(device: &Value) -> String {
    device
        .get("tags")
        .and_then(Value::as_object)
        .map(|t| {
            t.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn print_device(device: &Value, json: bool) {
    if json {
        println!("{device}");
        return;
    }
    let s = |k: &str| device.get(k).and_then(Value::as_str).unwrap_or("");
    let time = |k: &str| device.get(k).and_then(Value::as_i64).map(time_text);
    let connected = device.get("connected").and_then(Value::as_bool) == Some(true);
    println!("id:        {}", s("id"));
    println!("status:    {}", s("status"));
    println!("connected: {}", if connected { "yes" } else { "no" });
    println!("tags:      {}", tags_text(device));
    let metadata = device.get("metadata").cloned().unwrap_or(json!({}));
    println!("metadata:  {metadata}");
    if let Some(t) = time("created_at") {
        println!("created:   {t}");
    }
    if let Some(t) = time("updated_at") {
        println!("updated:   {t}");
    }
}

fn print_table(devices: &[Value]) {
    let rows: Vec<[String; 4]> = devices
        .iter()
        .map(|d| {
            let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let connected = d.get("connected").and_then(Value::as_bool).unwrap_or(false);
            [
                s("id"),
                s("status"),
                if connected { "yes" } else { "no" }.to_string(),
                tags_text(d),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_parse() {
        assert_eq!(parse_expiry("30d"), Ok(30 * 86_400));
        assert_eq!(parse_expiry("12h"), Ok(12 * 3600));
        assert_eq!(parse_expiry("10y"), Ok(10 * 31_557_600));
        assert_eq!(parse_expiry("2 years"), Ok(2 * 31_557_600));
        assert!(parse_expiry("500ms").is_err());
        assert!(parse_expiry("400d").unwrap_err().contains("10y"));
        assert!(parse_expiry("soon").is_err());
        assert!(parse_expiry("0y").is_err());
        assert_eq!(parse_expiry("1day"), Ok(86_400));
    }

    #[test]
    fn path_ids_are_refused_before_they_leave() {
        assert!(path_id("plant.3:line_2").is_ok());
        assert!(path_id("a/b").is_err());
        assert!(path_id("..").is_err());
    }
}
