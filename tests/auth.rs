//! Authentication and roles: bearer tokens from the config, over real gRPC and with the real
//! allotctl against the real allotd.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;

use allot::api::auth::hash_token;
use allot::clock::SystemClock;
use allot::config::{AuthConfig, Role, TokenConfig};
use allot::proto::v1;
use tonic::Code;
use tonic::metadata::MetadataValue;

fn tokens() -> AuthConfig {
    let token = |name: &str, role: Role| TokenConfig {
        name: name.into(),
        role,
        sha256: hash_token(&format!("secret-{name}")),
    };
    AuthConfig {
        tokens: vec![
            token("web", Role::Checkout),
            token("market", Role::Connector),
            token("dc", Role::Fulfilment),
            token("ops", Role::Admin),
        ],
    }
}

/// A request carrying `token` (none: no header).
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = MetadataValue::try_from(format!("Bearer {token}")).unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_gate_every_service_and_probes_stay_open() {
    // Goal: with tokens configured, a call without a token or with an unknown one is
    // UNAUTHENTICATED, a token whose role may not call the method is PERMISSION_DENIED (and
    // changes nothing), the right role passes, admin passes everywhere, and health needs no
    // token. Method: an in-process daemon with one token per role, one call per case.
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path());
    config.auth = tokens();
    let running = allot::server::start(config, Arc::new(SystemClock)).await.unwrap();
    let endpoint = format!("http://{}", running.grpc_address);
    let mut inventory = v1::inventory_client::InventoryClient::connect(endpoint.clone()).await.unwrap();
    let mut fulfilment = v1::fulfilment_client::FulfilmentClient::connect(endpoint.clone()).await.unwrap();
    let mut admin = v1::admin_client::AdminClient::connect(endpoint.clone()).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(endpoint).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);

    let nodes = || v1::UpsertNodesRequest { nodes: vec![common::node("DC-1", 40.0, -74.0)] };
    let code =
        |result: Result<tonic::Response<v1::UpsertNodesResponse>, tonic::Status>| result.unwrap_err().code();
    assert_eq!(code(inventory.upsert_nodes(with_token(nodes(), None)).await), Code::Unauthenticated);
    assert_eq!(code(inventory.upsert_nodes(with_token(nodes(), Some("wrong"))).await), Code::Unauthenticated);
    let denied = inventory.upsert_nodes(with_token(nodes(), Some("secret-web"))).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied}");
    assert!(denied.message().contains("web"), "the message names the token: {denied}");
    let listed = inventory.list_nodes(with_token(v1::ListNodesRequest {}, Some("secret-ops"))).await.unwrap();
    assert!(listed.into_inner().nodes.is_empty(), "a refused UpsertNodes stored nothing");
    inventory.upsert_nodes(with_token(nodes(), Some("secret-ops"))).await.unwrap();

    // Stock syncs are the fulfilment role's (and admin's); checkout reads and reserves.
    let stock = || v1::SetStockRequest { entries: vec![common::stock("SKU-1", "DC-1", 5)] };
    let status = inventory.set_stock(with_token(stock(), Some("secret-web"))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    inventory.set_stock(with_token(stock(), Some("secret-dc"))).await.unwrap();
    let reserve = |key: &str| v1::ReserveRequest {
        idempotency_key: key.into(),
        lines: vec![common::line("SKU-1", "DC-1", 1)],
        ttl_ms: 0,
        reference: String::new(),
        channel: String::new(),
    };
    inventory.reserve(with_token(reserve("auth-1"), Some("secret-web"))).await.unwrap();
    let status = inventory.reserve(with_token(reserve("auth-2"), Some("secret-market"))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let availability = v1::GetAvailabilityRequest { skus: vec!["SKU-1".into()], ..Default::default() };
    let items = inventory.get_availability(with_token(availability, Some("secret-market"))).await.unwrap();
    assert_eq!(
        items.into_inner().items[0].total_atp,
        4,
        "one unit reserved by checkout, none by the refused call"
    );

    // Fulfilment RPCs: the fulfilment role only (besides admin); admin RPCs: admin only.
    let list = || v1::ListFulfilmentOrdersRequest { node_id: "DC-1".into(), status: 0 };
    fulfilment.list_fulfilment_orders(with_token(list(), Some("secret-dc"))).await.unwrap();
    let status = fulfilment.list_fulfilment_orders(with_token(list(), Some("secret-web"))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let check = || v1::CheckRequest { listed_max: 0 };
    let status = admin.check(with_token(check(), Some("secret-dc"))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(admin.check(with_token(check(), Some("secret-ops"))).await.unwrap().into_inner().clean);

    // Probes need no token.
    let probe = tonic_health::pb::HealthCheckRequest { service: String::new() };
    assert_eq!(health.check(probe).await.unwrap().into_inner().status, 1, "SERVING without a token");

    // The metrics port is open but carries no business data: no SKU, node or token name.
    let scrape = common::http_get(running.metrics_address, "/metrics").await;
    for secret in ["SKU-1", "DC-1", "secret-", "\"web\"", "\"ops\""] {
        assert!(!scrape.contains(secret), "/metrics exposes {secret:?}");
    }
    assert!(scrape.contains("allot_auth_denied_total"), "denials are counted");
    drop((inventory, fulfilment, admin, health));
    running.shutdown().await;
}

#[test]
fn allotctl_sends_the_token_from_the_environment() {
    // Goal: the real allotctl against the real allotd with tokens configured: without a token
    // exit 1 (UNAUTHENTICATED), with ALLOT_TOKEN of the right role exit 0, of the wrong role
    // exit 1 (PERMISSION_DENIED); health works without one. Method: allotd --config with an
    // [auth] table, allotctl runs.
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[auth]\ntokens = [\n  {{ name = \"ops\", role = \"admin\", sha256 = \"{}\" }},\n  {{ name = \"web\", role = \"checkout\", sha256 = \"{}\" }},\n]\n",
        hash_token("ops-token"),
        hash_token("web-token")
    );
    let daemon = common::daemon::Daemon::start_with_config(&dir.path().join("data"), &toml);
    let run = |token: Option<&str>, args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_allotctl"));
        command.arg("--addr").arg(daemon.grpc_address.to_string()).args(args);
        command.env_remove("ALLOT_ADDR").env_remove("ALLOT_TOKEN").env_remove("ALLOT_TIMEOUT_MS");
        if let Some(token) = token {
            command.env("ALLOT_TOKEN", token);
        }
        let output = command.stdin(Stdio::null()).output().unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    assert_eq!(run(None, &["health"]).0, Some(0), "health needs no token");
    let (code, stderr) = run(None, &["nodes", "list"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    assert_eq!(run(Some("ops-token"), &["nodes", "list"]).0, Some(0));
    let (code, stderr) = run(Some("web-token"), &["check"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    assert_eq!(run(Some("ops-token"), &["check"]).0, Some(0));
}
