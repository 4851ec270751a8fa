//! TLS on a shard's connections: rustls driven sans-IO through its unbuffered API, from the
//! shard's own completion loop. Ciphertext from a receive goes in ([`TlsConn::read`]) and
//! plaintext comes out, to the same per-connection path plain connections take; the
//! connection's corked plaintext output is encrypted once per batch ([`TlsConn::encrypt`]),
//! several frames to a record, into the ciphertext the connection's one send per batch
//! writes. No second event loop, no tokio.
//!
//! Records are deframed and decrypted in the buffer they arrived in when they arrived whole
//! (a record cut by the end of a receive waits in [`TlsConn`]'s own buffer for the rest). rustls
//! 0.23 hands each decrypted record out of a buffer of its own, which is copied once into the
//! connection's plaintext buffer (the WebSocket engine unmasks in place, so it needs its input
//! mutable).
//!
//! The provider is `ring`: it builds with a C compiler only (aws-lc-rs needs cmake and a
//! longer build), and both run AES-GCM and ChaCha20-Poly1305 in assembly.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};

use super::metrics::Metrics;

/// Per-record overhead to reserve when encrypting: header 5, content type 1, AEAD tag 16, and
/// a TLS 1.2 explicit nonce 8, rounded up.
const RECORD_OVERHEAD: usize = 64;
/// The largest plaintext fragment of one record.
const MAX_FRAGMENT: usize = 16 * 1024;

/// What [`TlsConn::read`] found besides plaintext.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReadOutcome {
    /// The peer sent `close_notify`: no more data will come (like a FIN).
    pub peer_closed: bool,
}

/// One connection's TLS state.
pub(crate) struct TlsConn {
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not processed yet (a record cut by the end of a receive).
    incoming: Vec<u8>,
    /// Ciphertext to send: handshake records, encrypted output, alerts.
    outgoing: Vec<u8>,
    /// Our `close_notify` was queued.
    notified: bool,
    /// The handshake is done: application data may be encrypted.
    established: bool,
    /// Decrypted bytes on their way to the connection (kept for its capacity).
    plain: Vec<u8>,
}

