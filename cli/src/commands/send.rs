//! `tributary send`: a device sends JSON events and waits for every answer.

use std::collections::VecDeque;
use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tributary_ingest::client::{Client, Outcome};

use crate::DeviceArgs;
use crate::client::device_options;

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The stream to send to.
    #[arg(long, default_value = "telemetry")]
    pub stream: String,
    /// Events per frame. A frame is stored whole or not at all.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
    /// Events as JSON objects; without any, one event per line is read from stdin.
    pub events: Vec<String>,
}

/// Frames in flight at once.
const WINDOW: usize = 32;

struct Line {
    number: usize,
    text: String,
}

pub async fn run(args: SendArgs) -> Result<ExitCode> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let lines = read_lines(&args.events)?;
    if lines.is_empty() {
        bail!("no events to send: give JSON objects as arguments or one per line on stdin");
    }
    let client = Client::connect(device_options(&args.device, false)?).await?;
    let frames: Vec<&[Line]> = lines.chunks(args.batch).collect();
    let mut in_flight = VecDeque::new();
    let mut accepted = 0usize;
    let mut rejections = Vec::new();
    let mut settle =
        |outcome: Outcome, frame: &[Line], rejections: &mut Vec<serde_json::Value>| match outcome {
            Outcome::Acked(ack) => accepted += ack.count as usize,
            Outcome::Rejected(r) => {
                let first = frame.first().map(|l| l.number).unwrap_or(0);
                let last = frame.last().map(|l| l.number).unwrap_or(0);
                let line = r.event.and_then(|i| frame.get(i)).map(|l| l.number);
                let prefix = r.event.map(|i| format!("event {i}: ")).unwrap_or_default();
                let message = r
                    .message
                    .strip_prefix(&prefix)
                    .unwrap_or(&r.message)
                    .to_string();
                if !args.json {
                    let span = if first == last {
                        format!("line {first} was")
                    } else {
                        format!("lines {first}-{last} were")
                    };
                    match line {
                        Some(n) => eprintln!(
                            "error: line {n}: {message} ({}; {span} not stored)",
                            r.code.as_str()
                        ),
                        None => {
                            eprintln!("error: {message} ({}; {span} not stored)", r.code.as_str())
                        }
                    }
                }
                rejections.push(json!({
                    "line": line,
                    "lines": [first, last],
                    "code": r.code.as_str(),
                    "field": r.field,
                    "message": message,
                }));
            }
        };
    for frame in &frames {
        let payload = frame
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let answer = client
            .submit(&args.stream, payload.into_bytes().into())
            .await?;
        in_flight.push_back((answer, *frame));
        if in_flight.len() >= WINDOW
            && let Some((answer, frame)) = in_flight.pop_front()
        {
            settle(answer.await?, frame, &mut rejections);
        }
    }
    while let Some((answer, frame)) = in_flight.pop_front() {
        settle(answer.await?, frame, &mut rejections);
    }
    client.close().await;
    let sent = lines.len();
    if args.json {
        println!(
            "{}",
            json!({"sent": sent, "accepted": accepted, "rejected": sent - accepted, "errors": rejections})
        );
    } else if rejections.is_empty() {
        println!(
            "{accepted} event{} accepted",
            if accepted == 1 { "" } else { "s" }
        );
    } else {
        eprintln!(
            "{accepted} of {sent} events accepted; {} rejected",
            sent - accepted
        );
    }
    Ok(if rejections.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn read_lines(args: &[String]) -> Result<Vec<Line>> {
    let texts: Vec<String> = if args.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()
            .context("reading events from stdin")?
    } else {
        args.iter()
            .flat_map(|a| a.lines().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    Ok(texts
        .into_iter()
        .enumerate()
        .filter(|(_, t)| !t.trim().is_empty())
        .map(|(i, text)| Line {
            number: i + 1,
            text,
        })
        .collect())
}
