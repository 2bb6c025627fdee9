use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use uuid::Uuid;

/// Requests in flight per API key.
///
/// A count per key rather than a semaphore per key: callers never wait for a slot (they are
/// refused at once), so a counter is all a semaphore would do here, and an entry is removed
/// when its count drops to zero. The map therefore holds only keys with requests running,
/// at most one entry per in-flight request, however many keys come and go.
#[derive(Debug)]
pub(crate) struct InFlight {
    limit: u32,
    running: Mutex<HashMap<Uuid, u32>>,
}

impl InFlight {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Requests one key may have running at once.
    pub(crate) fn limit(&self) -> u32 {
        self.limit
    }

    fn running(&self) -> MutexGuard<'_, HashMap<Uuid, u32>> {
        // Nothing panics while holding the lock but a full allocator; the counts stay usable.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for one more request of `key`, or `None` if `limit` are already running.
    pub(crate) fn try_acquire(self: &Arc<Self>, key: Uuid) -> Option<Slot> {
        let mut running = self.running();
        let count = running.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            in_flight: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn tracked_keys(&self) -> usize {
        self.running().len()
    }
}

/// One running request; frees its slot when dropped (when the response body is finished or
/// abandoned).
#[derive(Debug)]
pub(crate) struct Slot {
    in_flight: Arc<InFlight>,
    key: Uuid,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self.in_flight.running();
        if let Entry::Occupied(mut entry) = running.entry(self.key) {
            let count = entry.get_mut();
            *count = count.saturating_sub(1);
            if *count == 0 {
                entry.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_key_and_freed_on_drop() {
        let in_flight = Arc::new(InFlight::new(2));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = in_flight.try_acquire(a).expect("first slot of a");
        let second = in_flight.try_acquire(a).expect("second slot of a");
        assert!(in_flight.try_acquire(a).is_none(), "a is at its limit");
        let other = in_flight.try_acquire(b).expect("b has its own slots");
        drop(first);
        let third = in_flight.try_acquire(a).expect("a freed one");
        assert_eq!(in_flight.tracked_keys(), 2);
        drop((second, third, other));
        assert_eq!(in_flight.tracked_keys(), 0, "idle keys are forgotten");
    }
}
