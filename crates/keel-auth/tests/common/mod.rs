//! Helpers shared by this crate's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;

use keel_auth::{AuthLayer, Principal};
use keel_server::PeerIdentity;
use secrecy::{ExposeSecret as _, SecretString};
use tonic::Code;
use tower::ServiceExt as _;
use tower_layer::Layer as _;

/// Calls a service behind `layer` with `key` and, if given, a peer identity; returns
/// the principal the service saw, or the status the layer answered with.
pub async fn call(
    layer: &AuthLayer,
    key: &SecretString,
    peer: Option<&str>,
) -> Result<Principal, (Code, String)> {
    let inner = tower::service_fn(|request: http::Request<()>| async move {
        let mut response = http::Response::new(());
        if let Some(principal) = request.extensions().get::<Principal>() {
            response.extensions_mut().insert(principal.clone());
        }
        Ok::<_, Infallible>(response)
    });
    let mut request = http::Request::new(());
    let bearer = format!("Bearer {}", key.expose_secret());
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        bearer.parse().expect("header value"),
    );
    if let Some(peer) = peer {
        request
            .extensions_mut()
            .insert(PeerIdentity(peer.to_owned()));
    }
    let response = layer
        .layer(inner)
        .oneshot(request)
        .await
        .unwrap_or_else(|e| match e {});
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Err((status.code(), status.message().to_owned()));
    }
    Ok(response
        .extensions()
        .get::<Principal>()
        .cloned()
        .expect("the service saw a principal"))
}
