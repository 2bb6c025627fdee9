//! Just enough networking to tell whether a server answers: a TCP probe, NATS's INFO line and a
//! handwritten HTTP/1.0 GET (plain HTTP: the demo's keel listens on loopback without TLS).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result};

const TIMEOUT: Duration = Duration::from_secs(2);

fn connect(addr: &str) -> Result<TcpStream> {
    let addr: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Whether something accepts TCP connections at `addr` (`host:port`).
pub(crate) fn answers(addr: &str) -> bool {
    connect(addr).is_ok()
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether the NATS server at `addr` says in its INFO line that JetStream is on.
pub(crate) fn nats_has_jetstream(addr: &str) -> Result<bool> {
    let mut line = String::new();
    BufReader::new(connect(addr)?).read_line(&mut line)?;
    Ok(info_has_jetstream(&line))
}

fn info_has_jetstream(info: &str) -> bool {
    info.starts_with("INFO ") && info.replace(' ', "").contains("\"jetstream\":true")
}

/// `GET http://{addr}{path}` over HTTP/1.0, with `authorization: Bearer {token}` when a token is
/// given; returns the status code.
pub(crate) fn http_get_status(addr: &str, path: &str, bearer: Option<&str>) -> Result<u16> {
    let mut stream = connect(addr)?;
    let authorization = bearer
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    stream.take(512).read_to_end(&mut head)?;
    status_code(&String::from_utf8_lossy(&head))
        .with_context(|| format!("no HTTP status line from {addr}"))
}

/// The code in an HTTP status line such as `HTTP/1.1 200 OK`.
fn status_code(response: &str) -> Option<u16> {
    let mut words = response.lines().next()?.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_lines() {
        assert_eq!(
            status_code("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Some(200)
        );
        assert_eq!(
            status_code("HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(""), None);
    }

    #[test]
    fn finds_jetstream_in_info() {
        assert!(info_has_jetstream(
            r#"INFO {"version":"2.9.10","headers":true,"jetstream":true,"client_id":6}"#
        ));
        assert!(!info_has_jetstream(
            r#"INFO {"version":"2.9.10","headers":true,"client_id":6}"#
        ));
        assert!(!info_has_jetstream("-ERR 'Authorization Violation'"));
    }
}
