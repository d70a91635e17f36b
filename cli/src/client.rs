//! The client side of the CLI: finding the server and talking to its API.

use std::io::Cursor;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::record_batch::RecordBatch;
use reqwest::StatusCode;
use serde_json::Value;
use tributary_ingest::client::{ClientIdentity, ClientOptions};

use crate::datadir::DataDir;
use crate::server::http::ARROW_STREAM;
use crate::{ApiArgs, DeviceArgs};

/// Default HTTP API address.
pub const DEFAULT_API: &str = "127.0.0.1:7701";
/// Default QUIC address.
pub const DEFAULT_QUIC: &str = "127.0.0.1:7700";

/// A client of the HTTP API.
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    /// Finds the API address and admin token from flags, environment or the data directory.
    pub fn resolve(args: &ApiArgs) -> Result<Api> {
        let dir = DataDir::new(&args.data_dir);
        let address = match &args.server {
            Some(s) => s.clone(),
            None => dir
                .read_server_info()
                .map(|i| i.http.to_string())
                .unwrap_or_else(|| DEFAULT_API.to_string()),
        };
        let base = if address.starts_with("http://") || address.starts_with("https://") {
            address.trim_end_matches('/').to_string()
        } else {
            format!("http://{address}")
        };
        let token = match &args.token {
            Some(t) => t.clone(),
            None => dir.read_admin_token()?,
        };
        Ok(Api {
            base,
            token,
            http: reqwest::Client::new(),
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach the Tributary server at {} (is `tributary serve` running?)",
                    self.base
                )
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        Err(api_error(status, &body))
    }

    /// Runs a statement; rows come back as Arrow.
    pub async fn sql(&self, statement: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let request = self
            .http
            .post(format!("{}/api/v1/sql", self.base))
            .header(reqwest::header::ACCEPT, ARROW_STREAM)
            .json(&serde_json::json!({ "sql": statement }));
        let bytes = self.send(request).await?.bytes().await?;
        let reader = StreamReader::try_new(Cursor::new(bytes), None)
            .context("reading the server's answer")?;
        let schema = reader.schema();
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        Ok((schema, batches))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let response = self
            .send(self.http.get(format!("{}/api/v1{path}", self.base)))
            .await?;
        Ok(response.json().await?)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let response = self
            .send(
                self.http
                    .post(format!("{}/api/v1{path}", self.base))
                    .json(body),
            )
            .await?;
        Ok(response.json().await?)
    }

    /// A GET with query parameters (a name may repeat), percent-encoded.
    pub async fn get_query(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1{path}", self.base))
            .with_context(|| format!("invalid server address {}", self.base))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(self.send(self.http.get(url)).await?.json().await?)
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        let response = self
            .send(
                self.http
                    .patch(format!("{}/api/v1{path}", self.base))
                    .json(body),
            )
            .await?;
        Ok(response.json().await?)
    }

    /// A POST of a body that is not JSON (an import file), answered with JSON.
    pub async fn post_bytes(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<Value> {
        let response = self
            .send(
                self.http
                    .post(format!("{}/api/v1{path}", self.base))
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(body),
            )
            .await?;
        Ok(response.json().await?)
    }

    /// A JSON request with extra headers (`If-Match`).
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
        headers: &[(&str, String)],
    ) -> Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .json(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        Ok(self.send(request).await?.json().await?)
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.http.delete(format!("{}/api/v1{path}", self.base)))
            .await?;
        Ok(())
    }
}

/// The API's JSON error as one line.
fn api_error(status: StatusCode, body: &[u8]) -> anyhow::Error {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    match parsed.as_ref().and_then(|v| v.get("error")) {
        Some(e) => {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            anyhow!("{message}")
        }
        None => anyhow!(
            "the server answered {status}: {}",
            String::from_utf8_lossy(body)
        ),
    }
}

/// The server's QUIC address and the CA to trust: from flags or
/// environment (`server`, `ca`), else from the data directory (its
/// `server.json` and `tls/ca.pem`), else the default address.
pub fn quic_server(
    data_dir: &Path,
    server: Option<&str>,
    ca: Option<&Path>,
) -> Result<(SocketAddr, PathBuf)> {
    let dir = DataDir::new(data_dir);
    let address = match server {
        Some(s) => s.to_string(),
        None => dir
            .read_server_info()
            .map(|i| i.quic.to_string())
            .unwrap_or_else(|| DEFAULT_QUIC.to_string()),
    };
    let server: SocketAddr = address
        .to_socket_addrs()
        .with_context(|| format!("invalid server address '{address}'"))?
        .next()
        .ok_or_else(|| anyhow!("server address '{address}' resolves to nothing"))?;
    let ca = ca.map(Path::to_path_buf).unwrap_or_else(|| dir.ca_cert());
    if !ca.exists() {
        bail!(
            "no CA certificate at {} (pass --ca, or --data-dir of the server)",
            ca.display()
        );
    }
    Ok((server, ca))
}

/// Connection settings of a device client, from flags, environment or the data directory.
pub fn device_options(args: &DeviceArgs, commands: bool) -> Result<ClientOptions> {
    let (server, ca) = quic_server(&args.data_dir, args.server.as_deref(), args.ca.as_deref())?;
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(
            ClientIdentity::from_files(cert, key)
                .with_context(|| format!("reading the client certificate {}", cert.display()))?,
        ),
        _ => None,
    };
    Ok(ClientOptions {
        server,
        server_name: args.server_name.clone(),
        ca,
        device_id: args.device.clone(),
        token: args.token.clone().unwrap_or_default(),
        commands,
        idempotent: false,
        identity,
        group: args.group.clone(),
    })
}
