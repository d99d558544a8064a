//! Deadlines for HTTP/2 connections, kept by watching the frames that cross the socket.
//!
//! Pingora hands an HTTP/2 connection to the `h2` crate, which has no notion of a slow client:
//! a HEADERS frame without END_HEADERS, or a request body that stops arriving, holds a stream
//! (and its upstream connection) for as long as the client likes. Rather than patch either
//! crate, [`H2Watch`] reads the frame headers of both directions as the bytes go by and keeps
//! the contract's limits:
//!
//! - the connection preface and the first frame, every header block (HEADERS + CONTINUATION)
//!   and every other non-DATA frame must arrive whole within `header_timeout` of its first
//!   byte, else the connection is closed;
//! - a request body (DATA frames of a stream the client has not ended, and whose answer the
//!   server has not started) that makes no progress for `body_timeout` is reset: Portico feeds the
//!   `h2` server a RST_STREAM for that stream as if the client had sent it, so the request is
//!   abandoned and its upstream connection released. If the client stalled in the middle of a
//!   frame, no frame can be fed in: the connection is closed instead.
//!
//! Idle connections (no open stream) are closed by Pingora's own `h2_idle_timeout`.

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

const FRAME_HEADER: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// The error code of the RST_STREAM fed to the h2 server when a body stalls: one no client
/// sends (RFC 9113 §7: unknown codes carry no special meaning), so the request's failure reads
/// as the body timeout it is rather than as a client reset ([`body_timed_out`]).
const BODY_TIMEOUT_RESET: u32 = 0x504f_0408;
/// Streams whose body is timed at once; more are not tracked (h2 refuses streams past its own
/// concurrency limit long before this).
const MAX_TRACKED: usize = 1024;
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Where a byte stream of frames stands.
#[derive(Debug, Default)]
struct FrameScan {
    /// Preface bytes still to come (client side only).
    preface_left: usize,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    payload_left: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// A frame whose header or payload completed.
enum Event {
    /// The 9-byte header of a frame arrived.
    Header { kind: u8, flags: u8 },
    /// A frame arrived whole.
    Done { kind: u8, flags: u8, stream: u32 },
    /// Payload bytes of a DATA frame arrived.
    Data { stream: u32 },
}

impl FrameScan {
    /// At a frame boundary (after the preface): nothing of a frame is half-read.
    fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.header_len == 0 && self.payload_left == 0
    }

    fn scan(&mut self, mut bytes: &[u8], mut on: impl FnMut(Event)) {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.payload_left == 0 && self.header_len < FRAME_HEADER {
                let n = (FRAME_HEADER - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len < FRAME_HEADER {
                    return;
                }
                let h = &self.header;
                self.payload_left = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
                self.kind = h[3];
                self.flags = h[4];
                self.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                on(Event::Header {
                    kind: self.kind,
                    flags: self.flags,
                });
                if self.payload_left == 0 {
                    self.header_len = 0;
                    on(self.done());
                }
                continue;
            }
            let n = self.payload_left.min(bytes.len());
            self.payload_left -= n;
            bytes = &bytes[n..];
            if self.kind == DATA && n > 0 {
                on(Event::Data { stream: self.stream });
            }
            if self.payload_left == 0 {
                self.header_len = 0;
                on(self.done());
            }
        }
    }

    fn done(&self) -> Event {
        Event::Done {
            kind: self.kind,
            flags: self.flags,
            stream: self.stream,
        }
    }

    /// Bytes of a frame (or the preface) have arrived, but not all of it.
    fn mid_frame(&self) -> bool {
        !self.at_boundary()
    }
}

/// The HTTP/2 deadlines of one connection (see the module docs).
#[derive(Debug)]
pub struct H2Watch {
    header_timeout: Duration,
    body_timeout: Duration,
    inbound: FrameScan,
    outbound: FrameScan,
    /// The current non-DATA frame, header block or preface must be whole by then.
    head_deadline: Option<Instant>,
    /// A HEADERS frame asked to end its stream; applied when its header block ends.
    block_ends_stream: bool,
    /// Streams whose request body is still coming, with the time of its last progress.
    bodies: HashMap<u32, Instant>,
}

