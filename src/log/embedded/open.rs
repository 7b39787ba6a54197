//! Opening the embedded store's file: its format version (checked before anything is written,
//! upgraded and recorded in the transaction that creates the tables), and damage found at open.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use redb::{Database, ReadableTable};

use super::storage::{Hold, Storage};
use super::{parsing, unavailable, EVENTS, IDS, META};
use crate::log::LogError;

/// The `meta` key holding the store's format version; a file without it is format 1.
const FORMAT_KEY: &str = "format";
/// The `meta` key holding the store's random id ([`crate::log::EventLog::identity`]), made when
/// the file is created (or first opened by a release that keeps one).
pub(super) const STORE_ID_KEY: &str = "store_id";

/// The store format this build writes, and the newest it opens.
///
/// - 1: every release before the format was recorded (no `format` key).
/// - 2: the same tables and values, with the key.
/// - 3: the same tables; new payloads are compact records (`wire::record`: compressed, the
///   references pointers into the envelope), which a release of format 2 would misread as
///   damaged. Payloads of formats 1 and 2 stay as they are and are read as they were.
/// - 4: the same tables; new compact records carry a checksum (`wire::record` version 2), which
///   a release of format 3 would serve as damaged; `meta` holds the store's id (`store_id`).
///   Records of earlier formats stay as they are.
///
/// A file of a newer format is refused and left untouched. Bump it when the layout of the
/// tables or of their values changes in a way an older release would misread, and add the step
/// from the previous format where [`open_database`] upgrades.
pub const FORMAT: u64 = 4;

/// Whether the file may be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// The gateway's own store: upgraded and written.
    ReadWrite,
    /// An offline scan (`verify`, `export`): redb's own writes at open (recovery, the tables'
    /// creation) stay in memory, so the file is never changed.
    ReadOnly,
}

/// The file a new store is built in before it is renamed to its place (see [`create`]).
pub(super) fn creating_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".creating");
    name.into()
}

/// Creates a new, empty store at `path`, whole or not at all: redb's file is built (tables,
/// format) under [`creating_path`], synced, and only then renamed into place, so that a first
/// start killed or out of disk space part way leaves no `events.redb` that cannot be opened;
/// what it left under the temporary name is removed by the next start.
fn create(path: &Path, cache_bytes: usize) -> Result<(), LogError> {
    let creating = creating_path(path);
    let build = || -> Result<(), Box<dyn std::error::Error>> {
        match std::fs::remove_file(&creating) {
            Ok(()) => tracing::info!(
                path = %creating.display(),
                "removed what an interrupted first start left"
            ),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error.into()),
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&creating)?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create_file(file)?;
        init(&db, None, Access::ReadWrite, path)?;
        drop(db);
        std::fs::File::open(&creating)?.sync_all()?;
        std::fs::rename(&creating, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    build().map_err(|error| {
        let _ = std::fs::remove_file(&creating);
        unavailable(format!("cannot create {}: {error}", path.display()))
    })
}

/// Opens (or creates) the store file at `path`. Nothing is written to it until its format is
/// known to be one this build reads; then (for [`Access::ReadWrite`]) it is upgraded and the
/// current format recorded, in the transaction that creates the tables.
pub(super) fn open_database(
    path: &Path,
    cache_bytes: usize,
    fault: &Arc<AtomicBool>,
    access: Access,
) -> Result<Database, LogError> {
    let cannot_open =
        |e: &dyn std::fmt::Display| unavailable(format!("cannot open {}: {e}", path.display()));
    if access == Access::ReadWrite && std::fs::symlink_metadata(path).is_err() {
        create(path, cache_bytes)?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(access == Access::ReadWrite)
        .truncate(false)
        .open(path)
        .map_err(|e| cannot_open(&e))?;
    let file_len = file.metadata().map_err(|e| cannot_open(&e))?.len();
    // A new store is built aside and renamed into place whole: an empty file is a store lost
    // (a copy that failed, a redirection over it), never one to start afresh in.
    if file_len == 0 {
        return Err(LogError::Misconfigured(format!(
            "{} is empty: it holds no store (a copy that failed, or a file emptied by mistake?); \
             restore the store, or remove the file to start a new, empty one",
            path.display()
        )));
    }
    let expected = layout_len(&file);
    let in_use = |error: redb::DatabaseError| match error {
        redb::DatabaseError::DatabaseAlreadyOpen => in_use(path),
        other => cannot_open(&other),
    };
    let (storage, hold) = Storage::held(file, fault.clone()).map_err(in_use)?;
    // An offline scan of a file cut short (copied in part, a disk that lost its end): the
    // missing bytes read as zeros, so that what is left can be read; the pages that were there
    // fail their checksums, and cost their records only.
    if access == Access::ReadOnly {
        if let Some(expected) = expected.filter(|&expected| expected > file_len) {
            hold.pad_to(expected);
            tracing::warn!(
                path = %path.display(),
                missing = expected - file_len,
                "the store file is shorter than its header says; the missing bytes read as zeros"
            );
        }
    }
    // redb asserts (panics) on some kinds of damage its crash recovery does not cover, such as
    // bytes appended past its layout; refuse to start with a clear error instead of crashing.
    let created = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create_with_backend(storage)
    }))
    .map_err(|_| {
        unavailable(format!(
            "{} is damaged beyond crash recovery; restore it from a backup",
            path.display()
        ))
    })?;
    let db = created.map_err(in_use)?;
    match checked(&db, path, &hold, access) {
        Ok(()) => Ok(db),
        Err(error) => {
            close(db);
            Err(error)
        }
    }
}

