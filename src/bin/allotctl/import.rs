//! `stock import` and `nodes import`: reading CSV and JSON files row by row, checking each row
//! the way the daemon would, and sending the good ones in batches that survive a bad row.
//!
//! A row the client can tell is bad (a field that does not parse, an id that breaks the id
//! rule, a node the daemon does not know) is reported on stderr as `line N: reason` and
//! skipped. A row the daemon rejects anyway (INVALID_ARGUMENT naming `entries[i]` or
//! `nodes[i]`, e.g. a quantity above its configured maximum) is mapped back to its line,
//! reported, dropped, and the rest of its batch is sent again: at most
//! `REJECTED_ROWS_PER_BATCH_MAX` times per batch, so one bad row never loses a batch and a
//! systematically wrong file does not loop for ever. A batch never holds the same key twice
//! (the daemon would reject the whole batch): such a row flushes the batch early, so the later
//! row of the file wins, as it would in a sequence of snapshots.
//!
//! Stock files are streamed (memory is bounded by the batch, whatever the file size); node
//! files are small and read whole (at most `NODES_FILE_BYTES_MAX`). Must not print to stdout
//! except the final summary: rejected rows and the progress bar go to stderr.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use allot::domain::check_id;
use allot::proto::v1;
use csv::ByteRecord;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::value::RawValue;
use tonic::{Code, Status};

use crate::client::Context;
use crate::failure::{Failure, Outcome};
use crate::output;

/// Stock rows per SetStock: half the daemon's default limit, so a daemon configured a little
/// lower still takes them, and one message stays far below 4 MiB even with 128-byte ids.
pub const STOCK_BATCH_LEN_DEFAULT: usize = 5_000;
/// The daemon's default `stock_entries_per_batch_max`: `--batch-size` may not exceed it.
pub const STOCK_BATCH_LEN_MAX: usize = 10_000;
/// Nodes per UpsertNodes (the daemon takes up to 10,000; node files are small).
const NODES_BATCH_LEN: usize = 1_000;
/// Rows the daemon may reject from one batch before the import stops: beyond this, the file
/// (or the daemon's configuration) is wrong as a whole, and resending would only loop.
const REJECTED_ROWS_PER_BATCH_MAX: usize = 100;
/// Retries of one batch the daemon shed with RESOURCE_EXHAUSTED, with doubling pauses.
const BUSY_RETRIES_MAX: u32 = 5;
const BUSY_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Rejected rows kept for the `--json` summary; the count stays exact beyond it.
const REJECTIONS_KEPT_MAX: usize = 10_000;
/// The largest node file read (it is read whole).
const NODES_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Rows between two progress-bar updates (an update is cheap but not free).
const PROGRESS_ROWS_STEP: u64 = 1_024;

const _: () = assert!(STOCK_BATCH_LEN_DEFAULT <= STOCK_BATCH_LEN_MAX);

/// `--help` text of `stock import`.
pub const STOCK_CSV_HELP: &str = "\
FILE is CSV with a header row naming the columns (any order):
  sku,node_id,on_hand[,safety_stock]
on_hand and safety_stock are whole units >= 0; an empty or missing safety_stock keeps the
position's current setting (the node's default for a new position). Ids are 1..128 bytes of
printable ASCII without spaces; node_id must be a node the daemon knows (nodes import first).
Cells are trimmed; empty lines are skipped.

Rows are sent as SetStock batches (absolute on-hand snapshots; open reservations are kept).
A bad row is reported on stderr as `line N: reason` and skipped; the import goes on and ends
with exit code 4. A (sku, node_id) that appears twice: the later row wins.

Example:
  sku,node_id,on_hand,safety_stock
  TSHIRT-M,DC-EAST,100,
  TSHIRT-M,STORE-12,10,2";

/// `--help` text of `nodes import`.
pub const NODES_FILE_HELP: &str = "\
FILE is CSV (.csv) or JSON (.json); --format overrides the extension. Each node replaces the
daemon's node of that id entirely (UpsertNodes).

