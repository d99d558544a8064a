//! Where an HTTP/1 request ends, enforced on the bytes the edge layer replays to Pingora.
//!
//! The edge layer checked the request head; [`RequestBounds`] then hands Pingora exactly that
//! request — the head, then its body (Content-Length bytes, or a chunked body read through the
//! strict [`ChunkedScan`]) — and never a byte past it:
//!
//! - **Pipelining.** Bytes a client sent after its request (the next pipelined request) stay
//!   with the edge layer, so Pingora sees no "overread" (which makes it drop the connection and
//!   the pipelined request with it), and the next request is read and checked by the edge layer
//!   like any other: requests are served in order, one at a time.
//! - **Chunked bodies.** Pingora's chunk parser is lenient (a bare LF or any byte in a chunk
//!   extension, a trailer line without a colon, `3 \r\n` as a size); a front proxy that reads
//!   the same bytes another way would see another body. The scan follows RFC 9112 §7.1 and
//!   refuses anything else: the read fails with a [`FramingError`], answered 400.
//! - **Upgrades.** After a `101` answer to an upgrade request the connection is a tunnel: from
//!   then on bytes pass as they come.
//!
//! The scan looks at each byte of a size or trailer line once, and skips chunk data by count:
//! no copies, except of bytes past the end of the request (moved back for the next one).
//!
//! (Over 500 lines because of its unit tests, kept beside the code they pin down.)

use pingora::protocols::Stream;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// How a request's body is framed (from its checked head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body (neither Content-Length nor Transfer-Encoding), or `Content-Length: 0`.
    None,
    Length(u64),
    Chunked,
}

/// What the edge layer knows of a checked request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub body: Body,
    /// An HTTP/1.1 `Upgrade` that `Connection` names: a 101 answer turns the connection into a
    /// tunnel.
    pub upgrade: bool,
}

/// A chunked body that breaks RFC 9112 §7.1 (carried inside the `io::Error` of the read, so the
/// request is answered 400 rather than dropped).
#[derive(Debug)]
pub struct FramingError(pub &'static str);

impl std::fmt::Display for FramingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed chunked body: {}", self.0)
    }
}

impl std::error::Error for FramingError {}

/// The message of a [`FramingError`] inside `e`, if there is one: in the `io::Error` of the
/// read, however deep Pingora wrapped it (its errors carry their cause as a boxed error).
pub fn framing_error(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut at = Some(e);
    // A few levels at most; bounded anyway.
    for _ in 0..8 {
        let cur = at?;
        if let Some(f) = cur.downcast_ref::<FramingError>() {
            return Some(f.0);
        }
        at = if let Some(io) = cur.downcast_ref::<io::Error>() {
            io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static))
        } else if let Some(pe) = cur
            .downcast_ref::<pingora::Error>()
            // Pingora often boxes a boxed error as a cause.
            .or_else(|| cur.downcast_ref::<Box<pingora::Error>>().map(|b| &**b))
        {
            pe.cause.as_deref().map(|c| c as &(dyn std::error::Error + 'static))
        } else {
            cur.source()
        };
    }
    None
}

/// Bytes the edge layer holds for the next request while this one is served (a pipelining
/// client's next requests); past this, it stops reading until this request is done.
const STASH_MAX: usize = 64 << 10;

#[derive(Debug)]
enum Phase {
    /// Head bytes left to hand over.
    Head(usize),
    /// Body bytes left (Content-Length).
    Length(u64),
    Chunked(ChunkedScan),
    /// The request is whole: later bytes are kept for the next one.
    Done,
    /// Upgraded: bytes pass as they come.
    Tunnel,
}

/// One request's bounds on the replayed stream (see the module docs).
#[derive(Debug)]
pub struct RequestBounds {
    phase: Phase,
    body: Body,
    upgrade: bool,
}

impl RequestBounds {
    pub fn new(head_len: usize, framing: Framing) -> Self {
        RequestBounds {
            phase: Phase::Head(head_len),
            body: framing.body,
            upgrade: framing.upgrade,
        }
    }

    /// The phase after the head.
    fn body_phase(&self) -> Phase {
        match self.body {
            Body::None | Body::Length(0) => Phase::Done,
            Body::Length(n) => Phase::Length(n),
            Body::Chunked => Phase::Chunked(ChunkedScan::default()),
        }
    }

