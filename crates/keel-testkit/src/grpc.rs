//! A tonic server for a test's own routes, on 127.0.0.1:0.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::{Channel, Server};

/// Serves `routes` until dropped. Bound before it serves, so a client can connect at once.
#[derive(Debug)]
pub struct GrpcServer {
    /// Where it listens.
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl GrpcServer {
    /// Binds 127.0.0.1:0 and serves `routes` in the caller's runtime.
    pub async fn start(routes: Routes) -> anyhow::Result<GrpcServer> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop) = oneshot::channel::<()>();
        tokio::spawn(async move {
            Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop.await;
                })
                .await
        });
        Ok(GrpcServer {
            addr,
            _stop: stop_tx,
        })
    }

    /// A new connection to the server.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await
            .with_context(|| format!("connect to {}", self.addr))?;
        Ok(channel)
    }
}
