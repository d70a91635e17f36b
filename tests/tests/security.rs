//! Device credentials at the gateway (docs/security.md, docs/protocol.md
//! section 4): who may connect (tokens, client certificates, enrollment
//! groups), for how long (expiry, renewal on the live session), and what
//! happens to a live session when its device's credentials change. Every
//! refusal says why and stores nothing.

use std::time::{Duration, Instant};

use serde_json::json;
use tributary_ingest::Error as IngestError;
use tributary_ingest::client::{Client, ClientIdentity, ClientOptions, Outcome};
use tributary_ingest::protocol::{
    self, Encoding, ErrorCode, Events, Frame, FrameDecoder, Hello, RefusedCode, RejectCode,
};
use tributary_ingest::tls::{TlsFiles, issue_device_certificate};
use tributary_tests::{
    DeviceCredentials, Server, derive_device_key, random_key, sign_token, unix_now,
};

use crate::e2e::{STREAM, count};

/// How long a change in the registry may take to end a live session.
const REVOCATION_BOUND: Duration = Duration::from_secs(5);

/// An hour from now: the expiry of tokens the tests make.
fn in_an_hour() -> i64 {
    unix_now() + 3600
}

fn setup(devices: &[&str]) -> (Server, Vec<DeviceCredentials>) {
    let server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let creds = devices
        .iter()
        .map(|id| server.add_device_with_keys(id))
        .collect();
    (server, creds)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options(server: &Server, device: &str, token: &str) -> ClientOptions {
    ClientOptions {
        server: server.quic_addr().parse().unwrap(),
        server_name: "localhost".into(),
        ca: server.ca(),
        device_id: device.into(),
        token: token.into(),
        commands: true,
        idempotent: false,
        identity: None,
        group: None,
    }
}

async fn connect(server: &Server, device: &str, token: &str) -> Client {
    Client::connect(options(server, device, token))
        .await
        .unwrap_or_else(|e| panic!("{device} could not connect: {e}"))
}

/// Runs a CLI command from async code without stalling the runtime.
fn cli(server: &Server, args: &[&str]) -> tributary_tests::Run {
    tokio::task::block_in_place(|| server.cli(args)).ok()
}

/// Sends one event and expects it stored.
async fn send_ok(client: &Client, event: &str) {
    match client.send("telemetry", event.as_bytes().to_vec()).await {
        Ok(Outcome::Acked(ack)) => assert_eq!(ack.count, 1),
        other => panic!("{event} was not stored: {other:?}"),
    }
}

/// Connects as a device that does not wait for WELCOME: HELLO and an EVENTS
/// frame go out in one write. The gateway must refuse the HELLO with
/// `unauthorized` and read nothing after it. Returns the refusal's message.
async fn refused(server: &Server, device: &str, token: &str) -> String {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tributary_ingest::tls::client_config(&server.ca()).unwrap());
    let connection = endpoint
        .connect(server.quic_addr().parse().unwrap(), "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut bytes = Frame::Hello(Hello {
        version: protocol::VERSION,
        device_id: device.into(),
        token: token.into(),
        commands: false,
        idempotent: false,
        group: None,
        twin: false,
    })
    .encode_to_vec();
    Frame::Events(Events {
        seq: 1,
        stream: "telemetry".into(),
        encoding: Encoding::Json,
        payload: br#"{"temp": 66.6}"#.to_vec().into(),
    })
    .encode(&mut bytes);
    send.write_all(&bytes).await.unwrap();

    let mut decoder = FrameDecoder::default();
    let (code, message) = loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            match frame {
                Frame::Error(e) => break (e.code, e.message),
                other => panic!("{device} with {token:?}: expected ERROR, got {other:?}"),
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(64 * 1024, true)).await
        {
            Ok(Ok(Some(chunk))) => decoder.push(&chunk.bytes),
            other => panic!("{device} with {token:?}: no ERROR frame ({other:?})"),
        }
    };
    assert_eq!(code, ErrorCode::Unauthorized, "{message}");
    // The close carries the same code and reason.
    match tokio::time::timeout(Duration::from_secs(5), connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                close.error_code.into_inner(),
                u64::from(ErrorCode::Unauthorized.close_code())
            );
            assert_eq!(String::from_utf8_lossy(&close.reason), message);
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    message
}