CSV: a header row naming the columns (any order):
  node_id,type,lat,lon,enabled,can_ship,can_pickup,daily_capacity,processing_days,priority,
  base_cost,cost_per_km,cost_per_unit,default_safety_stock,channels
node_id, lat and lon are required. A missing column or an empty cell takes the default:
  type WAREHOUSE (or STORE, DROPSHIP, THIRD_PARTY), enabled true, can_ship true,
  can_pickup false, daily_capacity 0 (= unlimited), processing_days 0, priority 0,
  base_cost, cost_per_km, cost_per_unit 0 (cents), default_safety_stock 0,
  channels empty (= every channel; several are separated by `;`, e.g. web;pos).
Booleans: true/false, yes/no, 1/0.

JSON: an array of objects with the proto's field names (or {\"nodes\": [...]}, the
UpsertNodes request); omitted fields take the defaults above, location is required:
  [{\"node_id\": \"DC-EAST\", \"type\": \"WAREHOUSE\", \"location\": {\"lat\": 40.7, \"lon\": -74.0},
    \"rates\": {\"base_cost\": 500, \"cost_per_km\": 1, \"cost_per_unit\": 25},
    \"channels\": [\"web\"]}]

A bad node is reported on stderr as `line N: reason` and skipped (exit code 4).";

/// A row that was not stored, and why.
struct Rejection {
    line: u64,
    reason: String,
}

/// What an import did so far; rejected rows are printed as they are found.
struct Report {
    /// "rows" or "nodes", for the summary.
    noun: &'static str,
    rows_read: u64,
    rows_stored: u64,
    batches: u64,
    rejected_count: u64,
    /// The first `REJECTIONS_KEPT_MAX` rejections, for `--json`.
    rejected: Vec<Rejection>,
    progress: ProgressBar,
}

impl Report {
    fn new(noun: &'static str, progress: ProgressBar) -> Report {
        Report {
            noun,
            rows_read: 0,
            rows_stored: 0,
            batches: 0,
            rejected_count: 0,
            rejected: Vec::new(),
            progress,
        }
    }

    fn reject(&mut self, line: u64, reason: String) {
        self.progress.suspend(|| eprintln!("line {line}: {reason}"));
        self.rejected_count += 1;
        if self.rejected.len() < REJECTIONS_KEPT_MAX {
            self.rejected.push(Rejection { line, reason });
        }
        self.progress.set_message(self.progress_message());
    }

    fn stored(&mut self, rows: usize) {
        self.rows_stored += rows as u64;
        self.batches += 1;
        self.progress.set_message(self.progress_message());
    }

    fn progress_message(&self) -> String {
        format!("{} stored, {} rejected", self.rows_stored, self.rejected_count)
    }

    fn note(&self, text: &str) {
        self.progress.suspend(|| eprintln!("allotctl: {text}"));
    }

    /// Prints the summary (stdout) and says how the import went.
    fn finish(self, json: bool, file: &Path) -> Outcome {
        self.progress.finish_and_clear();
        if json {
            let rejected: Vec<_> = self
                .rejected
                .iter()
                .map(|rejection| serde_json::json!({ "line": rejection.line, "reason": rejection.reason }))
                .collect();
            output::print_json(&serde_json::json!({
                "file": file.display().to_string(),
                "rows": self.rows_read,
                "stored": self.rows_stored,
                "rejected": self.rejected_count,
                "batches": self.batches,
                "rejected_rows": rejected,
                "rejected_rows_truncated": self.rejected_count > self.rejected.len() as u64,
            }));
        } else {
            let batches = if self.batches == 1 { "batch" } else { "batches" };
            let mut text = format!(
                "stored {} of {} {} in {} {batches}",
                self.rows_stored, self.rows_read, self.noun, self.batches
            );
            if self.rejected_count > 0 {
                text.push_str(&format!(
                    "; {} rejected (reported above as `line N: reason`)",
                    self.rejected_count
                ));
            }
            output::out(&format!("{text}\n"));
        }
        if self.rejected_count > 0 { Outcome::Partial } else { Outcome::Done }
    }
}

/// A progress bar over the file's bytes on stderr, only when stderr is a terminal.
fn progress_bar(file_bytes: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(file_bytes), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} (eta {eta})")
            .expect("the progress template is valid"),
    );
    bar
}

