//! A Redis connection over a socket that refuses oversized replies.
//!
//! redis 0.32 buffers a whole reply, however large the server says it is, and has no limit of
//! its own. Keel's connections therefore read through [`ReplyBudget`]: at most `limit` bytes may
//! arrive between two writes (one command sent), after which the read fails and redis closes the
//! connection, failing the pending command.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use redis::aio::MultiplexedConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::TargetError;

/// Logs in over `stream` (AUTH, SELECT as the URL says) and starts the connection's driver.
pub(crate) async fn handshake<S>(
    stream: S,
    limit: usize,
    info: &redis::RedisConnectionInfo,
    config: redis::AsyncConnectionConfig,
) -> Result<MultiplexedConnection, TargetError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let budget = ReplyBudget {
        inner: stream,
        limit,
        read: 0,
    };
    let (conn, driver) = MultiplexedConnection::new_with_config(info, budget, config)
        .await
        .map_err(TargetError::Redis)?;
    // The driver ends when the last clone of the connection is dropped.
    tokio::spawn(driver);
    Ok(conn)
}

/// A socket that fails reads once more than `limit` bytes arrived since the last write.
#[derive(Debug)]
pub(crate) struct ReplyBudget<S> {
    inner: S,
    limit: usize,
    read: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for ReplyBudget<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.read += buf.filled().len() - before;
        if this.read > this.limit {
            return Poll::Ready(Err(io::Error::other(format!(
                "the reply is larger than {} bytes (--target-redis-max-reply / KEEL_TARGET_REDIS_MAX_REPLY)",
                this.limit
            ))));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReplyBudget<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if written > 0 {
            this.read = 0;
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
