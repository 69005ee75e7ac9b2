//! Noticing a database that went silent. A server behind a network partition, or on a
//! frozen host, closes nothing: a statement sent to it waits for an answer that never
//! comes, and the connection's socket reports nothing for as long as TCP keeps trying
//! (a quarter of an hour on Linux), or for ever to a peer whose kernel still answers.
//!
//! So every connection's socket is watched. Reading the frontend/backend protocol's
//! framing as it passes, the [`Watchdog`] counts the answers the connection awaits (each
//! `Sync` and simple `Query` the client sends, and the startup, ends in one
//! `ReadyForQuery`), and fails the socket when one is awaited and the server has sent
//! nothing at all for the connection's [`Silence::limit`]. A statement is never silent for
//! that long on its own: every session runs with `statement_timeout` set a little below
//! it, so a slow statement gets its error from the server first. The connection then fails
//! like any lost connection (its callers see the database unavailable, and retry), and the
//! pool drops the connections it opened before: they went through the same silence.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

/// How long a server may stay silent while an answer is awaited, and when a connection
/// of this pool last found one that was: shared by a pool's connections.
#[derive(Debug)]
pub(crate) struct Silence {
    /// The sessions' `statement_timeout`.
    statement_timeout: Duration,
    last_noticed: Mutex<Option<Instant>>,
}

/// What a silent server is given beyond the statement timeout: time for the error that
/// cancels a statement at the timeout to arrive.
const GRACE: Duration = Duration::from_secs(2);

impl Silence {
    pub(crate) fn new(statement_timeout: Duration) -> Arc<Silence> {
        Arc::new(Silence { statement_timeout, last_noticed: Mutex::default() })
    }

    pub(crate) fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// How long the server may send nothing while an answer is awaited.
    pub(crate) fn limit(&self) -> Duration {
        self.statement_timeout + GRACE
    }

