//! The `user_data` of every operation: which operation it is and, for per-connection
//! operations, which connection.
//!
//! Layout: operation (8 bits) | low 24 bits of the connection's generation | slot (32 bits).
//! The generation bits are a second check only: a connection's slot is freed after its last
//! completion arrived, so no completion can outlive the connection it names. What users keep
//! (`Remote`) carries the full 64-bit [`ConnId`].

use super::slab::ConnId;

/// The kinds of operation a shard submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Op {
    /// The listener's multishot accept.
    Accept = 1,
    /// A connection's receive (multishot, or single-shot into its own buffer).
    Recv = 2,
    /// A connection's send.
    Send = 3,
    /// The cancellation of a connection's receive.
    Cancel = 4,
    /// The read of the shard's wake-up eventfd (commands from other threads).
    Wake = 5,
    /// The shard's sweep timer.
    Timer = 6,
}

impl Op {
    fn from_u8(byte: u8) -> Option<Op> {
        Some(match byte {
            1 => Op::Accept,
            2 => Op::Recv,
            3 => Op::Send,
            4 => Op::Cancel,
            5 => Op::Wake,
            6 => Op::Timer,
            _ => return None,
        })
    }
}

const GEN_BITS: u64 = 0x00FF_FFFF;

/// A packed `user_data` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token(u64);

impl Token {
    /// A shard-wide operation (no connection).
    pub fn shard(op: Op) -> Token {
        Token((op as u64) << 56)
    }

    /// An operation of connection `id`.
    pub fn conn(op: Op, id: ConnId) -> Token {
        Token(((op as u64) << 56) | ((id.gen & GEN_BITS) << 32) | u64::from(id.slot))
    }

    /// The token a completion carried back.
    pub fn from_raw(user_data: u64) -> Token {
        Token(user_data)
    }

    /// The value handed to the kernel.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// The operation, `None` for a value no shard submitted.
    pub fn op(self) -> Option<Op> {
        Op::from_u8((self.0 >> 56) as u8)
    }

    /// The connection's slot.
    pub fn slot(self) -> u32 {
        self.0 as u32
    }

    /// The low 24 bits of the connection's generation.
    pub fn gen_bits(self) -> u64 {
        (self.0 >> 32) & GEN_BITS
    }

    /// Whether this token names connection `id` (slot and generation bits).
    pub fn names(self, id: ConnId) -> bool {
        self.slot() == id.slot && self.gen_bits() == id.gen & GEN_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_operation_slot_and_generation_bits() {
        let id = ConnId {
            slot: 123_456,
            gen: 0x1234_5678_9ABC_DEF0,
        };
        let t = Token::conn(Op::Send, id);
        assert_eq!(t.op(), Some(Op::Send));
        assert_eq!(t.slot(), 123_456);
        assert_eq!(t.gen_bits(), 0xBC_DEF0);
        assert!(t.names(id));
        assert_eq!(Token::from_raw(t.raw()), t);
        let max = ConnId {
            slot: u32::MAX,
            gen: u64::MAX,
        };
        assert_eq!(Token::conn(Op::Recv, max).slot(), u32::MAX);
        assert_eq!(Token::conn(Op::Recv, max).op(), Some(Op::Recv));
        assert_eq!(Token::shard(Op::Timer).op(), Some(Op::Timer));
        assert_eq!(Token::from_raw(0).op(), None);
    }
}
