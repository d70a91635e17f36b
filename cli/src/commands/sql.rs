//! `tributary sql` (through the server) and `tributary query` (no server).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Result, bail};
use tributary_engine::catalog::Catalog;
use tributary_engine::log::{EmbeddedLog, LogOptions, SharedEventStream};
use tributary_sinks::parquet::Storage;
use tributary_sql::query::QueryEngine;
use tributary_sql::statement::{Statement, parse};

use crate::ApiArgs;
use crate::client::Api;
use crate::datadir::{DataDir, looks_like_data_dir};
use crate::output::{Format, print};
use crate::server::StoredStreams;

pub async fn run(api: &ApiArgs, statement: &str, format: Format) -> Result<ExitCode> {
    let api = Api::resolve(api)?;
    let (schema, batches) = api.sql(statement).await?;
    print(&mut std::io::stdout().lock(), &schema, &batches, format)?;
    Ok(ExitCode::SUCCESS)
}

/// Answers a SELECT straight from a data directory's files.
pub async fn query_offline(data_dir: &Path, statement: &str, format: Format) -> Result<ExitCode> {
    if !looks_like_data_dir(data_dir) {
        bail!("{} is not a Tributary data directory", data_dir.display());
    }
    let statement = match parse(statement)? {
        Statement::Query(q) => *q,
        _ => {
            bail!("`tributary query` runs SELECT statements only; use `tributary sql` for the rest")
        }
    };
    let dir = DataDir::new(data_dir);
    // A running server moves files and offsets underneath us, and the
    // answer could count events twice: hold the directory's lock, as a
    // server does, for the query. Where the lock file cannot be made (a
    // read-only copy), a live pid in server.json is the sign.
    let busy = || {
        anyhow::anyhow!(
            "a server{} is running on {}; use `tributary sql`, which queries it consistently",
            dir.holder(),
            data_dir.display()
        )
    };
    let _no_server = match dir.lock() {
        Ok(Some(lock)) => Some(lock),
        Ok(None) => return Err(busy()),
        Err(_) => {
            if let Some(info) = dir.read_server_info()
                && Path::new(&format!("/proc/{}", info.pid)).exists()
            {
                return Err(busy());
            }
            None
        }
    };
    let catalog = Arc::new(Catalog::open(&dir.catalog())?);
    let log: SharedEventStream = Arc::new(EmbeddedLog::open(
        dir.log(),
        LogOptions {
            read_only: true,
            ..LogOptions::default()
        },
    )?);
    let engine = QueryEngine::new(
        catalog,
        Arc::new(StoredStreams {
            storage: Storage::local(dir.storage())?,
            log,
        }),
    );
    let result = engine.run(statement).await?;
    print(
        &mut std::io::stdout().lock(),
        &result.schema,
        &result.batches,
        format,
    )?;
    Ok(ExitCode::SUCCESS)
}