/// The store file at `path` is held by another process (redb's lock on it).
pub(crate) fn in_use(path: &Path) -> LogError {
    LogError::Misconfigured(format!(
        "{} is in use by another process (a running gateway?): stop it first",
        path.display()
    ))
}

/// Drops a database, whose drop may walk damaged pages (redb panics on them): a damaged store
/// costs an error, never a crash.
pub(super) fn close(db: Database) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(db)));
}

/// The format of the just opened `db` checked, the held writes released (read-write), the
/// tables made and the format recorded.
fn checked(db: &Database, path: &Path, hold: &Hold, access: Access) -> Result<(), LogError> {
    let cannot_open =
        |e: &dyn std::fmt::Display| unavailable(format!("cannot open {}: {e}", path.display()));
    let found = stored_format(db, path)?;
    if let Some(found) = found.filter(|&found| found > FORMAT) {
        // Dropped while held: what redb wrote at open never reaches the file.
        return Err(LogError::NewerFormat {
            path: path.display().to_string(),
            found,
            supported: FORMAT,
        });
    }
    if access == Access::ReadWrite {
        hold.release().map_err(|e| cannot_open(&e))?;
    }
    // The commit walks the pages of the tables it touches: redb panics on damaged ones.
    let what = format!("{}: the pages that locate its tables", path.display());
    parsing(&what, || init(db, found, access, path))?.map_err(unavailable)
}

/// The length redb's header says its file has (redb 2's header, file format 3: the page size and
/// the regions' layout at bytes 12 to 31), `None` when the header cannot be read. Used only to
/// read a file cut short (`Hold::pad_to`): redb itself refuses one.
pub(super) fn layout_len(file: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    const MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
    let mut header = [0u8; 32];
    file.read_exact_at(&mut header, 0).ok()?;
    if header[..9] != MAGIC {
        return None;
    }
    let field = |at: usize| {
        u64::from(u32::from_le_bytes([
            header[at],
            header[at + 1],
            header[at + 2],
            header[at + 3],
        ]))
    };
    let (page, region_header, region_data) = (field(12), field(16), field(20));
    let (full_regions, trailing) = (field(24), field(28));
    let full = (region_header + region_data).checked_mul(page)?;
    let trailing = if trailing > 0 {
        (region_header + trailing).checked_mul(page)?
    } else {
        0
    };
    page.checked_add(full_regions.checked_mul(full)?)?
        .checked_add(trailing)
}

/// Creates the tables that do not exist yet, upgrades a file of format `found` (`None`: new),
/// and records the current format, in one transaction.
fn init(db: &Database, found: Option<u64>, access: Access, path: &Path) -> Result<(), redb::Error> {
    {
        let txn = db.begin_write()?;
        txn.open_table(EVENTS)?;
        txn.open_table(IDS)?;
        let mut meta = txn.open_table(META)?;
        // Upgrades, oldest first. From 1 to 2 nothing changes but the key: the tables, their
        // keys and the values' header are the same, and a payload written before `StoredEvent`
        // fields 4 (deviations) and 5 (references) existed reads them as empty, which is what
        // they were. From 2 to 3 nothing is rewritten either: the old payloads stay readable
        // (`wire::record::stored` tells them from compact records by their first byte), and
        // only new events are written compact. From 3 to 4 nothing is rewritten either: new
        // records carry a checksum, old ones are read as they are, and the store gets its id
        // (below). A later format adds its step here.
        if let Some(found) = found.filter(|&found| found < FORMAT) {
            if access == Access::ReadWrite {
                tracing::info!(
                    path = %path.display(),
                    from = found,
                    to = FORMAT,
                    "embedded store format upgraded"
                );
            }
        }
        meta.insert(FORMAT_KEY, FORMAT)?;
        if meta.get(STORE_ID_KEY)?.is_none() {
            meta.insert(STORE_ID_KEY, crate::log::random_id())?;
        }
        drop(meta);
        txn.commit()?;
        Ok(())
    }
}

/// The format the file says it has: `None` for a new file (no tables yet), 1 for a file written
/// before the format was recorded.
fn stored_format(db: &Database, path: &Path) -> Result<Option<u64>, LogError> {
    let read = || -> Result<Option<u64>, redb::Error> {
        let txn = db.begin_read()?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        Ok(Some(meta.get(FORMAT_KEY)?.map_or(1, |v| v.value())))
    };
    parsing(
        &format!("{}: the page that holds its format", path.display()),
        read,
    )?
    .map_err(unavailable)
}