/// What the connection must do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is late; wake up at this instant to check again (if any deadline is set).
    Wait(Option<Instant>),
    /// Feed this RST_STREAM frame to the h2 server (a request body stalled).
    Reset(u32),
    /// Close the connection: a header block or frame is late, or a body stalled mid-frame.
    Close(Late),
}

/// What was late, for the metric and the log.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Late {
    Head,
    Body,
}

impl Late {
    /// The `reason` label of `portico_rejected_connections_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Late::Head => "header_timeout",
            Late::Body => "body_timeout",
        }
    }
}

impl H2Watch {
    /// A watch for a connection whose preface has not been read yet.
    pub fn new(header_timeout: Duration, body_timeout: Duration, now: Instant) -> Self {
        H2Watch {
            header_timeout,
            body_timeout,
            inbound: FrameScan {
                preface_left: PREFACE.len(),
                ..Default::default()
            },
            outbound: FrameScan::default(),
            // The preface and the first frame (the client's SETTINGS) are the connection's head.
            head_deadline: Some(now + header_timeout),
            block_ends_stream: false,
            bodies: HashMap::new(),
        }
    }

    /// Bytes the client sent (after any bytes fed in by [`H2Watch::rst_frame`]).
    pub fn client_bytes(&mut self, bytes: &[u8], now: Instant) {
        let limit = now + self.header_timeout;
        let (deadline, ends, bodies) = (&mut self.head_deadline, &mut self.block_ends_stream, &mut self.bodies);
        self.inbound.scan(bytes, |e| match e {
            Event::Header { kind, flags, .. } => {
                if kind == DATA {
                    // Bodies are timed per stream, by their progress.
                    *deadline = None;
                } else {
                    if kind == HEADERS {
                        *ends = flags & END_STREAM != 0;
                    }
                    // Any other frame, or a whole header block, must come promptly; a
                    // CONTINUATION keeps the clock its HEADERS started.
                    deadline.get_or_insert(limit);
                }
            }
            Event::Data { stream } => {
                if let Some(t) = bodies.get_mut(&stream) {
                    *t = now;
                }
            }
            Event::Done { kind, flags, stream } => {
                match kind {
                    HEADERS | CONTINUATION if flags & END_HEADERS == 0 => return,
                    HEADERS | CONTINUATION => {
                        if *ends {
                            bodies.remove(&stream);
                        } else if !bodies.contains_key(&stream) && bodies.len() < MAX_TRACKED {
                            bodies.insert(stream, now);
                        }
                    }
                    DATA if flags & END_STREAM != 0 => {
                        bodies.remove(&stream);
                    }
                    RST_STREAM => {
                        bodies.remove(&stream);
                    }
                    _ => {}
                }
                // A frame (or header block) is whole; the next one starts its own clock.
                *deadline = None;
            }
        });
        if self.inbound.header_len > 0 && self.inbound.payload_left == 0 {
            // A frame header is partly here: it must not trickle either.
            self.head_deadline.get_or_insert(limit);
        }
    }

    /// Bytes the server wrote: a stream whose answer started (or ended) no longer times its
    /// request body. From its response head on, a stream is an exchange both ways (a gRPC
    /// stream, a long upload answered as it goes): its idle limit is the upstream's read
    /// timeout (the route's own, when it sets one), which Pingora keeps on the other side.
    pub fn server_bytes(&mut self, bytes: &[u8]) {
        let bodies = &mut self.bodies;
        self.outbound.scan(bytes, |e| {
            if let Event::Done { kind, flags, stream } = e {
                let answered = match kind {
                    HEADERS | RST_STREAM => true,
                    DATA => flags & END_STREAM != 0,
                    _ => false,
                };
                if answered {
                    bodies.remove(&stream);
                }
            }
        });
    }