// ----- stock ---------------------------------------------------------------------------------

/// Column positions of a stock file.
struct StockColumns {
    sku: usize,
    node_id: usize,
    on_hand: usize,
    safety_stock: Option<usize>,
    /// Fields per row, as in the header.
    width: usize,
}

/// A stock file whose header is read and checked: everything that can be known before the
/// daemon is asked anything.
pub struct StockFile {
    path: PathBuf,
    reader: csv::Reader<File>,
    columns: StockColumns,
    file_bytes: u64,
}

/// Opens FILE and checks its header (exit 2 when either fails).
pub fn open_stock_file(path: &Path) -> Result<StockFile, Failure> {
    let file = File::open(path).map_err(|error| Failure::Usage(format!("{}: {error}", path.display())))?;
    let file_bytes = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
    let mut reader = csv_reader(file);
    let header = read_header(&mut reader, path)?;
    let columns = stock_columns(&header)
        .map_err(|reason| Failure::Usage(format!("{}: line 1: {reason}", path.display())))?;
    Ok(StockFile { path: path.to_path_buf(), reader, columns, file_bytes })
}

/// `stock import FILE`: streams the file in SetStock batches of `batch_len` rows.
pub async fn stock_import(context: &Context, file: StockFile, batch_len: usize) -> Result<Outcome, Failure> {
    assert!((1..=STOCK_BATCH_LEN_MAX).contains(&batch_len), "clap bounds --batch-size");
    let StockFile { path, mut reader, columns, file_bytes } = file;
    let mut inventory = context.inventory();
    let nodes = context.call(inventory.list_nodes(v1::ListNodesRequest {})).await?;
    let known_nodes: HashSet<String> = nodes.nodes.into_iter().map(|node| node.node_id).collect();

    let mut report = Report::new("rows", progress_bar(file_bytes));
    let mut batch: Vec<(u64, v1::StockEntry)> = Vec::with_capacity(batch_len);
    let mut keys: HashSet<(String, String)> = HashSet::with_capacity(batch_len);
    let mut record = ByteRecord::new();
    let mut send = async |entries: Vec<v1::StockEntry>| -> Result<(), Status> {
        context.call_status(inventory.set_stock(v1::SetStockRequest { entries })).await.map(|_| ())
    };
    loop {
        let more = reader
            .read_byte_record(&mut record)
            .map_err(|error| Failure::Usage(format!("{}: {error}", path.display())))?;
        if !more {
            break;
        }
        // The reader sets the position of every record it reads.
        let (line, byte) = record.position().map_or((0, 0), |position| (position.line(), position.byte()));
        report.rows_read += 1;
        if report.rows_read.is_multiple_of(PROGRESS_ROWS_STEP) {
            report.progress.set_position(byte);
        }
        let entry = match stock_entry(&columns, &record, &known_nodes) {
            Ok(entry) => entry,
            Err(reason) => {
                report.reject(line, reason);
                continue;
            }
        };
        let key = (entry.sku.clone(), entry.node_id.clone());
        if keys.contains(&key) {
            send_batch(&mut batch, "entries", &mut report, &mut send).await?;
            keys.clear();
        }
        keys.insert(key);
        batch.push((line, entry));
        if batch.len() >= batch_len {
            send_batch(&mut batch, "entries", &mut report, &mut send).await?;
            keys.clear();
        }
    }
    send_batch(&mut batch, "entries", &mut report, &mut send).await?;
    report.progress.set_position(file_bytes);
    Ok(report.finish(context.json, &path))
}

