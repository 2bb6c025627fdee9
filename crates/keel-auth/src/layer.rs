use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use secrecy::{ExposeSecret as _, SecretString};
use tonic::Status;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tower_layer::Layer;
use tower_service::Service;

use keel_server::PeerIdentity;

use crate::in_process::InProcessCall;
use crate::store::Authenticated;
use crate::{AuthError, KeyStore, Principal, Role, Scope};

const API_KEY_HEADER: &str = "x-api-key";
const MISSING_KEY: &str = "missing API key: send the header \"authorization: Bearer keel_...\"";
const INVALID_KEY: &str = "invalid API key";

/// Authenticates every call of the wrapped gRPC service with an API key.
///
/// The key comes from `authorization: Bearer keel_…` or, failing that,
/// `x-api-key: keel_…`. On success the caller's [`Principal`] is put into the
/// request extensions, where handlers find it with [`principal`]; otherwise the call
/// is answered with UNAUTHENTICATED (UNAVAILABLE if the key store cannot be
/// reached) and never reaches the service.
///
/// When the server verified a client certificate under mutual TLS, its
/// [`PeerIdentity`] is copied into [`Principal::peer_identity`]. With
/// [`AuthLayer::require_client_cert_for_service_keys`], a `service` key is refused
/// unless that identity is the key's name; with [`AuthLayer::mutual_tls`] (set
/// whenever the listener verifies client certificates), the same holds for every
/// fleet key.
///
/// A call made through an [`InProcess`](crate::InProcess) channel, from a service
/// of this same process, carries a marker only keel-auth can create and is let
/// through without a key as an internal fleet caller (role `service`). Nothing that
/// arrives over a listener can carry that marker: request extensions are never
/// filled from the wire, and no header stands for it.
///
/// Wrap each generated server separately, so services that must stay open (health,
/// reflection) are simply left unwrapped:
///
/// ```no_run
/// use tower_layer::Layer as _;
/// # fn example(store: keel_auth::KeyStore) {
/// // Health stands in for any generated `XxxServer`.
/// let (_, health) = tonic_health::server::health_reporter();
/// let routes = tonic::service::Routes::new(keel_auth::AuthLayer::new(store.clone()).layer(health));
/// # let _ = routes;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct AuthLayer {
    store: KeyStore,
    require_client_cert_for_service_keys: bool,
    mutual_tls: bool,
}

impl AuthLayer {
    /// A layer checking keys against `store`, requiring client certificates for
    /// service keys if the store says so
    /// ([`KeyStore::require_client_cert_for_service_keys`]).
    pub fn new(store: KeyStore) -> Self {
        AuthLayer {
            require_client_cert_for_service_keys: store.require_client_cert_for_service_keys,
            mutual_tls: store.mutual_tls,
            store,
        }
    }

    /// With `on` (the listener verifies client certificates), a call with a fleet key
    /// is refused with UNAUTHENTICATED unless it carries a [`PeerIdentity`] equal to
    /// the key's name. Overrides the store's setting ([`KeyStore::mutual_tls`]).
    pub fn mutual_tls(mut self, on: bool) -> Self {
        self.mutual_tls = on;
        self
    }

    /// With `required`, a call with a `service` key is refused with UNAUTHENTICATED
    /// unless it carries a [`PeerIdentity`] equal to the key's name, i.e. came over
    /// mutual TLS with a verified certificate for that service. Other roles are not
    /// affected. Overrides the store's setting.
    pub fn require_client_cert_for_service_keys(mut self, required: bool) -> Self {
        self.require_client_cert_for_service_keys = required;
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            store: self.store.clone(),
            require_client_cert_for_service_keys: self.require_client_cert_for_service_keys,
            mutual_tls: self.mutual_tls,
        }
    }
}