    /// When a connection last found the server silent.
    pub(crate) fn last_noticed(&self) -> Option<Instant> {
        *self.last_noticed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn noticed(&self) {
        *self.last_noticed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

/// Frames a stream of protocol messages: a type byte (none for the startup message) and a
/// length that counts itself, then the body, which is skipped.
#[derive(Debug)]
struct Framer {
    /// The next message is the untyped startup message.
    untyped: bool,
    header: [u8; 5],
    have: usize,
    skip: usize,
}

impl Framer {
    fn new(untyped_first: bool) -> Framer {
        Framer { untyped: untyped_first, header: [0; 5], have: 0, skip: 0 }
    }

    /// Reads `bytes`, calling `message` with the type of each message that begins in them
    /// (0 for the startup message).
    fn feed(&mut self, mut bytes: &[u8], mut message: impl FnMut(u8)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let header = if self.untyped { 4 } else { 5 };
            let n = (header - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == header {
                let (kind, length) =
                    if self.untyped { (0, &self.header[..4]) } else { (self.header[0], &self.header[1..5]) };
                let length = u32::from_be_bytes(length.try_into().expect("four bytes"));
                message(kind);
                self.skip = (length as usize).saturating_sub(4);
                self.have = 0;
                self.untyped = false;
            }
        }
    }
}

/// A connection's socket (or its TLS stream), watched for a silent server.
pub(crate) struct Watchdog<S> {
    inner: S,
    silence: Arc<Silence>,
    sent: Framer,
    received: Framer,
    /// `ReadyForQuery` messages the client awaits.
    awaited: u32,
    /// When the server last sent anything, or the first awaited answer was asked for.
    heard: Instant,
    alarm: Pin<Box<Sleep>>,
    armed: bool,
}

impl<S> Watchdog<S> {
    pub(crate) fn new(inner: S, silence: Arc<Silence>) -> Watchdog<S> {
        Watchdog {
            inner,
            silence,
            sent: Framer::new(true),
            received: Framer::new(false),
            awaited: 0,
            heard: Instant::now(),
            alarm: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
        }
    }

    /// Errs once the server has been silent past the limit while an answer is awaited;
    /// otherwise makes sure the task is woken when it would be.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.awaited == 0 {
            return Ok(());
        }
        let limit = self.silence.limit();
        loop {
            let deadline = self.heard + limit;
            if Instant::now() >= deadline {
                self.silence.noticed();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the database sent nothing for {limit:?} while an answer was awaited"),
                ));
            }
            if !self.armed {
                self.alarm.as_mut().reset(deadline.into());
                self.armed = true;
            }
            match self.alarm.as_mut().poll(cx) {
                Poll::Pending => return Ok(()),
                // it went off for an earlier deadline (the server spoke since): look again
                Poll::Ready(()) => self.armed = false,
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watchdog<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    this.heard = Instant::now();
                    let awaited = &mut this.awaited;
                    this.received.feed(new, |kind| {
                        if kind == b'Z' {
                            *awaited = awaited.saturating_sub(1);
                        }
                    });
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watchdog<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        let (awaited, heard) = (&mut this.awaited, &mut this.heard);
        this.sent.feed(&data[..written], |kind| {
            // the startup, a simple query and a Sync each end in one ReadyForQuery
            if matches!(kind, 0 | b'Q' | b'S') {
                if *awaited == 0 {
                    *heard = Instant::now();
                }
                *awaited += 1;
            }
        });
        // the connection's task reads next; have it woken at the deadline (a silence
        // already past it is reported by that read)
        let _ = this.check(cx);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tokio_postgres::tls::TlsStream + Unpin> tokio_postgres::tls::TlsStream for Watchdog<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.inner.channel_binding()
    }
}

/// A TLS connector whose streams are watched: over TLS the watchdog sits above the
/// encryption, where the protocol's messages can be read.
#[derive(Clone)]
pub(crate) struct Watched<T> {
    pub(crate) tls: T,
    pub(crate) silence: Arc<Silence>,
}

impl<S, T> tokio_postgres::tls::TlsConnect<S> for Watched<T>
where
    T: tokio_postgres::tls::TlsConnect<S>,
    T::Stream: Unpin,
    T::Future: Send + 'static,
{
    type Stream = Watchdog<T::Stream>;
    type Error = T::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, T::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let (handshake, silence) = (self.tls.connect(stream), self.silence);
        Box::pin(async move { Ok(Watchdog::new(handshake.await?, silence)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn frames_messages_however_the_bytes_are_split() {
        let mut stream = Vec::new();
        // an untyped startup message, then typed ones
        let startup_body = b"\x00\x03\x00\x00user\x00postgres\x00\x00";
        stream.extend_from_slice(&(startup_body.len() as u32 + 4).to_be_bytes());
        stream.extend_from_slice(startup_body);
        stream.extend(message(b'P', b"\x00SELECT 1\x00\x00\x00"));
        stream.extend(message(b'S', b""));
        stream.extend(message(b'Q', b"BEGIN\x00"));
        for chunk in [1, 2, 3, 7, 64, stream.len()] {
            let mut framer = Framer::new(true);
            let mut kinds = Vec::new();
            for piece in stream.chunks(chunk) {
                framer.feed(piece, |k| kinds.push(k));
            }
            assert_eq!(kinds, [0, b'P', b'S', b'Q'], "in pieces of {chunk}");
        }
    }

    /// A server that answers some of a pipeline and then goes silent is noticed, and
    /// one that answers in full is not.
    #[tokio::test]
    async fn a_silent_server_fails_the_socket_once_an_answer_is_overdue() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let silence = Silence::new(Duration::from_millis(100));
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut watched = Watchdog::new(client, silence.clone());
        watched.sent = Framer::new(false);
        // two statements pipelined, each with its Sync
        let mut pipeline = message(b'E', b"\x00\x00\x00\x00\x00");
        pipeline.extend(message(b'S', b""));
        pipeline.extend(message(b'E', b"\x00\x00\x00\x00\x00"));
        pipeline.extend(message(b'S', b""));
        watched.write_all(&pipeline).await.unwrap();
        // the first is answered
        let mut answer = message(b'C', b"SELECT 1\x00");
        answer.extend(message(b'Z', b"I"));
        server.write_all(&answer).await.unwrap();
        let mut buf = vec![0; answer.len()];
        watched.read_exact(&mut buf).await.unwrap();
        assert!(silence.last_noticed().is_none());
        // the second never is
        let started = Instant::now();
        let error = watched.read(&mut [0; 16]).await.expect_err("the silence is noticed");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() >= Duration::from_millis(100), "not before the limit");
        assert!(silence.last_noticed().is_some());

        // answered in full: nothing awaited, so a quiet server is just idle
        let silence = Silence::new(Duration::from_millis(10));
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut watched = Watchdog::new(client, silence.clone());
        watched.sent = Framer::new(false);
        watched.write_all(&message(b'Q', b"SELECT 1\x00")).await.unwrap();
        server.write_all(&message(b'Z', b"I")).await.unwrap();
        watched.read_exact(&mut [0; 6]).await.unwrap();
        let idle = tokio::time::timeout(Duration::from_millis(2_500), watched.read(&mut [0; 16])).await;
        assert!(idle.is_err(), "an idle connection is left alone: {idle:?}");
        assert!(silence.last_noticed().is_none());
    }
}
