//! `GET /metrics`: the gateway's counters and the command queue in the
//! Prometheus text exposition format (0.0.4), for a Prometheus server to
//! scrape. No token, like `/health`: it shows counts, never ids or
//! secrets. Served beside the route table (it is not part of `/api/v1`
//! and not JSON), so the OpenAPI document leaves it out.
//! `docs/operations.md` ("Metrics") describes every metric.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tributary_ingest::metrics::{
    render_commands, render_connected_devices, render_consumer_lag, render_in_flight,
};

use super::ApiState;

/// The media type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The server's metrics as Prometheus text: connections, sessions, frames
/// and events through the QUIC gateway since the server started, the
/// devices connected now, the command queue by status, and how far each
/// stream's consumers are behind its log.
pub(super) async fn metrics(State(state): State<ApiState>) -> Response {
    let mut out = String::with_capacity(4096);
    state.gateway.metrics().render(&mut out);
    render_connected_devices(&mut out, state.gateway.connected_count());
    render_in_flight(&mut out, state.gateway.in_flight());
    // A scrape still answers when the queue cannot be read: those gauges
    // are left out, and the log says why.
    match state.commands.blocking(|q| q.status_counts()).await {
        Ok(counts) => render_commands(&mut out, &counts),
        Err(e) => tracing::warn!(error = %e, "could not count the command queue for /metrics"),
    }
    let lags: Vec<_> = state
        .sql
        .catalog
        .streams()
        .into_iter()
        .filter_map(|def| match state.sql.log.lag(&def.name) {
            Ok(lag) => Some((def.name, lag)),
            Err(e) => {
                tracing::warn!(stream = %def.name, error = %e, "could not read the stream's consumer offsets for /metrics");
                None
            }
        })
        .collect();
    render_consumer_lag(&mut out, &lags);
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    response
}
