//! The file under the embedded store's database: redb's own file backend, with writes that can
//! be held back in memory until the store's format has been checked (so a file the gateway
//! refuses is left exactly as it was), and a fault tests can arm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use redb::backends::FileBackend;
use redb::StorageBackend;

/// redb's file backend, shared by the database (through [`Storage`]) and its opener (who
/// releases or drops the held writes).
#[derive(Debug)]
pub(super) struct Storage {
    inner: Arc<Inner>,
}

/// What the opener keeps of the storage it handed to redb.
#[derive(Debug, Clone)]
pub(super) struct Hold {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: FileBackend,
    /// Armed only by tests: the next sync reaches the disk and then reports an error.
    fault: Arc<AtomicBool>,
    /// Whether writes are held (a fast check before taking `held`'s lock).
    holding: AtomicBool,
    /// The writes redb made while held, in order; `None` once released.
    held: Mutex<Option<Held>>,
}

/// Writes, resizes and syncs redb asked for while held, replayed in the same order (syncs
/// included, so redb's ordering guarantees survive) when released.
#[derive(Debug, Default)]
struct Held {
    ops: Vec<Op>,
    /// The file's length as redb sees it.
    len: u64,
}

#[derive(Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Sync(bool),
}

impl Storage {
    /// Storage over `file` whose writes are held in memory until [`Hold::release`]: opening a
    /// redb database writes to its file (a recovery flag in the header, repairs), and nothing
    /// may be written to a store before its format is known to be one this build understands.
    pub(super) fn held(
        file: std::fs::File,
        fault: Arc<AtomicBool>,
    ) -> Result<(Self, Hold), redb::DatabaseError> {
        let file = FileBackend::new(file)?;
        let len = file.len().map_err(redb::StorageError::Io)?;
        let inner = Arc::new(Inner {
            file,
            fault,
            holding: AtomicBool::new(true),
            held: Mutex::new(Some(Held {
                ops: Vec::new(),
                len,
            })),
        });
        Ok((
            Self {
                inner: inner.clone(),
            },
            Hold { inner },
        ))
    }
}

impl Hold {
    /// Makes the file look `len` bytes long to redb (zeros past its end), when it is shorter:
    /// for an offline scan of a file cut short, which redb refuses to open at all.
    pub(super) fn pad_to(&self, len: u64) {
        if let Some(held) = self.inner.lock().as_mut() {
            held.len = held.len.max(len);
        }
    }

    /// Writes what was held to the file, in order, and lets later writes through. Without it
    /// (the database dropped while held) the file is left as it was found.
    pub(super) fn release(&self) -> Result<(), std::io::Error> {
        let mut held = self.inner.lock();
        let ops = held.take().map(|held| held.ops).unwrap_or_default();
        // Other callers wait on the lock, then find nothing held and go to the file.
        self.inner.holding.store(false, Ordering::Release);
        for op in ops {
            match op {
                Op::Write(offset, data) => self.inner.file.write(offset, &data)?,
                Op::SetLen(len) => self.inner.file.set_len(len)?,
                Op::Sync(eventual) => self.inner.file.sync_data(eventual)?,
            }
        }
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `work` on the held writes, or `None` when writes go to the file.
    fn with_held<T>(&self, work: impl FnOnce(&mut Held) -> T) -> Option<T> {
        if !self.holding.load(Ordering::Acquire) {
            return None;
        }
        self.lock().as_mut().map(work)
    }

    /// The bytes redb would read had the held writes reached the file.
    fn read_through(&self, held: &Held, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        // The file's bytes (zeros past its end), then each held change over them, in order.
        let from_file = self.file.len()?.saturating_sub(offset).min(len as u64) as usize;
        let mut data = if from_file > 0 {
            self.file.read(offset, from_file)?
        } else {
            Vec::new()
        };
        data.resize(len, 0);
        let end = offset + len as u64;
        for op in &held.ops {
            match op {
                Op::Write(at, bytes) => {
                    let (start, stop) = (offset.max(*at), end.min(*at + bytes.len() as u64));
                    if start < stop {
                        data[(start - offset) as usize..(stop - offset) as usize]
                            .copy_from_slice(&bytes[(start - at) as usize..(stop - at) as usize]);
                    }
                }
                // What a shrink cut reads as zeros if the file grows again.
                Op::SetLen(cut) if *cut < end => {
                    data[cut.saturating_sub(offset) as usize..].fill(0);
                }
                Op::SetLen(_) | Op::Sync(_) => {}
            }
        }
        Ok(data)
    }
}

impl StorageBackend for Storage {
    fn len(&self) -> Result<u64, std::io::Error> {
        match self.inner.with_held(|held| held.len) {
            Some(len) => Ok(len),
            None => self.inner.file.len(),
        }
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        if self.inner.holding.load(Ordering::Acquire) {
            if let Some(held) = self.inner.lock().as_ref() {
                return self.inner.read_through(held, offset, len);
            }
        }
        self.inner.file.read(offset, len)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let held = self.inner.with_held(|held| {
            held.ops.push(Op::SetLen(len));
            held.len = len;
        });
        match held {
            Some(()) => Ok(()),
            None => self.inner.file.set_len(len),
        }
    }

    fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
        if let Some(()) = self
            .inner
            .with_held(|held| held.ops.push(Op::Sync(eventual)))
        {
            return Ok(());
        }
        self.inner.file.sync_data(eventual)?;
        if self.inner.fault.swap(false, Ordering::AcqRel) {
            return Err(std::io::Error::other("injected fault: synced, then failed"));
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let held = self
            .inner
            .with_held(|held| held.ops.push(Op::Write(offset, data.to_vec())));
        match held {
            Some(()) => Ok(()),
            None => self.inner.file.write(offset, data),
        }
    }
}
