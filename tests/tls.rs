//! TLS and mutual TLS on the gRPC port (`[tls]`), over real connections: certificates are
//! generated per run (rcgen), nothing secret is committed.
//!
//! Each case would fail against a plaintext server or one that accepts any client: the
//! positive calls need a completed handshake, the negative ones need the handshake (not a
//! later RPC) to be refused, and the state is read back to show nothing changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use allot::clock::SystemClock;
use allot::config::TlsConfig;
use allot::proto::v1;
use allot::server::{Running, StartError};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A certificate authority that can sign server and client certificates.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its key.
struct Pair {
    cert: String,
    key: String,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Authority { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names` (DNS names or IP addresses).
    fn sign(&self, common_name: &str, names: &[&str]) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|name| name.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// The files of one test: a CA, the server's pair, a client pair from the same CA, and a
/// client pair and CA nobody trusts.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn write() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("Allot test CA");
        let server = ca.sign("allotd", &["localhost", "127.0.0.1"]);
        let client = ca.sign("checkout-1", &["checkout-1"]);
        let rogue_ca = Authority::new("Somebody else's CA");
        let rogue = rogue_ca.sign("intruder", &["intruder"]);
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", &ca.pem());
        write("server.pem", &server.cert);
        write("server.key", &server.key);
        write("client.pem", &client.cert);
        write("client.key", &client.key);
        write("rogue-ca.pem", &rogue_ca.pem());
        write("rogue.pem", &rogue.cert);
        write("rogue.key", &rogue.key);
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    fn server_config(&self, mutual: bool) -> TlsConfig {
        TlsConfig {
            cert_file: Some(self.path("server.pem")),
            key_file: Some(self.path("server.key")),
            client_ca_file: mutual.then(|| self.path("ca.pem")),
        }
    }

    /// Client TLS trusting `ca`, presenting `identity` (a pair's file stem) if any.
    fn client(&self, ca: &str, identity: Option<&str>) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read(ca)));
        if let Some(stem) = identity {
            config = config.identity(Identity::from_pem(
                self.read(&format!("{stem}.pem")),
                self.read(&format!("{stem}.key")),
            ));
        }
        config
    }
}

async fn start(data: &Path, tls: TlsConfig) -> Result<Running, StartError> {
    let mut config = common::test_config(data);
    config.tls = tls;
    allot::server::start(config, Arc::new(SystemClock)).await
}

async fn connect(running: &Running, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let port = running.grpc_address.port();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://localhost:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect().await.map_err(|error| format!("{error:?}"))
}

/// Upserts one node over `channel`: the call that proves the connection works end to end.
async fn upsert(channel: Channel, node_id: &str) -> Result<(), tonic::Status> {
    let mut inventory = v1::inventory_client::InventoryClient::new(channel);
    inventory
        .upsert_nodes(v1::UpsertNodesRequest { nodes: vec![common::node(node_id, 40.0, -74.0)] })
        .await
        .map(|_| ())
}

/// A connection attempt that must not get as far as a served call: either the connect or
/// the first call fails (rustls may report a refused client certificate only on first use).
async fn refused(running: &Running, tls: Option<ClientTlsConfig>, node_id: &str) -> String {
    match connect(running, tls).await {
        Err(error) => error,
        Ok(channel) => match upsert(channel, node_id).await {
            Ok(()) => panic!("a call from {node_id} was served"),
            // Made up by the client's transport (the server never answered the call): a TLS
            // alert or a broken HTTP/2 connection, whatever code the client library picks.
            Err(status) => {
                let source = std::error::Error::source(&status);
                assert!(
                    source.is_some_and(|source| source.downcast_ref::<tonic::transport::Error>().is_some()),
                    "not a transport failure: {status:?}"
                );
                format!("{status:?}")
            }
        },
    }
}

async fn node_ids(running: &Running, tls: ClientTlsConfig) -> Vec<String> {
    let channel = connect(running, Some(tls)).await.unwrap();
    let mut inventory = v1::inventory_client::InventoryClient::new(channel);
    let nodes = inventory.list_nodes(v1::ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    nodes.into_iter().map(|node| node.node_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_only_clients_that_trust_the_server() {
    // Goal: with cert_file and key_file the port speaks TLS only. Method: a client trusting
    // the CA is served; a plaintext client and a client trusting another CA are refused at
    // the transport; only the served call changed state.
    let files = Files::write();
    let data = tempfile::tempdir().unwrap();
    let running = start(data.path(), files.server_config(false)).await.unwrap();

    upsert(connect(&running, Some(files.client("ca.pem", None))).await.unwrap(), "DC-TLS").await.unwrap();
    let plain = refused(&running, None, "DC-PLAIN").await;
    let untrusting = refused(&running, Some(files.client("rogue-ca.pem", None)), "DC-ROGUE").await;
    eprintln!("plaintext client: {plain}\nclient trusting another CA: {untrusting}");

    assert_eq!(node_ids(&running, files.client("ca.pem", None)).await, vec!["DC-TLS".to_string()]);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    // Goal: with client_ca_file every client must present a certificate that CA signed.
    // Method: a client with such a certificate is served; one without a certificate, one with
    // a certificate from another CA, and a plaintext one are refused; nothing they sent is
    // stored.
    let files = Files::write();
    let data = tempfile::tempdir().unwrap();
    let running = start(data.path(), files.server_config(true)).await.unwrap();

    upsert(connect(&running, Some(files.client("ca.pem", Some("client")))).await.unwrap(), "DC-MTLS")
        .await
        .unwrap();
    let anonymous = refused(&running, Some(files.client("ca.pem", None)), "DC-ANONYMOUS").await;
    let rogue = refused(&running, Some(files.client("ca.pem", Some("rogue"))), "DC-ROGUE").await;
    let plain = refused(&running, None, "DC-PLAIN").await;
    eprintln!("no client certificate: {anonymous}\nforeign client certificate: {rogue}\nplaintext: {plain}");

    assert_eq!(node_ids(&running, files.client("ca.pem", Some("client"))).await, vec!["DC-MTLS".to_string()]);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_the_start_with_a_reason() {
    // Goal: a TLS misconfiguration never starts a plaintext server: half a key pair is a
    // config problem, an unreadable file is named, a file that is not a certificate is
    // refused. Method: start with each and read the error.
    let files = Files::write();
    let data = tempfile::tempdir().unwrap();
    let error = |result: Result<Running, StartError>| match result {
        Ok(_) => panic!("started with a bad [tls] section"),
        Err(error) => error.to_string(),
    };

    let half = TlsConfig { cert_file: Some(files.path("server.pem")), ..TlsConfig::default() };
    let text = error(start(data.path(), half).await);
    assert!(text.contains("tls.cert_file and tls.key_file go together"), "{text}");

    let missing = TlsConfig { cert_file: Some(files.path("nope.pem")), ..files.server_config(false) };
    let text = error(start(data.path(), missing).await);
    assert!(text.contains("tls.cert_file") && text.contains("nope.pem"), "{text}");

    // A key where the certificate should be: no certificate in the PEM.
    let swapped = TlsConfig { cert_file: Some(files.path("server.key")), ..files.server_config(false) };
    let text = error(start(data.path(), swapped).await);
    assert!(text.starts_with("TLS: "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allotctl_speaks_tls_and_mutual_tls() {
    // Goal: operators reach a TLS daemon with allotctl. Method: the real allotctl against an
    // in-process daemon requiring client certificates: with the CA and a client pair it works
    // (exit 0); without the client pair it cannot connect (exit 3); a missing CA file is a
    // usage error (exit 2).
    let files = Files::write();
    let data = tempfile::tempdir().unwrap();
    let running = start(data.path(), files.server_config(true)).await.unwrap();
    let address = format!("https://localhost:{}", running.grpc_address.port());
    let allotctl = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_allotctl"))
            .args(["--addr", &address, "--timeout-ms", "5000"])
            .args(extra)
            .args(["nodes", "list"])
            .env_remove("ALLOT_TLS_CA")
            .env_remove("ALLOT_TLS_CERT")
            .env_remove("ALLOT_TLS_KEY")
            .env_remove("ALLOT_TOKEN")
            .output()
            .unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let ca = files.path("ca.pem");
    let cert = files.path("client.pem");
    let key = files.path("client.key");
    let (ca, cert, key) = (ca.to_str().unwrap(), cert.to_str().unwrap(), key.to_str().unwrap());

    let (code, stderr) =
        tokio::task::block_in_place(|| allotctl(&["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = tokio::task::block_in_place(|| allotctl(&["--tls-ca", ca]));
    assert_eq!(code, Some(3), "{stderr}");
    let (code, stderr) = tokio::task::block_in_place(|| allotctl(&["--tls-ca", "/nonexistent/ca.pem"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
    running.shutdown().await;
}