/// Also through the client library, as a device written against it sees it.
async fn refused_by_client(server: &Server, device: &str, token: &str) -> String {
    match Client::connect(options(server, device, token)).await {
        Err(IngestError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::Unauthorized, "{message}");
            message
        }
        Err(other) => panic!("{device}: unexpected error {other}"),
        Ok(_) => panic!("{device} with {token:?} was let in"),
    }
}

/// Waits for the server to end a live session; returns its `unauthorized`
/// reason, after checking that it came within [`REVOCATION_BOUND`].
async fn closed_within_bound(client: &Client, since: Instant) -> String {
    let ended = tokio::time::timeout(REVOCATION_BOUND, client.closed())
        .await
        .unwrap_or_else(|_| panic!("the session was still open {REVOCATION_BOUND:?} later"));
    assert!(since.elapsed() < REVOCATION_BOUND);
    match ended {
        IngestError::Server { code, message } => {
            assert_eq!(code, ErrorCode::Unauthorized, "{message}");
            message
        }
        other => panic!("the session ended without a reason from the server: {other}"),
    }
}

/// A refusal that names no cause: the same for an unknown device, a bad
/// signature and a malformed token, so that nobody can probe for ids.
fn assert_generic(message: &str, device: &str) {
    assert!(message.contains(device), "{message}");
    for leak in ["disabled", "expired", "exist", "rotated", "removed"] {
        assert!(!message.contains(leak), "says too much ({leak}): {message}");
    }
}

#[test]
fn token_signed_with_a_random_key_is_refused() {
    let (server, _) = setup(&["d1"]);
    runtime().block_on(async {
        let forged = sign_token("d1", &random_key(), in_an_hour());
        let message = refused(&server, "d1", &forged).await;
        assert_generic(&message, "d1");
        // An unknown device gets the very same answer.
        let ghost = sign_token("ghost", &random_key(), in_an_hour());
        let unknown = refused(&server, "ghost", &ghost).await;
        assert_eq!(unknown, message.replace("d1", "ghost"));
        assert_eq!(refused_by_client(&server, "d1", &forged).await, message);
    });
    assert_eq!(count(&server, "telemetry"), 0);
}

#[test]
fn expired_token_is_refused_with_its_expiry() {
    let (server, creds) = setup(&["d1"]);
    let d1 = &creds[0];
    runtime().block_on(async {
        let expired = d1.primary_token(unix_now() - 60);
        let message = refused(&server, "d1", &expired).await;
        assert!(message.contains("expired"), "{message}");
        // Only a token the device's key signed learns that it expired.
        let forged_expired = sign_token("d1", &random_key(), unix_now() - 60);
        assert_generic(&refused(&server, "d1", &forged_expired).await, "d1");
    });
    assert_eq!(count(&server, "telemetry"), 0);
}

#[test]
fn token_for_another_device_is_refused() {
    let (server, creds) = setup(&["d1", "d2"]);
    let d1 = &creds[0];
    runtime().block_on(async {
        // d1's own token, and one d1's key signed for d2: neither opens d2.
        for token in [
            d1.token.clone(),
            sign_token("d2", &d1.primary_key, in_an_hour()),
        ] {
            let message = refused(&server, "d2", &token).await;
            assert_generic(&message, "d2");
        }
        // d1 still gets in with its own.
        connect(&server, "d1", &d1.token).await.close().await;
    });
    assert_eq!(count(&server, "telemetry"), 0);
}

#[test]
fn malformed_tokens_are_refused() {
    let (server, creds) = setup(&["d1"]);
    let good = creds[0].primary_token(in_an_hour());
    let (head, signature) = good.rsplit_once('.').unwrap();
    let malformed = [
        String::new(),
        "trb1".into(),
        "trb_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG".into(),
        format!("trb2.{}", &good[5..]),
        format!("{head}."),
        format!("{head}.{}", &signature[1..]),
        format!("{head}.{signature}="),
        format!("trb1.0{}", &good[5..]),
        format!("trb1.-5.{signature}"),
        format!("{good}.extra"),
        "x".repeat(4000),
    ];
    runtime().block_on(async {
        for token in &malformed {
            let message = refused(&server, "d1", token).await;
            assert_generic(&message, "d1");
        }
    });
    assert_eq!(count(&server, "telemetry"), 0);
}