fn stock_columns(header: &Header) -> Result<StockColumns, String> {
    header.check(&["sku", "node_id", "on_hand", "safety_stock"], &["sku", "node_id", "on_hand"])?;
    Ok(StockColumns {
        sku: header.index["sku"],
        node_id: header.index["node_id"],
        on_hand: header.index["on_hand"],
        safety_stock: header.index.get("safety_stock").copied(),
        width: header.width,
    })
}

fn stock_entry(
    columns: &StockColumns,
    record: &ByteRecord,
    known_nodes: &HashSet<String>,
) -> Result<v1::StockEntry, String> {
    check_width(record, columns.width)?;
    let sku = id_cell(record, columns.sku, "sku")?;
    let node_id = id_cell(record, columns.node_id, "node_id")?;
    if !known_nodes.contains(node_id) {
        return Err(format!("node_id: unknown node {node_id:?} (import it with `nodes import` first)"));
    }
    let on_hand = cell(record, Some(columns.on_hand), "on_hand")?
        .ok_or_else(|| "on_hand: missing".to_string())
        .and_then(|raw| quantity(raw, "on_hand"))?;
    let safety_stock = cell(record, columns.safety_stock, "safety_stock")?
        .map(|raw| quantity(raw, "safety_stock"))
        .transpose()?;
    Ok(v1::StockEntry { sku: sku.to_string(), node_id: node_id.to_string(), on_hand, safety_stock })
}

// ----- nodes ---------------------------------------------------------------------------------

/// The format of a node file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodesFormat {
    Csv,
    Json,
}

/// Every column a node CSV may have.
const NODE_COLUMNS: [&str; 15] = [
    "node_id",
    "type",
    "lat",
    "lon",
    "enabled",
    "can_ship",
    "can_pickup",
    "daily_capacity",
    "processing_days",
    "priority",
    "base_cost",
    "cost_per_km",
    "cost_per_unit",
    "default_safety_stock",
    "channels",
];

/// A node as written in a file, before defaults and checks: the JSON shape (the proto's
/// field names), which the CSV columns are mapped onto.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeDraft {
    node_id: String,
    #[serde(rename = "type")]
    node_type: Option<String>,
    location: Option<LocationDraft>,
    enabled: Option<bool>,
    can_ship: Option<bool>,
    can_pickup: Option<bool>,
    daily_capacity: Option<i64>,
    processing_days: Option<i64>,
    priority: Option<i64>,
    rates: Option<RatesDraft>,
    default_safety_stock: Option<i64>,
    channels: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocationDraft {
    lat: f64,
    lon: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RatesDraft {
    base_cost: Option<i64>,
    cost_per_km: Option<i64>,
    cost_per_unit: Option<i64>,
}

/// The UpsertNodes request shape of a JSON node file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesDocument<'text> {
    #[serde(borrow)]
    nodes: Vec<&'text RawValue>,
}

/// A node file read and checked; its bad nodes are already reported.
pub struct NodesFile {
    path: PathBuf,
    nodes: Vec<(u64, v1::Node)>,
    report: Report,
}

/// Reads and checks the whole node file (exit 2 when it cannot be read or has no valid
/// header / is not a JSON array); bad nodes are reported as `line N: reason`.
pub fn read_nodes_file(path: &Path, format: Option<NodesFormat>) -> Result<NodesFile, Failure> {
    let format = match format {
        Some(format) => format,
        None => match path.extension().and_then(|extension| extension.to_str()) {
            Some(extension) if extension.eq_ignore_ascii_case("csv") => NodesFormat::Csv,
            Some(extension) if extension.eq_ignore_ascii_case("json") => NodesFormat::Json,
            _ => {
                return Err(Failure::Usage(format!(
                    "{}: cannot tell CSV from JSON by the name: use --format csv|json",
                    path.display()
                )));
            }
        },
    };
    let file = File::open(path).map_err(|error| Failure::Usage(format!("{}: {error}", path.display())))?;
    let file_bytes = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
    if file_bytes > NODES_FILE_BYTES_MAX {
        return Err(Failure::Usage(format!(
            "{}: {file_bytes} bytes; a node file may have at most {NODES_FILE_BYTES_MAX}",
            path.display()
        )));
    }
    let mut report = Report::new("nodes", ProgressBar::hidden());
    let nodes = match format {
        NodesFormat::Csv => nodes_from_csv(file, path, &mut report)?,
        NodesFormat::Json => nodes_from_json(path, &mut report)?,
    };
    Ok(NodesFile { path: path.to_path_buf(), nodes, report })
}

