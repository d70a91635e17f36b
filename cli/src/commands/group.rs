//! `tributary group add | list | get | update | remove | rotate-key`:
//! enrollment groups through the HTTP API.

use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use serde_json::{Map, Value, json};

use super::device::{
    KeySlot, Status, parse_tag, path_id, print_columns, tag_map, tags_text, time_text,
};
use crate::ApiArgs;
use crate::client::Api;

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create an enrollment group and print its two keys (shown only once).
    ///
    /// A device of the group derives its key from the group's (see
    /// docs/security.md) and is registered the first time it connects.
    Add {
        /// The group's name: the same rules as a device id.
        name: String,
        /// A tag every device enrolled through the group gets, as key=value; repeat for more.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Create the group disabled: it enrolls no devices until enabled.
        #[arg(long)]
        disabled: bool,
        /// Print the group and its keys as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List enrollment groups, ordered by name.
    List {
        /// Print the groups as a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one enrollment group.
    Get {
        name: String,
        /// Print the group as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change a group's tags or status; devices it enrolled keep theirs.
    Update {
        name: String,
        /// The new tags, as key=value; repeat for more. They replace all old tags.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Remove every tag.
        #[arg(long, conflicts_with = "tags")]
        clear_tags: bool,
        /// Enable or disable enrollment through the group.
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// Print the updated group as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a group; the devices it enrolled stay, with their own keys.
    Remove {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Replace one of a group's keys with a fresh one and print it.
    RotateKey {
        name: String,
        /// Which key.
        #[arg(long, value_enum)]
        key: KeySlot,
        /// Print {"name", "slot", "key"} as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn status_text(status: Status) -> &'static str {
    match status {
        Status::Enabled => "enabled",
        Status::Disabled => "disabled",
    }
}

pub async fn run(command: GroupCommand) -> Result<ExitCode> {
    match command {
        GroupCommand::Add {
            name,
            tags,
            disabled,
            json,
            api,
        } => {
            let api = Api::resolve(&api)?;
            let mut body = json!({"name": name, "tags": tag_map(tags)});
            if disabled {
                body["status"] = json!("disabled");
            }
            let created = api.post("/enrollment-groups", &body).await?;
            if json {
                println!("{created}");
            } else {
                let s = |k: &str| created.get(k).and_then(Value::as_str).unwrap_or("");
                println!(
                    "enrollment group {name} created{}",
                    if disabled { " (disabled)" } else { "" }
                );
                println!("primary key:   {}", s("primary_key"));
                println!("secondary key: {}", s("secondary_key"));
                println!(
                    "The keys are shown only once: store them now. A device's key is \
                     HMAC-SHA256(group key, device id) (docs/security.md)."
                );
            }
        }
        GroupCommand::List { json, api } => {
            let api = Api::resolve(&api)?;
            let list = api.get("/enrollment-groups").await?;
            let groups = list
                .get("groups")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if json {
                println!("{}", Value::Array(groups));
            } else if groups.is_empty() {
                println!("no enrollment groups (add one with `tributary group add <name>`)");
            } else {
                let rows: Vec<Vec<String>> = groups
                    .iter()
                    .map(|g| {
                        let s =
                            |k: &str| g.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                        vec![s("name"), s("status"), tags_text(g)]
                    })
                    .collect();
                print_columns(&["NAME", "STATUS", "TAGS"], &rows);
            }
        }
        GroupCommand::Get { name, json, api } => {
            let api = Api::resolve(&api)?;
            let group = api
                .get(&format!("/enrollment-groups/{}", path_name(&name)?))
                .await?;
            print_group(&group, json);
        }
        GroupCommand::Update {
            name,
            tags,
            clear_tags,
            status,
            json,
            api,
        } => {
            let mut body = Map::new();
            if !tags.is_empty() || clear_tags {
                body.insert("tags".into(), Value::Object(tag_map(tags)));
            }
            if let Some(s) = status {
                body.insert("status".into(), json!(status_text(s)));
            }
            if body.is_empty() {
                bail!("nothing to change: pass --tag, --clear-tags or --status");
            }
            let api = Api::resolve(&api)?;
            let group = api
                .patch(
                    &format!("/enrollment-groups/{}", path_name(&name)?),
                    &Value::Object(body),
                )
                .await?;
            print_group(&group, json);
        }
        GroupCommand::Remove { name, api } => {
            let api = Api::resolve(&api)?;
            api.delete(&format!("/enrollment-groups/{}", path_name(&name)?))
                .await?;
            println!("enrollment group {name} removed");
        }
        GroupCommand::RotateKey {
            name,
            key,
            json,
            api,
        } => {
            let api = Api::resolve(&api)?;
            let slot = key.as_str();
            let rotated = api
                .post(
                    &format!(
                        "/enrollment-groups/{}/keys/{slot}/rotate",
                        path_name(&name)?
                    ),
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
                println!("new {slot} key of group {name}: {new_key}");
                println!(
                    "Devices enrolled from now on derive their keys from it; devices enrolled \
                     already keep theirs."
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A group name as a URL path segment (the device id rules).
fn path_name(name: &str) -> Result<&str> {
    path_id(name).map_err(|_| {
        anyhow!("'{name}' is not a group name; names are letters, digits, '.', '_', '-' and ':'")
    })
}

fn print_group(group: &Value, json: bool) {
    if json {
        println!("{group}");
        return;
    }
    let s = |k: &str| group.get(k).and_then(Value::as_str).unwrap_or("");
    let time = |k: &str| group.get(k).and_then(Value::as_i64).map(time_text);
    println!("name:    {}", s("name"));
    println!("status:  {}", s("status"));
    println!("tags:    {}", tags_text(group));
    if let Some(t) = time("created_at") {
        println!("created: {t}");
    }
    if let Some(t) = time("updated_at") {
        println!("updated: {t}");
    }
}
