//! The availability feed: live fan-out of durable changes, plus replay from the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{broadcast, mpsc};

use crate::domain::{AvailabilityChange, Channel, Sku};
use crate::index::Index;
use crate::store::Store;

/// Changes read from the store per page while replaying.
const REPLAY_PAGE_LEN: usize = 1_024;

/// The live side of the feed: batches of durable changes in sequence order.
pub struct Feed {
    sender: broadcast::Sender<Arc<[AvailabilityChange]>>,
    /// Set at shutdown: every watch ends with UNAVAILABLE so the server can drain.
    closed: tokio::sync::watch::Sender<bool>,
    watchers: AtomicUsize,
    watchers_max: usize,
}

impl Feed {
    /// `buffer_batches`: commit batches a watcher may fall behind before it is dropped.
    pub fn new(buffer_batches: usize, watchers_max: usize) -> Self {
        let (sender, _) = broadcast::channel(buffer_batches.max(1));
        let (closed, _) = tokio::sync::watch::channel(false);
        Self { sender, closed, watchers: AtomicUsize::new(0), watchers_max }
    }

    /// Ends every watch (graceful shutdown).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Called by the commit thread after each durable batch. Never blocks.
    pub fn publish(&self, changes: Vec<AvailabilityChange>) {
        // Nobody watching: no shared copy to build. A watcher that subscribes after this
        // check would not have received a send made now either.
        if self.sender.receiver_count() > 0 {
            let _ = self.sender.send(Arc::from(changes));
        }
    }

    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

/// What one Watch asks for.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// Empty: every SKU.
    pub skus: Vec<Sku>,
    pub channel: Option<Channel>,
    pub from_sequence: Option<u64>,
}

/// One item of a watch, as the API layer converts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchItem {
    pub sku: Sku,
    pub node_id: crate::domain::NodeId,
    pub atp: i64,
    pub total_atp: i64,
    pub sequence: u64,
    pub snapshot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("too many watchers ({0}); retry later")]
    TooManyWatchers(usize),
    #[error(
        "from_sequence {requested} is older than the retained history (oldest {oldest}); take a fresh snapshot"
    )]
    TooOld { requested: u64, oldest: u64 },
    #[error("the consumer fell behind the feed; resume with from_sequence = {resume_from}")]
    Lagged { resume_from: u64 },
    #[error("reading the change history failed: {0}")]
    Store(String),
    #[error("the server is shutting down; resume with from_sequence = {resume_from}")]
    Closed { resume_from: u64 },
}

/// Counts a watcher for as long as its task runs.
struct WatcherGuard<'a>(&'a AtomicUsize);

