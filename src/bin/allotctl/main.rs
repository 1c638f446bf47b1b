//! allotctl: the operator's command line for allotd, over gRPC.
//!
//! Thin: flags (clap), one connection, one command, an exit code scripts can rely on
//! (`failure`). `import` streams CSV/JSON files into the daemon in batches, `commands` has
//! every other command, `output` renders tables and JSON, `client` owns the connection.
//! Talks to the daemon only through the generated clients of `allot::proto::v1` and
//! grpc.health.v1; from the library it may use only the pure identifier rule and the default
//! limits of `allot::domain`, never the daemon's internals.

mod client;
mod commands;
mod failure;
mod import;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use commands::{ReservationAction, TailOptions};
use failure::{EXIT_CODES_HELP, Failure, Outcome};
use import::NodesFormat;

/// `--timeout-ms` default: a 5,000-row SetStock on a busy daemon answers well within it.
const CALL_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// `events tail --idle-ms` default: the replay streams continuously, so a second without an
/// event means it has caught up.
const EVENTS_IDLE_MS_DEFAULT: u64 = 1_000;
/// `order list --limit` default.
const ORDERS_LIST_LEN_DEFAULT: usize = 100;

/// Operator CLI of allotd: nodes, stock, availability, reservations, orders, events,
/// backups and health, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "allotctl", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    /// The daemon's gRPC address: host:port, http://host:port or https://host:port.
    #[arg(long, env = "ALLOT_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    addr: String,
    /// Print one JSON document on stdout instead of tables (events tail: one JSON object per
    /// line). Errors are also a document: {"error": {"code": ..., "message": ...}}.
    #[arg(long, global = true)]
    json: bool,
    /// The longest wait for one answer, in milliseconds (no answer: exit 3).
    #[arg(long, env = "ALLOT_TIMEOUT_MS", default_value_t = CALL_TIMEOUT_MS_DEFAULT, global = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Bearer token sent with every call, when the daemon has `[auth] tokens` configured.
    /// Prefer the environment variable: a flag shows in the process list.
    #[arg(long, env = "ALLOT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificates of the daemon's TLS certificate (turns TLS on; see `[tls]`).
    #[arg(long, env = "ALLOT_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// This client's PEM certificate, for a daemon with `tls.client_ca_file` (mutual TLS).
    #[arg(long, env = "ALLOT_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// This client's PEM private key, with --tls-cert.
    #[arg(long, env = "ALLOT_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fulfilment nodes: import a CSV or JSON file, list them.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Stock positions: import a snapshot CSV, adjust one position.
    Stock {
        #[command(subcommand)]
        command: StockCommand,
    },
    /// Available to promise per SKU and node (GetAvailability).
    Atp(AtpArgs),
    /// Hold stock: one all-or-nothing reservation over every SKU:NODE:QTY line (exit 5 when
    /// INSUFFICIENT: nothing is held).
    Reserve(ReserveArgs),
    /// Show, confirm, extend or release one reservation.
    Reservation {
        #[command(subcommand)]
        command: ReservationCommand,
    },
    /// Show an order, its audit trail, or list orders.
    Order {
        #[command(subcommand)]
        command: OrderCommand,
    },
    /// The event feed (WatchEvents).
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Order KPIs (GetStats).
    Stats {
        /// Only orders of this channel.
        #[arg(long, value_parser = commands::id_value)]
        channel: Option<String>,
    },
    /// Online backup of the whole store into DIR, a new directory on the daemon's machine
    /// (Admin.Backup). A relative DIR is taken from allotctl's working directory. Restore:
    /// copy DIR and start allotd with --data-dir on the copy.
    Backup {
        /// Must not exist yet; its parent must. The daemon writes it.
        dir: PathBuf,
    },
    /// The consistency checker (Admin.Check): recomputes every position's reserved units from
    /// the open reservations and checks the order book; exit 6 when anything drifted.
    /// It pauses the daemon's writers for about one scan of the reservations.
    Check {
        /// Drifted positions and problems listed at most (each).
        #[arg(long, default_value_t = 100)]
        listed_max: u32,
    },
    /// grpc.health.v1 Check: prints the status; exit 0 when SERVING, 3 otherwise.
    Health {
        /// A service name (e.g. allot.v1.Inventory); empty = the whole daemon.
        #[arg(long, default_value = "")]
        service: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// Create or replace nodes from FILE.csv or FILE.json (UpsertNodes).
    #[command(after_help = import::NODES_FILE_HELP)]
    Import {
        /// The node file: CSV or JSON (formats below).
        file: PathBuf,
        /// The file's format, when its extension does not say.
        #[arg(long, value_enum)]
        format: Option<NodesFormat>,
    },
    /// Every node, ordered by node_id.
    List,
}

