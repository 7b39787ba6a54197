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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default `--subscriber-stall-timeout`: how long a subscriber may hold bytes of the budget
/// without giving any back (its client reads nothing) while another waits for them.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A holder's connection, as the budget sees it (see [`Budget::holder`]).
pub trait Connection: Send + Sync {
    /// Closes it (what it had not written is dropped).
    fn close(&self);

    /// Whether its peer took in bytes within the last `stall` (the kernel's count of bytes the
    /// peer acknowledged): a client reading slowly behind large socket buffers does, though none
    /// of the bytes held for it may have reached the socket for a while. `false` when unknown.
    fn took_bytes_within(&self, stall: Duration) -> bool;
}

/// A holder's connection: closed when it stalls while others wait.
pub type Evict = Arc<dyn Connection>;

/// A shared byte budget.
///
/// Subscribers whose clients stop reading keep what they hold; were that the whole budget, every
/// other subscriber would wait for ever (DESIGN invariant 4: slow subscribers cost nothing to
/// others). So a wait for bytes that lasts the stall timeout ends the connections of the holders
/// that have given nothing back for as long: their frames are dropped with the connection, their
/// bytes come back, and their clients resume from their cursor elsewhere or later.
#[derive(Clone)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    total: usize,
    /// Every subscription that may hold bytes (see [`Holder`]).
    holders: Arc<Mutex<Vec<Weak<HolderState>>>>,
    stall: Duration,
    /// Holders whose connection was ended for stalling.
    evicted: Arc<AtomicU64>,
    /// The time holders' progress is measured from.
    epoch: Instant,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("total", &self.total)
            .field("held", &self.held())
            .field("stall", &self.stall)
            .finish()
    }
}

/// One subscription's standing in a [`Budget`]: what it holds, when it last gave bytes back,
/// and how to end its connection.
#[derive(Clone)]
pub struct Holder(Arc<HolderState>);

struct HolderState {
    /// Set while the gateway reads its next page (waiting for a read slot, reading): what it
    /// holds then is not its client's doing.
    busy: AtomicBool,
    held: AtomicUsize,
    /// Milliseconds since the budget's epoch when bytes were last given back (or it began).
    progress_ms: AtomicU64,
    evict: Option<Evict>,
    evicted: AtomicBool,
    epoch: Instant,
}

impl HolderState {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl Holder {
    /// Marks the gateway at work for this holder (`true`) or done (`false`, which also counts as
    /// progress: what it reads next has just been handed to it).
    pub fn set_busy(&self, busy: bool) {
        self.0.busy.store(busy, Ordering::Relaxed);
        if !busy {
            self.0.progress_ms.store(self.0.now_ms(), Ordering::Relaxed);
        }
    }
}

/// Bytes of a [`Budget`] held by one holder; given back on drop.
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    holder: Arc<HolderState>,
}

impl Permit {
    fn new(permit: OwnedSemaphorePermit, holder: &Holder) -> Self {
        holder
            .0
            .held
            .fetch_add(permit.num_permits(), Ordering::Relaxed);
        // Bytes just given to it: its client has had no time to read them yet.
        holder
            .0
            .progress_ms
            .store(holder.0.now_ms(), Ordering::Relaxed);
        Self {
            permit: Some(permit),
            holder: holder.0.clone(),
        }
    }

    /// The bytes held.
    pub fn num_permits(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Splits `n` bytes off into a permit of the same holder; `None` if it holds fewer.
    pub fn split(&mut self, n: usize) -> Option<Self> {
        let split = self.permit.as_mut()?.split(n)?;
        Some(Self {
            permit: Some(split),
            holder: self.holder.clone(),
        })
    }

    /// Adds `other`'s bytes to this permit (and to its holder).
    pub fn merge(&mut self, mut other: Self) {
        let Some(theirs) = other.permit.take() else {
            return;
        };
        if !Arc::ptr_eq(&self.holder, &other.holder) {
            let n = theirs.num_permits();
            other.holder.held.fetch_sub(n, Ordering::Relaxed);
            self.holder.held.fetch_add(n, Ordering::Relaxed);
        }
        match self.permit.as_mut() {
            Some(mine) => mine.merge(theirs),
            None => self.permit = Some(theirs),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let holder = &self.holder;
            holder
                .held
                .fetch_sub(permit.num_permits(), Ordering::Relaxed);
            holder.progress_ms.store(holder.now_ms(), Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.num_permits())
    }
}

impl Budget {
    /// A budget of `total` bytes (at least 1) whose stalled holders are evicted after
    /// [`DEFAULT_STALL_TIMEOUT`].
    pub fn new(total: usize) -> Self {
        Self::with_stall(total, DEFAULT_STALL_TIMEOUT)
    }

    /// A budget of `total` bytes (at least 1): a wait for bytes that lasts `stall` evicts the
    /// holders that have given nothing back for `stall`.
    pub fn with_stall(total: usize, stall: Duration) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
            holders: Arc::default(),
            stall: stall.max(Duration::from_millis(1)),
            evicted: Arc::default(),
            epoch: Instant::now(),
        }
    }

