//! Wiring: opens the store, recovers the index, starts the commit thread, the gRPC server
//! (with health and reflection), the metrics endpoint and the background tasks; and the
//! two-step graceful shutdown (NOT_SERVING and refuse new work, then drain, stop the commit
//! thread, flush).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::api::admin::AdminApi;
use crate::api::fulfilment::FulfilmentApi;
use crate::api::inventory::InventoryApi;
use crate::api::orders::OrdersApi;
use crate::api::routing::RoutingApi;
use crate::api::{Admission, Core};
use crate::background::{self, BackgroundOptions};
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::events::{EventFeed, Feed};
use crate::index::{Index, IndexOptions};
use crate::metrics::RpcMetrics;
use crate::orders::OrderBook;
use crate::proto::{self, v1};
use crate::store::{self, DiskGuard, Store, StoreError, StoreOptions, WalOptions};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    #[error("binding {what} on {address}: {source}")]
    Bind { what: &'static str, address: SocketAddr, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Other(String),
}

/// The accepted gRPC connections, with TCP_NODELAY. tonic's own accept loop retries a failing
/// accept at once, so a daemon out of file descriptors (EMFILE) would spin a core; here a
/// failed accept waits before the next try, and the established connections go on.
fn accepted(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<Result<tokio::net::TcpStream, std::io::Error>> {
    const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut failures = 0u64;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if sender.send(Ok(stream)).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    metrics::counter!("allot_accept_errors_total").increment(1);
                    // Once per burst, not once per try.
                    if failures.is_multiple_of(100) {
                        tracing::warn!(%error, "accepting a connection failed; retrying in 50 ms");
                    }
                    failures += 1;
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// The rustls server configuration of `[tls]`, or None for plaintext. Reads the PEM files.
fn tls_config(tls: &crate::config::TlsConfig) -> Result<Option<ServerTlsConfig>, StartError> {
    let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|error| StartError::Tls(format!("reading tls.{what} {}: {error}", path.display())))
    };
    let mut server = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("cert_file", cert_file)?, read("key_file", key_file)?))
        // A client that opens a connection and never finishes the handshake is dropped.
        .timeout(Duration::from_secs(10));
    if let Some(client_ca_file) = &tls.client_ca_file {
        server = server.client_ca_root(Certificate::from_pem(read("client_ca_file", client_ca_file)?));
    }
    Ok(Some(server))
}

/// A running daemon.
pub struct Running {
    pub grpc_address: SocketAddr,
    pub metrics_address: SocketAddr,
    pub core: Arc<Core>,
    shutdown: watch::Sender<bool>,
    finished: JoinHandle<()>,
}