#[test]
fn disabled_device_is_refused_and_its_live_sessions_closed() {
    let (server, creds) = setup(&["d1", "d2"]);
    let (d1, d2) = (&creds[0], &creds[1]);
    runtime().block_on(async {
        let first = connect(&server, "d1", &d1.token).await;
        let second = connect(&server, "d1", &d1.secondary_token(in_an_hour())).await;
        let bystander = connect(&server, "d2", &d2.token).await;
        send_ok(&first, r#"{"temp": 1}"#).await;

        cli(&server, &["device", "disable", "d1"]);
        let since = Instant::now();
        for session in [&first, &second] {
            let message = closed_within_bound(session, since).await;
            assert!(message.contains("disabled"), "{message}");
        }
        // Nothing sent after the close is stored. (Regression: a frame sent
        // after the server had ended the session waited forever for its
        // answer.)
        assert!(
            first
                .send("telemetry", &b"{\"temp\": 2}"[..])
                .await
                .is_err()
        );

        let message = refused(&server, "d1", &d1.token).await;
        assert!(message.contains("disabled"), "{message}");
        // Another device is not touched.
        send_ok(&bystander, r#"{"temp": 3}"#).await;

        cli(&server, &["device", "enable", "d1"]);
        let back = connect(&server, "d1", &d1.token).await;
        send_ok(&back, r#"{"temp": 4}"#).await;
        back.close().await;
        bystander.close().await;
    });
    let rows = server.sql_json(
        "SELECT device_id, count(*) AS n FROM telemetry GROUP BY device_id ORDER BY device_id",
    );
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"device_id": "d1", "n": 2}),
            serde_json::json!({"device_id": "d2", "n": 1}),
        ]
    );
}

