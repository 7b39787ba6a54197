//! The bytes the gateway holds for subscribers on their way out (DESIGN invariant 4): one
//! budget (`--catch-up-memory`) shared by every subscription, gRPC and SSE alike.
//!
//! A subscription takes permits for each event before it hands it to its stream: a catch-up page
//! takes them before it reads (at most its share) and per record read; a live event takes them
//! when it leaves the tail (or, when the budget is spent, the subscription reads that event from
//! the log later). The permits go with the event into the response body ([`PermitSlot`],
//! [`HeldBody`]): the frame the event was encoded into carries them, and they are given back when
//! hyper drops that frame, that is once its bytes are written to the socket. So what a client that
//! stops reading holds (its page, and the frames HTTP/2 or HTTP/1.1 buffers for it) is counted.
//!
//! One event larger than the whole budget still goes, alone: it takes the whole budget.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A shared byte budget.
#[derive(Clone, Debug)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    total: usize,
}

/// Bytes of a [`Budget`] held; given back on drop.
pub type Permit = OwnedSemaphorePermit;

impl Budget {
    /// A budget of `total` bytes (at least 1).
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.total - self.semaphore.available_permits().min(self.total)
    }

    /// What `bytes` may take: at most the whole budget (an event larger than the budget goes
    /// alone), and at most what one acquisition can ask.
    fn clamp(&self, bytes: usize) -> u32 {
        bytes.clamp(1, self.total).min(u32::MAX as usize) as u32
    }

    /// Waits for `bytes` (fairly: first come, first served).
    pub async fn acquire(&self, bytes: usize) -> Permit {
        let wanted = self.clamp(bytes);
        // The semaphore is never closed.
        match self.semaphore.clone().acquire_many_owned(wanted).await {
            Ok(permit) => permit,
            Err(_) => unreachable!("the budget's semaphore is never closed"),
        }
    }

    /// `bytes` if they are free now.
    pub fn try_acquire(&self, bytes: usize) -> Option<Permit> {
        self.semaphore
            .clone()
            .try_acquire_many_owned(self.clamp(bytes))
            .ok()
    }

    /// Takes `bytes` out of `held` (what was taken for a page), or out of the budget now when
    /// `held` has too few; `None` when neither has them.
    pub fn take(&self, held: &mut Option<Permit>, bytes: usize) -> Option<Permit> {
        let wanted = self.clamp(bytes) as usize;
        if let Some(permit) = held.as_mut() {
            if permit.num_permits() > wanted {
                return permit.split(wanted);
            }
            if permit.num_permits() == wanted {
                return held.take();
            }
            let more = self.try_acquire(wanted - permit.num_permits())?;
            let mut all = held.take()?;
            all.merge(more);
            return Some(all);
        }
        self.try_acquire(wanted)
    }
}

/// The permits of events a stream has handed to its encoder and whose frame has not been
/// produced yet; shared by the stream and its response body ([`HeldBody`]).
#[derive(Clone, Default)]
pub struct PermitSlot(Arc<Mutex<Option<Permit>>>);

impl PermitSlot {
    /// Adds the permit of an event handed to the encoder.
    pub fn put(&self, permit: Permit) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some(held) => held.merge(permit),
            None => *slot = Some(permit),
        }
    }

    fn take(&self) -> Option<Permit> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A response body whose data frames carry the permits of the events encoded in them: the
/// permits are given back when the frame's bytes are dropped (written to the socket).
pub struct HeldBody<B> {
    inner: B,
    slot: PermitSlot,
}

impl<B> HeldBody<B> {
    /// Wraps `inner`, whose stream puts its events' permits in `slot`.
    pub fn new(inner: B, slot: PermitSlot) -> Self {
        Self { inner, slot }
    }
}

/// A frame's bytes and the permits of the events in them.
struct Carried {
    bytes: Bytes,
    _permit: Permit,
}

impl AsRef<[u8]> for Carried {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl<B> Body for HeldBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let frame = match frame.into_data() {
            Ok(bytes) => match this.slot.take() {
                // Every event handed over so far is in this frame or an earlier one: the
                // encoder yields all it has encoded.
                Some(permit) if !bytes.is_empty() => Frame::data(Bytes::from_owner(Carried {
                    bytes,
                    _permit: permit,
                })),
                _ => Frame::data(bytes),
            },
            Err(frame) => frame,
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_hands_out_what_it_has_and_lets_one_oversize_event_through() {
        let budget = Budget::new(1000);
        let mut page = Some(budget.try_acquire(600).expect("free"));
        let first = budget.take(&mut page, 400).expect("from the page");
        assert_eq!(budget.held(), 600);
        let second = budget
            .take(&mut page, 300)
            .expect("the page's rest and 100 more");
        assert!(page.is_none());
        assert_eq!(budget.held(), 700);
        assert!(budget.take(&mut None, 301).is_none(), "only 300 left");
        drop((first, second));
        assert_eq!(budget.held(), 0);
        let huge = budget
            .try_acquire(5000)
            .expect("larger than the budget: all of it");
        assert_eq!(huge.num_permits(), 1000);
        assert!(budget.try_acquire(1).is_none());
    }
}
