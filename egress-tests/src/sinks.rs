//! Servers for the traffic of a test, inside a test namespace: a TCP sink that counts bytes, a UDP
//! sink, and a small HTTP server that records every request (an upload target, a web page for
//! curl, a webhook receiver). Each serves from threads of its own until dropped; dropping it
//! stops them and closes its sockets.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use crate::netns::{LoopNs, in_netns};

/// How often the serving threads look at their stop flag.
const POLL: Duration = Duration::from_millis(10);

/// A listener bound inside `ns`, non-blocking so that its accept loop can stop.
fn listen(ns: &LoopNs, addr: SocketAddr) -> TcpListener {
    let l = in_netns(ns, move || {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"))
    });
    l.set_nonblocking(true).expect("a non-blocking listener");
    l
}

/// Accepts connections until `stop`, handing each to `serve` on a thread of its own (blocking,
/// with a read timeout so that it notices `stop` too).
fn accept_loop(
    l: TcpListener,
    stop: Arc<AtomicBool>,
    serve: impl Fn(TcpStream, &AtomicBool) + Send + Sync + 'static,
) {
    let serve = Arc::new(serve);
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    let (stop, serve) = (stop.clone(), serve.clone());
                    thread::spawn(move || {
                        s.set_nonblocking(false).expect("a blocking stream");
                        s.set_read_timeout(Some(POLL * 10)).expect("a read timeout");
                        serve(s, &stop);
                    });
                }
                // Nothing to accept yet (or a failed accept): look again shortly.
                Err(_) => thread::sleep(POLL),
            }
        }
    });
}

/// Reads from `s` until the peer closes (or `stop`), calling `seen` with every chunk's length.
fn drain(s: &mut TcpStream, stop: &AtomicBool, mut seen: impl FnMut(usize)) {
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => seen(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A TCP server that reads every connection to its end, counting the bytes.
#[derive(Debug)]
pub struct TcpSink {
    bytes: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl TcpSink {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &LoopNs, addr: impl Into<SocketAddr>) -> TcpSink {
        let l = listen(ns, addr.into());
        let sink = TcpSink {
            bytes: Arc::default(),
            closed: Arc::default(),
            stop: Arc::default(),
        };
        let (bytes, closed) = (sink.bytes.clone(), sink.closed.clone());
        accept_loop(l, sink.stop.clone(), move |mut s, stop| {
            drain(&mut s, stop, |n| {
                bytes.fetch_add(n as u64, Ordering::SeqCst);
            });
            closed.fetch_add(1, Ordering::SeqCst);
        });
        sink
    }

    /// Bytes read so far, over every connection.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Connections read to their end (the peer closed) so far.
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP socket that counts the bytes and datagrams it receives.
#[derive(Debug)]
pub struct UdpSink {
    bytes: Arc<AtomicU64>,
    datagrams: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl UdpSink {
    /// Binds `addr` inside `ns`.
    pub fn start(ns: &LoopNs, addr: impl Into<SocketAddr>) -> UdpSink {
        let addr = addr.into();
        let sock = in_netns(ns, move || {
            UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"))
        });
        sock.set_read_timeout(Some(POLL * 10))
            .expect("a read timeout");
        let sink = UdpSink {
            bytes: Arc::default(),
            datagrams: Arc::default(),
            stop: Arc::default(),
        };
        let (bytes, datagrams, stop) = (
            sink.bytes.clone(),
            sink.datagrams.clone(),
            sink.stop.clone(),
        );
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    bytes.fetch_add(n as u64, Ordering::SeqCst);
                    datagrams.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        sink
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    pub fn datagrams(&self) -> u64 {
        self.datagrams.load(Ordering::SeqCst)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One request an [`HttpServer`] answered.
#[derive(Debug, Clone)]
pub struct Request {
    /// The request line and headers.
    pub head: String,
    pub body: Vec<u8>,
}

impl Request {
    /// The value of header `name` (any case), if the request has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }

    /// The body as JSON; panics when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// An HTTP/1.1 server that reads each request with its body (by Content-Length), records it, and
/// answers `200 OK` with a fixed body, closing the connection.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

/// The head (up to the blank line) and where the body starts, once `buf` holds the whole head.
fn split_head(buf: &[u8]) -> Option<(String, usize)> {
    let i = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((String::from_utf8_lossy(&buf[..i]).into_owned(), i + 4))
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads one request from `s`. `Expect: 100-continue` is never answered: curl then sends a large
/// body after its 1 s expect timeout, as it does with servers that ignore the header.
fn read_request(s: &mut TcpStream, stop: &AtomicBool) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut read = |s: &mut TcpStream, buf: &mut Vec<u8>| -> Option<()> {
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            match s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Some(());
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
    };
    let (head, body_at) = loop {
        read(s, &mut buf)?;
        if let Some(h) = split_head(&buf) {
            break h;
        }
    };
    let len: usize = header(&head, "content-length")
        .map(|v| v.parse().expect("a numeric Content-Length"))
        .unwrap_or(0);
    while buf.len() < body_at + len {
        read(s, &mut buf)?;
    }
    Some(Request {
        head,
        body: buf[body_at..body_at + len].to_vec(),
    })
}

impl HttpServer {
    /// Listens on `addr` inside `ns` (port 0: any free port, see [`HttpServer::addr`]); answers
    /// every request with `body`.
    pub fn start(ns: &LoopNs, addr: impl Into<SocketAddr>, body: &'static [u8]) -> HttpServer {
        let l = listen(ns, addr.into());
        let server = HttpServer {
            addr: l.local_addr().expect("the listener's address"),
            requests: Arc::default(),
            stop: Arc::default(),
        };
        let requests = server.requests.clone();
        accept_loop(l, server.stop.clone(), move |mut s, stop| {
            let Some(req) = read_request(&mut s, stop) else {
                return;
            };
            requests.lock().expect("requests lock").push(req);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(body);
        });
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests lock").clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
