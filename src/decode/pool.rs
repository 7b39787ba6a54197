//! Where bodies are decoded: on a bounded pool of blocking threads with its own admission, so
//! that decoding a large body never holds the async workers that answer other requests
//! (`/healthz`, subscribers, small bodies).
//!
//! A body of at most [`INLINE_BYTES`] is decoded where it arrived: that costs less than handing
//! it to another thread (tens of microseconds), and the decode is linear in the body. A larger
//! one waits for one of `threads` workers (tokio's blocking threads, at most `threads` at once);
//! at most `queue` may wait, and a body beyond them is refused at once ([`Busy`]: 429 /
//! RESOURCE_EXHAUSTED with a retry hint) rather than piling up.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Bodies of at most this many bytes are decoded inline, on the async worker they arrived on.
pub const INLINE_BYTES: usize = 16 * 1024;

/// The decode workers by default: one per CPU core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// After decoding a body of at least this many bytes, a worker gives the memory freed back to
/// the system: glibc keeps what one large decode took in its arenas otherwise (tens of MiB
/// after a megabyte of opaque values), long after the decode.
const TRIM_AFTER_BYTES: usize = 256 * 1024;

/// Gives the heap's free memory back to the system (glibc keeps freed memory in its arenas
/// unless asked). Blocking: walks every arena, so call it off the async workers.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims glibc's own heap; it takes no pointers of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bodies that may wait for a decode worker by default.
pub const DEFAULT_QUEUE: usize = 64;

/// Every decode worker is busy and as many bodies wait: retry shortly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many bodies being decoded; retry shortly")]
pub struct Busy;

/// The decode workers and their admission. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DecodePool {
    /// One permit per worker: held while a body is decoded.
    workers: Arc<Semaphore>,
    /// One permit per worker and per waiting place: taken at once or refused.
    admission: Arc<Semaphore>,
    /// Bodies up to this size are decoded inline.
    inline_bytes: usize,
}

impl DecodePool {
    /// `threads` workers (at least 1) and `queue` bodies waiting for them.
    pub fn new(threads: usize, queue: usize) -> Self {
        let threads = threads.max(1);
        Self {
            workers: Arc::new(Semaphore::new(threads)),
            admission: Arc::new(Semaphore::new(threads.saturating_add(queue))),
            inline_bytes: INLINE_BYTES,
        }
    }

    /// The same pool deciding inline for bodies of at most `bytes` (tests: 0 sends every body
    /// to the workers).
    pub fn with_inline_bytes(mut self, bytes: usize) -> Self {
        self.inline_bytes = bytes;
        self
    }

    /// Runs `decode` for a body of `len` bytes: inline when small, else on a worker. [`Busy`]
    /// at once when every worker and waiting place is taken.
    pub async fn run<T: Send + 'static>(
        &self,
        len: usize,
        decode: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        if len <= self.inline_bytes {
            return Ok(decode());
        }
        let admitted = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy)?;
        self.on_worker(admitted, len, decode).await
    }

    /// Runs `decode` on a worker, waiting for admission as long as it takes: for work that was
    /// admitted already as part of a request (a duplicate's conflict check).
    pub async fn run_waiting<T: Send + 'static>(
        &self,
        len: usize,
        decode: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        if len <= self.inline_bytes {
            return Some(decode());
        }
        let admitted = self.admission.clone().acquire_owned().await.ok()?;
        self.on_worker(admitted, len, decode).await.ok()
    }

    async fn on_worker<T: Send + 'static>(
        &self,
        admitted: tokio::sync::OwnedSemaphorePermit,
        len: usize,
        decode: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        // The semaphores are never closed: acquiring fails only if they were.
        let worker = self
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Busy)?;
        // The permits travel with the work: a caller that goes away (its client left) does not
        // free a worker still busy with its body.
        let task = tokio::task::spawn_blocking(move || {
            let _permits = (admitted, worker);
            let value = decode();
            if len >= TRIM_AFTER_BYTES {
                trim_heap();
            }
            value
        });
        match task.await {
            Ok(value) => Ok(value),
            // A decode that panicked panics its request, as it would have inline.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => Err(Busy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_its_threads_and_queue_a_body_is_refused_at_once_and_small_ones_run_inline() {
        let pool = DecodePool::new(1, 1);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = std::sync::Arc::new(std::sync::Mutex::new(held));
        let block = |held: std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>| {
            move || {
                let _ = held.lock().map(|held| held.recv());
                std::thread::current().id()
            }
        };
        let large = INLINE_BYTES + 1;
        let running = tokio::spawn({
            let (pool, held) = (pool.clone(), held.clone());
            async move { pool.run(large, block(held)).await }
        });
        let waiting = tokio::spawn({
            let (pool, held) = (pool.clone(), held.clone());
            async move {
                // Behind the first: it waits for the thread.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                pool.run(large, block(held)).await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        assert_eq!(
            pool.run(large, || ()).await,
            Err(Busy),
            "one thread, one waiting"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_millis(100),
            "at once"
        );
        let here = std::thread::current().id();
        assert_eq!(
            pool.run(INLINE_BYTES, || std::thread::current().id()).await,
            Ok(here)
        );
        for _ in 0..2 {
            release.send(()).expect("a decode waits");
        }
        let first = running.await.expect("joins").expect("admitted");
        let second = waiting.await.expect("joins").expect("admitted");
        assert_ne!(first, here, "decoded on a blocking thread");
        assert_ne!(second, here);
        assert_eq!(pool.run(large, || 7).await, Ok(7), "free again");
    }
}
