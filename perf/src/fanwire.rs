//! The fan-out scenarios' side of the wire: publications that carry their sequence number and
//! send stamp in the payload, and a streaming reader that checks every delivery to one
//! subscriber.
//!
//! A publication's payload is `seq` (u64 little-endian), `stamp` (u64 little-endian, ns on the
//! generator's monotonic clock when it was written), then filler that depends on `seq`, so a
//! payload mixed up between publications fails as surely as a flipped byte. Like `wire`, this
//! module never touches a socket.
//!
//! Per subscriber, deliveries must come in publication order with no duplicates: a sequence
//! number at or below the last one delivered fails the run. A gap (a sequence number above the
//! next expected) is not an error but is reported as skipped publications: a server may drop
//! publications to a subscriber over its backpressure limit, or a broadcast channel may lag;
//! the scenario counts them as lost.

use crate::wire::{self, HeadBuf, Rng, OP_BINARY, OP_CLOSE, OP_CONTINUATION};

/// Payload bytes taken by the sequence number and the send stamp.
pub const STAMP_LEN: usize = 16;

/// Distinct fillers: publication `seq` carries filler number `seq % FILLERS`.
const FILLERS: usize = 16;

/// Builds the publications of one run: `size`-byte payloads, masked into client frames.
#[derive(Debug)]
pub struct Publications {
    pattern: Vec<u8>,
    size: usize,
}

impl Publications {
    /// Publications of `size` payload bytes (at least [`STAMP_LEN`]).
    ///
    /// # Errors
    ///
    /// `size` is below [`STAMP_LEN`].
    pub fn new(size: usize, seed: u64) -> Result<Self, String> {
        if size < STAMP_LEN {
            return Err(format!(
                "fan-out payloads carry a {STAMP_LEN}-byte sequence number and stamp: --size \
                 must be at least {STAMP_LEN}"
            ));
        }
        let mut rng = Rng::new(seed);
        let mut pattern = vec![0u8; size - STAMP_LEN + FILLERS];
        for chunk in pattern.chunks_mut(8) {
            let r = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        Ok(Publications { pattern, size })
    }

    /// Payload bytes per publication.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The payload bytes of publication `seq` after its stamp.
    pub fn filler(&self, seq: u64) -> &[u8] {
        let k = (seq % FILLERS as u64) as usize;
        &self.pattern[k..k + self.size - STAMP_LEN]
    }

    /// Appends the masked binary frame of publication `seq`, stamped `stamp_ns`, to `out`.
    pub fn push_wire(&self, out: &mut Vec<u8>, seq: u64, stamp_ns: u64, rng: &mut Rng) {
        let mask = wire::mask_key(rng);
        wire::push_header(out, true, OP_BINARY, self.size, mask);
        let mut stamp = [0u8; STAMP_LEN];
        stamp[..8].copy_from_slice(&seq.to_le_bytes());
        stamp[8..].copy_from_slice(&stamp_ns.to_le_bytes());
        let payload = stamp.iter().chain(self.filler(seq));
        out.extend(payload.enumerate().map(|(i, b)| b ^ mask[i & 3]));
    }
}

/// One publication delivered whole and intact to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Its sequence number.
    pub seq: u64,
    /// When the generator wrote it (ns on the generator's clock).
    pub stamp_ns: u64,
    /// Publications between the previous delivery and this one that never arrived.
    pub skipped: u64,
}

/// Streaming reader of one connection's server frames in a fan-out scenario.
#[derive(Debug, Default)]
pub struct FanReader {
    head: HeadBuf,
    in_frame: bool,
    fin: bool,
    control: bool,
    remaining: u64,
    in_message: bool,
    offset: usize,
    stamp: [u8; STAMP_LEN],
    seq: u64,
    /// The sequence number expected next: one past the last delivery (0 before any).
    pub next: u64,
    /// Refuse every data frame: the publisher's connection gets none.
    pub no_data: bool,
}

impl FanReader {
    /// A reader for the publisher's connection, which must receive no data frames.
    pub fn publisher() -> Self {
        FanReader {
            no_data: true,
            ..FanReader::default()
        }
    }