    /// How many of `bytes` (the next ones of the stream) belong to this request: at most up to
    /// the end of the current phase, and at least one while the request is not whole.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, FramingError> {
        match &mut self.phase {
            Phase::Head(left) => {
                let n = (*left).min(bytes.len());
                *left -= n;
                if *left == 0 {
                    self.phase = self.body_phase();
                }
                Ok(n)
            }
            Phase::Length(left) => {
                let n = (*left).min(bytes.len() as u64);
                *left -= n;
                if *left == 0 {
                    self.phase = Phase::Done;
                }
                Ok(n as usize)
            }
            Phase::Chunked(scan) => {
                let n = scan.scan(bytes)?;
                if scan.done() {
                    self.phase = Phase::Done;
                }
                Ok(n)
            }
            Phase::Done => Ok(0),
            Phase::Tunnel => Ok(bytes.len()),
        }
    }

    /// The server writes `bytes`: a 101 answer to an upgrade request opens the tunnel. (Pingora
    /// writes a response head in one piece, status line first.)
    pub fn wrote(&mut self, bytes: &[u8]) {
        if self.upgrade && matches!(self.phase, Phase::Done) && bytes.starts_with(b"HTTP/1.1 101") {
            self.phase = Phase::Tunnel;
        }
    }

    /// A read by Pingora: `prefix` (bytes read ahead) first, then the socket — within bounds.
    pub fn poll_read(
        &mut self,
        inner: &mut Stream,
        prefix: &mut Vec<u8>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if matches!(self.phase, Phase::Done) {
            return poll_idle(inner, prefix, cx);
        }
        let invalid = |e: FramingError| io::Error::new(io::ErrorKind::InvalidData, e);
        if !prefix.is_empty() {
            let n = prefix.len().min(buf.remaining());
            let used = self.take(&prefix[..n]).map_err(invalid)?;
            buf.put_slice(&prefix[..used]);
            prefix.drain(..used);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let used = self.take(new).map_err(invalid)?;
        if used < new.len() {
            // Past the end of this request: kept for the next one.
            prefix.extend_from_slice(&new[used..]);
            buf.set_filled(before + used);
        }
        Poll::Ready(Ok(()))
    }
}

/// A read while the request is whole and its answer is on its way: Pingora reads only to notice
/// a client that went away. Bytes that arrive (the next pipelined request) are kept, not handed
/// over; a close is reported once nothing is kept.
fn poll_idle(inner: &mut Stream, prefix: &mut Vec<u8>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    loop {
        if prefix.len() >= STASH_MAX {
            return Poll::Pending;
        }
        // Straight into `prefix` (a zeroed 4 KiB scratch buffer here cost more than the rest of
        // the edge layer's work per request).
        if std::task::ready!(super::stream::poll_fill(inner, prefix, cx))? == 0 {
            // The client closed: say so only when no request of its is waiting.
            return if prefix.is_empty() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
    }
}

/// Where a chunked body stands (RFC 9112 §7.1):
///
/// ```text
/// chunked-body = *chunk last-chunk trailer-section CRLF
/// chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
/// chunk-ext    = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
/// trailer-section = *( field-line CRLF )
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size (`digits` so far).
    #[default]
    Size,
    /// Whitespace after the size: only a `;` may follow.
    SizeSpace,
    /// Inside chunk extensions (tokens, `=`, `;`, whitespace).
    Ext,
    /// Inside a quoted extension value.
    Quoted,
    /// After a backslash in a quoted value.
    QuotedPair,
    /// The CR of a size line was seen.
    SizeLf,
    /// Chunk data left.
    Data,
    /// The CRLF after chunk data.
    DataCr,
    DataLf,
    /// The start of a trailer line (or the final CRLF).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    /// The CR of the final empty line was seen.
    EndLf,
    Done,
}