impl Running {
    /// Graceful shutdown; returns when everything acknowledged is flushed.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        let _ = self.finished.await;
    }

    /// Waits until the server stops on its own (it does not, short of shutdown).
    pub async fn wait(self) {
        let _ = self.finished.await;
    }

    /// A handle that triggers graceful shutdown from elsewhere (signal handler).
    pub fn shutdown_trigger(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Starts the daemon on `config`; ports 0 pick free ports (see the returned addresses).
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    config.validate()?;
    let started = Instant::now();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&config.tls)? {
        // Reads and parses the certificate and key before anything else starts: a bad file
        // stops the start, naming the problem, and never falls back to plaintext.
        builder = builder.tls_config(tls).map_err(|error| StartError::Tls(tls_error_text(&error)))?;
    } else if !config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "gRPC is plaintext on a non-loopback address: configure [tls]");
    }
    let data_dir = config.data_dir.clone();
    // The ports first: a taken port fails the start before the store is opened (a failed
    // start must not leave RocksDB's threads running while the process exits).
    let grpc_listener = TcpListener::bind(config.listen).await.map_err(|source| StartError::Bind {
        what: "gRPC",
        address: config.listen,
        source,
    })?;
    let grpc_address = grpc_listener.local_addr().map_err(|error| StartError::Other(error.to_string()))?;
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| StartError::Bind { what: "metrics", address: config.metrics_listen, source })?;
    let metrics_address =
        metrics_listener.local_addr().map_err(|error| StartError::Other(error.to_string()))?;

    let store_options = StoreOptions {
        write_buffer_bytes: config.store.write_buffer_bytes,
        journal_segment_bytes: config.store.journal_segment_bytes,
    };
    let (store, recovered) = tokio::task::spawn_blocking(move || Store::open(&data_dir, &store_options))
        .await
        .map_err(|error| StartError::Other(error.to_string()))??;
    let store = Arc::new(store);
    // Measured once before serving: a start on a full disk refuses writes from the first one.
    let disk_guard = Arc::new(DiskGuard::new(&config.data_dir, config.store.disk_free_min_bytes));
    if let Err(error) = disk_guard.measure() {
        return Err(StartError::Other(format!(
            "measuring free space of {}: {error}",
            config.data_dir.display()
        )));
    }
    let feed = Arc::new(Feed::new(config.server.watch_buffer_batches, config.server.watchers_max));
    let event_feed =
        Arc::new(EventFeed::new(config.server.watch_buffer_batches, config.orders.event_watchers_max));
    let publisher_feed = feed.clone();
    let publisher_events = event_feed.clone();
    let (wal, commit_thread) = store::wal::start(
        store.clone(),
        WalOptions {
            durability: config.store.durability,
            queue_len_max: config.store.commit_queue_len_max,
            batch_len_max: config.store.commit_batch_len_max,
            commit_interval: std::time::Duration::from_micros(config.store.commit_interval_us),
            change_retention: config.store.change_retention,
            event_retention: config.store.event_retention,
            disk_guard: Some(disk_guard.clone()),
        },
        Box::new(move |changes, events| {
            if !changes.is_empty() {
                publisher_feed.publish(changes);
            }
            publisher_events.publish(events);
        }),
    );
    let mut recovered = recovered;
    let recovered_orders = std::mem::take(&mut recovered.orders);
    let index = Arc::new(Index::new(
        IndexOptions {
            shard_count: config.index.shard_count,
            terminal_retention_ms: config.index.terminal_reservation_retention_ms,
            idempotency_retention_ms: config.index.idempotency_retention_ms,
            limits: config.limits.clone(),
            rules: config.routing.clone(),
        },
        recovered,
        wal.clone(),
        clock,
    ));
    let orders = Arc::new(OrderBook::new(index.clone(), config.orders.clone(), recovered_orders));
    let metrics_handle = crate::metrics::install();
    let core = Arc::new(Core {
        index: index.clone(),
        store: store.clone(),
        feed: feed.clone(),
        orders: orders.clone(),
        events: event_feed.clone(),
        admission: Admission::new(config.server.in_flight_max),
        rpc_metrics: RpcMetrics::new(),
        watch_out_len_max: config.server.watch_out_len_max,
    });

    let (shutdown, shutdown_receiver) = watch::channel(false);
    let metrics_task = {
        let mut stop = shutdown_receiver.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            if let Err(error) = crate::metrics::serve(metrics_listener, metrics_handle, stopped).await {
                tracing::error!(%error, "the metrics endpoint stopped");
            }
        })
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<v1::inventory_server::InventoryServer<InventoryApi>>().await;
    health_reporter.set_serving::<v1::routing_server::RoutingServer<RoutingApi>>().await;
    health_reporter.set_serving::<v1::orders_server::OrdersServer<OrdersApi>>().await;
    health_reporter.set_serving::<v1::fulfilment_server::FulfilmentServer<FulfilmentApi>>().await;
    health_reporter.set_serving::<v1::admin_server::AdminServer<AdminApi>>().await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| StartError::Other(error.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|error| StartError::Other(error.to_string()))?;

    let message_bytes_max = config.limits.message_bytes_max;
    let inventory = v1::inventory_server::InventoryServer::new(InventoryApi::new(core.clone()))
        .max_decoding_message_size(message_bytes_max)
        .max_encoding_message_size(message_bytes_max);
    let routing = v1::routing_server::RoutingServer::new(RoutingApi::new(core.clone()))
        .max_decoding_message_size(message_bytes_max)
        .max_encoding_message_size(message_bytes_max);
    let orders_service = v1::orders_server::OrdersServer::new(OrdersApi::new(core.clone()))
        .max_decoding_message_size(message_bytes_max)
        .max_encoding_message_size(message_bytes_max);
    let admin = v1::admin_server::AdminServer::new(AdminApi::new(core.clone()))
        .max_decoding_message_size(message_bytes_max)
        .max_encoding_message_size(message_bytes_max);
    let fulfilment = v1::fulfilment_server::FulfilmentServer::new(FulfilmentApi::new(core.clone()))
        .max_decoding_message_size(message_bytes_max)
        .max_encoding_message_size(message_bytes_max);

    let background_tasks = background::spawn(
        core.clone(),
        BackgroundOptions {
            expiry_sweep_interval_ms: config.server.expiry_sweep_interval_ms,
            expiry_batch_len_max: config.server.expiry_batch_len_max,
            purge_interval_ms: config.server.purge_interval_ms,
            commit_queue_len_max: config.store.commit_queue_len_max,
            idempotency_retention_ms: config.index.idempotency_retention_ms,
            backorder_retry_interval_ms: config.orders.backorder_retry_interval_ms,
            backorder_retry_batch_len_max: config.orders.backorder_retry_batch_len_max,
            backorder_full_pass_interval_ms: config.orders.backorder_full_pass_interval_ms,
            consistency_check_interval_ms: config.server.consistency_check_interval_ms,
            disk_check_interval_ms: config.store.disk_check_interval_ms,
        },
        disk_guard,
        shutdown_receiver.clone(),
    );

    let mut stop_serving = shutdown_receiver.clone();
    let drain = Duration::from_millis(config.server.shutdown_drain_ms);
    let shutdown_core = core.clone();
    let shutdown_health = health_reporter.clone();
    // Step one runs in a task of its own: tonic polls its shutdown signal only while it
    // accepts, and our incoming stream (`accepted`) ends at the same signal, so tonic could stop
    // accepting without ever completing the signal future. Then nothing refused new work or
    // ended the watches and ReserveStreams, and the drain waited its full time.
    let step_one = tokio::spawn(async move {
        let _ = stop_serving.wait_for(|stop| *stop).await;
        // Step one: tell load balancers, refuse new work, end watches so in-flight calls drain.
        shutdown_health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        shutdown_health.set_not_serving::<v1::inventory_server::InventoryServer<InventoryApi>>().await;
        shutdown_health.set_not_serving::<v1::routing_server::RoutingServer<RoutingApi>>().await;
        shutdown_health.set_not_serving::<v1::orders_server::OrdersServer<OrdersApi>>().await;
        shutdown_health.set_not_serving::<v1::fulfilment_server::FulfilmentServer<FulfilmentApi>>().await;
        shutdown_health.set_not_serving::<v1::admin_server::AdminServer<AdminApi>>().await;
        shutdown_core.admission.begin_shutdown();
        shutdown_core.feed.close();
        shutdown_core.events.close();
        tracing::info!("shutting down: not serving, draining in-flight requests");
    });
    let serve_signal = async move {
        let _ = step_one.await;
    };
    let server = builder
        .tcp_nodelay(true)
        .layer(tower::util::MapResponseLayer::new(crate::api::oversize::remap_oversize))
        .layer(crate::api::auth::AuthLayer::new(crate::api::auth::Auth::from_config(&config.auth)))
        .layer(crate::api::large::LargeRequestLayer::new(message_bytes_max))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inventory)
        .add_service(routing)
        .add_service(orders_service)
        .add_service(fulfilment)
        .add_service(admin)
        // TCP_NODELAY on every accepted connection: a response written in more than one segment
        // would otherwise wait for the client's delayed ACK (40 ms). (The builder's own
        // tcp_nodelay applies only when tonic binds the listener itself.)
        .serve_with_incoming_shutdown(accepted(grpc_listener, shutdown_receiver.clone()), serve_signal);

    tracing::info!(
        grpc = %grpc_address,
        tls = if config.tls.client_ca_file.is_some() { "mutual" } else if config.tls.enabled() { "on" } else { "off" },
        metrics = %crate::metrics::describe_address(metrics_address),
        startup_ms = started.elapsed().as_millis() as u64,
        positions = index.position_count(),
        reservations = index.reservation_count(),
        "allotd serving"
    );

    let mut drain_signal = shutdown_receiver;
    let finished = tokio::spawn(async move {
        let mut server = Box::pin(server);
        tokio::select! {
            result = &mut server => {
                if let Err(error) = result {
                    tracing::error!(%error, "the gRPC server failed");
                }
            }
            _ = async {
                let _ = drain_signal.wait_for(|stop| *stop).await;
                tokio::time::sleep(drain).await;
            } => {
                tracing::warn!(drain_ms = drain.as_millis() as u64, "in-flight requests did not drain in time; closing");
            }
        }
        // Step two: stop background work, let the commit thread write what is queued, flush.
        for task in background_tasks {
            let _ = task.await;
        }
        let _ = metrics_task.await;
        let wal = index.wal().clone();
        let result = tokio::task::spawn_blocking(move || {
            wal.stop();
            let _ = commit_thread.join();
            store.flush()
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::info!("shutdown complete: store flushed"),
            Ok(Err(error)) => tracing::error!(%error, "flushing the store at shutdown failed"),
            Err(error) => tracing::error!(%error, "the shutdown task failed"),
        }
    });

    Ok(Running { grpc_address, metrics_address, core, shutdown, finished })
}

/// A transport error with its sources (rustls puts the useful part in the source chain).
fn tls_error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