#[test]
fn rotating_the_signing_key_drops_the_live_session() {
    let (server, creds) = setup(&["d1"]);
    let d1 = &creds[0];
    runtime().block_on(async {
        let client = connect(&server, "d1", &d1.token).await;
        send_ok(&client, r#"{"temp": 1}"#).await;

        let rotated = cli(
            &server,
            &["device", "rotate-key", "d1", "--key", "primary", "--json"],
        );
        let since = Instant::now();
        let message = closed_within_bound(&client, since).await;
        assert!(message.contains("rotated"), "{message}");
        assert!(message.contains("reconnect"), "{message}");

        // The old token is dead for good; the new key signs tokens that work.
        assert_generic(&refused(&server, "d1", &d1.token).await, "d1");
        let new_key = new_key_from(&rotated.stdout);
        assert_ne!(new_key, d1.primary_key);
        let fresh = connect(&server, "d1", &sign_token("d1", &new_key, in_an_hour())).await;
        send_ok(&fresh, r#"{"temp": 2}"#).await;
        fresh.close().await;
    });
    assert_eq!(count(&server, "telemetry"), 2);
}

/// The new key in `device rotate-key --json`'s output.
fn new_key_from(stdout: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("rotate-key --json is not JSON ({e}): {stdout}"));
    v["key"]
        .as_str()
        .unwrap_or_else(|| panic!("no key in {v}"))
        .to_string()
}

#[test]
fn key_rollover_keeps_a_session_signed_by_the_other_key() {
    let (server, creds) = setup(&["d1"]);
    let d1 = &creds[0];
    runtime().block_on(async {
        // Step 1 of the rollover: the device moves to its secondary key.
        let client = connect(&server, "d1", &d1.secondary_token(in_an_hour())).await;
        send_ok(&client, r#"{"temp": 1}"#).await;
        // Step 2: the primary is rotated. A session on the old primary would
        // be gone within the bound; this one stays.
        cli(&server, &["device", "rotate-key", "d1", "--key", "primary"]);
        let ended = tokio::time::timeout(REVOCATION_BOUND, client.closed()).await;
        assert!(
            ended.is_err(),
            "the session was closed: {:?}",
            ended.map(|e| e.to_string())
        );
        send_ok(&client, r#"{"temp": 2}"#).await;
        client.close().await;
    });
    assert_eq!(count(&server, "telemetry"), 2);
}

#[test]
fn removing_a_device_drops_its_live_session() {
    let (server, creds) = setup(&["d1"]);
    let d1 = &creds[0];
    runtime().block_on(async {
        let client = connect(&server, "d1", &d1.token).await;
        send_ok(&client, r#"{"temp": 1}"#).await;
        cli(&server, &["device", "remove", "d1"]);
        let since = Instant::now();
        let message = closed_within_bound(&client, since).await;
        assert!(message.contains("removed"), "{message}");
        assert_generic(&refused(&server, "d1", &d1.token).await, "d1");
    });
    assert_eq!(count(&server, "telemetry"), 1);
}

#[test]
fn a_live_session_ends_when_its_token_expires() {
    let (server, creds) = setup(&["d1"]);
    let d1 = &creds[0];
    runtime().block_on(async {
        // Whole seconds: make sure at least 2 are left when the session starts.
        let expires_at = unix_now() + 3;
        let client = connect(&server, "d1", &d1.primary_token(expires_at)).await;
        send_ok(&client, r#"{"temp": 1}"#).await;
        let message = tokio::time::timeout(Duration::from_secs(10), client.closed())
            .await
            .expect("the session outlived its token");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert!(
            now.as_millis() >= expires_at as u128 * 1000,
            "closed before the token expired"
        );
        assert!(
            now.as_millis() < (expires_at as u128 + 2) * 1000,
            "closed {now:?}, long after the expiry {expires_at}"
        );
        let IngestError::Server { code, message } = message else {
            panic!("no reason from the server: {message}")
        };
        assert_eq!(code, ErrorCode::Unauthorized);
        assert!(message.contains("token expired at"), "{message}");
        assert!(message.contains("reconnect with a new token"), "{message}");
    });
    assert_eq!(count(&server, "telemetry"), 1);
}

#[test]
fn a_device_cannot_publish_as_another_device() {
    let (server, creds) = setup(&["d1", "d2"]);
    let d1 = &creds[0];
    runtime().block_on(async {
        let client = connect(&server, "d1", &d1.token).await;
        assert_eq!(client.welcome().device_id, "d1");
        // A frame claiming another device is refused whole, saying why.
        let outcome = client
            .send(
                "telemetry",
                &br#"[{"temp": 1}, {"temp": 2, "device_id": "d2"}]"#[..],
            )
            .await
            .unwrap();
        let Outcome::Rejected(r) = outcome else {
            panic!("stored events claiming device d2: {outcome:?}")
        };
        assert_eq!(r.code, RejectCode::InvalidDeviceId);
        assert_eq!(r.event, Some(1));
        assert_eq!(r.field.as_deref(), Some("device_id"));
        assert!(r.message.contains("\"d2\""), "{}", r.message);
        assert!(
            r.message.contains("authenticated as \"d1\""),
            "{}",
            r.message
        );
        // Naming itself, or nobody, is fine: the stored id is the session's.
        send_ok(&client, r#"{"temp": 3, "device_id": "d1"}"#).await;
        send_ok(&client, r#"{"temp": 4}"#).await;
        client.close().await;
    });
    let rows = server.sql_json("SELECT device_id, temp FROM telemetry ORDER BY temp");
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"device_id": "d1", "temp": 3.0}),
            serde_json::json!({"device_id": "d1", "temp": 4.0}),
        ]
    );
}

/// docs/security.md spells out the token derivation and a test vector; the
/// tests sign tokens from that text (`sign_token`), so both have to hold.
#[test]
fn tokens_follow_the_documented_derivation() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md"))
        .unwrap();
    let value = |label: &str| {
        doc.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .unwrap_or_else(|| panic!("docs/security.md has no '{label}' line"))
            .trim()
            .trim_matches('`')
            .to_string()
    };
    let (device, key, expires_at, token) = (
        value("device_id:"),
        value("key (base64):"),
        value("expires_at:").parse::<i64>().unwrap(),
        value("token:"),
    );
    assert_eq!(sign_token(&device, &key, expires_at), token);

    // And the server's own tokens are made the same way.
    let (server, creds) = setup(&["d1"]);
    let d1 = &creds[0];
    let expires_at: i64 = d1.token.split('.').nth(1).unwrap().parse().unwrap();
    assert_eq!(d1.token, d1.primary_token(expires_at));
    assert!(expires_at > unix_now());
    runtime().block_on(async {
        connect(&server, "d1", &d1.primary_token(in_an_hour()))
            .await
            .close()
            .await;
    });
}

// ----- Client certificates ----------------------------------------------

/// Has the server's development CA issue a certificate for `device` and
/// register it, through the API; returns it and its thumbprint.
fn issue_certificate(server: &Server, device: &str) -> (ClientIdentity, String) {
    let issued = server.api_expect(
        "POST",
        &format!("/api/v1/devices/{device}/certificates"),
        Some(&json!({"issue": true, "valid_days": 30})),
        201,
    );
    let field = |k: &str| {
        issued[k]
            .as_str()
            .unwrap_or_else(|| panic!("no {k} in {issued}"))
            .to_string()
    };
    (
        ClientIdentity::from_pem(field("cert_pem"), field("key_pem")),
        field("thumbprint"),
    )
}

/// A device that authenticates with its certificate: an empty token.
fn certificate_options(server: &Server, device: &str, identity: ClientIdentity) -> ClientOptions {
    options(server, device, "").with_certificate(identity)
}

async fn refused_with(options: ClientOptions) -> String {
    match Client::connect(options).await {
        Err(IngestError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::Unauthorized, "{message}");
            message
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("let in"),
    }
}

#[test]
fn a_registered_certificate_authenticates_its_device() {
    let (server, _) = setup(&["d1", "d2"]);
    let (identity, _) = issue_certificate(&server, "d1");
    runtime().block_on(async {
        let client = Client::connect(certificate_options(&server, "d1", identity.clone()))
            .await
            .unwrap_or_else(|e| panic!("d1's certificate was refused: {e}"));
        assert_eq!(client.welcome().device_id, "d1");
        send_ok(&client, r#"{"temp": 1}"#).await;
        client.close().await;

        // It is d1's, not d2's: the answer names no cause.
        let message = refused_with(certificate_options(&server, "d2", identity.clone())).await;
        assert_generic(&message, "d2");
        assert!(message.contains("certificate"), "{message}");
        // An empty token needs a certificate.
        let message = refused_with(options(&server, "d1", "")).await;
        assert!(message.contains("client certificate"), "{message}");
        // A token still works beside it, and is what counts.
        let mut both = certificate_options(&server, "d1", identity);
        both.token = sign_token("d1", &random_key(), in_an_hour());
        assert_generic(&refused_with(both).await, "d1");
    });
    let rows = server.sql_json("SELECT device_id, temp FROM telemetry");
    assert_eq!(rows, vec![json!({"device_id": "d1", "temp": 1.0})]);
}

/// A CA of its own in `dir` (`ca.pem`, `ca.key`), named `name`, as
/// [`TlsFiles`] for [`issue_device_certificate`].
fn make_ca(dir: &std::path::Path, name: &str) -> TlsFiles {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let files = TlsFiles::in_dir(dir);
    std::fs::write(&files.ca_cert, cert.pem()).unwrap();
    std::fs::write(&files.ca_key, key.serialize_pem()).unwrap();
    files
}

#[test]
fn a_certificate_from_an_untrusted_ca_fails_the_handshake() {
    let (server, _) = setup(&["d1"]);
    let elsewhere = tempfile::tempdir().unwrap();
    // A CA of someone else's, and the development CA of another Tributary
    // installation (the same name as this server's, another key).
    let stranger = make_ca(&elsewhere.path().join("stranger"), "Someone else's CA");
    let twin_dir = elsewhere.path().join("other-tributary");
    let namesake = TlsFiles::in_dir(&twin_dir);
    namesake.ensure().unwrap();
    for (ca, alert) in [(stranger, "unknown_ca"), (namesake, "decrypt_error")] {
        let foreign = issue_device_certificate(&ca, "d1", 30).unwrap();
        // Registered to d1 even: what refuses it is TLS, before any HELLO.
        server.api_expect(
            "POST",
            "/api/v1/devices/d1/certificates",
            Some(&json!({"certificate_pem": foreign.cert_pem})),
            201,
        );
        let identity = ClientIdentity::from_pem(foreign.cert_pem, foreign.key_pem);
        runtime().block_on(async {
            match Client::connect(certificate_options(&server, "d1", identity)).await {
                Err(e @ IngestError::CertificateRefused { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("the server refused the client certificate"),
                        "{text}"
                    );
                    assert!(text.contains(alert), "{text}");
                }
                Err(other) => panic!("not a certificate refusal: {other:?}"),
                Ok(_) => panic!("a certificate from an untrusted CA was let in"),
            }
        });
    }
    assert_eq!(count(&server, "telemetry"), 0);
}

#[test]
fn revoking_a_certificate_drops_its_live_session() {
    let (server, _) = setup(&["d1"]);
    let (identity, thumbprint) = issue_certificate(&server, "d1");
    let (other, _) = issue_certificate(&server, "d1");
    runtime().block_on(async {
        let client = Client::connect(certificate_options(&server, "d1", identity.clone()))
            .await
            .unwrap();
        let bystander = Client::connect(certificate_options(&server, "d1", other))
            .await
            .unwrap();
        send_ok(&client, r#"{"temp": 1}"#).await;
        tokio::task::block_in_place(|| {
            server.api_expect(
                "POST",
                &format!("/api/v1/devices/d1/certificates/{thumbprint}/revoke"),
                None,
                200,
            )
        });
        let since = Instant::now();
        let message = closed_within_bound(&client, since).await;
        assert!(message.contains("revoked"), "{message}");
        assert!(
            client
                .send("telemetry", &b"{\"temp\": 2}"[..])
                .await
                .is_err()
        );
        // For good; the device's other certificate is not touched.
        let message = refused_with(certificate_options(&server, "d1", identity)).await;
        assert!(message.contains("revoked"), "{message}");
        send_ok(&bystander, r#"{"temp": 3}"#).await;
        bystander.close().await;
    });
    assert_eq!(count(&server, "telemetry"), 2);
}

// ----- Renewing the token on a live session --------------------------------

/// Waits until the wall clock is past `secs` (seconds since the epoch).
async fn wait_past(secs: i64) {
    while unix_now() <= secs {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_renewed_session_outlives_its_first_token() {
    let (server, creds) = setup(&["d1"]);
    let d1 = &creds[0];
    runtime().block_on(async {
        let first_expiry = unix_now() + 3;
        let client = connect(&server, "d1", &d1.primary_token(first_expiry)).await;
        send_ok(&client, r#"{"temp": 1}"#).await;

        // Refused renewals say why and leave the session as it was.
        let forged = sign_token("d1", &random_key(), in_an_hour());
        let stale = d1.primary_token(unix_now() - 60);
        for (token, why) in [(forged, "not signed"), (stale, "expired")] {
            match client.renew(&token).await {
                Err(IngestError::Refused { code, message }) => {
                    assert_eq!(code, RefusedCode::Unauthorized, "{message}");
                    assert!(message.contains(why), "{message}");
                    assert!(
                        message.contains("goes on with its current token"),
                        "{message}"
                    );
                }
                other => panic!("renewal with a bad token: {other:?}"),
            }
        }
        send_ok(&client, r#"{"temp": 2}"#).await;

        // A good one: signed with the secondary key, for an hour.
        let later = in_an_hour();
        let renewed = client.renew(&d1.secondary_token(later)).await.unwrap();
        assert_eq!(renewed, Some(later as u64));
        wait_past(first_expiry + 1).await;
        // The same connection, past the first token's expiry.
        send_ok(&client, r#"{"temp": 3}"#).await;

        // Registry changes now apply to the new token: rotating the primary
        // key (which signed the first) leaves the session...
        cli(&server, &["device", "rotate-key", "d1", "--key", "primary"]);
        let ended = tokio::time::timeout(Duration::from_secs(2), client.closed()).await;
        assert!(ended.is_err(), "closed: {:?}", ended.map(|e| e.to_string()));
        send_ok(&client, r#"{"temp": 4}"#).await;
        // ...rotating the secondary (which signed the second) ends it.
        cli(
            &server,
            &["device", "rotate-key", "d1", "--key", "secondary"],
        );
        let message = closed_within_bound(&client, Instant::now()).await;
        assert!(message.contains("rotated"), "{message}");
    });
    assert_eq!(count(&server, "telemetry"), 4);
}

#[test]
fn a_refused_renewal_keeps_the_old_expiry() {
    let (server, creds) = setup(&["d1", "d2"]);
    let (d1, d2) = (&creds[0], &creds[1]);
    runtime().block_on(async {
        let expires_at = unix_now() + 3;
        let client = connect(&server, "d1", &d1.primary_token(expires_at)).await;
        // Another device's token does not renew this session.
        match client.renew(&d2.primary_token(in_an_hour())).await {
            Err(IngestError::Refused { code, message }) => {
                assert_eq!(code, RefusedCode::Unauthorized);
                assert_generic(&message, "d1");
            }
            other => panic!("renewal with d2's token: {other:?}"),
        }
        send_ok(&client, r#"{"temp": 1}"#).await;
        let ended = tokio::time::timeout(Duration::from_secs(10), client.closed())
            .await
            .expect("the session outlived its token");
        let now_ms = unix_now() * 1000;
        assert!(
            now_ms >= expires_at * 1000,
            "closed before the token expired"
        );
        let IngestError::Server { code, message } = ended else {
            panic!("no reason from the server: {ended}")
        };
        assert_eq!(code, ErrorCode::Unauthorized);
        assert!(message.contains("token expired at"), "{message}");
    });
    assert_eq!(count(&server, "telemetry"), 1);
}

#[test]
fn a_certificate_session_has_no_token_to_renew() {
    let (server, creds) = setup(&["d1"]);
    let (identity, _) = issue_certificate(&server, "d1");
    runtime().block_on(async {
        let client = Client::connect(certificate_options(&server, "d1", identity))
            .await
            .unwrap();
        match client.renew(&creds[0].primary_token(in_an_hour())).await {
            Err(IngestError::Refused { code, message }) => {
                assert_eq!(code, RefusedCode::InvalidRequest);
                assert!(message.contains("certificate"), "{message}");
            }
            other => panic!("renewal on a certificate session: {other:?}"),
        }
        send_ok(&client, r#"{"temp": 1}"#).await;
        client.close().await;
    });
}

// ----- Enrollment groups ---------------------------------------------------

#[test]
fn a_group_enrolls_a_device_it_has_never_seen() {
    let (server, _) = setup(&[]);
    let group = server.api_expect(
        "POST",
        "/api/v1/enrollment-groups",
        Some(&json!({"name": "factory-7", "tags": {"site": "north", "line": "3"}})),
        201,
    );
    let group_key = group["primary_key"].as_str().unwrap().to_string();
    let secondary = group["secondary_key"].as_str().unwrap().to_string();
    // The device's key, derived in the test from docs/protocol.md 4.3.
    let token = sign_token("g-1", &derive_device_key(&group_key, "g-1"), in_an_hour());
    let (status, _) = server.api("GET", "/api/v1/devices/g-1", None);
    assert_eq!(status, 404);
    runtime().block_on(async {
        // A key not derived from the group's, a group that does not exist:
        // the same answer, and nothing created.
        let wrong = sign_token(
            "g-2",
            &derive_device_key(&random_key(), "g-2"),
            in_an_hour(),
        );
        let message = refused_with(options(&server, "g-2", &wrong).with_group("factory-7")).await;
        assert_generic(&message, "g-2");
        let lost = sign_token("g-2", &derive_device_key(&group_key, "g-2"), in_an_hour());
        let unknown = refused_with(options(&server, "g-2", &lost).with_group("factory-8")).await;
        assert_eq!(unknown, message);

        let client = Client::connect(options(&server, "g-1", &token).with_group("factory-7"))
            .await
            .unwrap_or_else(|e| panic!("g-1 was not enrolled: {e}"));
        assert_eq!(client.welcome().device_id, "g-1");
        send_ok(&client, r#"{"temp": 1}"#).await;
        client.close().await;

        // From now on it is a device like any other, with both derived keys.
        let own = sign_token("g-1", &derive_device_key(&secondary, "g-1"), in_an_hour());
        let again = connect(&server, "g-1", &own).await;
        send_ok(&again, r#"{"temp": 2}"#).await;
        again.close().await;
    });
    let device = server.api_expect("GET", "/api/v1/devices/g-1", None, 200);
    assert_eq!(
        device["tags"],
        json!({"site": "north", "line": "3"}),
        "{device}"
    );
    let (status, _) = server.api("GET", "/api/v1/devices/g-2", None);
    assert_eq!(status, 404, "a refused enrollment created g-2");
    let rows = server.sql_json("SELECT device_id, temp FROM telemetry ORDER BY temp");
    assert_eq!(
        rows,
        vec![
            json!({"device_id": "g-1", "temp": 1.0}),
            json!({"device_id": "g-1", "temp": 2.0}),
        ]
    );
}

/// The derivation the group test relies on reproduces the published test
/// vector (docs/security.md), computed with its own HMAC.
#[test]
fn group_keys_follow_the_documented_derivation() {
    use base64::Engine as _;
    let group_key: Vec<u8> = (0u8..32).collect();
    let group_key = base64::engine::general_purpose::STANDARD.encode(group_key);
    let expected = "n5hp4ukLeAS7SxeF5FRQVLr8H+gphAmzs4FeKjULmFc=";
    assert_eq!(derive_device_key(&group_key, "sensor-1"), expected);
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md"))
        .unwrap();
    assert!(
        doc.contains(expected),
        "docs/security.md lost the group key test vector"
    );
}