/// A gRPC service wrapped by [`AuthLayer`]; keeps the inner service's
/// [`NamedService::NAME`](tonic::server::NamedService::NAME) so it can be routed.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    store: KeyStore,
    require_client_cert_for_service_keys: bool,
    mutual_tls: bool,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for AuthService<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // `self.inner` is the clone that was polled ready, so it must serve this call;
        // a fresh clone stays behind for the next poll_ready.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        // Only keel-auth's in-process channel puts this here; see `InProcess`.
        if let Some(call) = request.extensions().get::<InProcessCall>() {
            let principal = call.principal();
            request.extensions_mut().insert(principal);
            return Box::pin(inner.call(request));
        }
        let store = self.store.clone();
        // Copied out before the async block so the future does not borrow the request
        // (whose body need not be Sync).
        let key = api_key(request.headers());
        let peer_identity = request
            .extensions()
            .get::<PeerIdentity>()
            .map(|identity| identity.0.clone());
        let binding = CertBinding {
            service_keys: self.require_client_cert_for_service_keys,
            fleet_keys: self.mutual_tls,
        };
        Box::pin(async move {
            let principal = match key {
                Ok(key) => authenticate(&store, &key)
                    .await
                    .and_then(|found| check_peer(found, peer_identity, binding)),
                Err(status) => Err(status),
            };
            match principal {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The key the caller sent, or the UNAUTHENTICATED status to answer with.
fn api_key(headers: &http::HeaderMap) -> Result<SecretString, Status> {
    let invalid = || Status::unauthenticated(INVALID_KEY);
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| invalid())?;
        let (scheme, token) = value.split_once(' ').ok_or_else(invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(invalid());
        }
        return Ok(SecretString::from(token.trim()));
    }
    if let Some(value) = headers.get(API_KEY_HEADER) {
        let value = value.to_str().map_err(|_| invalid())?;
        return Ok(SecretString::from(value.trim()));
    }
    Err(Status::unauthenticated(MISSING_KEY))
}

async fn authenticate(store: &KeyStore, key: &SecretString) -> Result<Authenticated, Status> {
    let key = key.expose_secret();
    // Only the prefix of a well-formed key is ever logged; it identifies the key
    // in listings without revealing it.
    let key_prefix = key
        .get(..crate::key::DISPLAY_PREFIX_LEN)
        .filter(|_| crate::key::is_well_formed(key));
    match store.authenticate_key(key).await {
        Ok(found) => Ok(found),
        Err(AuthError::MalformedKey) => {
            tracing::debug!("rejected malformed API key");
            Err(Status::unauthenticated(INVALID_KEY))
        }
        Err(err @ (AuthError::UnknownKey | AuthError::Revoked | AuthError::Expired)) => {
            tracing::debug!(key_prefix, reason = %err, "rejected API key");
            let message = if matches!(err, AuthError::UnknownKey) {
                INVALID_KEY.to_owned()
            } else {
                err.to_string()
            };
            Err(Status::unauthenticated(message))
        }
        Err(err) => {
            tracing::warn!(error = %err, key_prefix, "cannot verify API key");
            Err(Status::unavailable("cannot verify API key right now"))
        }
    }
}

/// Which keys must come with a client certificate naming them.
#[derive(Debug, Clone, Copy)]
struct CertBinding {
    /// Every `service` key, tenant or fleet.
    service_keys: bool,
    /// Every fleet key: mutual TLS is on.
    fleet_keys: bool,
}

/// The caller, with the identity of its client certificate; refused if it holds a
/// key that `binding` binds to a certificate it did not present.
fn check_peer(
    found: Authenticated,
    peer_identity: Option<String>,
    binding: CertBinding,
) -> Result<Principal, Status> {
    let Authenticated {
        mut principal,
        name,
    } = found;
    let named = peer_identity.as_deref() == Some(name.as_str());
    if binding.fleet_keys && principal.scope == Scope::Fleet && !named {
        tracing::debug!(
            key_id = %principal.key_id,
            key_name = %name,
            peer_identity = peer_identity.as_deref(),
            "rejected fleet key without a client certificate naming it"
        );
        return Err(Status::unauthenticated(format!(
            "fleet keys must come with a client certificate for {name} (mutual TLS is on): \
             present the certificate issued to {name}"
        )));
    }
    if binding.service_keys && principal.role == Role::Service && !named {
        tracing::debug!(
            key_id = %principal.key_id,
            key_name = %name,
            peer_identity = peer_identity.as_deref(),
            "rejected service key without a client certificate naming it"
        );
        return Err(Status::unauthenticated(format!(
            "service keys must come with a client certificate for {name}"
        )));
    }
    principal.peer_identity = peer_identity;
    Ok(principal)
}

/// The caller of an RPC, as authenticated by [`AuthLayer`].
///
/// Fails with INTERNAL when the request carries no principal, which means the
/// service was registered without the layer.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<&Principal, Status> {
    request.extensions().get::<Principal>().ok_or_else(|| {
        Status::internal("request has no authenticated caller: the auth layer is not installed")
    })
}

/// A client interceptor that sends `key` as `authorization: Bearer keel_…` on
/// every call, for use with `XxxClient::with_interceptor`.
///
/// A key that cannot be a header value fails each call with UNAUTHENTICATED
/// instead of panicking.
pub fn bearer_interceptor(
    key: SecretString,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, Status> + Clone {
    // Built once; marked sensitive so HTTP/2 never puts it in a compression table
    // and Debug output shows no key.
    let value: Option<AsciiMetadataValue> =
        MetadataValue::try_from(format!("Bearer {}", key.expose_secret()))
            .ok()
            .map(|mut value| {
                value.set_sensitive(true);
                value
            });
    move |mut request| match &value {
        Some(value) => {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
            Ok(request)
        }
        None => Err(Status::unauthenticated(
            "API key contains characters not allowed in a header",
        )),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn check(headers: &[(&str, &str)], expected: Result<&str, &str>) {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
            map.append(name, HeaderValue::from_str(value).expect("header value"));
        }
        let got = api_key(&map);
        let got = match &got {
            Ok(key) => Ok(key.expose_secret()),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unauthenticated);
                Err(status.message())
            }
        };
        assert_eq!(got, expected, "{headers:?}");
    }

    #[test]
    fn keys_are_read_from_authorization_or_x_api_key() {
        check(&[("authorization", "Bearer keel_abc")], Ok("keel_abc"));
        check(&[("authorization", "bearer  keel_abc ")], Ok("keel_abc"));
        check(&[("x-api-key", "keel_abc")], Ok("keel_abc"));
        check(
            &[("authorization", "Bearer keel_a"), ("x-api-key", "keel_b")],
            Ok("keel_a"),
        );
        check(&[], Err(MISSING_KEY));
        check(&[("authorization", "Basic dXNlcjpwdw==")], Err(INVALID_KEY));
        check(&[("authorization", "keel_abc")], Err(INVALID_KEY));
    }

    #[test]
    fn interceptor_sets_a_sensitive_bearer_header() {
        let mut intercept = bearer_interceptor(SecretString::from("keel_abc"));
        let request = intercept(tonic::Request::new(())).expect("intercepted");
        let value = request
            .metadata()
            .get("authorization")
            .expect("authorization set");
        assert_eq!(value.to_str().expect("ascii"), "Bearer keel_abc");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("keel_abc"));

        let mut intercept = bearer_interceptor(SecretString::from("keel_\n"));
        let status = intercept(tonic::Request::new(())).expect_err("newline in key");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}