    /// Check the deadlines at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        if let Some(d) = self.head_deadline {
            if now >= d {
                return Verdict::Close(Late::Head);
            }
        }
        let stalled = self
            .bodies
            .iter()
            .filter(|(_, t)| now >= **t + self.body_timeout)
            .map(|(s, _)| *s)
            .min();
        if let Some(stream) = stalled {
            if self.inbound.mid_frame() {
                return Verdict::Close(Late::Body);
            }
            self.bodies.remove(&stream);
            return Verdict::Reset(stream);
        }
        let next_body = self.bodies.values().map(|t| *t + self.body_timeout).min();
        Verdict::Wait(match (self.head_deadline, next_body) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// The RST_STREAM frame that abandons `stream`, to feed to the h2 server. Only fed
    /// at a frame boundary (see [`H2Watch::check`]); it leaves the scan at a boundary.
    pub fn rst_frame(stream: u32) -> [u8; 13] {
        let mut f = [0u8; 13];
        f[2] = 4; // payload length
        f[3] = RST_STREAM;
        f[5..9].copy_from_slice(&stream.to_be_bytes());
        f[9..13].copy_from_slice(&BODY_TIMEOUT_RESET.to_be_bytes());
        f
    }
}

/// Whether a request failed because the frame watch reset its stalled body (Pingora reports
/// the reset as a read error, with the h2 error as its cause).
pub fn body_timed_out(e: &pingora::Error) -> bool {
    e.root_cause()
        .downcast_ref::<h2::Error>()
        .and_then(h2::Error::reason)
        .is_some_and(|r| u32::from(r) == BODY_TIMEOUT_RESET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[])
    }

    const S: Duration = Duration::from_secs(1);

    fn opened(t0: Instant) -> H2Watch {
        let mut w = H2Watch::new(2 * S, 5 * S, t0);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(settings());
        w.client_bytes(&bytes, t0);
        assert_eq!(w.check(t0), Verdict::Wait(None), "the connection head is done");
        w
    }

    #[test]
    fn the_preface_and_first_frame_have_a_deadline() {
        let t0 = Instant::now();
        let mut w = H2Watch::new(2 * S, 5 * S, t0);
        w.client_bytes(&PREFACE[..10], t0);
        assert_eq!(w.check(t0 + S), Verdict::Wait(Some(t0 + 2 * S)));
        assert!(matches!(w.check(t0 + 2 * S), Verdict::Close(Late::Head)));
    }

    #[test]
    fn an_unfinished_header_block_closes_the_connection() {
        let t0 = Instant::now();
        let mut w = opened(t0);
        let t1 = t0 + S;
        w.client_bytes(&frame(HEADERS, 0, 1, b"abc"), t1);
        assert_eq!(w.check(t1 + S), Verdict::Wait(Some(t1 + 2 * S)));
        // CONTINUATION without END_HEADERS keeps the original clock.
        w.client_bytes(&frame(CONTINUATION, 0, 1, b"d"), t1 + S);
        assert!(matches!(w.check(t1 + 2 * S), Verdict::Close(Late::Head)));
    }

    #[test]
    fn a_trickled_frame_header_is_timed_too() {
        let t0 = Instant::now();
        let mut w = opened(t0);
        let f = frame(0x6, 0, 0, &[0; 8]); // PING
        w.client_bytes(&f[..3], t0 + S);
        assert!(matches!(w.check(t0 + 3 * S), Verdict::Close(Late::Head)));
    }

    #[test]
    fn a_complete_header_block_clears_the_deadline_and_times_the_body() {
        let t0 = Instant::now();
        let mut w = opened(t0);
        w.client_bytes(&frame(HEADERS, END_HEADERS, 1, b"abc"), t0);
        assert_eq!(w.check(t0), Verdict::Wait(Some(t0 + 5 * S)));
        // Body progress moves the clock.
        w.client_bytes(&frame(DATA, 0, 1, b"hello"), t0 + 3 * S);
        assert_eq!(w.check(t0 + 6 * S), Verdict::Wait(Some(t0 + 8 * S)));
        assert_eq!(w.check(t0 + 8 * S), Verdict::Reset(1));
        assert_eq!(w.check(t0 + 9 * S), Verdict::Wait(None), "reset once");
    }

    #[test]
    fn ended_streams_are_not_timed() {
        let t0 = Instant::now();
        let mut w = opened(t0);
        // A GET: END_STREAM on HEADERS.
        w.client_bytes(&frame(HEADERS, END_HEADERS | END_STREAM, 1, b"a"), t0);
        // A POST ended by an empty DATA frame.
        w.client_bytes(&frame(HEADERS, END_HEADERS, 3, b"a"), t0);
        w.client_bytes(&frame(DATA, END_STREAM, 3, b""), t0);
        // A POST whose answer the server ended early (a 413).
        w.client_bytes(&frame(HEADERS, END_HEADERS, 5, b"a"), t0);
        w.server_bytes(&frame(HEADERS, END_HEADERS | END_STREAM, 5, b"x"));
        // A POST the client reset.
        w.client_bytes(&frame(HEADERS, END_HEADERS, 7, b"a"), t0);
        w.client_bytes(&frame(RST_STREAM, 0, 7, &[0, 0, 0, 8]), t0);
        assert_eq!(w.check(t0 + 60 * S), Verdict::Wait(None));
    }

    #[test]
    fn a_stream_whose_answer_started_is_not_timed() {
        let t0 = Instant::now();
        let mut w = opened(t0);
        // A gRPC bidirectional stream: the client keeps its side open, the server has answered
        // its head; both idle. The upstream's read timeout bounds it, not body_timeout.
        w.client_bytes(&frame(HEADERS, END_HEADERS, 1, b"a"), t0);
        w.client_bytes(&frame(DATA, 0, 1, b"msg"), t0);
        w.server_bytes(&frame(HEADERS, END_HEADERS, 1, b"x"));
        // Another stream, not answered yet, is still timed.
        w.client_bytes(&frame(HEADERS, END_HEADERS, 3, b"a"), t0);
        assert_eq!(w.check(t0 + 5 * S), Verdict::Reset(3));
        assert_eq!(w.check(t0 + 60 * S), Verdict::Wait(None));
    }

    #[test]
    fn a_body_stalled_mid_frame_closes_the_connection() {
        let t0 = Instant::now();
        let mut w = opened(t0);
        w.client_bytes(&frame(HEADERS, END_HEADERS, 1, b"abc"), t0);
        let data = frame(DATA, 0, 1, b"hello");
        w.client_bytes(&data[..11], t0);
        assert_eq!(w.check(t0 + 5 * S), Verdict::Close(Late::Body));
    }

    #[test]
    fn frames_split_at_any_byte_scan_the_same() {
        let t0 = Instant::now();
        let mut all = PREFACE.to_vec();
        all.extend(settings());
        all.extend(frame(HEADERS, END_HEADERS, 1, b"abc"));
        all.extend(frame(DATA, END_STREAM, 1, b"hello"));
        for cut in 0..all.len() {
            let mut w = H2Watch::new(2 * S, 5 * S, t0);
            w.client_bytes(&all[..cut], t0);
            w.client_bytes(&all[cut..], t0);
            assert_eq!(w.check(t0 + 60 * S), Verdict::Wait(None), "cut at {cut}");
        }
    }

    #[test]
    fn the_rst_frame_is_well_formed() {
        let f = H2Watch::rst_frame(5);
        let mut scan = FrameScan::default();
        let mut seen = None;
        scan.scan(&f, |e| {
            if let Event::Done { kind, stream, .. } = e {
                seen = Some((kind, stream));
            }
        });
        assert_eq!(seen, Some((RST_STREAM, 5)));
        assert!(scan.at_boundary());
    }
}