/// `nodes import FILE`: sends the checked nodes in UpsertNodes batches.
pub async fn nodes_import(context: &Context, file: NodesFile) -> Result<Outcome, Failure> {
    let NodesFile { path, nodes, mut report } = file;
    let mut inventory = context.inventory();
    let mut send = async |nodes: Vec<v1::Node>| -> Result<(), Status> {
        context.call_status(inventory.upsert_nodes(v1::UpsertNodesRequest { nodes })).await.map(|_| ())
    };
    let mut batch: Vec<(u64, v1::Node)> = Vec::with_capacity(NODES_BATCH_LEN);
    let mut ids: HashSet<String> = HashSet::new();
    for (line, node) in nodes {
        if ids.contains(&node.node_id) {
            send_batch(&mut batch, "nodes", &mut report, &mut send).await?;
            ids.clear();
        }
        ids.insert(node.node_id.clone());
        batch.push((line, node));
        if batch.len() >= NODES_BATCH_LEN {
            send_batch(&mut batch, "nodes", &mut report, &mut send).await?;
            ids.clear();
        }
    }
    send_batch(&mut batch, "nodes", &mut report, &mut send).await?;
    Ok(report.finish(context.json, &path))
}

fn nodes_from_csv(file: File, path: &Path, report: &mut Report) -> Result<Vec<(u64, v1::Node)>, Failure> {
    let mut reader = csv_reader(file);
    let header = read_header(&mut reader, path)?;
    header
        .check(&NODE_COLUMNS, &["node_id", "lat", "lon"])
        .map_err(|reason| Failure::Usage(format!("{}: line 1: {reason}", path.display())))?;
    let mut nodes = Vec::new();
    let mut record = ByteRecord::new();
    while reader
        .read_byte_record(&mut record)
        .map_err(|error| Failure::Usage(format!("{}: {error}", path.display())))?
    {
        let line = record.position().map_or(0, csv::Position::line);
        report.rows_read += 1;
        match node_draft_from_csv(&header, &record).and_then(node_from_draft) {
            Ok(node) => nodes.push((line, node)),
            Err(reason) => report.reject(line, reason),
        }
    }
    Ok(nodes)
}

fn node_draft_from_csv(header: &Header, record: &ByteRecord) -> Result<NodeDraft, String> {
    check_width(record, header.width)?;
    let get = |name: &str| cell(record, header.index.get(name).copied(), name);
    let int = |name: &str| get(name)?.map(|raw| integer(raw, name)).transpose();
    let boolean = |name: &str| get(name)?.map(|raw| parse_bool(raw, name)).transpose();
    let float = |name: &str| -> Result<f64, String> {
        let raw = get(name)?.ok_or_else(|| format!("{name}: missing"))?;
        raw.parse::<f64>().map_err(|_| format!("{name}: {raw:?} is not a number"))
    };
    let rates = RatesDraft {
        base_cost: int("base_cost")?,
        cost_per_km: int("cost_per_km")?,
        cost_per_unit: int("cost_per_unit")?,
    };
    Ok(NodeDraft {
        node_id: get("node_id")?.unwrap_or_default().to_string(),
        node_type: get("type")?.map(str::to_string),
        location: Some(LocationDraft { lat: float("lat")?, lon: float("lon")? }),
        enabled: boolean("enabled")?,
        can_ship: boolean("can_ship")?,
        can_pickup: boolean("can_pickup")?,
        daily_capacity: int("daily_capacity")?,
        processing_days: int("processing_days")?,
        priority: int("priority")?,
        rates: Some(rates),
        default_safety_stock: int("default_safety_stock")?,
        channels: get("channels")?.map(|raw| {
            raw.split(';').map(str::trim).filter(|channel| !channel.is_empty()).map(str::to_string).collect()
        }),
    })
}

