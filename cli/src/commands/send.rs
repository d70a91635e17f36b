//! `tributary send`: a device sends JSON events and waits for every answer.

use std::collections::VecDeque;
use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tributary_ingest::client::{Client, Outcome};
use tributary_ingest::protocol::RejectCode;

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
    // Frame header: length, type, seq, stream name length, stream name, encoding.
    let overhead = 4 + 1 + 8 + 1 + args.stream.len() + 1;
    let max_payload = (client.welcome().max_frame_bytes as usize).saturating_sub(overhead);
    let max_events = (client.welcome().max_events_per_frame as usize).max(1);
    let (frames, too_big) = pack(&lines, args.batch.min(max_events), max_payload);
    let mut in_flight = VecDeque::new();
    let mut accepted = 0usize;
    let mut rejections = Vec::new();
    for line in too_big {
        let message = format!(
            "the event is {} bytes; the server takes at most {max_payload} bytes per frame",
            line.text.len()
        );
        let rejection = Rejection {
            line: Some(line.number),
            lines: [line.number, line.number],
            code: "frame_too_large",
            field: None,
            message,
        };
        rejection.report(args.json, "not sent", &mut rejections);
    }
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
            settle(
                pace(&client, &args.stream, frame, answer.await?).await?,
                frame,
                args.json,
                &mut accepted,
                &mut rejections,
            );
        }
    }
    while let Some((answer, frame)) = in_flight.pop_front() {
        settle(
            pace(&client, &args.stream, frame, answer.await?).await?,
            frame,
            args.json,
            &mut accepted,
            &mut rejections,
        );
    }
    client.close().await;
    let sent = lines.len();
    if args.json {
        println!(
            "{}",
            json!({"sent": sent, "accepted": accepted, "rejected": sent.saturating_sub(accepted), "errors": rejections})
        );
    } else if rejections.is_empty() {
        println!(
            "{accepted} event{} accepted",
            if accepted == 1 { "" } else { "s" }
        );
    } else {
        eprintln!(
            "{accepted} of {sent} events accepted; {} rejected",
            sent.saturating_sub(accepted)
        );
    }
    Ok(if rejections.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends a frame the server rejected with `rate_limited` again once the
/// time it gave has passed, until it is taken or rejected for another
/// reason; any other answer is returned as it is.
async fn pace(
    client: &Client,
    stream: &str,
    frame: &[Line],
    mut outcome: Outcome,
) -> Result<Outcome> {
    while let Outcome::Rejected(r) = &outcome
        && r.code == RejectCode::RateLimited
    {
        let wait = r.retry_after_ms.unwrap_or(100).min(60_000);
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        let payload = frame
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        outcome = client.send(stream, payload.into_bytes()).await?;
    }
    Ok(outcome)
}

/// Counts one frame's answer; prints a rejection with the line it blames.
fn settle(
    outcome: Outcome,
    frame: &[Line],
    json: bool,
    accepted: &mut usize,
    rejections: &mut Vec<serde_json::Value>,
) {
    match outcome {
        // A server never acknowledges more events than the frame held.
        Outcome::Acked(ack) => *accepted += (ack.count as usize).min(frame.len()),
        Outcome::Rejected(r) => {
            let first = frame.first().map(|l| l.number).unwrap_or(0);
            let last = frame.last().map(|l| l.number).unwrap_or(0);
            let prefix = r.event.map(|i| format!("event {i}: ")).unwrap_or_default();
            let span = if first == last {
                format!("line {first} was not stored")
            } else {
                format!("lines {first}-{last} were not stored")
            };
            let rejection = Rejection {
                line: r.event.and_then(|i| frame.get(i)).map(|l| l.number),
                lines: [first, last],
                code: r.code.as_str(),
                message: r
                    .message
                    .strip_prefix(&prefix)
                    .unwrap_or(&r.message)
                    .to_string(),
                field: r.field,
            };
            rejection.report(json, &span, rejections);
        }
    }
}

/// Events that were not stored, and why.
struct Rejection {
    /// The line to blame, when one is.
    line: Option<usize>,
    /// The lines that were not stored.
    lines: [usize; 2],
    code: &'static str,
    field: Option<String>,
    message: String,
}

impl Rejection {
    /// Prints one `error:` line (unless `--json`) and keeps it for the summary.
    fn report(self, json: bool, consequence: &str, rejections: &mut Vec<serde_json::Value>) {
        if !json {
            match self.line {
                Some(n) => eprintln!(
                    "error: line {n}: {} ({}; {consequence})",
                    self.message, self.code
                ),
                None => eprintln!("error: {} ({}; {consequence})", self.message, self.code),
            }
        }
        rejections.push(json!({
            "line": self.line,
            "lines": self.lines,
            "code": self.code,
            "field": self.field,
            "message": self.message,
        }));
    }
}

/// Groups lines into frames of at most `batch` events and `max_bytes` of
/// payload; a line too big for any frame comes back on its own.
fn pack(lines: &[Line], batch: usize, max_bytes: usize) -> (Vec<&[Line]>, Vec<&Line>) {
    let mut frames = Vec::new();
    let mut too_big = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, line) in lines.iter().enumerate() {
        let size = line.text.len() + 1;
        if size > max_bytes {
            if start < i {
                frames.push(&lines[start..i]);
            }
            too_big.push(line);
            start = i + 1;
            bytes = 0;
            continue;
        }
        if i > start && (i - start >= batch || bytes + size > max_bytes) {
            frames.push(&lines[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < lines.len() {
        frames.push(&lines[start..]);
    }
    (frames, too_big)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(sizes: &[usize]) -> Vec<Line> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Line {
                number: i + 1,
                text: "x".repeat(*n),
            })
            .collect()
    }

    #[test]
    fn frames_respect_count_and_size_and_oversized_lines_stand_alone() {
        let l = lines(&[3, 3, 3, 3, 3]);
        let (frames, big) = pack(&l, 2, 100);
        assert_eq!(
            frames.iter().map(|f| f.len()).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        assert!(big.is_empty());
        let (frames, _) = pack(&l, 100, 8);
        assert_eq!(
            frames.iter().map(|f| f.len()).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        let l = lines(&[3, 50, 3]);
        let (frames, big) = pack(&l, 100, 10);
        assert_eq!(
            frames.iter().map(|f| f[0].number).collect::<Vec<_>>(),
            [1, 3]
        );
        assert_eq!(big.iter().map(|l| l.number).collect::<Vec<_>>(), [2]);
    }
}