impl TlsConn {
    /// A server-side TLS connection.
    ///
    /// # Errors
    /// rustls refused the configuration.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Result<TlsConn, rustls::Error> {
        Ok(TlsConn {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            notified: false,
            established: false,
            plain: Vec::new(),
        })
    }

    /// Processes received ciphertext: decrypted application data is appended to `plain`,
    /// handshake records to the output. Ciphertext that ends inside a record is kept for the
    /// next call.
    ///
    /// # Errors
    /// A TLS error (a bad record, an alert from the peer, a failed handshake): the connection
    /// must end. An alert for the peer may be in the output; send it first.
    pub fn read(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Result<ReadOutcome, rustls::Error> {
        let mut outcome = ReadOutcome::default();
        let mut data = data;
        if !self.incoming.is_empty() {
            if !self.established {
                // Handshake messages may span records, and rustls joins them in the buffer:
                // everything goes behind what is held.
                return self.read_held(data, plain);
            }
            // Complete the record held back with just as much of `data` as it lacks; the
            // rest is processed where it arrived. (A receive ends inside a record whenever a
            // peer writes full 16 KiB records: a receive buffer is not a multiple of a
            // record's size on the wire.)
            loop {
                let missing = record_missing(&self.incoming);
                if missing == 0 || data.is_empty() {
                    break;
                }
                let take = missing.min(data.len());
                self.incoming.extend_from_slice(&data[..take]);
                data = &mut data[take..];
            }
            if record_missing(&self.incoming) > 0 {
                return Ok(outcome);
            }
            let held = self.read_held(&[], plain)?;
            outcome.peer_closed |= held.peer_closed;
            if !self.incoming.is_empty() {
                // rustls kept some of it: the rest of `data` goes behind.
                let more = self.read_held(data, plain)?;
                outcome.peer_closed |= more.peer_closed;
                return Ok(outcome);
            }
        }
        // The common case: records arrive whole and are processed where they are.
        let used = self.process(data, plain);
        let more = self.finish_processing(&used)?;
        outcome.peer_closed |= more.peer_closed;
        if let Ok((consumed, _)) = used {
            self.incoming.extend_from_slice(&data[consumed..]);
        }
        Ok(outcome)
    }

    /// Appends `data` to the held ciphertext and processes it all there.
    fn read_held(
        &mut self,
        data: &[u8],
        plain: &mut Vec<u8>,
    ) -> Result<ReadOutcome, rustls::Error> {
        self.incoming.extend_from_slice(data);
        let mut incoming = std::mem::take(&mut self.incoming);
        let used = self.process(&mut incoming, plain);
        let outcome = self.finish_processing(&used);
        if let Ok((consumed, _)) = used {
            incoming.drain(..consumed);
        }
        self.incoming = incoming;
        outcome
    }

    fn finish_processing(
        &mut self,
        used: &Result<(usize, ReadOutcome), rustls::Error>,
    ) -> Result<ReadOutcome, rustls::Error> {
        match used {
            Ok((_, outcome)) => Ok(*outcome),
            Err(e) => {
                self.drain_alerts();
                Err(e.clone())
            }
        }
    }

    /// Runs the state machine over `buf` until it needs more input; returns how many bytes of
    /// `buf` were consumed.
    fn process(
        &mut self,
        buf: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Result<(usize, ReadOutcome), rustls::Error> {
        let mut consumed = 0;
        let mut outcome = ReadOutcome::default();
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut buf[consumed..]);
            let mut again = true;
            match state? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        plain.extend_from_slice(record.payload);
                        consumed += record.discard;
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.outgoing, |out| encode.encode(out))?;
                }
                // The output is sent in order with everything after it: as good as sent.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::BlockedHandshake => again = false,
                ConnectionState::WriteTraffic(_) => {
                    self.established = true;
                    again = false;
                }
                ConnectionState::PeerClosed => outcome.peer_closed = true,
                ConnectionState::Closed => again = false,
                // Early data is not enabled (`max_early_data_size` is 0 unless the
                // application's own config sets it): treated as the peer's data.
                ConnectionState::ReadEarlyData(mut early) => {
                    while let Some(record) = early.next_record() {
                        let record = record?;
                        plain.extend_from_slice(record.payload);
                        consumed += record.discard;
                    }
                }
                _ => again = false,
            }
            consumed += discard;
            if !again {
                return Ok((consumed, outcome));
            }
        }
    }

    /// After an error rustls may have an alert for the peer queued: move it to the output.
    fn drain_alerts(&mut self) {
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if encode_into(&mut self.outgoing, |out| encode.encode(out)).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => return,
            }
        }
    }

    /// Encrypts `plain` (the connection's corked output, cleared here) into the output,
    /// several frames to a record. Before the handshake is done nothing happens and `plain`
    /// waits.
    ///
    /// # Errors
    /// The keys are exhausted (rustls refuses to encrypt more): the connection must end.
    pub fn encrypt(&mut self, plain: &mut Vec<u8>) -> Result<(), rustls::Error> {
        if plain.is_empty() || !self.established {
            return Ok(());
        }
        // Records rustls queued itself (a key update) go first, then the data.
        for _ in 0..8 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    let reserve = plain.len() + (plain.len() / MAX_FRAGMENT + 1) * RECORD_OVERHEAD;
                    encrypt_into(&mut self.outgoing, reserve, |out| {
                        traffic.encrypt(plain, out)
                    })?;
                    plain.clear();
                    return Ok(());
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.outgoing, |out| encode.encode(out))?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                // Closed both ways: nothing can be sent any more.
                _ => {
                    plain.clear();
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Queues our `close_notify` (once; only after the handshake).
    pub fn close_notify(&mut self) {
        if self.notified || !self.established {
            return;
        }
        self.notified = true;
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = state {
            let _ = encrypt_into(&mut self.outgoing, RECORD_OVERHEAD, |out| {
                traffic.queue_close_notify(out)
            });
        }
    }

    /// The plaintext buffer, to fill with [`TlsConn::read`] and give back with
    /// [`TlsConn::put_plain`].
    pub fn take_plain(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.plain)
    }

    /// Gives the plaintext buffer back (emptied) for its capacity.
    pub fn put_plain(&mut self, mut plain: Vec<u8>) {
        plain.clear();
        self.plain = plain;
    }

    /// Whether our `close_notify` was queued.
    pub fn notified(&self) -> bool {
        self.notified
    }

    /// Whether the handshake is done.
    pub fn established(&self) -> bool {
        self.established
    }

    /// Whether ciphertext waits to be sent.
    pub fn has_output(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// The ciphertext to send (the caller takes it whole, leaving the vector empty).
    pub fn outgoing(&mut self) -> &mut Vec<u8> {
        &mut self.outgoing
    }

    /// Gives back buffers grown past `keep` bytes while quiet.
    pub fn shrink(&mut self, keep: usize) {
        if self.plain.capacity() > keep {
            self.plain = Vec::new();
        }
        if self.incoming.is_empty() && self.incoming.capacity() > keep {
            self.incoming = Vec::new();
        }
        if self.outgoing.is_empty() && self.outgoing.capacity() > keep {
            self.outgoing = Vec::new();
        }
    }
}

/// A connection's TLS failed: one debug line, counted.
pub(crate) fn tls_failed(
    metrics: &mut Metrics,
    shard: usize,
    peer: SocketAddr,
    error: &rustls::Error,
) {
    tracing::debug!(shard, %peer, %error, "TLS failed");
    metrics.tls_failures += 1;
}

/// How many bytes the first TLS record in `buf` still lacks (its 5-byte header first).
fn record_missing(buf: &[u8]) -> usize {
    match buf {
        [_, _, _, hi, lo, ..] => {
            (5 + usize::from(u16::from_be_bytes([*hi, *lo]))).saturating_sub(buf.len())
        }
        _ => 5 - buf.len(),
    }
}

/// Appends what `encode` writes, growing the buffer to the size rustls asks for.
fn encode_into(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut room = 4096;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(e)) if e.required_size > room => {
                room = e.required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(rustls::Error::General(e.to_string()));
            }
        }
    }
}

/// Appends what `encrypt` writes, starting with `reserve` bytes of room.
fn encrypt_into(
    out: &mut Vec<u8>,
    reserve: usize,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut room = reserve;
    loop {
        out.resize(start + room, 0);
        match encrypt(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(e)) if e.required_size > room => {
                room = e.required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(rustls::Error::General(e.to_string()));
            }
        }
    }
}
