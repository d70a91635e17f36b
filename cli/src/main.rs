//! `tributary`: the whole IoT back end in one binary, and its command-line client.

mod client;
mod commands;
mod datadir;
mod output;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::output::Format;

/// mimalloc rather than glibc's malloc, which spent a quarter of the
/// server's time at full ingest in its own bookkeeping (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tributary: devices over QUIC, a durable event stream, streaming SQL rules,
/// Parquet storage and commands back to devices, in one process.
#[derive(Parser, Debug)]
#[command(name = "tributary", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where client commands find the server.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The server's data directory: its admin token, addresses and CA are read from there.
    #[arg(long, env = "TRIBUTARY_DATA_DIR", default_value = datadir::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The HTTP API address (default: from <data-dir>/server.json, else 127.0.0.1:7701).
    #[arg(long, env = "TRIBUTARY_API")]
    pub server: Option<String>,
    /// The admin token (default: <data-dir>/admin.token).
    #[arg(long, env = "TRIBUTARY_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// How a device client connects.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// The device id.
    #[arg(long, env = "TRIBUTARY_DEVICE")]
    pub device: String,
    /// The device's token (printed by `tributary device add`); not needed
    /// with --cert.
    #[arg(
        long,
        env = "TRIBUTARY_DEVICE_TOKEN",
        hide_env_values = true,
        required_unless_present = "cert"
    )]
    pub token: Option<String>,
    /// Authenticate with this client certificate (PEM, as `tributary device
    /// add --cert` writes it) instead of a token.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The enrollment group the device belongs to: a device the server does
    /// not know yet is registered on its first connection (its token signed
    /// with the key derived from the group's).
    #[arg(long, env = "TRIBUTARY_GROUP")]
    pub group: Option<String>,
    /// The server's data directory, to find its QUIC address and CA.
    #[arg(long, env = "TRIBUTARY_DATA_DIR", default_value = datadir::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The QUIC address (default: from <data-dir>/server.json, else 127.0.0.1:7700).
    #[arg(long, env = "TRIBUTARY_SERVER")]
    pub server: Option<String>,
    /// The CA certificate to trust (default: <data-dir>/tls/ca.pem).
    #[arg(long, env = "TRIBUTARY_CA")]
    pub ca: Option<PathBuf>,
    /// The name on the server's certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: QUIC gateway, event stream, rules, Parquet sink and HTTP API.
    Serve(server::ServeArgs),
    /// Run a SQL statement on the server (CREATE STREAM, CREATE RULE, SHOW, SELECT ...).
    Sql {
        /// The statement.
        statement: String,
        /// How to print rows.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Query a data directory's stored events with no server running.
    Query {
        /// The SELECT statement.
        statement: String,
        /// The data directory to read.
        #[arg(long, env = "TRIBUTARY_DATA_DIR", default_value = datadir::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// How to print rows.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Manage devices in the registry: credentials, certificates, twins.
    #[command(subcommand)]
    Device(commands::device::DeviceCommand),
    /// Manage enrollment groups (zero-touch provisioning).
    #[command(subcommand)]
    Group(commands::group::GroupCommand),
    /// Send commands to devices.
    #[command(name = "command", subcommand)]
    Commands(commands::command::CommandCommand),
    /// Manage the server itself: the admin token.
    #[command(subcommand)]
    Admin(commands::admin::AdminCommand),
    /// Send JSON events (one per line, from arguments or stdin) as a device.
    Send(commands::send::SendArgs),
    /// Connect as a device and print each command it receives as a JSON line.
    Listen(commands::listen::ListenArgs),
    /// Simulate a fleet of devices sending telemetry, and report what the
    /// server acknowledged and how fast.
    Simulate(commands::simulate::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => server::serve(args).await,
            Command::Sql {
                statement,
                format,
                api,
            } => commands::sql::run(&api, &statement, format).await,
            Command::Query {
                statement,
                data_dir,
                format,
            } => commands::sql::query_offline(&data_dir, &statement, format).await,
            Command::Device(cmd) => commands::device::run(cmd).await,
            Command::Group(cmd) => commands::group::run(cmd).await,
            Command::Commands(cmd) => commands::command::run(cmd).await,
            Command::Admin(cmd) => commands::admin::run(cmd).await,
            Command::Send(args) => commands::send::run(args).await,
            Command::Listen(args) => commands::listen::run(args).await,
            Command::Simulate(args) => commands::simulate::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // One clear line: the outermost context and its causes.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !message.contains(&c) {
                    message.push_str(": ");
                    message.push_str(&c);
                }
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
