//! The event feed (WatchEvents): every event of the audit trail in sequence order, replayed
//! from the store and then followed live. The sequencer is the commit thread; this module only
//! delivers. A consumer that falls behind the broadcast buffer is ended and resumes from its
//! last sequence + 1.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::feed::{Fanout, WatchError, WatcherGuard, admit, follow_live};
use crate::domain::AuditEvent;
use crate::store::{Store, WalHandle};

/// Events read from the store per page while replaying. Small: each unread consumer holds a
/// page plus its channel (with 1,024 pages and channels of 1,024, a thousand consumers that
/// never read held 1.4 GiB).
const REPLAY_PAGE_LEN: usize = 128;
/// Events queued towards one consumer at most (below `server.watch_out_len_max` when that is
/// larger: events are bigger than availability changes).
const EVENT_OUT_LEN_MAX: usize = 128;

/// The live side of the event feed: batches of durable events in sequence order.
pub type EventFeed = Fanout<AuditEvent>;

/// Starts a WatchEvents stream: every event with sequence >= `from_sequence` (0 and 1 = the
/// oldest retained; a later start older than that is OUT_OF_RANGE) whose type is in `types` (empty = all), then live events.
pub fn watch_events(
    store: Arc<Store>,
    wal: WalHandle,
    feed: Arc<EventFeed>,
    from_sequence: u64,
    types: Vec<String>,
    out_len_max: usize,
) -> Result<mpsc::Receiver<Result<AuditEvent, WatchError>>, WatchError> {
    // 0 and 1 mean "from the oldest retained event"; a later start before it is gone.
    let oldest = store.first_event_sequence();
    if from_sequence > 1 && from_sequence < oldest {
        return Err(WatchError::TooOld { requested: from_sequence, oldest });
    }
    admit(&feed.watchers, feed.watchers_max)?;
    // Subscribe before reading, so no event falls between the replay and the live feed.
    let live = feed.sender.subscribe();
    let closed = feed.closed.subscribe();
    let (sender, receiver) = mpsc::channel(out_len_max.clamp(1, EVENT_OUT_LEN_MAX));
    let types: HashSet<String> = types.into_iter().collect();
    let wanted = move |event: &AuditEvent| types.is_empty() || types.contains(&event.event_type);
    tokio::spawn(async move {
        let _guard = WatcherGuard(&feed.watchers);
        let mut next = from_sequence.max(oldest);
        // Replay what is durable; stop at the durable end seen when the page was read.
        loop {
            let end = wal.last_event_sequence();
            if next > end {
                break;
            }
            let store = store.clone();
            let page = tokio::task::spawn_blocking(move || store.read_audit(next, REPLAY_PAGE_LEN)).await;
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
            let mut progressed = false;
            for event in page {
                if event.sequence > end {
                    break;
                }
                if event.sequence != next {
                    // Trimmed or never written: the history has a hole we cannot fill.
                    let _ = sender
                        .send(Err(WatchError::TooOld { requested: next, oldest: event.sequence }))
                        .await;
                    return;
                }
                next = event.sequence + 1;
                progressed = true;
                if wanted(&event) && sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if !progressed {
                break;
            }
        }
        follow_live(
            live,
            closed,
            &sender,
            next - 1,
            |event| event.sequence,
            |event| wanted(event).then(|| event.clone()),
        )
        .await;
    });
    Ok(receiver)
}
