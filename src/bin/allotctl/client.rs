//! The connection to allotd: address parsing, connecting, typed clients and one way to call.
//!
//! Owns `--addr` handling (`host:port` or a URI), the connect and per-call timeouts, and the
//! message size the clients accept. Must not know any command: commands borrow a `Context`.

use std::future::Future;
use std::time::Duration;

use allot::proto::v1;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::failure::Failure;

/// How long connecting may take before the daemon counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response allotctl decodes. Above the daemon's 4 MiB request limit on purpose:
/// a ListNodes or ListOrders answer is not bounded by it.
const DECODE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, Failure> {
        match token.map(str::trim).filter(|token| !token.is_empty()) {
            None => Ok(Bearer(None)),
            Some(token) => MetadataValue::try_from(format!("Bearer {token}"))
                .map(|value| Bearer(Some(value)))
                .map_err(|_| Failure::Usage("--token / ALLOT_TOKEN: not a printable ASCII token".into())),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// What every command needs: a connected channel and the global flags.
pub struct Context {
    pub channel: Channel,
    /// `--token`: added to every call.
    pub bearer: Bearer,
    /// The daemon's URI as used, for messages.
    pub address: String,
    /// `--json`: one JSON document on stdout instead of tables.
    pub json: bool,
    /// `--timeout-ms`: the longest wait for one unary answer.
    pub call_timeout: Duration,
}

/// `--tls-ca`, `--tls-cert`, `--tls-key`: how to reach a daemon with `[tls]` configured.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM CA certificates the daemon's certificate must chain to.
    pub ca: Option<std::path::PathBuf>,
    /// This client's certificate and key, for a daemon that requires mutual TLS.
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl TlsFiles {
    /// The rustls client configuration, or None for plaintext (an http:// address and no CA).
    /// Every file is read here, so a missing one is a usage error (exit 2).
    pub fn client_config(&self, uri: &str) -> Result<Option<ClientTlsConfig>, Failure> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(Failure::Usage("--tls-cert and --tls-key go together".into()));
        }
        if self.ca.is_none() && self.cert.is_none() && !uri.starts_with("https://") {
            return Ok(None);
        }
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|error| Failure::Usage(format!("{flag} {}: {error}", path.display())))
        };
        let mut config = ClientTlsConfig::new();
        match &self.ca {
            Some(ca) => config = config.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?)),
            None => {
                return Err(Failure::Usage(
                    "TLS needs --tls-ca (the CA that signed the daemon's certificate)".into(),
                ));
            }
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config = config.identity(Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?));
        }
        Ok(Some(config))
    }
}

/// `host:port` becomes `http://host:port`; an `http://` or `https://` URI is kept.
pub fn endpoint_uri(raw: &str) -> Result<String, Failure> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(Failure::Usage("--addr: must not be empty".into()));
    }
    let uri = if raw.contains("://") { raw.to_string() } else { format!("http://{raw}") };
    if !uri.starts_with("http://") && !uri.starts_with("https://") {
        return Err(Failure::Usage(format!(
            "--addr {raw:?}: the scheme must be http:// or https:// (or none)"
        )));
    }
    Endpoint::from_shared(uri.clone())
        .map_err(|error| Failure::Usage(format!("--addr {raw:?}: not an address ({error})")))?;
    Ok(uri)
}

/// Connects eagerly, so an unreachable daemon is exit 3 before any command work starts.
pub async fn connect(
    uri: &str,
    json: bool,
    call_timeout: Duration,
    bearer: Bearer,
    tls: &TlsFiles,
) -> Result<Context, Failure> {
    let tls = tls.client_config(uri)?;
    // With TLS the scheme is https whatever was typed (the CA flags ask for it).
    let uri = match &tls {
        Some(_) => uri.replacen("http://", "https://", 1),
        None => uri.to_string(),
    };
    let uri = uri.as_str();
    let mut endpoint = Endpoint::from_shared(uri.to_string())
        .map_err(|error| Failure::Usage(format!("--addr {uri:?}: {error}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let endpoint_uses_tls = tls.is_some();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|error| Failure::Usage(format!("TLS: {error}")))?;
    }
    let channel = endpoint.connect().await.map_err(|error| {
        // The transport error's Display is terse ("transport error"); its source says why.
        // Layers repeat each other's text ("tcp connect error: tcp connect error: ..."): keep
        // each distinct message once.
        let mut reasons = vec![error.to_string()];
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !reasons.contains(&text) {
                reasons.push(text);
            }
            source = cause.source();
        }
        let reason = reasons.join(": ");
        Failure::Connect(format!("cannot connect to {uri}: {reason}"))
    })?;
    if endpoint_uses_tls {
        // With TLS 1.3 the client finishes its handshake before the server has checked the
        // client's certificate; a refusal arrives on first use. One health check (open to
        // every client) tells a refused connection from a daemon error.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        match tokio::time::timeout(CONNECT_TIMEOUT, health.check(request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                return Err(Failure::Connect(format!(
                    "cannot connect to {uri}: the TLS connection was refused or broke on first use \
                     (a daemon requiring a client certificate: see --tls-cert): {}",
                    status.message()
                )));
            }
            Err(_) => return Err(Failure::Connect(format!("cannot connect to {uri}: no answer over TLS"))),
        }
    }
    Ok(Context { channel, bearer, address: uri.to_string(), json, call_timeout })
}

impl Context {
    pub fn inventory(&self) -> v1::inventory_client::InventoryClient<Authed> {
        v1::inventory_client::InventoryClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(DECODE_BYTES_MAX)
    }

    pub fn orders(&self) -> v1::orders_client::OrdersClient<Authed> {
        v1::orders_client::OrdersClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(DECODE_BYTES_MAX)
    }

    pub fn admin(&self) -> v1::admin_client::AdminClient<Authed> {
        v1::admin_client::AdminClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(DECODE_BYTES_MAX)
    }

    pub fn health(&self) -> tonic_health::pb::health_client::HealthClient<Authed> {
        tonic_health::pb::health_client::HealthClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    /// One unary call bounded by `--timeout-ms`; no answer in time is DEADLINE_EXCEEDED.
    pub async fn call_status<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_elapsed) => Err(Status::deadline_exceeded(format!(
                "no answer from {} within {} ms (--timeout-ms)",
                self.address,
                self.call_timeout.as_millis()
            ))),
        }
    }

    /// `call_status` for commands that stop at the first error.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Failure> {
        self.call_status(call).await.map_err(Failure::Status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_host_port_or_an_http_uri() {
        // Goal: `--addr` accepts host:port and http(s) URIs and refuses anything else.
        // Method: table of inputs.
        assert_eq!(endpoint_uri("127.0.0.1:50051").unwrap(), "http://127.0.0.1:50051");
        assert_eq!(endpoint_uri("allot.allot.svc:50051").unwrap(), "http://allot.allot.svc:50051");
        assert_eq!(endpoint_uri("http://[::1]:50051").unwrap(), "http://[::1]:50051");
        for bad in ["", "ftp://host:1", "http://[::1"] {
            assert!(matches!(endpoint_uri(bad), Err(Failure::Usage(_))), "{bad:?} must be refused");
        }
    }
}
