//! `allot.v1.Inventory`: nodes, stock, availability, reservations, the availability feed.
//! HOT PATH (Reserve, GetAvailability): parse, admit, call the index, await the group commit,
//! reply. No logging here.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc::Sender;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{self, count, id, invalid, optional_id, quoted, timestamp};
use super::{Core, ServiceError};
use crate::domain::{
    AdjustStockCommand, Channel, IdempotencyKey, Node, NodeId, NodeType, PositionView, Reservation,
    ReservationId, ReservationStatus, ReserveCommand, ReserveLine, ShippingRates, Sku, StockAdjustment,
    StockEntry, Transition,
};
use crate::events::{self, WatchRequest};
use crate::index::ReserveOutcome;
use crate::metrics::Rpc;
use crate::proto::v1;

/// Bytes of a free-text field (reference, reason) at most.
const TEXT_BYTES_MAX: usize = 1_024;

pub struct InventoryApi {
    core: Arc<Core>,
}

/// The answer to one decided Reserve, counting the decision.
fn reserve_response(core: &Core, outcome: ReserveOutcome) -> v1::ReserveResponse {
    match outcome {
        ReserveOutcome::Reserved { id, expires_at_ms } => {
            core.rpc_metrics.reserved.increment(1);
            v1::ReserveResponse {
                reservation_id: id.to_string(),
                status: v1::reserve_response::Status::Reserved as i32,
                shortfalls: Vec::new(),
                expires_at: expires_at_ms.map(timestamp),
            }
        }
        ReserveOutcome::Insufficient(shortfalls) => {
            core.rpc_metrics.insufficient.increment(1);
            v1::ReserveResponse {
                reservation_id: String::new(),
                status: v1::reserve_response::Status::Insufficient as i32,
                shortfalls: shortfalls
                    .into_iter()
                    .map(|shortfall| v1::Shortfall {
                        sku: shortfall.sku.to_string(),
                        node_id: shortfall.node_id.to_string(),
                        requested: shortfall.requested,
                        available: shortfall.available,
                    })
                    .collect(),
                expires_at: None,
            }
        }
    }
}

/// One item of ReserveBatch or ReserveStream, answered: its response, or what Reserve would
/// have answered as an error.
fn item_answer(
    core: &Core,
    result: Result<ReserveOutcome, ServiceError>,
) -> Result<v1::ReserveResponse, v1::ItemError> {
    match result {
        Ok(outcome) => Ok(reserve_response(core, outcome)),
        Err(error) => {
            let status = Status::from(error);
            Err(v1::ItemError { code: status.code() as i32, message: status.message().to_string() })
        }
    }
}

/// Items of a ReserveStream decided in one burst at most: bounds how long the first of them
/// waits for the last to be decided (about 1 ms in a release build).
const STREAM_BURST_ITEMS_MAX: usize = 256;