#[derive(Debug, Subcommand)]
enum StockCommand {
    /// Set absolute on-hand quantities from a CSV snapshot, streamed in SetStock batches,
    /// with a progress bar on stderr when it is a terminal.
    #[command(after_help = import::STOCK_CSV_HELP)]
    Import {
        /// The stock CSV (format below).
        file: PathBuf,
        /// Rows per SetStock request (the daemon's default limit is 10,000).
        #[arg(long, default_value_t = import::STOCK_BATCH_LEN_DEFAULT,
              value_parser = batch_len_parser)]
        batch_size: usize,
    },
    /// Receipt (+) or shrinkage (-) at one position (AdjustStock, idempotent by
    /// --adjustment-id). Prints the position after it.
    Adjust {
        /// The idempotency key: a retry with the same id and entries applies once.
        #[arg(long, value_parser = commands::id_value)]
        adjustment_id: String,
        /// The SKU.
        #[arg(value_parser = commands::id_value)]
        sku: String,
        /// The node id.
        #[arg(value_parser = commands::id_value)]
        node: String,
        /// Units to add (positive) or remove (negative), e.g. 25 or -3.
        #[arg(allow_negative_numbers = true, value_parser = commands::delta_value)]
        delta: i64,
        /// Free text kept with the change, e.g. "receipt PO-123".
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn batch_len_parser(raw: &str) -> Result<usize, String> {
    let value: usize = raw.parse().map_err(|_| format!("{raw:?} is not a number"))?;
    if !(1..=import::STOCK_BATCH_LEN_MAX).contains(&value) {
        return Err(format!("must be within 1..={}", import::STOCK_BATCH_LEN_MAX));
    }
    Ok(value)
}

#[derive(Debug, Args)]
struct AtpArgs {
    /// One or more SKUs.
    #[arg(required = true, value_parser = commands::id_value)]
    skus: Vec<String>,
    /// Only nodes serving this channel count.
    #[arg(long, value_parser = commands::id_value)]
    channel: Option<String>,
    /// Only these nodes are listed and counted (repeatable).
    #[arg(long = "node", value_parser = commands::id_value)]
    nodes: Vec<String>,
}

#[derive(Debug, Args)]
struct ReserveArgs {
    /// The idempotency key: a retry with the same key and lines returns the same reservation.
    #[arg(long, value_parser = commands::id_value)]
    key: String,
    /// Hold for this long; 0 = until confirmed and shipped, or released.
    #[arg(long)]
    ttl_ms: u64,
    /// Your reference, e.g. a cart or order id.
    #[arg(long, default_value = "")]
    reference: String,
    /// The sales channel.
    #[arg(long, value_parser = commands::id_value)]
    channel: Option<String>,
    /// Lines as SKU:NODE:QTY (split from the right, so a SKU may contain ':').
    #[arg(required = true, value_parser = commands::parse_reserve_line)]
    lines: Vec<allot::proto::v1::ReserveLine>,
}

#[derive(Debug, Subcommand)]
enum ReservationCommand {
    /// The reservation and its lines.
    Show {
        /// The reservation id, e.g. rsv-42.
        #[arg(value_parser = commands::id_value)]
        id: String,
    },
    /// Return the held units to ATP (releasing twice is fine).
    Release {
        /// The reservation id.
        #[arg(value_parser = commands::id_value)]
        id: String,
    },
    /// Drop the TTL: the hold lasts until shipped or released.
    Confirm {
        /// The reservation id.
        #[arg(value_parser = commands::id_value)]
        id: String,
        /// Replaces the reservation's reference (e.g. the order id).
        #[arg(long, default_value = "")]
        reference: String,
    },
    /// A HELD reservation expires TTL_MS from now instead.
    Extend {
        /// The reservation id.
        #[arg(value_parser = commands::id_value)]
        id: String,
        /// The new TTL, counted from now.
        #[arg(long)]
        ttl_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum OrderCommand {
    /// The order, its status and line counters.
    Show {
        /// The order id, e.g. ord-7.
        #[arg(value_parser = commands::id_value)]
        id: String,
    },
    /// The order's audit trail, oldest first.
    History {
        /// The order id.
        #[arg(value_parser = commands::id_value)]
        id: String,
    },
    /// Orders oldest first, optionally by status and channel.
    List {
        /// e.g. HELD, ALLOCATED, BACKORDERED, EXCEPTION, SHIPPED.
        #[arg(long, value_parser = commands::order_status_value)]
        status: Option<allot::proto::v1::order::Status>,
        /// Only orders of this channel.
        #[arg(long, value_parser = commands::id_value)]
        channel: Option<String>,
        /// At most this many orders.
        #[arg(long, default_value_t = ORDERS_LIST_LEN_DEFAULT)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Print events from --from on. Without --follow, exits once the feed has been quiet for
    /// --idle-ms (what exists is printed) or after --limit events; with --follow, keeps
    /// printing live events until interrupted.
    Tail {
        /// The first sequence to print; 0 = the oldest retained event.
        #[arg(long = "from", default_value_t = 0)]
        from_sequence: u64,
        /// Only events of this type, e.g. order.shipped (repeatable).
        #[arg(long = "type")]
        types: Vec<String>,
        /// Keep following live events.
        #[arg(long)]
        follow: bool,
        /// Without --follow: the quiet time that means "caught up", in milliseconds.
        #[arg(long, default_value_t = EVENTS_IDLE_MS_DEFAULT)]
        idle_ms: u64,
        /// Stop after this many events; 0 = no limit.
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("allotctl: cannot start the async runtime: {error}");
            return ExitCode::from(failure::EXIT_DAEMON_ERROR);
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(outcome) => outcome.exit_code(),
        Err(failure) => {
            failure.report(json);
            failure.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<Outcome, Failure> {
    let uri = client::endpoint_uri(&cli.addr)?;
    // Whatever can be checked without the daemon is checked first: bad input is exit 2 even
    // when the daemon is down.
    let job = Job::prepare(cli.command)?;
    let bearer = client::Bearer::new(cli.token.as_deref())?;
    let tls = client::TlsFiles { ca: cli.tls_ca, cert: cli.tls_cert, key: cli.tls_key };
    let context =
        client::connect(&uri, cli.json, Duration::from_millis(cli.timeout_ms), bearer, &tls).await?;
    job.run(&context).await
}

/// A command with its local work done: files opened and checked, paths made absolute.
enum Job {
    StockImport(import::StockFile, usize),
    NodesImport(import::NodesFile),
    Backup(String),
    Other(Command),
}

impl Job {
    fn prepare(command: Command) -> Result<Job, Failure> {
        Ok(match command {
            Command::Stock { command: StockCommand::Import { file, batch_size } } => {
                Job::StockImport(import::open_stock_file(&file)?, batch_size)
            }
            Command::Nodes { command: NodesCommand::Import { file, format } } => {
                Job::NodesImport(import::read_nodes_file(&file, format)?)
            }
            Command::Backup { dir } => Job::Backup(commands::backup_dir_absolute(&dir)?),
            other => Job::Other(other),
        })
    }

    async fn run(self, context: &client::Context) -> Result<Outcome, Failure> {
        let command = match self {
            Job::StockImport(file, batch_len) => return import::stock_import(context, file, batch_len).await,
            Job::NodesImport(file) => return import::nodes_import(context, file).await,
            Job::Backup(dir) => return commands::backup(context, dir).await,
            Job::Other(command) => command,
        };
        match command {
            Command::Nodes { command: NodesCommand::List } => commands::nodes_list(context).await,
            Command::Stock { command: StockCommand::Adjust { adjustment_id, sku, node, delta, reason } } => {
                commands::stock_adjust(context, &adjustment_id, &sku, &node, delta, &reason).await
            }
            Command::Atp(args) => {
                commands::atp(context, &args.skus, args.channel.as_deref(), &args.nodes).await
            }
            Command::Reserve(args) => {
                let channel = args.channel.as_deref();
                commands::reserve(context, &args.key, args.ttl_ms, &args.reference, channel, &args.lines)
                    .await
            }
            Command::Reservation { command } => {
                let (id, action) = match command {
                    ReservationCommand::Show { id } => (id, ReservationAction::Show),
                    ReservationCommand::Release { id } => (id, ReservationAction::Release),
                    ReservationCommand::Confirm { id, reference } => {
                        (id, ReservationAction::Confirm { reference })
                    }
                    ReservationCommand::Extend { id, ttl_ms } => (id, ReservationAction::Extend { ttl_ms }),
                };
                commands::reservation(context, &id, action).await
            }
            Command::Order { command: OrderCommand::Show { id } } => commands::order_show(context, &id).await,
            Command::Order { command: OrderCommand::History { id } } => {
                commands::order_history(context, &id).await
            }
            Command::Order { command: OrderCommand::List { status, channel, limit } } => {
                commands::order_list(context, status, channel.as_deref(), limit).await
            }
            Command::Events {
                command: EventsCommand::Tail { from_sequence, types, follow, idle_ms, limit },
            } => {
                let idle = Duration::from_millis(idle_ms);
                commands::events_tail(context, TailOptions { from_sequence, types, follow, idle, limit })
                    .await
            }
            Command::Stats { channel } => commands::stats(context, channel.as_deref()).await,
            Command::Health { service } => commands::health(context, &service).await,
            Command::Check { listed_max } => commands::check(context, listed_max).await,
            Command::Stock { command: StockCommand::Import { .. } }
            | Command::Nodes { command: NodesCommand::Import { .. } }
            | Command::Backup { .. } => unreachable!("Job::prepare took the commands with local work"),
        }
    }
}