impl Drop for WatcherGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts a watch: returns a bounded receiver fed by a task. The stream ends with an error
/// item when the watcher lags; it never blocks the commit thread.
pub fn watch_availability(
    index: Arc<Index>,
    store: Arc<Store>,
    feed: Arc<Feed>,
    request: WatchRequest,
    out_len_max: usize,
) -> Result<mpsc::Receiver<Result<WatchItem, WatchError>>, WatchError> {
    let before = feed.watchers.fetch_add(1, Ordering::Relaxed);
    if before >= feed.watchers_max {
        feed.watchers.fetch_sub(1, Ordering::Relaxed);
        return Err(WatchError::TooManyWatchers(feed.watchers_max));
    }
    if let Some(from) = request.from_sequence {
        let oldest = store.first_sequence();
        if from < oldest && from <= index.wal().last_sequence() {
            feed.watchers.fetch_sub(1, Ordering::Relaxed);
            return Err(WatchError::TooOld { requested: from, oldest });
        }
    }
    // Subscribe before reading anything, so no change falls between the read and the live feed.
    let live = feed.sender.subscribe();
    let mut closed = feed.closed.subscribe();
    let (sender, receiver) = mpsc::channel(out_len_max.max(1));
    tokio::spawn(async move {
        let _guard = WatcherGuard(&feed.watchers);
        let filter = Filter::new(&request);
        let mut last_sent = match request.from_sequence {
            None => {
                let at = index.wal().last_sequence();
                let mut items = Vec::new();
                for part in 0..index.snapshot_part_count() {
                    index.snapshot_part(part, &request.skus, |sku, node_id, atp, totals| {
                        if filter.wants(sku, node_id, &index) {
                            items.push(WatchItem {
                                sku: sku.clone(),
                                node_id: node_id.clone(),
                                atp,
                                total_atp: filter.total(totals, &index),
                                sequence: at,
                                snapshot: true,
                            });
                        }
                    });
                    for item in items.drain(..) {
                        if sender.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                }
                at
            }
            Some(from) => {
                let mut next = from.max(1);
                loop {
                    let store = store.clone();
                    let page =
                        tokio::task::spawn_blocking(move || store.read_changes(next, REPLAY_PAGE_LEN)).await;
                    let page = match page {
                        Ok(Ok(page)) => page,
                        Ok(Err(error)) => {
                            let _ = sender.send(Err(WatchError::Store(error.to_string()))).await;
                            return;
                        }
                        Err(error) => {
                            let _ = sender.send(Err(WatchError::Store(error.to_string()))).await;
                            return;
                        }
                    };
                    let Some(last) = page.last().map(|change| change.sequence) else { break };
                    for change in page {
                        if let Some(item) = filter.item(&change, &index)
                            && sender.send(Ok(item)).await.is_err()
                        {
                            return;
                        }
                    }
                    next = last + 1;
                }
                next - 1
            }
        };
        let mut live = live;
        loop {
            let received = tokio::select! {
                received = live.recv() => received,
                // The client went away: free the watcher slot now, not at the next matching
                // change (a filtered watch on a quiet SKU may never see one).
                _ = sender.closed() => return,
                _ = async { closed.wait_for(|closed| *closed).await.map(|_| ()) } => {
                    let _ = sender.send(Err(WatchError::Closed { resume_from: last_sent + 1 })).await;
                    return;
                }
            };
            let batch = match received {
                Ok(batch) => batch,
                Err(broadcast::error::RecvError::Closed) => return,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    metrics::counter!("allot_watch_dropped_total", "reason" => "lagged").increment(1);
                    let _ = sender.send(Err(WatchError::Lagged { resume_from: last_sent + 1 })).await;
                    return;
                }
            };
            for change in batch.iter() {
                if change.sequence <= last_sent {
                    continue;
                }
                last_sent = change.sequence;
                if let Some(item) = filter.item(change, &index) {
                    // A full output buffer means a slow client: waiting here lets the broadcast
                    // buffer fill, and then the watcher is dropped with Lagged above.
                    if sender.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(receiver)
}

struct Filter {
    skus: std::collections::HashSet<Sku>,
    channel: Option<Channel>,
}

impl Filter {
    fn new(request: &WatchRequest) -> Self {
        Self { skus: request.skus.iter().cloned().collect(), channel: request.channel.clone() }
    }

    fn wants(&self, sku: &Sku, node_id: &crate::domain::NodeId, index: &Index) -> bool {
        if !self.skus.is_empty() && !self.skus.contains(sku) {
            return false;
        }
        match &self.channel {
            None => true,
            Some(channel) => index.nodes().get(node_id).is_some_and(|node| node.serves(Some(channel))),
        }
    }

    fn total(&self, totals: &crate::domain::Totals, index: &Index) -> i64 {
        let nodes = index.nodes();
        totals.for_channel(self.channel.as_ref(), |node_id| nodes.get(node_id).cloned())
    }

    fn item(&self, change: &AvailabilityChange, index: &Index) -> Option<WatchItem> {
        if !self.wants(&change.sku, &change.node_id, index) {
            return None;
        }
        Some(WatchItem {
            sku: change.sku.clone(),
            node_id: change.node_id.clone(),
            atp: change.atp,
            total_atp: self.total(&change.totals, index),
            sequence: change.sequence,
            snapshot: false,
        })
    }
}
