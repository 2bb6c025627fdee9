use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use secrecy::{ExposeSecret as _, SecretString};
use tonic::Status;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tower_layer::Layer;
use tower_service::Service;

use keel_server::PeerIdentity;

use crate::store::Authenticated;
use crate::{AuthError, KeyStore, Principal, Role};

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
/// unless that identity is the key's name.
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
}

impl AuthLayer {
    /// A layer checking keys against `store`, requiring client certificates for
    /// service keys if the store says so
    /// ([`KeyStore::require_client_cert_for_service_keys`]).
    pub fn new(store: KeyStore) -> Self {
        AuthLayer {
            require_client_cert_for_service_keys: store.require_client_cert_for_service_keys,
            store,
        }
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
        let store = self.store.clone();
        // Copied out before the async block so the future does not borrow the request
        // (whose body need not be Sync).
        let key = api_key(request.headers());
        let peer_identity = request
            .extensions()
            .get::<PeerIdentity>()
            .map(|identity| identity.0.clone());
        let require_client_cert = self.require_client_cert_for_service_keys;
        Box::pin(async move {
            let principal = match key {
                Ok(key) => authenticate(&store, &key)
                    .await
                    .and_then(|found| check_peer(found, peer_identity, require_client_cert)),
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

/// The caller, with the identity of its client certificate; refused if it holds a
/// service key that `require_client_cert` binds to a certificate it did not present.
fn check_peer(
    found: Authenticated,
    peer_identity: Option<String>,
    require_client_cert: bool,
) -> Result<Principal, Status> {
    let Authenticated {
        mut principal,
        name,
    } = found;
    if require_client_cert
        && principal.role == Role::Service
        && peer_identity.as_deref() != Some(name.as_str())
    {
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
