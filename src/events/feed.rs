//! The availability feed: live fan-out of durable changes, plus replay from the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{broadcast, mpsc};

use crate::domain::{AvailabilityChange, Channel, Sku};
use crate::index::Index;
use crate::store::Store;

/// Changes read from the store per page while replaying.
const REPLAY_PAGE_LEN: usize = 1_024;

/// The live side of the availability feed: batches of durable changes in sequence order.
pub type Feed = Fanout<AvailabilityChange>;

/// The live side of a feed: each durable batch, in sequence order, to every watcher, and the
/// count of watchers against their limit.
pub struct Fanout<T> {
    pub(super) sender: broadcast::Sender<Arc<[T]>>,
    /// Set at shutdown: every watch ends with UNAVAILABLE so the server can drain.
    pub(super) closed: tokio::sync::watch::Sender<bool>,
    pub(super) watchers: AtomicUsize,
    pub(super) watchers_max: usize,
}

impl<T> Fanout<T> {
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
    pub fn publish(&self, batch: Vec<T>) {
        // Nobody watching: no shared copy to build. A watcher that subscribes after this
        // check would not have received a send made now either.
        if !batch.is_empty() && self.sender.receiver_count() > 0 {
            let _ = self.sender.send(Arc::from(batch));
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
pub(super) struct WatcherGuard<'a>(pub(super) &'a AtomicUsize);

impl Drop for WatcherGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a watcher's place in `watchers`, given back by the `WatcherGuard` of the task it
/// starts next; none left: TooManyWatchers, and nothing taken.
pub(super) fn admit(watchers: &AtomicUsize, watchers_max: usize) -> Result<(), WatchError> {
    if watchers.fetch_add(1, Ordering::Relaxed) >= watchers_max {
        watchers.fetch_sub(1, Ordering::Relaxed);
        return Err(WatchError::TooManyWatchers(watchers_max));
    }
    Ok(())
}

/// Follows a feed's live batches from after `last_sent` until the client goes away, the feed
/// closes (Closed) or the watcher falls behind the broadcast buffer (Lagged); both errors say
/// where to resume. `item` turns an entry into what is sent, or None to skip it. Entries at or
/// below `last_sent` (already replayed) are skipped.
pub(super) async fn follow_live<T, O>(
    mut live: broadcast::Receiver<Arc<[T]>>,
    mut closed: tokio::sync::watch::Receiver<bool>,
    sender: &mpsc::Sender<Result<O, WatchError>>,
    mut last_sent: u64,
    sequence: impl Fn(&T) -> u64,
    mut item: impl FnMut(&T) -> Option<O>,
) {
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
        for entry in batch.iter() {
            if sequence(entry) <= last_sent {
                continue;
            }
            last_sent = sequence(entry);
            if let Some(item) = item(entry) {
                // A full output buffer means a slow client: waiting here lets the broadcast
                // buffer fill, and then the watcher is dropped with Lagged above.
                if sender.send(Ok(item)).await.is_err() {
                    return;
                }
            }
        }
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
    if let Some(from) = request.from_sequence {
        let oldest = store.first_sequence();
        if from < oldest && from <= index.wal().last_sequence() {
            return Err(WatchError::TooOld { requested: from, oldest });
        }
    }
    admit(&feed.watchers, feed.watchers_max)?;
    // Subscribe before reading anything, so no change falls between the read and the live feed.
    let live = feed.sender.subscribe();
    let closed = feed.closed.subscribe();
    let (sender, receiver) = mpsc::channel(out_len_max.max(1));
    tokio::spawn(async move {
        let _guard = WatcherGuard(&feed.watchers);
        let filter = Filter::new(&request);
        let last_sent = match request.from_sequence {
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
        follow_live(
            live,
            closed,
            &sender,
            last_sent,
            |change| change.sequence,
            |change| filter.item(change, &index),
        )
        .await;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Entries of a test feed: (sequence, payload).
    type Entry = (u64, &'static str);

    struct Follower {
        batches: broadcast::Sender<Arc<[Entry]>>,
        close: tokio::sync::watch::Sender<bool>,
        out: mpsc::Receiver<Result<&'static str, WatchError>>,
        task: tokio::task::JoinHandle<()>,
    }

    /// A follower from after `last_sent`, skipping payloads that start with "skip"; its output
    /// channel holds `out_len` items and the broadcast buffer `buffer` batches.
    fn follow(last_sent: u64, buffer: usize, out_len: usize) -> Follower {
        let (batches, live) = broadcast::channel(buffer);
        let (close, closed) = tokio::sync::watch::channel(false);
        let (sender, out) = mpsc::channel(out_len);
        let task = tokio::spawn(async move {
            follow_live(
                live,
                closed,
                &sender,
                last_sent,
                |entry: &Entry| entry.0,
                |entry| (!entry.1.starts_with("skip")).then_some(entry.1),
            )
            .await
        });
        Follower { batches, close, out, task }
    }

    async fn next(
        out: &mut mpsc::Receiver<Result<&'static str, WatchError>>,
    ) -> Option<Result<&'static str, WatchError>> {
        tokio::time::timeout(Duration::from_secs(10), out.recv()).await.expect("the follower answers in time")
    }

    #[tokio::test]
    async fn follows_batches_after_the_replay_and_skips_what_the_filter_drops() {
        let mut follower = follow(2, 8, 16);
        follower.batches.send(Arc::from(vec![(1, "old"), (2, "replayed"), (3, "c")])).unwrap();
        follower.batches.send(Arc::from(vec![(4, "skip d"), (5, "e")])).unwrap();
        assert_eq!(next(&mut follower.out).await, Some(Ok("c")));
        assert_eq!(next(&mut follower.out).await, Some(Ok("e")));
        // Shutdown: resume right after the last entry seen, even one the filter dropped.
        follower.batches.send(Arc::from(vec![(6, "skip f")])).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        follower.close.send_replace(true);
        assert_eq!(next(&mut follower.out).await, Some(Err(WatchError::Closed { resume_from: 7 })));
        assert_eq!(next(&mut follower.out).await, None, "nothing after the error");
    }

    #[tokio::test]
    async fn a_follower_behind_the_broadcast_buffer_ends_with_where_to_resume() {
        // Overtaken before it read anything: resume from the first entry after the replay.
        let mut follower = follow(10, 2, 16);
        for sequence in 11..=14 {
            follower.batches.send(Arc::from(vec![(sequence, "x")])).unwrap();
        }
        assert_eq!(next(&mut follower.out).await, Some(Err(WatchError::Lagged { resume_from: 11 })));
        assert_eq!(next(&mut follower.out).await, None, "nothing after the error");

        // A client that stops reading: its output channel of one fills, the follower waits on
        // it, the broadcast buffer of two batches overflows meanwhile, and the error names
        // the first entry the client has not been sent.
        let mut follower = follow(10, 2, 1);
        let settle = || tokio::time::sleep(Duration::from_millis(20));
        follower.batches.send(Arc::from(vec![(11, "a")])).unwrap();
        assert_eq!(next(&mut follower.out).await, Some(Ok("a")));
        follower.batches.send(Arc::from(vec![(12, "b")])).unwrap();
        settle().await; // 12 fills the output channel
        follower.batches.send(Arc::from(vec![(13, "c")])).unwrap();
        settle().await; // 13 waits for room
        for sequence in 14..=16 {
            follower.batches.send(Arc::from(vec![(sequence, "x")])).unwrap();
        }
        assert_eq!(next(&mut follower.out).await, Some(Ok("b")));
        assert_eq!(next(&mut follower.out).await, Some(Ok("c")));
        assert_eq!(next(&mut follower.out).await, Some(Err(WatchError::Lagged { resume_from: 14 })));
        assert_eq!(next(&mut follower.out).await, None);
    }

    #[tokio::test]
    async fn a_follower_whose_client_went_away_ends_without_waiting_for_a_batch() {
        let follower = follow(0, 8, 4);
        drop(follower.out);
        tokio::time::timeout(Duration::from_secs(10), follower.task)
            .await
            .expect("the follower ends with no batch sent")
            .expect("the follower does not panic");
        drop(follower.batches);
    }

    #[test]
    fn admit_takes_a_place_until_there_are_none_and_refuses_without_taking_one() {
        let watchers = AtomicUsize::new(0);
        assert_eq!(admit(&watchers, 2), Ok(()));
        assert_eq!(admit(&watchers, 2), Ok(()));
        assert_eq!(admit(&watchers, 2), Err(WatchError::TooManyWatchers(2)));
        assert_eq!(watchers.load(Ordering::Relaxed), 2);
        drop(WatcherGuard(&watchers));
        assert_eq!(admit(&watchers, 2), Ok(()));
    }
}
