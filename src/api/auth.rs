//! Authentication and authorisation: bearer tokens with roles, checked by a tower layer in
//! front of every service (the only place that sees the method path before tonic routes it).
//!
//! Tokens are configured as SHA-256 digests (`[auth] tokens`), never in clear. With no token
//! configured, authentication is off (the default: allotd listens on 127.0.0.1). Health and
//! reflection stay open, for load balancers and probes. A missing or unknown token is
//! UNAUTHENTICATED; a known token whose role may not call the method is PERMISSION_DENIED.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::Status;

use crate::config::decode_digest;
pub use crate::config::{AuthConfig, Role, TokenConfig};

/// The hex SHA-256 of a token, as the config stores it.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The roles that may call `service/method` besides admin; `None` for a method that needs no
/// token (health, reflection). Unknown methods are admin-only (tonic answers UNIMPLEMENTED for
/// them after the check).
fn allowed(path: &str) -> Option<&'static [Role]> {
    use Role::*;
    let method = path.trim_start_matches('/');
    if method.starts_with("grpc.health.") || method.starts_with("grpc.reflection.") {
        return None;
    }
    Some(match method {
        "allot.v1.Inventory/GetAvailability" | "allot.v1.Inventory/ListNodes" => {
            &[Checkout, Connector, Fulfilment]
        }
        "allot.v1.Inventory/Reserve"
        | "allot.v1.Inventory/ReserveBatch"
        | "allot.v1.Inventory/ReserveStream"
        | "allot.v1.Inventory/ConfirmReservation"
        | "allot.v1.Inventory/ExtendReservation"
        | "allot.v1.Inventory/ReleaseReservation"
        | "allot.v1.Inventory/GetReservation"
        | "allot.v1.Routing/Allocate" => &[Checkout],
        "allot.v1.Routing/Route" => &[Checkout, Connector],
        "allot.v1.Inventory/WatchAvailability"
        | "allot.v1.Orders/ListOrders"
        | "allot.v1.Orders/GetOrderHistory"
        | "allot.v1.Orders/WatchEvents" => &[Connector],
        "allot.v1.Orders/CaptureOrder" | "allot.v1.Orders/CancelOrder" => &[Checkout, Connector],
        "allot.v1.Orders/GetOrder" => &[Checkout, Connector, Fulfilment],
        "allot.v1.Inventory/SetStock" | "allot.v1.Inventory/AdjustStock" => &[Fulfilment],
        _ if method.starts_with("allot.v1.Fulfilment/") => &[Fulfilment],
        _ => &[],
    })
}

/// The configured tokens, by digest.
pub struct Auth {
    tokens: HashMap<[u8; 32], (String, Role)>,
}

impl Auth {
    /// `None` when no token is configured (authentication off).
    pub fn from_config(config: &AuthConfig) -> Option<Arc<Auth>> {
        if config.tokens.is_empty() {
            return None;
        }
        let tokens = config
            .tokens
            .iter()
            .filter_map(|token| Some((decode_digest(&token.sha256)?, (token.name.clone(), token.role))))
            .collect();
        Some(Arc::new(Auth { tokens }))
    }

    /// Decides one call from its method path and `authorization` header.
    pub fn check(&self, path: &str, authorization: Option<&http::HeaderValue>) -> Result<(), Status> {
        let Some(roles) = allowed(path) else { return Ok(()) };
        let token = authorization
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("a bearer token is required (authorization: Bearer <token>)")
            })?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let Some((name, role)) = self.tokens.get(&digest) else {
            metrics::counter!("allot_auth_denied_total", "reason" => "unauthenticated").increment(1);
            return Err(Status::unauthenticated("unknown bearer token"));
        };
        if *role == Role::Admin || roles.contains(role) {
            return Ok(());
        }
        metrics::counter!("allot_auth_denied_total", "reason" => "permission_denied").increment(1);
        Err(Status::permission_denied(format!(
            "token {name:?} has role {role:?}, which may not call {}",
            path.trim_start_matches('/')
        )))
    }
}

/// The tower layer that runs `Auth::check` before every call.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Option<Arc<Auth>>,
}

impl AuthLayer {
    pub fn new(auth: Option<Arc<Auth>>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, auth: self.auth.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Arc<Auth>>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(auth) = &self.auth
            && let Err(status) = auth.check(request.uri().path(), request.headers().get("authorization"))
        {
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Arc<Auth> {
        let tokens = [
            ("web", Role::Checkout, "t-checkout"),
            ("ops", Role::Admin, "t-admin"),
            ("dc", Role::Fulfilment, "t-dc"),
        ]
        .iter()
        .map(|(name, role, token)| TokenConfig {
            name: name.to_string(),
            role: *role,
            sha256: hash_token(token),
        })
        .collect();
        let config = AuthConfig { tokens };
        assert!(config.problems().is_empty());
        Auth::from_config(&config).unwrap()
    }

    fn bearer(token: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn roles_decide_and_probes_stay_open() {
        // Goal: the permission table and the two error codes. Method: one call per case.
        let auth = auth();
        let reserve = "/allot.v1.Inventory/Reserve";
        assert_eq!(auth.check(reserve, None).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            auth.check(reserve, Some(&bearer("nope"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(auth.check(reserve, Some(&bearer("t-checkout"))).is_ok());
        assert!(auth.check(reserve, Some(&bearer("t-admin"))).is_ok());
        let denied = auth.check(reserve, Some(&bearer("t-dc"))).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("dc"), "{denied:?}");
        let upsert = "/allot.v1.Inventory/UpsertNodes";
        assert_eq!(
            auth.check(upsert, Some(&bearer("t-checkout"))).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(auth.check("/allot.v1.Fulfilment/ConfirmShipment", Some(&bearer("t-dc"))).is_ok());
        assert!(auth.check("/grpc.health.v1.Health/Check", None).is_ok());
        assert!(auth.check("/allot.v1.Admin/Backup", Some(&bearer("t-dc"))).is_err());
    }

    #[test]
    fn config_problems_are_named() {
        // Goal: bad digests and duplicate names are refused at start-up. Method: examples.
        let token = |name: &str, sha256: &str| TokenConfig {
            name: name.into(),
            role: Role::Admin,
            sha256: sha256.into(),
        };
        let config = AuthConfig { tokens: vec![token("a", "xyz"), token("a", &hash_token("t"))] };
        assert_eq!(config.problems().len(), 2, "{:?}", config.problems());
        assert_eq!(hash_token("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
