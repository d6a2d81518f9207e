//! A host hogging a node's handshake slots: silent TCP streams held open
//! from one source address, reopened as the node closes them.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Socket, Type};

/// How often the hog looks for closed streams to reopen.
const CHECK_EVERY: Duration = Duration::from_millis(20);
/// A connect that takes longer than this failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What a [`Hog`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct HogCounts {
    /// Streams opened, the first ones included.
    pub(super) opened: u64,
    /// Streams the node closed (timed out, evicted or refused).
    pub(super) closed: u64,
    /// Connects that failed.
    pub(super) failed: u64,
}

/// Silent streams to one address, kept open until [`Hog::stop`].
pub(super) struct Hog {
    target: SocketAddr,
    from: IpAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<HogCounts>>,
}

impl Hog {
    /// Opens `streams` streams from `from` to `target` (failing if the
    /// source address cannot be used) and keeps them open in a thread.
    pub(super) fn start(target: SocketAddr, from: IpAddr, streams: usize) -> Result<Hog> {
        let mut held = Vec::with_capacity(streams);
        for _ in 0..streams {
            held.push(connect(target, from)?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("hog-{from}"))
            .spawn(move || hold(target, from, held, &flag))
            .context("cannot start the hog thread")?;
        Ok(Hog {
            target,
            from,
            stop,
            thread: Some(thread),
        })
    }

    /// One more stream from the same source, not kept open by the hog.
    pub(super) fn extra(&self) -> Result<TcpStream> {
        connect(self.target, self.from)
    }

    /// Closes every stream and says what happened.
    pub(super) fn stop(mut self) -> HogCounts {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn hold(
    target: SocketAddr,
    from: IpAddr,
    mut held: Vec<TcpStream>,
    stop: &AtomicBool,
) -> HogCounts {
    let mut counts = HogCounts {
        opened: held.len() as u64,
        ..HogCounts::default()
    };
    let mut closed = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for (i, s) in held.iter_mut().enumerate() {
            if !still_open(s) {
                closed.push(i);
            }
        }
        for i in closed.drain(..) {
            counts.closed += 1;
            match connect(target, from) {
                Ok(s) => {
                    held[i] = s;
                    counts.opened += 1;
                }
                // Keep the closed one; it is retried on the next round.
                Err(_) => counts.failed += 1,
            }
        }
        thread::sleep(CHECK_EVERY);
    }
    counts
}

/// A non-blocking TCP stream from `from` (any port) to `target`.
fn connect(target: SocketAddr, from: IpAddr) -> Result<TcpStream> {
    let open = || -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(from, 0).into())?;
        socket.connect_timeout(&target.into(), CONNECT_TIMEOUT)?;
        let stream: TcpStream = socket.into();
        stream.set_nonblocking(true)?;
        Ok(stream)
    };
    open().map_err(|e| anyhow!("cannot connect from {from} to {target}: {e}"))
}

/// True while the node keeps `stream` open; whatever it sent (its
/// preamble) is read and dropped.
fn still_open(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}