    /// Consumes `data`; calls `done` for each publication delivered completely and intact.
    /// `published` is how many publications have been written so far (a delivery with a
    /// higher sequence number was never sent).
    ///
    /// # Errors
    ///
    /// A protocol violation, a duplicate or reordered delivery, a delivery of something never
    /// published, a payload that differs from the publication's, or (with `no_data`) any data.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        pubs: &Publications,
        published: u64,
        mut done: impl FnMut(Delivery),
    ) -> Result<(), String> {
        loop {
            if !self.in_frame {
                match self.head.take(data) {
                    Some(used) => data = &data[used..],
                    None => return Ok(()),
                }
                self.start_frame(pubs.size())?;
            }
            let take = self.remaining.min(data.len() as u64) as usize;
            let (chunk, rest) = data.split_at(take);
            data = rest;
            if !self.control {
                self.check(chunk, pubs, published)?;
            }
            self.remaining -= take as u64;
            if self.remaining > 0 {
                return Ok(());
            }
            self.in_frame = false;
            if !self.control && self.fin {
                if self.offset != pubs.size() {
                    return Err(format!(
                        "delivery ended after {} of {} bytes",
                        self.offset,
                        pubs.size()
                    ));
                }
                let stamp_ns = u64::from_le_bytes(self.stamp[8..].try_into().unwrap_or([0; 8]));
                let delivery = Delivery {
                    seq: self.seq,
                    stamp_ns,
                    skipped: self.seq - self.next,
                };
                self.next = self.seq + 1;
                self.in_message = false;
                self.offset = 0;
                done(delivery);
            }
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    /// Checks the next `chunk` of the current message's payload.
    fn check(
        &mut self,
        mut chunk: &[u8],
        pubs: &Publications,
        published: u64,
    ) -> Result<(), String> {
        if self.offset < STAMP_LEN {
            let n = (STAMP_LEN - self.offset).min(chunk.len());
            self.stamp[self.offset..self.offset + n].copy_from_slice(&chunk[..n]);
            self.offset += n;
            chunk = &chunk[n..];
            if self.offset == STAMP_LEN {
                let seq = u64::from_le_bytes(self.stamp[..8].try_into().unwrap_or([0; 8]));
                if seq < self.next {
                    return Err(format!(
                        "publication {seq} delivered after publication {}: duplicate or out of \
                         order",
                        self.next - 1
                    ));
                }
                if seq >= published {
                    return Err(format!(
                        "publication {seq} delivered, but only {published} were published"
                    ));
                }
                self.seq = seq;
            }
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let at = self.offset - STAMP_LEN;
        let expected = &pubs.filler(self.seq)[at..at + chunk.len()];
        if chunk != expected {
            let i = chunk
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "delivery of publication {} differs at byte {} of {}: got {:#04x}, published \
                 {:#04x}",
                self.seq,
                self.offset + i,
                pubs.size(),
                chunk[i],
                expected[i]
            ));
        }
        self.offset += chunk.len();
        Ok(())
    }

    /// Validates a complete header and sets up the frame's payload state.
    fn start_frame(&mut self, size: usize) -> Result<(), String> {
        let head = self.head.parse()?;
        self.fin = head.fin;
        self.remaining = head.len;
        self.in_frame = true;
        self.control = head.opcode >= 0x8;
        match head.opcode {
            OP_CLOSE => {
                return Err(format!(
                    "server sent a close frame ({} payload bytes) mid-run",
                    head.len
                ))
            }
            0x9 | 0xA => {
                // Control frames: unfragmented, <= 125 bytes (RFC 6455 §5.5); skipped.
                if !head.fin || head.len > 125 {
                    return Err(format!(
                        "invalid control frame: opcode {}, {} bytes",
                        head.opcode, head.len
                    ));
                }
                return Ok(());
            }
            _ if self.no_data => {
                return Err(format!(
                    "server sent a data frame (opcode {:#x}) to the publisher",
                    head.opcode
                ))
            }
            OP_BINARY if !self.in_message => self.in_message = true,
            OP_CONTINUATION if self.in_message => {}
            op => {
                return Err(format!(
                    "unexpected opcode {op:#x} (in a message: {}); publications are binary",
                    self.in_message
                ))
            }
        }
        if self.offset as u64 + head.len > size as u64 {
            return Err(format!(
                "delivery longer than published: frame of {} bytes at offset {} of {size}",
                head.len, self.offset
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::wire::server_frame as frame;

    /// What a server delivers for publication `seq`: the client's frame, unmasked.
    fn delivered(pubs: &Publications, seq: u64) -> Vec<u8> {
        let mut wire = Vec::new();
        pubs.push_wire(&mut wire, seq, 1000 + seq, &mut Rng::new(seq));
        let header = if pubs.size() < 126 { 2 } else { 4 };
        let mask: [u8; 4] = wire[header..header + 4].try_into().unwrap();
        let payload: Vec<u8> = wire[header + 4..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        assert_eq!(wire[1] & 0x80, 0x80, "client frames are masked");
        frame(true, OP_BINARY, &payload)
    }

    fn feed_all(
        reader: &mut FanReader,
        pubs: &Publications,
        wire: &[u8],
    ) -> Result<Vec<Delivery>, String> {
        let mut seen = Vec::new();
        reader.feed(wire, pubs, 100, |d| seen.push(d))?;
        Ok(seen)
    }

    #[test]
    fn in_order_deliveries_pass_split_at_every_byte() {
        let pubs = Publications::new(300, 1).unwrap();
        let mut wire = delivered(&pubs, 0);
        wire.extend(frame(true, 0x9, b"ping"));
        wire.extend(delivered(&pubs, 1));
        for split in 0..wire.len() {
            let mut reader = FanReader::default();
            let mut seen = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                reader.feed(part, &pubs, 2, |d| seen.push(d)).unwrap();
            }
            let expect = [0, 1].map(|seq| Delivery {
                seq,
                stamp_ns: 1000 + seq,
                skipped: 0,
            });
            assert_eq!(seen, expect, "split at {split}");
        }
    }

    #[test]
    fn a_gap_is_counted_as_skipped_not_failed() {
        let pubs = Publications::new(16, 2).unwrap();
        let wire = [
            delivered(&pubs, 0),
            delivered(&pubs, 3),
            delivered(&pubs, 4),
        ]
        .concat();
        let seen = feed_all(&mut FanReader::default(), &pubs, &wire).unwrap();
        let skipped: Vec<u64> = seen.iter().map(|d| d.skipped).collect();
        assert_eq!(skipped, [0, 2, 0]);
        // The first delivery of a subscriber that joined late counts what it missed.
        let seen = feed_all(&mut FanReader::default(), &pubs, &delivered(&pubs, 5)).unwrap();
        assert_eq!(seen[0].skipped, 5);
    }

    #[test]
    fn a_duplicate_or_reordered_delivery_fails() {
        let pubs = Publications::new(64, 3).unwrap();
        let duplicate = [
            delivered(&pubs, 0),
            delivered(&pubs, 1),
            delivered(&pubs, 1),
        ]
        .concat();
        let err = feed_all(&mut FanReader::default(), &pubs, &duplicate).unwrap_err();
        assert!(
            err.contains("publication 1 delivered after publication 1"),
            "{err}"
        );
        let reordered = [delivered(&pubs, 2), delivered(&pubs, 1)].concat();
        let err = feed_all(&mut FanReader::default(), &pubs, &reordered).unwrap_err();
        assert!(err.contains("duplicate or out of order"), "{err}");
    }

    #[test]
    fn a_corrupted_or_unpublished_delivery_fails() {
        let pubs = Publications::new(200, 4).unwrap();
        let mut corrupt = delivered(&pubs, 7);
        corrupt[4 + 150] ^= 1;
        let err = feed_all(&mut FanReader::default(), &pubs, &corrupt).unwrap_err();
        assert!(err.contains("differs at byte 150"), "{err}");
        // Publication 7's stamp with publication 8's filler: mixed up between publications.
        let mut mixed = delivered(&pubs, 8);
        mixed[4..4 + 16].copy_from_slice(&delivered(&pubs, 7)[4..4 + 16]);
        assert!(feed_all(&mut FanReader::default(), &pubs, &mixed).is_err());
        let err = feed_all(&mut FanReader::default(), &pubs, &delivered(&pubs, 100)).unwrap_err();
        assert!(err.contains("only 100 were published"), "{err}");
        let short = frame(true, OP_BINARY, &delivered(&pubs, 0)[4..4 + 199]);
        assert!(feed_all(&mut FanReader::default(), &pubs, &short).is_err());
        let text = frame(true, 0x1, b"0123456789abcdef");
        assert!(feed_all(&mut FanReader::default(), &pubs, &text).is_err());
    }

    #[test]
    fn the_publisher_accepts_control_frames_only() {
        let pubs = Publications::new(16, 5).unwrap();
        let mut reader = FanReader::publisher();
        assert!(feed_all(&mut reader, &pubs, &frame(true, 0x9, b""))
            .unwrap()
            .is_empty());
        let err = feed_all(&mut reader, &pubs, &delivered(&pubs, 0)).unwrap_err();
        assert!(err.contains("to the publisher"), "{err}");
    }

    #[test]
    fn sizes_below_the_stamp_are_refused() {
        assert!(Publications::new(15, 0).is_err());
        assert!(Publications::new(16, 0).is_ok());
    }
}