fn nodes_from_json(path: &Path, report: &mut Report) -> Result<Vec<(u64, v1::Node)>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| Failure::Usage(format!("{}: {error}", path.display())))?;
    let elements: Vec<&RawValue> = if text.trim_start().starts_with('{') {
        serde_json::from_str::<NodesDocument<'_>>(&text).map(|document| document.nodes)
    } else {
        serde_json::from_str::<Vec<&RawValue>>(&text)
    }
    .map_err(|error| {
        Failure::Usage(format!(
            "{}: not a JSON array of nodes (or {{\"nodes\": [...]}}): {error}",
            path.display()
        ))
    })?;
    let mut nodes = Vec::with_capacity(elements.len());
    // Lines are counted incrementally: the elements come in file order.
    let (mut counted_to, mut line) = (0usize, 1u64);
    for element in elements {
        // The raw value borrows from `text`, so its offset there is where the node starts.
        let offset = element.get().as_ptr() as usize - text.as_ptr() as usize;
        line += text.as_bytes()[counted_to..offset].iter().filter(|&&byte| byte == b'\n').count() as u64;
        counted_to = offset;
        report.rows_read += 1;
        let parsed = serde_json::from_str::<NodeDraft>(element.get()).map_err(|error| {
            // serde_json places the error within the element: make the line absolute.
            let message = error.to_string();
            let message = message.split(" at line ").next().unwrap_or(&message).to_string();
            (line + error.line().saturating_sub(1) as u64, message)
        });
        match parsed.and_then(|draft| node_from_draft(draft).map_err(|reason| (line, reason))) {
            Ok(node) => nodes.push((line, node)),
            Err((line, reason)) => report.reject(line, reason),
        }
    }
    Ok(nodes)
}

/// Applies the defaults and checks what the daemon would refuse.
fn node_from_draft(draft: NodeDraft) -> Result<v1::Node, String> {
    check_id(&draft.node_id).map_err(|error| format!("node_id {:?}: {error}", draft.node_id))?;
    let node_type = match draft.node_type.as_deref() {
        None | Some("") => v1::node::Type::Warehouse,
        Some(raw) => v1::node::Type::from_str_name(&raw.to_ascii_uppercase())
            .filter(|kind| *kind != v1::node::Type::Unspecified)
            .ok_or_else(|| format!("type: {raw:?} is not WAREHOUSE, STORE, DROPSHIP or THIRD_PARTY"))?,
    };
    let location =
        draft.location.ok_or_else(|| "location: required ({\"lat\": ..., \"lon\": ...})".to_string())?;
    if !(-90.0..=90.0).contains(&location.lat) {
        return Err(format!("lat: {} is outside [-90, 90]", location.lat));
    }
    if !(-180.0..=180.0).contains(&location.lon) {
        return Err(format!("lon: {} is outside [-180, 180]", location.lon));
    }
    let rates = draft.rates.unwrap_or_default();
    let non_negative = |value: Option<i64>, name: &str| -> Result<i64, String> {
        match value.unwrap_or(0) {
            value if value < 0 => Err(format!("{name}: must not be negative (got {value})")),
            value => Ok(value),
        }
    };
    let channels = draft.channels.unwrap_or_default();
    for channel in &channels {
        check_id(channel).map_err(|error| format!("channels: {channel:?}: {error}"))?;
    }
    Ok(v1::Node {
        node_id: draft.node_id,
        r#type: node_type as i32,
        location: Some(v1::Location { lat: location.lat, lon: location.lon }),
        enabled: draft.enabled.unwrap_or(true),
        can_ship: draft.can_ship.unwrap_or(true),
        can_pickup: draft.can_pickup.unwrap_or(false),
        daily_capacity: non_negative(draft.daily_capacity, "daily_capacity")?,
        processing_days: non_negative(draft.processing_days, "processing_days")?,
        priority: draft.priority.unwrap_or(0),
        rates: Some(v1::ShippingRates {
            base_cost: non_negative(rates.base_cost, "base_cost")?,
            cost_per_km: non_negative(rates.cost_per_km, "cost_per_km")?,
            cost_per_unit: non_negative(rates.cost_per_unit, "cost_per_unit")?,
        }),
        default_safety_stock: non_negative(draft.default_safety_stock, "default_safety_stock")?,
        channels,
    })
}

