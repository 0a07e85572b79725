//! Accept loop shared by every listener of the proxy: HTTP/1.1 and HTTP/2 (prior knowledge,
//! detected per connection) served by hyper within [`Limits`], drained gracefully on
//! shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The body type every proxy response uses.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long in-flight connections get to finish after shutdown is asked for (Istio's
/// default `terminationDrainDuration`).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What one listener allows a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; one more is closed as soon as it is accepted (and counted).
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers, counted from when the proxy
    /// starts waiting for them: it also closes an HTTP/1 connection idle that long.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list), bytes.
    pub max_header_bytes: usize,
    /// Most headers an HTTP/1 request may have.
    pub max_headers: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 pings on an idle connection, and how long the answer may take.
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    /// How long a port that detects protocols waits for a client's first bytes before it
    /// takes the connection for opaque TCP (a protocol where the server speaks first). Ports
    /// whose protocol is declared do not wait at all.
    pub protocol_detection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 100,
            h2_keepalive_interval: Duration::from_secs(30),
            h2_keepalive_timeout: Duration::from_secs(10),
            protocol_detection_timeout: PROTOCOL_DETECTION_TIMEOUT,
        }
    }
}

/// Connection counters of one listener, for `/stats/prometheus`.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub active: AtomicU64,
    pub accepted: AtomicU64,
    /// Closed on arrival because `max_connections` were open.
    pub rejected: AtomicU64,
}

impl ConnStats {
    /// The counters in Prometheus text, labelled with the listener's name.
    pub fn prometheus(&self, listener: &str, out: &mut String) {
        for (name, help, kind, v) in [
            (
                "lumen_proxy_connections_active",
                "Downstream connections open now.",
                "gauge",
                &self.active,
            ),
            (
                "lumen_proxy_connections_accepted_total",
                "Downstream connections accepted.",
                "counter",
                &self.accepted,
            ),
            (
                "lumen_proxy_connections_rejected_total",
                "Downstream connections closed on arrival because the listener was at its connection limit.",
                "counter",
                &self.rejected,
            ),
        ] {
            if !out.contains(&format!("# TYPE {name} ")) {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            }
            out.push_str(&format!(
                "{name}{{listener=\"{listener}\"}} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` with a data-path stack until `shutdown`, then
/// drains.
pub async fn serve_stack(
    listener: TcpListener,
    stack: crate::stack::Stack,
    limits: Limits,
    stats: Arc<ConnStats>,
    shutdown: CancellationToken,
) {
    serve_stack_with(listener, stack, limits, stats, None, shutdown).await;
}

/// [`serve_stack`] on a port that also takes opaque TCP (see [`serve_detecting`]).
pub async fn serve_stack_detecting(
    listener: TcpListener,
    stack: crate::stack::Stack,
    limits: Limits,
    stats: Arc<ConnStats>,
    detect: Detect,
    shutdown: CancellationToken,
) {
    serve_stack_with(listener, stack, limits, stats, Some(detect), shutdown).await;
}

/// A stack as the handler: each request's body boxed, the stack's answer (it never fails).
async fn serve_stack_with(
    listener: TcpListener,
    stack: crate::stack::Stack,
    limits: Limits,
    stats: Arc<ConnStats>,
    detect: Option<Detect>,
    shutdown: CancellationToken,
) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    serve_detecting(
        listener,
        move |req: Request<Incoming>| {
            let stack = stack.clone();
            async move {
                match stack.oneshot(req.map(BodyExt::boxed)).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        },
        limits,
        stats,
        detect,
        shutdown,
    )
    .await;
}

/// Serves `handler` on `listener` with the default [`Limits`] until `shutdown`.
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: CancellationToken)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(
        listener,
        handler,
        Limits::default(),
        Arc::new(ConnStats::default()),
        shutdown,
    )
    .await;
}

/// What the accept loop knows of a connection. On a listener that reads original
/// destinations it is in every request's extensions, and opaque TCP gets it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub peer: SocketAddr,
    /// Where the client meant to connect, when iptables redirected the connection here
    /// (`SO_ORIGINAL_DST`); `None` for a connection made to the listener itself.
    pub original_dst: Option<SocketAddr>,
}

/// The destination a REDIRECTed connection had before NAT, or `None` when it was made to
/// this socket's own address (or the kernel keeps no NAT state for it).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let sock = socket2::SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// Serves a connection that is not HTTP.
pub type OpaqueFn =
    Arc<dyn Fn(TcpStream, Accepted) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// How a port that detects protocols treats connections that are not HTTP.
#[derive(Clone)]
pub struct Detect {
    /// Serves opaque TCP.
    pub opaque: OpaqueFn,
    /// The protocol the configuration declares for a connection's port, if it does: a TCP
    /// port goes to `opaque` without waiting for its first bytes (its server may speak
    /// first), an HTTP port to the HTTP stack; only an undeclared port is sniffed.
    pub declared: DeclaredFn,
    /// Read each connection's original destination (the listener takes captured traffic).
    pub original_dst: bool,
}

impl Detect {
    /// Every connection that is not HTTP goes to `opaque`; no port is declared.
    pub fn opaque(opaque: OpaqueFn) -> Detect {
        Detect {
            opaque,
            declared: Arc::new(|_| None),
            original_dst: false,
        }
    }
}

/// The protocol the configuration declares for an accepted connection's port.
pub type DeclaredFn = Arc<dyn Fn(&Accepted) -> Option<Declared> + Send + Sync>;

/// A port's protocol as the configuration declares it (Istio's protocol selection by port
/// name or `appProtocol`), so that no connection to it is guessed from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// HTTP/1, HTTP/2 or gRPC.
    Http,
    /// Opaque TCP.
    Tcp,
}

impl std::fmt::Debug for Detect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detect")
            .field("original_dst", &self.original_dst)
            .finish_non_exhaustive()
    }
}

