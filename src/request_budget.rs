//! One byte budget for the request bodies the gateway holds whole before it can check them (HTTP
//! ingest and batch bodies, gRPC `EventGateway` request messages): a body reserves its bytes when
//! it starts to be buffered and gives them back when it is dropped, so the bytes held for bodies
//! never exceed the budget, however many requests arrive or stall. A body that does not fit is
//! refused at once (429 / RESOURCE_EXHAUSTED), before its bytes are read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// The default budget (`--request-body-memory`): 64 MiB.
pub const DEFAULT_REQUEST_BODY_MEMORY: usize = 64 << 20;

/// Bytes all request bodies being received or handled may hold together. Cloning shares the
/// budget.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: usize,
    held: AtomicUsize,
    /// Bytes held, as exported (`iqgw_request_body_bytes`).
    gauge: Gauge,
    /// Bodies refused because the budget was spent.
    refused: Counter,
}

/// A body that did not fit in the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the gateway already holds its --request-body-memory ({limit} bytes) of request bodies being \
     received; retry shortly"
)]
pub struct Exhausted {
    /// The budget, in bytes.
    pub limit: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes whose bytes held are shown in `gauge` and whose refusals are
    /// counted in `refused`.
    pub fn new(limit: usize, gauge: Gauge, refused: Counter) -> Self {
        Self {
            inner: Arc::new(Inner {
                limit,
                held: AtomicUsize::new(0),
                gauge,
                refused,
            }),
        }
    }

    /// A budget of `limit` bytes that no metric shows (tests, embedders).
    pub fn unmetered(limit: usize) -> Self {
        Self::new(limit, Gauge::default(), Counter::default())
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::Relaxed)
    }

    /// An empty reservation, to grow as the body's size becomes known.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            inner: self.inner.clone(),
            bytes: AtomicUsize::new(0),
        }
    }
}

/// The bytes one body holds in the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    inner: Arc<Inner>,
    bytes: AtomicUsize,
}

impl Reservation {
    /// Takes `more` bytes from the budget for this body, or refuses (taking nothing) when the
    /// budget cannot hold them besides what every body holds already.
    pub fn grow(&self, more: usize) -> Result<(), Exhausted> {
        if more == 0 {
            return Ok(());
        }
        let inner = &*self.inner;
        let taken = inner
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more).filter(|&total| total <= inner.limit)
            });
        if taken.is_err() {
            inner.refused.inc();
            return Err(Exhausted { limit: inner.limit });
        }
        self.bytes.fetch_add(more, Ordering::AcqRel);
        inner.gauge.inc_by(i64::try_from(more).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Bytes this body holds.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let bytes = *self.bytes.get_mut();
        if bytes > 0 {
            self.inner.held.fetch_sub(bytes, Ordering::AcqRel);
            self.inner
                .gauge
                .dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_hold_more_than_the_budget_and_give_it_back_when_dropped() {
        let gauge = Gauge::default();
        let budget = BodyBudget::new(100, gauge.clone(), Counter::default());
        let a = budget.reservation();
        a.grow(60).expect("fits");
        let b = budget.reservation();
        assert_eq!(b.grow(41), Err(Exhausted { limit: 100 }));
        assert_eq!(b.bytes(), 0, "a refusal takes nothing");
        b.grow(40).expect("fits exactly");
        assert_eq!((budget.held(), gauge.get()), (100, 100));
        assert!(b.grow(1).is_err());
        drop(a);
        assert_eq!((budget.held(), gauge.get()), (40, 40));
        b.grow(60)
            .expect("fits again once the other body is dropped");
        drop(b);
        assert_eq!((budget.held(), gauge.get()), (0, 0));
    }

    #[test]
    fn concurrent_growth_never_exceeds_the_budget() {
        let budget = BodyBudget::unmetered(1000);
        let threads: Vec<_> = (0..8)
            .map(|seed: u64| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    let mut state = seed * 2654435761 + 1;
                    let mut held = Vec::new();
                    for _ in 0..10_000 {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let reservation = budget.reservation();
                        if reservation.grow((state % 300) as usize).is_ok() {
                            held.push(reservation);
                        }
                        assert!(budget.held() <= 1000);
                        if state % 3 == 0 {
                            held.clear();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no panic");
        }
        assert_eq!(budget.held(), 0);
    }
}
