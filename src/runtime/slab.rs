//! The connection slab: connections live in slots that are reused, each slot with a 64-bit
//! generation that moves on every reuse, so an identity ([`ConnId`]) kept after its
//! connection closed never reaches the next one in that slot.

use super::token::Token;

/// A connection's identity on its shard: the slot and the slot's generation when the
/// connection took it. Generations are 64-bit: at a billion reuses a second a slot would need
/// 584 years to come back to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConnId {
    /// Index into the slab.
    pub slot: u32,
    /// The slot's generation for this connection.
    pub gen: u64,
}

/// One slot: its current generation and, while taken, the connection.
struct Entry<T> {
    gen: u64,
    value: Option<T>,
}

/// Slots of `T` with generations and a free list (last freed, first reused).
pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
    /// How far a generation moves on reuse (1; larger only in tests, see `TestHooks`).
    stride: u64,
}

impl<T> Slab<T> {
    /// An empty slab whose generations move by `stride` on each reuse.
    pub fn new(stride: u64) -> Slab<T> {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            stride: stride.max(1),
        }
    }

    /// Takes a slot for the value `make` builds from its identity.
    pub fn insert_with(&mut self, make: impl FnOnce(ConnId) -> T) -> ConnId {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = u32::try_from(self.entries.len()).expect("fewer than 2^32 slots");
                self.entries.push(Entry {
                    gen: 0,
                    value: None,
                });
                slot
            }
        };
        let entry = &mut self.entries[slot as usize];
        let id = ConnId {
            slot,
            gen: entry.gen,
        };
        entry.value = Some(make(id));
        self.len += 1;
        id
    }

    /// The value with this exact identity.
    pub fn get(&mut self, id: ConnId) -> Option<&mut T> {
        self.entries
            .get_mut(id.slot as usize)
            .filter(|e| e.gen == id.gen)
            .and_then(|e| e.value.as_mut())
    }

    /// The value a completion's token names (slot and generation bits).
    pub fn by_token(&mut self, token: Token) -> Option<&mut T> {
        let slot = token.slot();
        self.entries
            .get_mut(slot as usize)
            .filter(|e| token.names(ConnId { slot, gen: e.gen }))
            .and_then(|e| e.value.as_mut())
    }

    /// The value in `slot`, whatever its generation: for slots taken from the shard's own
    /// lists within one batch, where the connection cannot have changed.
    pub fn at(&mut self, slot: u32) -> Option<&mut T> {
        self.entries
            .get_mut(slot as usize)
            .and_then(|e| e.value.as_mut())
    }

    /// Frees `slot`: its generation moves on, so every identity of the old value goes stale.
    pub fn remove(&mut self, slot: u32) -> Option<T> {
        let entry = self.entries.get_mut(slot as usize)?;
        let value = entry.value.take()?;
        entry.gen = entry.gen.wrapping_add(self.stride);
        self.free.push(slot);
        self.len -= 1;
        Some(value)
    }

    /// Taken slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// One past the highest slot ever taken: iterate `0..end()` with [`Slab::at`].
    pub fn end(&self) -> u32 {
        self.entries.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::token::Op;

    #[test]
    fn a_stale_identity_never_reaches_the_next_value_in_its_slot() {
        // A stride of 2^24 makes each reuse look like 2^24 of them: a 24-bit generation
        // would wrap to the same value here.
        let mut slab = Slab::new(1 << 24);
        let a = slab.insert_with(|_| "a");
        assert_eq!(slab.remove(a.slot), Some("a"));
        let b = slab.insert_with(|_| "b");
        assert_eq!(b.slot, a.slot, "last freed, first reused");
        assert_ne!(b.gen, a.gen);
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.get(b).copied(), Some("b"));
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn tokens_find_only_the_connection_they_were_made_for() {
        let mut slab = Slab::new(1);
        let a = slab.insert_with(|id| id);
        let token = Token::conn(Op::Recv, a);
        assert_eq!(slab.by_token(token).copied(), Some(a));
        slab.remove(a.slot);
        let b = slab.insert_with(|id| id);
        assert_eq!(
            slab.by_token(token),
            None,
            "completion of the freed connection"
        );
        assert_eq!(slab.by_token(Token::conn(Op::Recv, b)).copied(), Some(b));
        assert_eq!(slab.at(b.slot).copied(), Some(b));
        assert_eq!(slab.at(99), None);
    }
}
