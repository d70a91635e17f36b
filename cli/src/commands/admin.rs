//! `tributary admin rotate-token`: the server's own credentials.

use std::process::ExitCode;

use anyhow::{Result, anyhow};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::ApiArgs;
use crate::client::Api;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Replace the admin token: the old one stops working at once.
    ///
    /// The server writes the new token to <data-dir>/admin.token, where the
    /// CLI on its machine finds it; elsewhere, pass it with --token.
    RotateToken {
        /// Print {"token"} as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(command: AdminCommand) -> Result<ExitCode> {
    match command {
        AdminCommand::RotateToken { json, api } => {
            let api = Api::resolve(&api)?;
            let rotated = api.post("/admin/token/rotate", &json!({})).await?;
            let token = rotated
                .get("token")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("the server's answer has no token"))?;
            if json {
                println!("{rotated}");
            } else {
                println!("new admin token: {token}");
                println!(
                    "The old token no longer works. The server wrote the new one to \
                     <data-dir>/admin.token."
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