// ----- sending -------------------------------------------------------------------------------

/// Sends `rows` (then empties it). A row the daemon rejects by index is reported and dropped
/// and the rest resent; a shed batch is retried after a pause; anything else stops the import.
async fn send_batch<Entry: Clone>(
    rows: &mut Vec<(u64, Entry)>,
    list_field: &str,
    report: &mut Report,
    send: &mut impl AsyncFnMut(Vec<Entry>) -> Result<(), Status>,
) -> Result<(), Failure> {
    let mut rejected_here = 0usize;
    let mut busy_retries = 0u32;
    while !rows.is_empty() {
        let entries: Vec<Entry> = rows.iter().map(|(_, entry)| entry.clone()).collect();
        let status = match send(entries).await {
            Ok(()) => {
                report.stored(rows.len());
                rows.clear();
                return Ok(());
            }
            Err(status) => status,
        };
        if status.code() == Code::InvalidArgument
            && let Some((index, reason)) = rejected_entry(status.message(), list_field)
            && index < rows.len()
        {
            if rejected_here < REJECTED_ROWS_PER_BATCH_MAX {
                rejected_here += 1;
                let (line, _) = rows.remove(index);
                report.reject(line, format!("{reason} (rejected by the daemon)"));
                continue;
            }
            report.note(&format!(
                "the daemon rejected more than {REJECTED_ROWS_PER_BATCH_MAX} rows of one batch; stopping"
            ));
        } else if status.code() == Code::ResourceExhausted && busy_retries < BUSY_RETRIES_MAX {
            tokio::time::sleep(BUSY_BACKOFF_FIRST * 2u32.pow(busy_retries)).await;
            busy_retries += 1;
            continue;
        }
        report.note(&format!(
            "stopped at the batch starting on line {}: {} {} stored before it, none after",
            rows[0].0, report.rows_stored, report.noun
        ));
        return Err(status.into());
    }
    Ok(())
}

/// `entries[12].on_hand: ...` → (12, `on_hand: ...`); `entries[3]: (..) appears twice` →
/// (3, `(..) appears twice`).
fn rejected_entry(message: &str, list_field: &str) -> Option<(usize, String)> {
    let rest = message.strip_prefix(list_field)?.strip_prefix('[')?;
    let close = rest.find(']')?;
    let index = rest[..close].parse().ok()?;
    let reason = rest[close + 1..].trim_start_matches(['.', ':', ' ']);
    Some((index, reason.to_string()))
}

// ----- CSV helpers ---------------------------------------------------------------------------

fn csv_reader(file: File) -> csv::Reader<File> {
    // flexible: a short or long row is one bad row (reported with its line), not a read error.
    csv::ReaderBuilder::new().has_headers(true).flexible(true).trim(csv::Trim::All).from_reader(file)
}

/// The header row: column names and where they are.
struct Header {
    /// Lower-cased names in file order.
    names: Vec<String>,
    index: HashMap<String, usize>,
    width: usize,
}