    /// A new holder; `evict` ends its connection (`None`: never evicted).
    pub fn holder(&self, evict: Option<Evict>) -> Holder {
        let state = Arc::new(HolderState {
            busy: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            evict,
            evicted: AtomicBool::new(false),
            epoch: self.epoch,
        });
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        // Holders that are gone are pruned as new ones come: the list stays within twice the
        // subscriptions open.
        if holders.len() >= 64 && holders.len().is_power_of_two() {
            holders.retain(|holder| holder.strong_count() > 0);
        }
        holders.push(Arc::downgrade(&state));
        Holder(state)
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.total - self.semaphore.available_permits().min(self.total)
    }

    /// Holders evicted so far for stalling.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// What `bytes` may take: at most the whole budget (an event larger than the budget goes
    /// alone), and at most what one acquisition can ask.
    fn clamp(&self, bytes: usize) -> u32 {
        bytes.clamp(1, self.total).min(u32::MAX as usize) as u32
    }

    /// Waits for `bytes` (fairly: first come, first served). Each time the wait lasts the stall
    /// timeout, the holders stalled for as long are evicted (never `holder` itself).
    pub async fn acquire(&self, holder: &Holder, bytes: usize) -> Permit {
        let wanted = self.clamp(bytes);
        let acquire = self.semaphore.clone().acquire_many_owned(wanted);
        tokio::pin!(acquire);
        loop {
            match tokio::time::timeout(self.stall, &mut acquire).await {
                Ok(Ok(permit)) => return Permit::new(permit, holder),
                // The semaphore is never closed.
                Ok(Err(_)) => unreachable!("the budget's semaphore is never closed"),
                Err(_) => self.evict_stalled(holder),
            }
        }
    }

