//! A byte budget shared by everything that holds rows in memory: requests being converted and
//! the memtables. A [`Reservation`] gives its bytes back when dropped, so a batch carries its
//! reservation into the memtable and releases it when it is flushed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes that may be held at once.
#[derive(Debug)]
pub struct Budget {
    cap: usize,
    used: AtomicUsize,
}

/// Bytes taken from a [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(cap: usize) -> Arc<Budget> {
        Arc::new(Budget {
            cap,
            used: AtomicUsize::new(0),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `bytes` if they fit under the cap.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.cap)
            })
            .ok()
            .map(|_| Reservation {
                budget: self.clone(),
                bytes,
            })
    }

    /// Takes `bytes` even past the cap: for rows that are already durable and must be held
    /// (WAL replay at start), never for new requests.
    pub fn force_reserve(self: &Arc<Self>, bytes: usize) -> Reservation {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Reservation {
            budget: self.clone(),
            bytes,
        }
    }
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Moves `bytes` of this reservation (at most all of it) into a new one.
    pub fn split_off(&mut self, bytes: usize) -> Reservation {
        let moved = bytes.min(self.bytes);
        self.bytes -= moved;
        Reservation {
            budget: self.budget.clone(),
            bytes: moved,
        }
    }

    /// Changes the reservation to `bytes`: shrinking always works, growing only under the cap.
    pub fn resize(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            self.budget
                .used
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
            return true;
        }
        match self.budget.try_reserve(bytes - self.bytes) {
            Some(mut extra) => {
                // The extra bytes now belong to this reservation.
                extra.bytes = 0;
                self.bytes = bytes;
                true
            }
            None => false,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_under_the_cap_and_give_back_on_drop() {
        let budget = Budget::new(100);
        let mut a = budget.try_reserve(60).expect("fits");
        assert!(budget.try_reserve(41).is_none(), "over the cap");
        let b = budget.try_reserve(40).expect("fits exactly");
        assert_eq!(budget.used(), 100);
        assert!(!a.resize(61), "cannot grow past the cap");
        drop(b);
        assert!(a.resize(90));
        assert_eq!(budget.used(), 90);
        assert!(a.resize(10));
        assert_eq!(budget.used(), 10);
        let forced = budget.force_reserve(500);
        assert_eq!(budget.used(), 510);
        assert!(budget.try_reserve(1).is_none());
        drop(forced);
        let b = a.split_off(4);
        assert_eq!((a.bytes(), b.bytes(), budget.used()), (6, 4, 10));
        drop(a);
        assert_eq!(budget.used(), 4);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
