//! The ReserveStreams of a run: `--callers-per-stream` callers (or open-loop lanes) share one
//! Inventory.ReserveStream, so one stream carries that many reservations in flight. Answers
//! come back in request order, so each stream keeps the waiting callers in a queue, in the
//! order their requests went onto the stream (one lock covers both), and one task per stream
//! hands each answer to the caller at the head of the queue. A broken stream fails every
//! caller waiting on it; the next request opens a new one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use allot::proto::v1;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tonic::transport::Channel;

type Answer = Result<v1::ReserveStreamResponse, Status>;

/// One slot per group of callers; a slot opens its stream on first use.
pub struct StreamPool {
    callers_per_stream: usize,
    slots: Vec<tokio::sync::Mutex<Option<Arc<OpenStream>>>>,
}

impl StreamPool {
    /// Streams for `callers` callers (lanes), `callers_per_stream` to a stream.
    pub fn new(callers: usize, callers_per_stream: usize) -> Self {
        assert!(callers_per_stream > 0);
        let streams = callers.div_ceil(callers_per_stream).max(1);
        StreamPool {
            callers_per_stream,
            slots: (0..streams).map(|_| tokio::sync::Mutex::new(None)).collect(),
        }
    }

    /// Sends `request` on the stream of `caller`'s group (opening it over `inventory`'s
    /// connection if it is not open) and waits for its answer.
    pub async fn reserve(
        &self,
        caller: usize,
        inventory: &v1::inventory_client::InventoryClient<Channel>,
        request: v1::ReserveRequest,
    ) -> Answer {
        let slot = &self.slots[(caller / self.callers_per_stream) % self.slots.len()];
        let key = request.idempotency_key.clone();
        let waiter = {
            let mut open = slot.lock().await;
            let sent = match open.as_ref() {
                Some(stream) => stream.send(request),
                None => Err(request),
            };
            match sent {
                Ok(waiter) => waiter,
                Err(request) => {
                    let (stream, waiter) =
                        OpenStream::open(inventory, request, self.callers_per_stream).await?;
                    *open = Some(stream);
                    waiter
                }
            }
        };
        let answer = waiter.await.unwrap_or_else(|_| Err(Status::unavailable("the answer stream ended")))?;
        // Answers come in request order: one for another key means the queue and the stream
        // went out of step, and every answer after it would be counted for the wrong request.
        if answer.idempotency_key != key {
            return Err(Status::internal(format!(
                "the answer for {key} came with the key {}",
                answer.idempotency_key
            )));
        }
        Ok(answer)
    }
}

/// One open stream: its request sender and the callers waiting for answers, in send order.
struct OpenStream {
    sending: Mutex<Sending>,
}

struct Sending {
    /// `None` once the stream broke or ended.
    requests: Option<mpsc::Sender<v1::ReserveRequest>>,
    waiters: VecDeque<oneshot::Sender<Answer>>,
}

impl OpenStream {
    /// Opens a stream with `first` as its first request (allotd reads a request's first message
    /// before it answers the call's headers, so it goes with the call).
    async fn open(
        inventory: &v1::inventory_client::InventoryClient<Channel>,
        first: v1::ReserveRequest,
        callers: usize,
    ) -> Result<(Arc<OpenStream>, oneshot::Receiver<Answer>), Status> {
        // Each caller has at most one request queued, so the channel is never full.
        let (requests, receiver) = mpsc::channel(callers.max(1));
        requests.try_send(first).expect("an empty channel has room");
        let (waiter, answer) = oneshot::channel();
        let answers = inventory
            .clone()
            .reserve_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        let stream = Arc::new(OpenStream {
            sending: Mutex::new(Sending { requests: Some(requests), waiters: VecDeque::from([waiter]) }),
        });
        tokio::spawn(read_answers(stream.clone(), answers));
        Ok((stream, answer))
    }

    /// Queues `request` and its waiter together, so the queue is in send order; gives the
    /// request back when the stream is gone.
    fn send(&self, request: v1::ReserveRequest) -> Result<oneshot::Receiver<Answer>, v1::ReserveRequest> {
        let mut sending = self.sending.lock().expect("no panic while held");
        let Some(requests) = &sending.requests else { return Err(request) };
        if let Err(error) = requests.try_send(request) {
            // Closed (the call ended): the next request opens a new stream.
            sending.requests = None;
            return Err(error.into_inner());
        }
        let (waiter, answer) = oneshot::channel();
        sending.waiters.push_back(waiter);
        Ok(answer)
    }
}

/// Hands each answer to the oldest waiting caller; when the stream ends or breaks, fails the
/// callers still waiting and closes the request side.
async fn read_answers(stream: Arc<OpenStream>, mut answers: tonic::Streaming<v1::ReserveStreamResponse>) {
    loop {
        let next = answers.message().await;
        let mut sending = stream.sending.lock().expect("no panic while held");
        let failure = match next {
            Ok(Some(answer)) => match sending.waiters.pop_front() {
                // A caller that timed out dropped its receiver: nothing to hand over.
                Some(waiter) => {
                    let _ = waiter.send(Ok(answer));
                    continue;
                }
                None => Status::internal("an answer came for no request"),
            },
            Ok(None) => Status::unavailable("the answer stream ended"),
            Err(status) => status,
        };
        sending.requests = None;
        for waiter in sending.waiters.drain(..) {
            let _ = waiter.send(Err(failure.clone()));
        }
        return;
    }
}