    /// Ends the connections of the holders (other than `waiter`) that hold bytes and have given
    /// none back for the stall timeout.
    fn evict_stalled(&self, waiter: &Holder) {
        let stall_ms = self.stall.as_millis() as u64;
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let holders: Vec<Arc<HolderState>> = {
            let holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
            holders.iter().filter_map(Weak::upgrade).collect()
        };
        for holder in holders {
            if Arc::ptr_eq(&holder, &waiter.0)
                || holder.busy.load(Ordering::Relaxed)
                || holder.held.load(Ordering::Relaxed) == 0
                || now_ms.saturating_sub(holder.progress_ms.load(Ordering::Relaxed)) < stall_ms
            {
                continue;
            }
            let Some(evict) = &holder.evict else { continue };
            if evict.took_bytes_within(self.stall) {
                continue;
            }
            if !holder.evicted.swap(true, Ordering::Relaxed) {
                self.evicted.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    held_bytes = holder.held.load(Ordering::Relaxed),
                    stalled_ms = now_ms.saturating_sub(holder.progress_ms.load(Ordering::Relaxed)),
                    "a subscriber's client read nothing while others waited for memory \
                     (--catch-up-memory); its connection is closed (it resumes from its cursor)"
                );
                evict.close();
            }
        }
    }

    /// `bytes` if they are free now.
    pub fn try_acquire(&self, holder: &Holder, bytes: usize) -> Option<Permit> {
        self.semaphore
            .clone()
            .try_acquire_many_owned(self.clamp(bytes))
            .ok()
            .map(|permit| Permit::new(permit, holder))
    }

    /// Takes `bytes` out of `held` (what was taken for a page), or out of the budget now when
    /// `held` has too few; `None` when neither has them.
    pub fn take(&self, holder: &Holder, held: &mut Option<Permit>, bytes: usize) -> Option<Permit> {
        let wanted = self.clamp(bytes) as usize;
        if let Some(permit) = held.as_mut() {
            if permit.num_permits() > wanted {
                return permit.split(wanted);
            }
            if permit.num_permits() == wanted {
                return held.take();
            }
            let more = self.try_acquire(holder, wanted - permit.num_permits())?;
            let mut all = held.take()?;
            all.merge(more);
            return Some(all);
        }
        self.try_acquire(holder, wanted)
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
/// permits are given back when the frame's bytes are dropped (written to the socket). A frame
/// is handed to hyper in pieces of at most [`PIECE`] bytes, each with its share of the permits,
/// so that a client reading a large event slowly gives bytes back as it reads (and is seen to
/// make progress, see [`Budget::acquire`]), not only once the whole event is written.
pub struct HeldBody<B> {
    inner: B,
    slot: PermitSlot,
    /// The rest of the frame being handed over, with its permits.
    rest: Option<(Bytes, Option<Permit>)>,
}

/// The largest piece of a frame handed to hyper at once.
pub const PIECE: usize = 64 * 1024;

impl<B> HeldBody<B> {
    /// Wraps `inner`, whose stream puts its events' permits in `slot`.
    pub fn new(inner: B, slot: PermitSlot) -> Self {
        Self {
            inner,
            slot,
            rest: None,
        }
    }

    /// The next piece of `bytes` (carrying `permit`), the rest kept for the next poll.
    fn piece(&mut self, mut bytes: Bytes, mut permit: Option<Permit>) -> Frame<Bytes> {
        if bytes.len() > PIECE {
            let rest = bytes.split_off(PIECE);
            // The piece's share of the permits, in proportion to its bytes (the rest keeps
            // what is left, at least one permit while it has bytes).
            let share = permit.as_mut().and_then(|held| {
                let n = held.num_permits();
                let part = (n as u128 * PIECE as u128 / (PIECE + rest.len()) as u128) as usize;
                held.split(part.min(n.saturating_sub(1)))
            });
            self.rest = Some((rest, permit));
            permit = share;
        }
        match permit {
            Some(permit) => Frame::data(Bytes::from_owner(Carried {
                bytes,
                _permit: permit,
            })),
            None => Frame::data(bytes),
        }
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
        if let Some((bytes, permit)) = this.rest.take() {
            return Poll::Ready(Some(Ok(this.piece(bytes, permit))));
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let frame = match frame.into_data() {
            // Every event handed over so far is in this frame or an earlier one: the encoder
            // yields all it has encoded.
            Ok(bytes) if !bytes.is_empty() => {
                let permit = this.slot.take();
                this.piece(bytes, permit)
            }
            Ok(bytes) => Frame::data(bytes),
            Err(frame) => frame,
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some((rest, _)) = &self.rest {
            let rest = rest.len() as u64;
            hint.set_lower(hint.lower() + rest);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + rest);
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_hands_out_what_it_has_and_lets_one_oversize_event_through() {
        let budget = Budget::new(1000);
        let holder = budget.holder(None);
        let mut page = Some(budget.try_acquire(&holder, 600).expect("free"));
        let first = budget.take(&holder, &mut page, 400).expect("from the page");
        assert_eq!(budget.held(), 600);
        let second = budget
            .take(&holder, &mut page, 300)
            .expect("the page's rest and 100 more");
        assert!(page.is_none());
        assert_eq!(budget.held(), 700);
        assert_eq!(holder.0.held.load(Ordering::Relaxed), 700);
        assert!(
            budget.take(&holder, &mut None, 301).is_none(),
            "only 300 left"
        );
        drop((first, second));
        assert_eq!(budget.held(), 0);
        assert_eq!(holder.0.held.load(Ordering::Relaxed), 0);
        let huge = budget
            .try_acquire(&holder, 5000)
            .expect("larger than the budget: all of it");
        assert_eq!(huge.num_permits(), 1000);
        assert!(budget.try_acquire(&holder, 1).is_none());
    }

    /// A large frame goes to hyper in pieces of at most PIECE bytes, each carrying its share of
    /// the permits: a client reading slowly gives bytes back as it reads.
    #[tokio::test]
    async fn a_large_frame_gives_its_bytes_back_piece_by_piece() {
        use http_body_util::BodyExt;
        let budget = Budget::new(1_000_000);
        let holder = budget.holder(None);
        let slot = PermitSlot::default();
        slot.put(budget.try_acquire(&holder, 300_000).expect("free"));
        let frame = Bytes::from(vec![7u8; 200 * 1024]);
        let mut body = HeldBody::new(http_body_util::Full::new(frame.clone()), slot);
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("a frame").into_data().expect("data");
            assert!(data.len() <= PIECE, "{}", data.len());
            pieces.push(data);
        }
        assert_eq!(pieces.len(), 4, "200 KiB in pieces of 64 KiB");
        assert_eq!(pieces.concat(), frame.to_vec(), "the same bytes");
        assert_eq!(budget.held(), 300_000);
        let mut before = budget.held();
        for piece in pieces {
            drop(piece);
            assert!(budget.held() < before, "each piece gives some back");
            before = budget.held();
        }
        assert_eq!(budget.held(), 0);
        assert_eq!(holder.0.held.load(Ordering::Relaxed), 0);
    }

    /// A holder whose client reads nothing is evicted once another has waited the stall
    /// timeout for its bytes; one that gives bytes back now and then, one that holds nothing,
    /// and the waiter itself are not.
    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_stall_timeout_evicts_only_the_holders_that_gave_nothing_back() {
        let stall = Duration::from_secs(10);
        let budget = Budget::with_stall(1000, stall);
        let evicted = Arc::new(Mutex::new(Vec::new()));
        /// A connection whose peer never takes anything in; closing it is recorded.
        struct Recorded(&'static str, Arc<Mutex<Vec<&'static str>>>);
        impl Connection for Recorded {
            fn close(&self) {
                self.1.lock().unwrap().push(self.0);
            }
            fn took_bytes_within(&self, _: Duration) -> bool {
                false
            }
        }
        let holder =
            |name: &'static str| budget.holder(Some(Arc::new(Recorded(name, evicted.clone()))));
        let (stalled, reading, idle, waiter) = (
            holder("stalled"),
            holder("reading"),
            holder("idle"),
            holder("waiter"),
        );
        let stalled_bytes = budget.try_acquire(&stalled, 600).expect("free");
        let mut reading_bytes = Some(budget.try_acquire(&reading, 400).expect("free"));
        // `reading` gives back a little every few seconds, and takes it again.
        let reader = {
            let (budget, reading) = (budget.clone(), reading.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let part = reading_bytes.as_mut().and_then(|p| p.split(10));
                    drop(part);
                    tokio::task::yield_now().await;
                    if let Some(more) = budget.try_acquire(&reading, 10) {
                        if let Some(bytes) = reading_bytes.as_mut() {
                            bytes.merge(more);
                        }
                    }
                }
            })
        };
        let wait = {
            let (budget, waiter) = (budget.clone(), waiter.clone());
            tokio::spawn(async move { budget.acquire(&waiter, 500).await })
        };
        tokio::time::sleep(stall - Duration::from_secs(1)).await;
        assert!(evicted.lock().unwrap().is_empty(), "not before the timeout");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(*evicted.lock().unwrap(), vec!["stalled"]);
        assert_eq!(budget.evicted(), 1);
        // Its connection closing drops its frames: the waiter gets its bytes.
        drop(stalled_bytes);
        let got = tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .expect("the waiter is served")
            .expect("joins");
        assert_eq!(got.num_permits(), 500);
        // Evicted once only, whatever waits next.
        let again = {
            let (budget, waiter) = (budget.clone(), holder("second waiter"));
            tokio::spawn(async move { budget.acquire(&waiter, 1000).await })
        };
        tokio::time::sleep(stall * 3).await;
        let evicted_now = evicted.lock().unwrap().clone();
        assert!(
            evicted_now.iter().filter(|n| **n == "stalled").count() == 1
                && !evicted_now.contains(&"reading")
                && !evicted_now.contains(&"idle"),
            "{evicted_now:?}"
        );
        // The first waiter holds its 500 without giving any back: now it is the stalled one.
        assert!(evicted_now.contains(&"waiter"), "{evicted_now:?}");
        drop((got, idle));
        reader.abort();
        let _ = reader.await;
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), again)
                .await
                .expect("served once the rest is back")
                .expect("joins")
                .num_permits(),
            1000
        );
    }
}
