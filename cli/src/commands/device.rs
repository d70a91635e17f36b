//! `tributary device add | list | get | update | disable | enable | remove |
//! rotate-key | token | import | twin | desired | cert`: the device registry
//! through the HTTP API.

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
        /// Also issue an X.509 certificate from the server's development CA
        /// and write <ID>.crt and <ID>.key (mode 0600).
        #[arg(long)]
        cert: bool,
        /// Where --cert writes the files (default: the current directory).
        #[arg(long, value_name = "DIR", requires = "cert")]
        cert_out: Option<PathBuf>,
        /// How long the certificate lasts, in days (default 365, at most 3650).
        #[arg(long, value_name = "DAYS", requires = "cert", value_parser = clap::value_parser!(u32).range(1..=3650))]
        cert_days: Option<u32>,
        /// Print the device, its keys and token (and the certificate's
        /// thumbprint and files) as one JSON object.
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
    /// Show a device's twin: its desired and reported properties.
    Twin {
        id: String,
        /// Print the twin as one line of JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change a device's desired properties: a JSON merge patch (a key set
    /// to null is removed), or with --replace the whole object.
    Desired {
        id: String,
        /// A JSON object; @FILE reads it from a file, - from stdin.
        properties: String,
        /// Replace the desired properties with this object instead of merging it in.
        #[arg(long)]
        replace: bool,
        /// Change them only if they are at this version now (see `device twin`).
        #[arg(long, value_name = "N")]
        if_version: Option<i64>,
        /// Print the twin as one line of JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Manage a device's X.509 certificates: issue, register, list, revoke.
    Cert {
        id: String,
        #[command(subcommand)]
        action: CertAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertAction {
    /// Issue a certificate from the server's development CA and write
    /// <ID>.crt and <ID>.key (mode 0600); the key is not kept anywhere else.
    Issue {
        /// How long the certificate lasts, in days (default 365, at most 3650).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: Option<u32>,
        /// Where to write the files (default: the current directory).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print the certificate's thumbprint, expiry and file paths as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Register a certificate made elsewhere (a PEM file); it must chain to
    /// a CA the server trusts to be of use.
    Register {
        file: PathBuf,
        /// Print the registered certificate as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the device's certificates, oldest first.
    List {
        /// Print them as a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a certificate: the device can no longer connect with it.
    Revoke {
        /// The certificate's thumbprint (SHA-256 of its DER, hex), as `cert list` shows it.
        thumbprint: String,
        /// Print the revoked certificate as JSON.
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

impl KeySlot {
    /// As the API's paths name it.
    pub fn as_str(self) -> &'static str {
        match self {
            KeySlot::Primary => "primary",
            KeySlot::Secondary => "secondary",
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportFormat {
    /// A header line `id,tags,metadata,status`; tags as k=v;k2=v2, metadata a JSON object.
    Csv,
    /// One JSON object {"id", "tags"?, "metadata"?, "status"?} per line.
    Jsonl,
}

pub(crate) fn parse_tag(text: &str) -> Result<(String, String), String> {
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

pub(crate) fn tag_map(tags: Vec<(String, String)>) -> Map<String, Value> {
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
            cert,
            cert_out,
            cert_days,
            json,
            api,
        } => {
            let api = Api::resolve(&api)?;
            // Refuse before anything is created if the files are in the way.
            let cert_files = if cert {
                Some(CertFiles::new(cert_out.as_deref(), path_id(&id)?)?)
            } else {
                None
            };
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
            let certificate = match &cert_files {
                Some(files) => Some(
                    issue_certificate(&api, &id, cert_days, files)
                        .await
                        .with_context(|| {
                            format!(
                                "device {id} was created (its keys are lost unless you \
                                 rerun with --json; `tributary device rotate-key` makes new \
                                 ones), but no certificate was issued"
                            )
                        })?,
                ),
                None => None,
            };
            if json {
                let mut created = created;
                if let Some(c) = &certificate {
                    created["certificate"] = c.clone();
                }
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
                if let Some(c) = &certificate {
                    print_issued(c);
                }
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
            let slot = key.as_str();
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
        DeviceCommand::Twin { id, json, api } => {
            let api = Api::resolve(&api)?;
            let twin = api.get(&format!("/devices/{}/twin", path_id(&id)?)).await?;
            print_twin(&twin, json)?;
        }
        DeviceCommand::Desired {
            id,
            properties,
            replace,
            if_version,
            json,
            api,
        } => {
            let properties = read_object(&properties)?;
            let api = Api::resolve(&api)?;
            let headers: Vec<(&str, String)> = if_version
                .map(|v| ("If-Match", format!("\"{v}\"")))
                .into_iter()
                .collect();
            let method = if replace {
                reqwest::Method::PUT
            } else {
                reqwest::Method::PATCH
            };
            let twin = api
                .send_json(
                    method,
                    &format!("/devices/{}/twin/desired", path_id(&id)?),
                    &Value::Object(properties),
                    &headers,
                )
                .await?;
            print_twin(&twin, json)?;
        }
        DeviceCommand::Cert { id, action } => cert(&id, action).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON object from an argument: inline, `@FILE`, or `-` for stdin (a
/// command-line argument stops at 128 KiB; properties may be bigger).
fn read_object(text: &str) -> Result<Map<String, Value>> {
    let (source, owned);
    if text == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)
            .context("reading the properties from stdin")?;
        (source, owned) = ("stdin".to_string(), buf);
    } else if let Some(path) = text.strip_prefix('@') {
        let buf = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        (source, owned) = (path.to_string(), buf);
    } else {
        (source, owned) = ("the argument".to_string(), text.to_string());
    }
    match serde_json::from_str(&owned) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => {
            bail!("the properties in {source} must be a JSON object, like '{{\"interval_s\": 30}}'")
        }
        Err(e) => bail!("the properties in {source} are not JSON: {e}"),
    }
}

fn print_twin(twin: &Value, json: bool) -> Result<()> {
    if json {
        println!("{twin}");
        return Ok(());
    }
    let side = |name: &str| -> Result<()> {
        let version = twin
            .get(format!("{name}_version"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let updated = twin
            .get(format!("{name}_updated_at"))
            .and_then(Value::as_i64)
            .map(|t| format!(", changed {}", time_text(t)))
            .unwrap_or_default();
        println!("{name} (version {version}{updated}):");
        let properties = twin.get(name).cloned().unwrap_or(json!({}));
        println!("{}", serde_json::to_string_pretty(&properties)?);
        Ok(())
    };
    side("desired")?;
    side("reported")
}

/// Where an issued certificate and its key are written: `<id>.crt` and
/// `<id>.key` in a folder.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    /// The files in `dir` (default: the current directory), which must not
    /// exist yet: a private key is never overwritten.
    fn new(dir: Option<&Path>, id: &str) -> Result<CertFiles> {
        let dir = dir.unwrap_or(Path::new("."));
        let files = CertFiles {
            cert: dir.join(format!("{id}.crt")),
            key: dir.join(format!("{id}.key")),
        };
        for path in [&files.cert, &files.key] {
            if path.exists() {
                bail!(
                    "{} exists already; move it away or write elsewhere with --cert-out / --out",
                    path.display()
                );
            }
        }
        Ok(files)
    }

    /// Writes the certificate (0644) and key (0600), neither over an existing file.
    fn write(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = self.cert.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        for (path, bytes, mode) in [(&self.key, key_pem, 0o600), (&self.cert, cert_pem, 0o644)] {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(bytes.as_bytes()).and_then(|()| f.sync_all()))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }
}

/// Issues a certificate for `id` and writes it and its key to `files`;
/// returns what `--json` shows of it (no key: that is in the file).
async fn issue_certificate(
    api: &Api,
    id: &str,
    days: Option<u32>,
    files: &CertFiles,
) -> Result<Value> {
    let mut body = json!({"issue": true});
    if let Some(d) = days {
        body["valid_days"] = json!(d);
    }
    let mut issued = api
        .post(&format!("/devices/{}/certificates", path_id(id)?), &body)
        .await?;
    let pem = |k: &str| {
        issued
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("the server's answer has no {k}"))
    };
    let (cert_pem, key_pem) = (pem("cert_pem")?, pem("key_pem")?);
    let thumbprint = issued
        .get("thumbprint")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    files.write(&cert_pem, &key_pem).with_context(|| {
        format!(
            "certificate {thumbprint} was issued but not saved; revoke it with \
             `tributary device cert {id} revoke {thumbprint}` and issue another"
        )
    })?;
    if let Some(o) = issued.as_object_mut() {
        o.remove("cert_pem");
        o.remove("key_pem");
        o.insert("cert_path".into(), json!(files.cert.display().to_string()));
        o.insert("key_path".into(), json!(files.key.display().to_string()));
    }
    Ok(issued)
}

fn print_issued(c: &Value) {
    let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("");
    println!("certificate: {}", s("cert_path"));
    println!(
        "key:         {} (the only copy: keep it safe)",
        s("key_path")
    );
    println!("thumbprint:  {}", s("thumbprint"));
    if let Some(t) = c.get("not_after").and_then(Value::as_i64) {
        println!("expires:     {}", time_text(t));
    }
}

async fn cert(id: &str, action: CertAction) -> Result<()> {
    let path = format!("/devices/{}/certificates", path_id(id)?);
    match action {
        CertAction::Issue {
            days,
            out,
            json,
            api,
        } => {
            let files = CertFiles::new(out.as_deref(), id)?;
            let api = Api::resolve(&api)?;
            let issued = issue_certificate(&api, id, days, &files).await?;
            if json {
                println!("{issued}");
            } else {
                println!("certificate issued for {id}");
                print_issued(&issued);
            }
        }
        CertAction::Register { file, json, api } => {
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let api = Api::resolve(&api)?;
            let added = api.post(&path, &json!({ "certificate_pem": pem })).await?;
            if json {
                println!("{added}");
            } else {
                let s = |k: &str| added.get(k).and_then(Value::as_str).unwrap_or("");
                println!("certificate {} registered to {id}", s("thumbprint"));
                if let Some(t) = added.get("not_after").and_then(Value::as_i64) {
                    println!("expires: {}", time_text(t));
                }
            }
        }
        CertAction::List { json, api } => {
            let api = Api::resolve(&api)?;
            let list = api.get(&path).await?;
            let certificates = list
                .get("certificates")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if json {
                println!("{}", Value::Array(certificates));
            } else if certificates.is_empty() {
                println!(
                    "{id} has no certificates (issue one with `tributary device cert {id} issue`)"
                );
            } else {
                let rows: Vec<Vec<String>> = certificates
                    .iter()
                    .map(|c| {
                        let s =
                            |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                        let t = |k: &str| {
                            c.get(k)
                                .and_then(Value::as_i64)
                                .map(time_text)
                                .unwrap_or_default()
                        };
                        vec![
                            s("thumbprint"),
                            s("status"),
                            t("not_after"),
                            t("created_at"),
                        ]
                    })
                    .collect();
                print_columns(&["THUMBPRINT", "STATUS", "EXPIRES", "ADDED"], &rows);
            }
        }
        CertAction::Revoke {
            thumbprint,
            json,
            api,
        } => {
            if thumbprint.is_empty()
                || !thumbprint
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':')
            {
                bail!(
                    "'{thumbprint}' is not a thumbprint; `tributary device cert {id} list` shows them"
                );
            }
            let api = Api::resolve(&api)?;
            let revoked = api
                .post(&format!("{path}/{thumbprint}/revoke"), &json!({}))
                .await?;
            if json {
                println!("{revoked}");
            } else {
                println!("certificate {thumbprint} of {id} revoked");
            }
        }
    }
    Ok(())
}

/// Prints rows under headers, in columns as wide as their widest cell.
pub(crate) fn print_columns(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            out.push_str(&format!("{c:<width$}  ", width = widths[i]));
        }
        out.trim_end().to_string()
    };
    println!("{}", line(headers.to_vec()));
    for r in rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}

/// A device id as a URL path segment. Valid ids need no escaping; anything
/// else is refused here rather than sent to some other path.
pub(crate) fn path_id(id: &str) -> Result<&str> {
    path_segment(
        id,
        "a device id; ids are letters, digits, '.', '_', '-' and ':'",
    )
}

/// `id` as one segment of an API path, or an error saying it is not `what`
/// (a `/`, `?`, `#`, `%`, `.` or `..` would change which path is called).
pub(crate) fn path_segment<'a>(id: &'a str, what: &str) -> Result<&'a str> {
    if id.is_empty() || id.contains(['/', '?', '#', '%']) || id == "." || id == ".." {
        bail!("'{id}' is not {what}");
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
pub(crate) fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

pub(crate) fn tags_text(device: &Value) -> String {
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
    if let Some(c) = device.get("connection").filter(|c| c.is_object()) {
        let t = |k: &str| c.get(k).and_then(Value::as_i64).map(time_text);
        if let Some(since) = t("since") {
            println!("since:     {since}");
        }
        if let Some(reason) = c.get("reason").and_then(Value::as_str) {
            println!("reason:    {reason}");
        }
        if let Some(seen) = t("last_seen") {
            println!("last seen: {seen}");
        }
        if let Some(event) = t("last_event_at") {
            println!("last event: {event}");
        }
    }
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
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let connected = d.get("connected").and_then(Value::as_bool).unwrap_or(false);
            let last_seen = d
                .get("connection")
                .and_then(|c| c.get("last_seen"))
                .and_then(Value::as_i64)
                .map(time_text)
                .unwrap_or_else(|| "-".to_string());
            vec![
                s("id"),
                s("status"),
                if connected { "yes" } else { "no" }.to_string(),
                last_seen,
                tags_text(d),
            ]
        })
        .collect();
    print_columns(&["ID", "STATUS", "CONNECTED", "LAST SEEN", "TAGS"], &rows);
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