/// How often an idle ReserveStream looks whether the daemon is shutting down.
const STREAM_SHUTDOWN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Items of a ReserveStream decided one after another at one wake-up of its task (every
/// request message that had arrived by then, up to the window), each with its key and its
/// outcome or error, and the one barrier that makes all of them durable (none when the commit
/// queue refused the burst: then every item is that error).
struct Burst {
    items: Vec<(String, Result<ReserveOutcome, ServiceError>)>,
    durable: Option<crate::index::Durable>,
}

/// What woke a ReserveStream's task.
enum StreamEvent {
    /// The oldest burst is durable (or failed to become so).
    Durable(Result<(), crate::index::IndexError>),
    /// The next request message, the end of the request stream, or a transport error.
    Next(Result<Option<v1::ReserveRequest>, Status>),
    /// Time to look whether the daemon is shutting down.
    Poll,
}

/// Serves a ReserveStream in one task: decides the items in arrival order (each under its own
/// shard locks, like Reserve) and answers them in request order as soon as they are durable.
/// Every message already received when the task wakes (up to `STREAM_BURST_ITEMS_MAX`) is
/// decided in the same burst, which, like a ReserveBatch, shares one barrier: one wait and one
/// wake-up per burst, not per item.
/// At most `limits.lines_per_request_max` items wait for their answers: past that, the request
/// stream is not read (a caller that does not read its answers stops being read too, once the
/// answer channel is full). Ends, after answering every item decided, at the end of the
/// request stream, on a transport error (answered with its status) or at shutdown
/// (UNAVAILABLE).
async fn serve_stream(
    core: Arc<Core>,
    mut incoming: tonic::Streaming<v1::ReserveRequest>,
    answers: Sender<Result<v1::ReserveStreamResponse, Status>>,
) {
    use v1::reserve_stream_response::Result as Answer;
    let window = core.index.limits().lines_per_request_max.max(1);
    let mut shutdown_poll = tokio::time::interval(STREAM_SHUTDOWN_POLL);
    shutdown_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut bursts: std::collections::VecDeque<Burst> = std::collections::VecDeque::new();
    // Items in `bursts`: decided, not yet answered.
    let mut waiting = 0usize;
    // Whether the request stream is still read, and the error status to end with, if any.
    let mut reading = true;
    let mut end: Option<Status> = None;
    loop {
        let room = waiting < window;
        let has_waiting = !bursts.is_empty();
        let event = {
            let oldest = async {
                match bursts.front_mut().and_then(|burst| burst.durable.as_mut()) {
                    Some(durable) => durable.await,
                    None => Ok(()),
                }
            };
            tokio::select! {
                biased;
                result = oldest, if has_waiting => StreamEvent::Durable(result),
                next = incoming.message(), if reading && room => StreamEvent::Next(next),
                _ = shutdown_poll.tick(), if reading => StreamEvent::Poll,
                else => break,
            }
        };
        let mut next = match event {
            StreamEvent::Durable(durable) => {
                let burst = bursts.pop_front().expect("a burst was waiting");
                waiting -= burst.items.len();
                for (key, decided) in burst.items {
                    let result = decided
                        .and_then(|outcome| durable.clone().map(|()| outcome).map_err(ServiceError::from));
                    let answer = v1::ReserveStreamResponse {
                        idempotency_key: key,
                        result: Some(match item_answer(&core, result) {
                            Ok(response) => Answer::Response(response),
                            Err(error) => Answer::Error(error),
                        }),
                    };
                    if answers.send(Ok(answer)).await.is_err() {
                        return; // the caller went away; what was decided is durable anyway
                    }
                }
                continue;
            }
            StreamEvent::Next(next) => next,
            StreamEvent::Poll => {
                if core.admission.shutting_down() {
                    (reading, end) = (false, Some(Status::from(ServiceError::ShuttingDown)));
                }
                continue;
            }
        };
        // Decide this message and every one that has arrived behind it, as one burst.
        let batch = core.index.reserve_batch();
        let mut items = Vec::new();
        loop {
            match next {
                Ok(Some(_)) if core.admission.shutting_down() => {
                    (reading, end) = (false, Some(Status::from(ServiceError::ShuttingDown)));
                    break;
                }
                Ok(Some(item)) => {
                    let key = item.idempotency_key.clone();
                    let decided = parse_reserve(item, core.index.limits()).and_then(|command| match &batch {
                        Ok(batch) => Ok(batch.reserve(command)?),
                        Err(refused) => Err(refused.clone().into()),
                    });
                    items.push((key, decided));
                }
                // The request stream ended: answer what is waiting, then end with OK.
                Ok(None) => {
                    reading = false;
                    break;
                }
                // The request stream broke (a bad frame, a reset): said after the answers.
                Err(status) => {
                    (reading, end) = (false, Some(super::oversize::remap_status(status)));
                    break;
                }
            }
            if waiting + items.len() >= window || items.len() == STREAM_BURST_ITEMS_MAX {
                break;
            }
            // A long burst gives the worker back now and then, as reading item by item did.
            tokio::task::coop::consume_budget().await;
            match ready_message(&mut incoming).await {
                Some(ready) => next = ready,
                None => break,
            }
        }
        if items.is_empty() {
            // Nothing decided (the stream ended or broke, or the daemon is stopping): the
            // barrier's place in the commit queue goes back unused with `batch`.
            continue;
        }
        let durable = batch.ok().map(|batch| batch.finish());
        waiting += items.len();
        bursts.push_back(Burst { items, durable });
    }
    if let Some(status) = end {
        let _ = answers.send(Err(status)).await;
    }
}

/// The next request message if it has arrived already, without waiting for one.
async fn ready_message<T>(incoming: &mut tonic::Streaming<T>) -> Option<Result<Option<T>, Status>> {
    use tokio_stream::Stream;
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match Pin::new(&mut *incoming).poll_next(cx) {
            std::task::Poll::Ready(next) => Some(next.transpose()),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

impl InventoryApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::AvailabilityChange, Status>> + Send>>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::inventory_server::Inventory for InventoryApi {
    type WatchAvailabilityStream = BoxStream<v1::AvailabilityChange>;
    type ReserveStreamStream = BoxStream<v1::ReserveStreamResponse>;

    async fn upsert_nodes(
        &self,
        request: Request<v1::UpsertNodesRequest>,
    ) -> Result<Response<v1::UpsertNodesResponse>, Status> {
        let permit = self.core.admit(Rpc::UpsertNodes)?;
        let result = async {
            let request = request.into_inner();
            count("nodes", request.nodes.len(), self.core.index.limits().nodes_per_request_max)?;
            let mut seen = HashSet::new();
            let mut nodes = Vec::with_capacity(request.nodes.len());
            for (index, raw) in request.nodes.into_iter().enumerate() {
                let node = parse_node(raw, index)?;
                if !seen.insert(node.node_id.clone()) {
                    return Err(invalid(format!("nodes[{index}].node_id: {} appears twice", node.node_id)));
                }
                nodes.push(node);
            }
            let count = self.core.index.upsert_nodes(nodes)?.durable().await?;
            Ok(v1::UpsertNodesResponse { count: count as i64 })
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn list_nodes(
        &self,
        _request: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        let permit = self.core.admit(Rpc::ListNodes)?;
        let nodes = self.core.index.nodes().sorted().iter().map(|node| node_to_wire(node)).collect();
        self.core.finish(permit, Ok(v1::ListNodesResponse { nodes }))
    }

    async fn set_stock(
        &self,
        request: Request<v1::SetStockRequest>,
    ) -> Result<Response<v1::SetStockResponse>, Status> {
        let permit = self.core.admit(Rpc::SetStock)?;
        let result = async {
            let request = request.into_inner();
            let limits = self.core.index.limits();
            count("entries", request.entries.len(), limits.stock_entries_per_batch_max)?;
            let mut seen = HashSet::new();
            let mut entries = Vec::with_capacity(request.entries.len());
            for (index, raw) in request.entries.iter().enumerate() {
                let sku = id(Sku::parse, &raw.sku, format_args!("entries[{index}].sku"))?;
                let node_id = id(NodeId::parse, &raw.node_id, format_args!("entries[{index}].node_id"))?;
                let on_hand = convert::non_negative_qty(
                    format_args!("entries[{index}].on_hand"),
                    raw.on_hand,
                    limits.quantity_max,
                )?;
                let safety_stock = raw
                    .safety_stock
                    .map(|value| {
                        convert::non_negative_qty(
                            format_args!("entries[{index}].safety_stock"),
                            value,
                            limits.quantity_max,
                        )
                    })
                    .transpose()?;
                if !seen.insert((sku.clone(), node_id.clone())) {
                    return Err(invalid(format!("entries[{index}]: ({sku}, {node_id}) appears twice")));
                }
                entries.push(StockEntry { sku, node_id, on_hand, safety_stock });
            }
            let count = self.core.index.set_stock(&entries)?.durable().await?;
            Ok(v1::SetStockResponse { count: count as i64 })
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn adjust_stock(
        &self,
        request: Request<v1::AdjustStockRequest>,
    ) -> Result<Response<v1::AdjustStockResponse>, Status> {
        let permit = self.core.admit(Rpc::AdjustStock)?;
        let result = async {
            let request = request.into_inner();
            let limits = self.core.index.limits();
            let adjustment_id = id(IdempotencyKey::parse, &request.adjustment_id, "adjustment_id")?;
            count("entries", request.entries.len(), limits.stock_entries_per_batch_max)?;
            let mut seen = HashSet::new();
            let mut entries = Vec::with_capacity(request.entries.len());
            for (index, raw) in request.entries.iter().enumerate() {
                let sku = id(Sku::parse, &raw.sku, format_args!("entries[{index}].sku"))?;
                let node_id = id(NodeId::parse, &raw.node_id, format_args!("entries[{index}].node_id"))?;
                if raw.delta == 0 || raw.delta.unsigned_abs() > limits.quantity_max as u64 {
                    return Err(invalid(format!(
                        "entries[{index}].delta: must be non-zero and at most {} in size (got {})",
                        limits.quantity_max, raw.delta
                    )));
                }
                let reason = convert::text(&format!("entries[{index}].reason"), &raw.reason, TEXT_BYTES_MAX)?;
                if !seen.insert((sku.clone(), node_id.clone())) {
                    return Err(invalid(format!("entries[{index}]: ({sku}, {node_id}) appears twice")));
                }
                entries.push(StockAdjustment { sku, node_id, delta: raw.delta, reason });
            }
            let command = AdjustStockCommand { adjustment_id, entries };
            let views = self.core.index.adjust_stock(&command)?.durable().await?;
            Ok(v1::AdjustStockResponse {
                positions: views.iter().map(|view| position_to_wire(view, true)).collect(),
            })
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn get_availability(
        &self,
        request: Request<v1::GetAvailabilityRequest>,
    ) -> Result<Response<v1::GetAvailabilityResponse>, Status> {
        let permit = self.core.admit(Rpc::GetAvailability)?;
        let result = (|| {
            let request = request.into_inner();
            let limits = self.core.index.limits();
            count("skus", request.skus.len(), limits.skus_per_query_max)?;
            let skus = request
                .skus
                .iter()
                .enumerate()
                .map(|(index, raw)| id(Sku::parse, raw, format_args!("skus[{index}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let channel = optional_id(Channel::parse, &request.channel, "channel")?;
            if request.node_ids.len() > limits.nodes_per_request_max {
                return Err(invalid(format!(
                    "node_ids: {} entries, the limit is {}",
                    request.node_ids.len(),
                    limits.nodes_per_request_max
                )));
            }
            let node_ids = request
                .node_ids
                .iter()
                .enumerate()
                .map(|(index, raw)| id(NodeId::parse, raw, format_args!("node_ids[{index}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let items = self.core.index.availability(&skus, channel.as_ref(), &node_ids);
            Ok(v1::GetAvailabilityResponse {
                items: items
                    .into_iter()
                    .map(|item| v1::AvailabilityItem {
                        sku: item.sku,
                        total_atp: item.total_atp,
                        nodes: item.nodes.iter().map(|view| position_to_wire(view, false)).collect(),
                    })
                    .collect(),
            })
        })();
        self.core.finish(permit, result)
    }

    async fn reserve(
        &self,
        request: Request<v1::ReserveRequest>,
    ) -> Result<Response<v1::ReserveResponse>, Status> {
        let permit = self.core.admit(Rpc::Reserve)?;
        let result = async {
            let command = parse_reserve(request.into_inner(), self.core.index.limits())?;
            let outcome = self.core.index.reserve(command)?.durable().await?;
            Ok(reserve_response(&self.core, outcome))
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn reserve_batch(
        &self,
        request: Request<v1::ReserveBatchRequest>,
    ) -> Result<Response<v1::ReserveBatchResponse>, Status> {
        let permit = self.core.admit(Rpc::ReserveBatch)?;
        let result = async {
            let items = request.into_inner().items;
            let limits = self.core.index.limits();
            if items.is_empty() {
                return Err(ServiceError::InvalidArgument("items: at least one item is required".into()));
            }
            count("items", items.len(), limits.lines_per_request_max)?;
            // Every item decides in turn (under its own shard locks) and hands its mutation to
            // the commit thread without waiting; one barrier after the last stands for all of
            // them, so the batch shares a few group commits instead of one fsync per item, and
            // the call parks (and is woken) once. Each item still has its own answer. A full
            // commit queue refuses every item, as it would have refused each alone.
            let batch = self.core.index.reserve_batch();
            let mut decided = Vec::with_capacity(items.len());
            for item in items {
                decided.push(parse_reserve(item, limits).and_then(|command| match &batch {
                    Ok(batch) => Ok(batch.reserve(command)?),
                    Err(refused) => Err(refused.clone().into()),
                }));
            }
            let durable = match batch {
                Ok(batch) => batch.finish().await,
                Err(_) => Ok(()),
            };
            let answers = decided
                .into_iter()
                .map(|item| {
                    use v1::reserve_batch_response::item::Result as Answer;
                    let result = item
                        .and_then(|outcome| durable.clone().map(|()| outcome).map_err(ServiceError::from));
                    v1::reserve_batch_response::Item {
                        result: Some(match item_answer(&self.core, result) {
                            Ok(response) => Answer::Response(response),
                            Err(error) => Answer::Error(error),
                        }),
                    }
                })
                .collect();
            Ok(v1::ReserveBatchResponse { items: answers })
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn reserve_stream(
        &self,
        request: Request<tonic::Streaming<v1::ReserveRequest>>,
    ) -> Result<Response<BoxStream<v1::ReserveStreamResponse>>, Status> {
        // The permit covers opening the stream; its items are bounded by the window below and
        // by the commit queue (an item shed there answers RESOURCE_EXHAUSTED).
        let permit = self.core.admit(Rpc::ReserveStream)?;
        let window = self.core.index.limits().lines_per_request_max.max(1);
        let (answers, answer_receiver) = tokio::sync::mpsc::channel(window);
        tokio::spawn(serve_stream(self.core.clone(), request.into_inner(), answers));
        let stream = tokio_stream::wrappers::ReceiverStream::new(answer_receiver);
        self.core.finish(permit, Ok(Box::pin(stream) as BoxStream<v1::ReserveStreamResponse>))
    }

    async fn confirm_reservation(
        &self,
        request: Request<v1::ConfirmReservationRequest>,
    ) -> Result<Response<v1::Reservation>, Status> {
        let permit = self.core.admit(Rpc::ConfirmReservation)?;
        let request = request.into_inner();
        let result = async {
            let reference = convert::text("reference", &request.reference, TEXT_BYTES_MAX)?;
            self.transition(&request.reservation_id, Transition::Confirm, &reference).await
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn extend_reservation(
        &self,
        request: Request<v1::ExtendReservationRequest>,
    ) -> Result<Response<v1::Reservation>, Status> {
        let permit = self.core.admit(Rpc::ExtendReservation)?;
        let request = request.into_inner();
        let result = async {
            let ttl_ms = ttl(request.ttl_ms, self.core.index.limits().ttl_ms_max)?;
            if ttl_ms == 0 {
                return Err(invalid("ttl_ms: must be positive to extend a reservation"));
            }
            let expires_at_ms = self.core.index.clock().now_ms().saturating_add(ttl_ms);
            self.transition(&request.reservation_id, Transition::Extend { expires_at_ms }, "").await
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn release_reservation(
        &self,
        request: Request<v1::ReleaseReservationRequest>,
    ) -> Result<Response<v1::Reservation>, Status> {
        let permit = self.core.admit(Rpc::ReleaseReservation)?;
        let request = request.into_inner();
        let result = self.transition(&request.reservation_id, Transition::Release, "").await;
        self.core.finish(permit, result)
    }

    async fn get_reservation(
        &self,
        request: Request<v1::GetReservationRequest>,
    ) -> Result<Response<v1::Reservation>, Status> {
        let permit = self.core.admit(Rpc::GetReservation)?;
        let request = request.into_inner();
        let result = parse_reservation_id(&request.reservation_id).and_then(|id| {
            self.core
                .index
                .reservation(id)
                .map(|reservation| reservation_to_wire(&reservation))
                .ok_or_else(|| not_found(id))
        });
        self.core.finish(permit, result)
    }

    async fn watch_availability(
        &self,
        request: Request<v1::WatchAvailabilityRequest>,
    ) -> Result<Response<BoxStream<v1::AvailabilityChange>>, Status> {
        let permit = self.core.admit(Rpc::WatchAvailability)?;
        let result = (|| {
            let request = request.into_inner();
            if request.skus.len() > self.core.index.limits().skus_per_query_max {
                return Err(invalid(format!(
                    "skus: {} entries, the limit is {}",
                    request.skus.len(),
                    self.core.index.limits().skus_per_query_max
                )));
            }
            let skus = request
                .skus
                .iter()
                .enumerate()
                .map(|(index, raw)| id(Sku::parse, raw, format_args!("skus[{index}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let channel = optional_id(Channel::parse, &request.channel, "channel")?;
            let watch = WatchRequest { skus, channel, from_sequence: request.from_sequence };
            let receiver = events::watch_availability(
                self.core.index.clone(),
                self.core.store.clone(),
                self.core.feed.clone(),
                watch,
                self.core.watch_out_len_max,
            )?;
            let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
            let stream = tokio_stream::StreamExt::map(stream, |item| match item {
                Ok(item) => Ok(v1::AvailabilityChange {
                    sku: item.sku.to_string(),
                    node_id: item.node_id.to_string(),
                    atp: item.atp,
                    total_atp: item.total_atp,
                    sequence: item.sequence,
                    snapshot: item.snapshot,
                }),
                Err(error) => Err(Status::from(ServiceError::from(error))),
            });
            Ok(Box::pin(stream) as WatchStream)
        })();
        self.core.finish(permit, result)
    }
}

impl InventoryApi {
    async fn transition(
        &self,
        raw_id: &str,
        transition: Transition,
        reference: &str,
    ) -> Result<v1::Reservation, ServiceError> {
        let id = parse_reservation_id(raw_id)?;
        let reservation = self.core.index.transition(id, transition, reference)?.durable().await?;
        Ok(reservation_to_wire(&reservation))
    }
}

fn parse_reservation_id(raw: &str) -> Result<ReservationId, ServiceError> {
    if raw.is_empty() {
        return Err(invalid("reservation_id: must not be empty"));
    }
    ReservationId::parse(raw).ok_or_else(|| {
        invalid(format!("reservation_id: {} is not a reservation id (rsv-<number>)", quoted(raw)))
    })
}

fn not_found(id: ReservationId) -> ServiceError {
    ServiceError::Index(crate::index::IndexError::NotFound(format!("reservation {id} does not exist")))
}

fn ttl(ttl_ms: u64, ttl_ms_max: u64) -> Result<u64, ServiceError> {
    if ttl_ms > ttl_ms_max {
        return Err(invalid(format!("ttl_ms: {ttl_ms} is above the maximum of {ttl_ms_max}")));
    }
    Ok(ttl_ms)
}

/// Up to this many lines, `parse_reserve` finds a repeated line without a set.
const SCAN_LINES_MAX: usize = 16;

/// Parses and checks a Reserve request; everything wrong is INVALID_ARGUMENT with the line.
pub fn parse_reserve(
    request: v1::ReserveRequest,
    limits: &crate::domain::Limits,
) -> Result<ReserveCommand, ServiceError> {
    let idempotency_key = id(IdempotencyKey::parse, &request.idempotency_key, "idempotency_key")?;
    count("lines", request.lines.len(), limits.lines_per_request_max)?;
    // A short request (the usual one or few lines) finds a repeated line by scanning the lines
    // parsed so far, with no allocation or hashing; a set is built only for long ones.
    let mut seen =
        (request.lines.len() > SCAN_LINES_MAX).then(|| HashSet::with_capacity(request.lines.len()));
    let mut lines: Vec<ReserveLine> = Vec::with_capacity(request.lines.len());
    for (index, raw) in request.lines.iter().enumerate() {
        let sku = id(Sku::parse, &raw.sku, format_args!("lines[{index}].sku"))?;
        let node_id = id(NodeId::parse, &raw.node_id, format_args!("lines[{index}].node_id"))?;
        let qty = convert::positive_qty(format_args!("lines[{index}].qty"), raw.qty, limits.quantity_max)?;
        let repeated = match &mut seen {
            Some(seen) => !seen.insert((raw.sku.as_str(), raw.node_id.as_str())),
            None => lines.iter().any(|line| line.sku == sku && line.node_id == node_id),
        };
        if repeated {
            return Err(invalid(format!("lines[{index}]: ({sku}, {node_id}) appears twice")));
        }
        lines.push(ReserveLine { sku, node_id, qty });
    }
    Ok(ReserveCommand {
        idempotency_key,
        lines,
        ttl_ms: ttl(request.ttl_ms, limits.ttl_ms_max)?,
        reference: convert::text("reference", &request.reference, TEXT_BYTES_MAX)?,
        channel: optional_id(Channel::parse, &request.channel, "channel")?,
    })
}

fn parse_node(raw: v1::Node, index: usize) -> Result<Node, ServiceError> {
    let field = |name: &str| format!("nodes[{index}].{name}");
    let node_id = id(NodeId::parse, &raw.node_id, field("node_id"))?;
    let node_type = match v1::node::Type::try_from(raw.r#type) {
        Ok(v1::node::Type::Warehouse) => NodeType::Warehouse,
        Ok(v1::node::Type::Store) => NodeType::Store,
        Ok(v1::node::Type::Dropship) => NodeType::Dropship,
        Ok(v1::node::Type::ThirdParty) => NodeType::ThirdParty,
        Ok(v1::node::Type::Unspecified) | Err(_) => {
            return Err(invalid(format!(
                "{}: must be WAREHOUSE, STORE, DROPSHIP or THIRD_PARTY",
                field("type")
            )));
        }
    };
    let location = raw.location.ok_or_else(|| invalid(format!("{}: is required", field("location"))))?;
    let rates = raw.rates.unwrap_or_default();
    let mut channels = raw
        .channels
        .iter()
        .enumerate()
        .map(|(channel_index, channel)| {
            id(Channel::parse, channel, format!("nodes[{index}].channels[{channel_index}]"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    channels.sort();
    channels.dedup();
    let node = Node {
        node_id,
        node_type,
        lat: location.lat,
        lon: location.lon,
        enabled: raw.enabled,
        can_ship: raw.can_ship,
        can_pickup: raw.can_pickup,
        daily_capacity: raw.daily_capacity,
        processing_days: raw.processing_days,
        priority: raw.priority,
        rates: ShippingRates {
            base_cost: rates.base_cost,
            cost_per_km: rates.cost_per_km,
            cost_per_unit: rates.cost_per_unit,
        },
        default_safety_stock: raw.default_safety_stock,
        channels,
    };
    if let Some(problem) = node.problems().into_iter().next() {
        return Err(invalid(format!("nodes[{index}].{problem}")));
    }
    Ok(node)
}

pub fn node_to_wire(node: &Node) -> v1::Node {
    v1::Node {
        node_id: node.node_id.to_string(),
        r#type: match node.node_type {
            NodeType::Warehouse => v1::node::Type::Warehouse,
            NodeType::Store => v1::node::Type::Store,
            NodeType::Dropship => v1::node::Type::Dropship,
            NodeType::ThirdParty => v1::node::Type::ThirdParty,
        } as i32,
        location: Some(v1::Location { lat: node.lat, lon: node.lon }),
        enabled: node.enabled,
        can_ship: node.can_ship,
        can_pickup: node.can_pickup,
        daily_capacity: node.daily_capacity,
        processing_days: node.processing_days,
        priority: node.priority,
        rates: Some(v1::ShippingRates {
            base_cost: node.rates.base_cost,
            cost_per_km: node.rates.cost_per_km,
            cost_per_unit: node.rates.cost_per_unit,
        }),
        default_safety_stock: node.default_safety_stock,
        channels: node.channels.iter().map(ToString::to_string).collect(),
    }
}

fn position_to_wire(view: &PositionView, with_sku: bool) -> v1::Position {
    v1::Position {
        node_id: view.node_id.to_string(),
        on_hand: view.on_hand,
        reserved: view.reserved,
        safety_stock: view.safety_stock,
        atp: view.atp,
        sku: if with_sku { view.sku.to_string() } else { String::new() },
    }
}

pub fn reservation_to_wire(reservation: &Reservation) -> v1::Reservation {
    use v1::reservation::Status;
    v1::Reservation {
        reservation_id: reservation.id.to_string(),
        status: match reservation.status {
            ReservationStatus::Held => Status::Held,
            ReservationStatus::Confirmed => Status::Confirmed,
            ReservationStatus::Released => Status::Released,
            ReservationStatus::Expired => Status::Expired,
            ReservationStatus::Fulfilled => Status::Fulfilled,
        } as i32,
        lines: reservation
            .lines
            .iter()
            .map(|line| v1::ReserveLine {
                sku: line.sku.to_string(),
                node_id: line.node_id.to_string(),
                qty: line.qty,
            })
            .collect(),
        reference: reservation.reference.clone(),
        channel: reservation.channel.as_ref().map(ToString::to_string).unwrap_or_default(),
        idempotency_key: reservation.idempotency_key.as_ref().map(ToString::to_string).unwrap_or_default(),
        created_at: Some(timestamp(reservation.created_at_ms)),
        expires_at: reservation.expires_at_ms.map(timestamp),
        updated_at: Some(timestamp(reservation.updated_at_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(lines: usize, repeat: Option<(usize, usize)>) -> v1::ReserveRequest {
        let mut lines: Vec<v1::ReserveLine> = (0..lines)
            .map(|line| v1::ReserveLine { sku: format!("SKU-{line}"), node_id: "DC-1".into(), qty: 1 })
            .collect();
        if let Some((from, to)) = repeat {
            lines[to].sku = lines[from].sku.clone();
        }
        v1::ReserveRequest { idempotency_key: "k".into(), lines, ttl_ms: 1_000, ..Default::default() }
    }

    fn parse(request: v1::ReserveRequest) -> Result<ReserveCommand, ServiceError> {
        parse_reserve(request, &crate::domain::Limits::default())
    }

    fn refusal(request: v1::ReserveRequest) -> String {
        match parse(request) {
            Err(ServiceError::InvalidArgument(message)) => message,
            Err(other) => panic!("not INVALID_ARGUMENT: {other:?}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn a_repeated_line_is_refused_in_short_and_long_requests() {
        // Short requests scan, long ones use a set: both name the later line.
        assert_eq!(refusal(request(3, Some((0, 2)))), "lines[2]: (SKU-0, DC-1) appears twice");
        let long = SCAN_LINES_MAX + 4;
        assert_eq!(
            refusal(request(long, Some((1, long - 1)))),
            format!("lines[{}]: (SKU-1, DC-1) appears twice", long - 1)
        );
        // The same SKU at another node is another line.
        let mut other_node = request(2, Some((0, 1)));
        other_node.lines[1].node_id = "DC-2".into();
        assert_eq!(parse(other_node).expect("two positions").lines.len(), 2);
        for len in [1, SCAN_LINES_MAX, long] {
            assert_eq!(parse(request(len, None)).expect("distinct").lines.len(), len);
        }
    }
}