impl Header {
    /// Every column known, none twice, every required one present.
    fn check(&self, known: &[&str], required: &[&str]) -> Result<(), String> {
        if let Some(unknown) = self.names.iter().find(|name| !known.contains(&name.as_str())) {
            return Err(format!(
                "unknown column {unknown:?}; the columns are {} (a header row is required)",
                known.join(",")
            ));
        }
        if self.index.len() != self.width {
            return Err("a column is named twice".into());
        }
        let missing: Vec<&str> =
            required.iter().copied().filter(|name| !self.index.contains_key(*name)).collect();
        if !missing.is_empty() {
            return Err(format!("missing column(s) {} (a header row is required)", missing.join(",")));
        }
        Ok(())
    }
}

fn read_header(reader: &mut csv::Reader<File>, path: &Path) -> Result<Header, Failure> {
    let record =
        reader.byte_headers().map_err(|error| Failure::Usage(format!("{}: {error}", path.display())))?;
    if record.is_empty() {
        return Err(Failure::Usage(format!("{}: empty file; a header row is required", path.display())));
    }
    let names: Vec<String> =
        record.iter().map(|raw| String::from_utf8_lossy(raw).to_ascii_lowercase()).collect();
    let index = names.iter().enumerate().map(|(position, name)| (name.clone(), position)).collect();
    Ok(Header { names, index, width: record.len() })
}

/// A row may be shorter than the header (missing trailing cells are empty, so optional
/// columns may be left off), never longer.
fn check_width(record: &ByteRecord, width: usize) -> Result<(), String> {
    if record.len() > width {
        return Err(format!("{} fields, the header has only {width}", record.len()));
    }
    Ok(())
}

/// A cell as text; `None` when the column is absent or the cell empty.
fn cell<'record>(
    record: &'record ByteRecord,
    column: Option<usize>,
    name: &str,
) -> Result<Option<&'record str>, String> {
    let Some(raw) = column.and_then(|column| record.get(column)) else { return Ok(None) };
    if raw.is_empty() {
        return Ok(None);
    }
    std::str::from_utf8(raw).map(Some).map_err(|_| format!("{name}: not UTF-8"))
}

fn id_cell<'record>(record: &'record ByteRecord, column: usize, name: &str) -> Result<&'record str, String> {
    let raw = cell(record, Some(column), name)?.unwrap_or("");
    check_id(raw).map_err(|error| format!("{name} {raw:?}: {error}"))?;
    Ok(raw)
}

fn integer(raw: &str, name: &str) -> Result<i64, String> {
    raw.parse::<i64>().map_err(|_| format!("{name}: {raw:?} is not a whole number"))
}

/// Whole units >= 0. The upper bound (`[limits] quantity_max`) is configurable, so the daemon
/// checks it, and the import maps its rejection back to the line.
fn quantity(raw: &str, name: &str) -> Result<i64, String> {
    let value = integer(raw, name)?;
    if value < 0 {
        return Err(format!("{name}: must not be negative (got {value})"));
    }
    Ok(value)
}

fn parse_bool(raw: &str, name: &str) -> Result<bool, String> {
    match raw.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{name}: {raw:?} is not true/false, yes/no or 1/0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_entry_maps_the_daemons_message_to_an_index_and_a_reason() {
        // Goal: every shape of the daemon's per-entry message yields the index and the reason,
        // and anything else yields none. Method: the messages src/api and src/index write.
        assert_eq!(
            rejected_entry("entries[12].on_hand: must not be negative (got -1)", "entries"),
            Some((12, "on_hand: must not be negative (got -1)".to_string()))
        );
        assert_eq!(
            rejected_entry("entries[3]: (A, N0) appears twice", "entries"),
            Some((3, "(A, N0) appears twice".to_string()))
        );
        assert_eq!(
            rejected_entry("nodes[0].node_id: must not be empty", "nodes").map(|(index, _)| index),
            Some(0)
        );
        assert_eq!(rejected_entry("entries: 20000 entries, the limit is 10000", "entries"), None);
        assert_eq!(rejected_entry("entries[x].sku: bad", "entries"), None);
        assert_eq!(rejected_entry("nodes[1].lat: out of range", "entries"), None);
    }
}