/// How long, by default, a detecting port waits for a client's first bytes before it takes
/// the connection for opaque TCP (a protocol where the server speaks first). Istio's sniffing
/// once waited 100 ms, and on a busy node took HTTP connections whose client was slower than
/// that for TCP, uncounted by request metrics (Istio now waits without limit, Linkerd 10 s);
/// a second keeps server-first protocols on undeclared ports working.
pub const PROTOCOL_DETECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http,
    Opaque,
    Closed,
}

/// Whether `head` starts like HTTP/1 (an upper-case method and a space) or HTTP/2's preface.
pub fn looks_like_http(head: &[u8]) -> bool {
    if head.starts_with(b"PRI * HTTP/2.0") {
        return true;
    }
    let method_len = head.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=7).contains(&method_len) && head.get(method_len) == Some(&b' ')
}

/// Peeks at a connection's first bytes (up to 16, for at most `wait`) and tells HTTP from
/// opaque bytes; a client that sent nothing in time is opaque, one that closed is closed.
pub async fn sniff(stream: &tokio::net::TcpStream, wait: Duration) -> Sniffed {
    let deadline = tokio::time::Instant::now() + wait;
    let mut head = [0u8; 16];
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut head)).await {
            Err(_) => return Sniffed::Opaque,
            Ok(Err(_)) | Ok(Ok(0)) => return Sniffed::Closed,
            Ok(Ok(n)) => {
                let method_len = head[..n]
                    .iter()
                    .take_while(|b| b.is_ascii_uppercase())
                    .count();
                // Enough to decide: a full method and its space, or a byte no method has.
                if looks_like_http(&head[..n]) {
                    return Sniffed::Http;
                }
                if method_len < n || n == head.len() {
                    return Sniffed::Opaque;
                }
                // Only capitals so far: wait for more.
                if tokio::time::timeout_at(deadline, stream.readable())
                    .await
                    .is_err()
                {
                    return Sniffed::Opaque;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Serves `handler` on `listener` within `limits` until `shutdown`, then drains connections
/// for at most [`DRAIN_TIMEOUT`].
pub async fn serve_with<H, F>(
    listener: TcpListener,
    handler: H,
    limits: Limits,
    stats: Arc<ConnStats>,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_detecting(listener, handler, limits, stats, None, shutdown).await;
}

/// [`serve_with`], and with `detect` given, a port that serves HTTP/1, HTTP/2 and opaque TCP
/// alike: a connection to a port declared TCP, or whose first bytes are not HTTP (or that
/// sends nothing within [`Limits::protocol_detection_timeout`]), goes to `detect.opaque`.
pub async fn serve_detecting<H, F>(
    listener: TcpListener,
    handler: H,
    limits: Limits,
    stats: Arc<ConnStats>,
    detect: Option<Detect>,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection limit reached: closed on arrival");
            drop(stream);
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let accepted = Accepted {
            peer,
            original_dst: detect
                .as_ref()
                .filter(|d| d.original_dst)
                .and_then(|_| original_dst(&stream)),
        };
        let handler = handler.clone();
        let tag = detect.as_ref().is_some_and(|d| d.original_dst);
        let service = service_fn(move |mut req: Request<Incoming>| {
            if tag {
                req.extensions_mut().insert(accepted);
            }
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let builder = builder.clone();
        let stats = stats.clone();
        let watcher = graceful.watcher();
        let header_read_timeout = limits.header_read_timeout;
        let detection_timeout = limits.protocol_detection_timeout;
        let detect = detect.clone();
        tokio::spawn(async move {
            if let Some(detect) = detect {
                let sniffed = match (detect.declared)(&accepted) {
                    Some(Declared::Tcp) => Sniffed::Opaque,
                    Some(Declared::Http) => Sniffed::Http,
                    None => sniff(&stream, detection_timeout).await,
                };
                match sniffed {
                    Sniffed::Opaque => {
                        (detect.opaque)(stream, accepted).await;
                        stats.active.fetch_sub(1, Ordering::Relaxed);
                        drop(slot);
                        return;
                    }
                    Sniffed::Closed => {
                        stats.active.fetch_sub(1, Ordering::Relaxed);
                        drop(slot);
                        return;
                    }
                    Sniffed::Http => {}
                }
            }
            // Telling HTTP/1 from HTTP/2 reads the first bytes, which hyper's own header
            // timeout does not cover: a client that sends nothing gets the same time.
            let mut first = [0u8; 1];
            let arrived = tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await;
            if matches!(arrived, Ok(Ok(n)) if n > 0) {
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "connection ended with error");
                }
            } else {
                tracing::debug!(%peer, "no request within the header-read time: closed");
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::http::text_body;

    /// A server answering "hello" within `limits`; its address and counters.
    async fn hello(limits: Limits) -> (std::net::SocketAddr, Arc<ConnStats>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(ConnStats::default());
        let stop = CancellationToken::new();
        tokio::spawn(serve_with(
            listener,
            |_req: Request<Incoming>| async { Response::new(text_body("hello")) },
            limits,
            stats.clone(),
            stop.clone(),
        ));
        (addr, stats, stop)
    }

    /// Writes `raw`, then reads until the server closes (at most 10 s).
    async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(raw).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn heads_too_big_or_with_too_many_headers_are_refused_with_431() {
        let (addr, _, _stop) = hello(Limits::default()).await;
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nx-big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        let resp = exchange(addr, big.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.80}");
        let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
        let resp = exchange(
            addr,
            format!("GET / HTTP/1.1\r\nHost: a\r\n{many}Connection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.80}");
        // Within the limits, it answers.
        let resp = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with("hello"),
            "{resp}"
        );
    }

    #[tokio::test]
    async fn conflicting_content_length_and_transfer_encoding_is_a_400() {
        let (addr, _, _stop) = hello(Limits::default()).await;
        let resp = exchange(
            addr,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        // Both headers: the message is framed by chunked (RFC 9112 §6.3) and the connection
        // is not reused, so nothing smuggled after it is read as a request.
        let resp = exchange(
            addr,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await;
        assert!(
            resp.matches("HTTP/1.1").count() <= 1,
            "one response at most, never one for a smuggled request: {resp}"
        );
    }

    #[tokio::test]
    async fn a_slowloris_client_is_cut_off_at_the_header_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let (addr, stats, _stop) = hello(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .expect("write");
        let started = Instant::now();
        // One header byte every 100 ms, for at most 10 s.
        let mut cut = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"x").await.is_err() {
                cut = true;
                break;
            }
            let mut buf = [0u8; 256];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
            {
                // Closed (0) or answered (408): either way the server ended it.
                let _ = n;
                cut = true;
                break;
            }
        }
        assert!(
            cut,
            "the connection stayed open for {:?}",
            started.elapsed()
        );
        // And the counters come back to their baseline.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.active.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "a connection is still counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn past_the_connection_limit_connections_are_closed_and_counted() {
        let limits = Limits {
            max_connections: 10,
            ..Limits::default()
        };
        let (addr, stats, _stop) = hello(limits).await;
        let mut held = Vec::new();
        for _ in 0..10 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            // A request on each, so each is surely accepted and counted.
            s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .expect("write");
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.expect("read");
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            held.push(s);
        }
        assert_eq!(stats.active.load(Ordering::Relaxed), 10);
        for _ in 0..5 {
            let resp = exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
            assert!(
                resp.is_empty(),
                "over the limit: closed unanswered, got {resp}"
            );
        }
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 5);
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.active.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "connections still counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Room again.
        let resp = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    #[tokio::test]
    async fn the_same_port_serves_http2_with_prior_knowledge() {
        let (addr, _, _stop) = hello(Limits::default()).await;
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Empty<Bytes>>();
        let resp = client
            .get(format!("http://{addr}/").parse().expect("uri"))
            .await
            .expect("h2 response");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "hello");
    }
}