/// A streaming, copy-free check of a chunked body (see [`State`]).
#[derive(Debug, Default, Clone)]
pub struct ChunkedScan {
    state: State,
    size: u64,
    /// Significant hex digits of the size so far.
    digits: u32,
    has_digit: bool,
    left: u64,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl ChunkedScan {
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Scan the next bytes of the body; returns how many belong to it (fewer than given only
    /// when the body ended).
    pub fn scan(&mut self, bytes: &[u8]) -> Result<usize, FramingError> {
        let mut i = 0;
        while i < bytes.len() {
            if self.state == State::Data {
                let n = self.left.min((bytes.len() - i) as u64);
                self.left -= n;
                i += n as usize;
                if self.left == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            if self.state == State::Done {
                return Ok(i);
            }
            self.step(bytes[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), FramingError> {
        use State::*;
        let bad = |why| Err(FramingError(why));
        self.state = match (self.state, b) {
            (Size, b) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                if self.size == 0 && digit == 0 {
                    // Leading zeros are allowed (`000` is a last chunk) and do not count.
                } else {
                    self.digits += 1;
                    if self.digits > 15 {
                        return bad("the chunk size is too large");
                    }
                }
                self.size = self.size << 4 | digit;
                self.has_digit = true;
                Size
            }
            (Size, _) if !self.has_digit => return bad("a chunk size must start with a hex digit"),
            (Size, b'\r') => SizeLf,
            (Size, b';') => Ext,
            (Size | SizeSpace, b' ' | b'\t') => SizeSpace,
            (SizeSpace, b';') => Ext,
            (Size | SizeSpace, _) => return bad("a chunk size line may only go on with ';' extensions"),
            (Ext, b'\r') => SizeLf,
            (Ext, b'"') => Quoted,
            (Ext, b) if is_tchar(b) || matches!(b, b';' | b'=' | b' ' | b'\t') => Ext,
            (Ext, _) => return bad("a chunk extension holds a byte that is not allowed"),
            (Quoted, b'"') => Ext,
            (Quoted, b'\\') => QuotedPair,
            (Quoted | QuotedPair, b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff) => Quoted,
            (Quoted | QuotedPair, _) => return bad("a quoted chunk extension holds a control byte"),
            (SizeLf, b'\n') => {
                let size = self.size;
                self.size = 0;
                self.digits = 0;
                self.has_digit = false;
                if size == 0 {
                    TrailerStart
                } else {
                    self.left = size;
                    Data
                }
            }
            (SizeLf, _) => return bad("a chunk size line must end with CRLF"),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size,
            (DataCr | DataLf, _) => return bad("chunk data must be followed by CRLF"),
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart | TrailerName, b) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerStart | TrailerName, _) => return bad("a trailer line must be 'name: value'"),
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff) => TrailerValue,
            (TrailerValue, _) => return bad("a trailer value holds a control byte"),
            (TrailerLf, b'\n') => TrailerStart,
            (TrailerLf, _) => return bad("a trailer line must end with CRLF"),
            (EndLf, b'\n') => Done,
            (EndLf, _) => return bad("a chunked body must end with CRLF"),
            (Data | Done, _) => unreachable!("handled by scan"),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many bytes of `body` the scan takes in one piece, and in every two-piece split.
    fn scanned(body: &[u8]) -> Result<usize, &'static str> {
        let mut whole = ChunkedScan::default();
        let n = whole.scan(body).map_err(|e| e.0)?;
        if !whole.done() {
            return Err("incomplete");
        }
        for cut in 0..body.len() {
            let mut s = ChunkedScan::default();
            let a = s.scan(&body[..cut]).unwrap();
            let b = if s.done() { 0 } else { s.scan(&body[cut..]).unwrap() };
            assert_eq!(a + b, n, "cut at {cut}");
            assert!(s.done());
        }
        Ok(n)
    }

    #[test]
    fn well_formed_bodies_end_where_they_end() {
        for body in [
            &b"5\r\nhello\r\n0\r\n\r\n"[..],
            b"5;name=value\r\nhello\r\n0\r\n\r\n",
            b"5 ;name\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"q;\\\"x\"\r\nhello\r\n0\r\n\r\n",
            b"A\r\n0123456789\r\n0\r\n\r\n",
            b"005\r\nhello\r\n000\r\n\r\n",
            b"5\r\nhello\r\n0\r\nx-trailer: 1\r\nx-b:\r\n\r\n",
            b"0\r\n\r\n",
        ] {
            assert_eq!(scanned(body), Ok(body.len()), "{}", String::from_utf8_lossy(body));
        }
        // A pipelined request after the body is not part of it.
        let mut s = ChunkedScan::default();
        let bytes = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(s.scan(bytes).unwrap(), 13);
        assert!(s.done());
    }

    #[test]
    fn lenient_forms_are_refused() {
        for (body, why) in [
            (
                &b"3;x\nGET /smug HTTP/1.1\r\nabc\r\n0\r\n\r\n"[..],
                "bare LF in an extension",
            ),
            (b"3;x\x01\r\nabc\r\n0\r\n\r\n", "a control byte in an extension"),
            (b"3;\"a\rb\"\r\nabc\r\n0\r\n\r\n", "CR inside a quoted extension"),
            (b"3 \r\nabc\r\n0\r\n\r\n", "a space after the size"),
            (b" 3\r\nabc\r\n0\r\n\r\n", "a space before the size"),
            (b"3\nabc\r\n0\r\n\r\n", "a size line ended by a bare LF"),
            (b"0x3\r\nabc\r\n0\r\n\r\n", "0x"),
            (b"-3\r\nabc\r\n0\r\n\r\n", "negative"),
            (b"\r\nabc\r\n0\r\n\r\n", "an empty size"),
            (b"10000000000000000\r\n", "overflow"),
            (b"3\r\nabcd\r\n0\r\n\r\n", "data longer than its size"),
            (b"3\r\nabc\n0\r\n\r\n", "bare LF after data"),
            (
                b"3\r\nabc\r\n0\r\nGET /smug HTTP/1.1\r\n\r\n",
                "a trailer line without a colon",
            ),
            (b"3\r\nabc\r\n0\r\nx : 1\r\n\r\n", "a space before a trailer's colon"),
            (b"3\r\nabc\r\n0\r\n x: 1\r\n\r\n", "a folded trailer line"),
            (b"3\r\nabc\r\n0\r\nx: 1\n\r\n", "a bare LF after a trailer"),
            (b"3\r\nabc\r\n0\r\nx: a\x00b\r\n\r\n", "NUL in a trailer"),
            (b"3\r\nabc\r\n0\n\n", "bare LFs at the end"),
        ] {
            let mut s = ChunkedScan::default();
            assert!(s.scan(body).is_err(), "{why}: {}", String::from_utf8_lossy(body));
        }
    }

    /// Found however Pingora wrapped the failed read (as it does: a boxed error as the cause
    /// of another), so the client gets a 400 rather than a bare close.
    #[test]
    fn a_framing_error_is_found_inside_pingora_errors() {
        use pingora::{Error, ErrorType::ReadError};
        let io = io::Error::new(io::ErrorKind::InvalidData, FramingError("bad"));
        let read = Error::because(ReadError, "when reading body", io);
        let outer = Error::because(ReadError, "Peer: x", read);
        assert_eq!(framing_error(&*outer), Some("bad"));
        let other = Error::because(ReadError, "x", io::Error::other("reset"));
        assert_eq!(framing_error(&*other), None);
    }

    #[test]
    fn bounds_hand_over_one_request_at_a_time() {
        let chunked = Framing {
            body: Body::Chunked,
            upgrade: false,
        };
        let mut b = RequestBounds::new(4, chunked);
        // The head only, then the body, then nothing of what follows.
        assert_eq!(b.take(b"HEAD3\r\n").unwrap(), 4);
        assert_eq!(b.take(b"3\r\nabc\r\n0\r\n\r\nNEXT").unwrap(), 13);
        assert!(matches!(b.phase, Phase::Done));
        let mut b = RequestBounds::new(
            2,
            Framing {
                body: Body::Length(3),
                upgrade: false,
            },
        );
        assert_eq!(b.take(b"HDabcNEXT").unwrap(), 2);
        assert_eq!(b.take(b"abcNEXT").unwrap(), 3);
        assert_eq!(b.take(b"NEXT").unwrap(), 0);
        // Only a 101 to an upgrade request opens a tunnel.
        let mut b = RequestBounds::new(
            2,
            Framing {
                body: Body::None,
                upgrade: true,
            },
        );
        assert_eq!(b.take(b"HD").unwrap(), 2);
        b.wrote(b"HTTP/1.1 200 OK\r\n");
        assert!(matches!(b.phase, Phase::Done));
        b.wrote(b"HTTP/1.1 101 Switching Protocols\r\n");
        assert_eq!(b.take(b"frames").unwrap(), 6);
        let mut b = RequestBounds::new(
            2,
            Framing {
                body: Body::None,
                upgrade: false,
            },
        );
        assert_eq!(b.take(b"HD").unwrap(), 2);
        b.wrote(b"HTTP/1.1 101 Switching Protocols\r\n");
        assert_eq!(b.take(b"frames").unwrap(), 0);
    }
}
