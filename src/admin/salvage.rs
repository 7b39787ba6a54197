//! The salvage of an embedded store whose index cannot be read (the pages that locate its
//! tables or records are damaged or missing): the file is read byte by byte for records that
//! carry a checksum (`wire::record`, version 2), which is how a record is told from anything
//! else without redb's help. Each record is stored beside the time it was received; the events
//! are written in that order (the store's sequences follow it), those received within the same
//! millisecond in the order they are found in the file (a page holds its records in sequence
//! order). redb copies pages on write, so a record may be found several times: once
//! each is written.
//!
//! What this cannot give back: records written before records had a checksum (their bytes
//! cannot be told from noise), records on damaged bytes, and the sequences. And it may give back
//! more: records retention had removed whose pages were not reused yet.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::log::LogError;
use crate::wire::record::{sealed_len, Sealed};

/// Bytes of the file looked at at once.
const WINDOW: usize = 16 << 20;
/// What comes before a record in the `events` table's value: the received time and the event id,
/// 8 bytes each, big-endian (`log::embedded`).
const VALUE_HEADER: usize = 16;
/// The largest record read whole (a record says it holds at most 256 MiB).
const MAX_RECORD: usize = 260 << 20;

/// What a salvage found and wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Salvaged {
    /// Events written.
    pub written: u64,
    /// Copies of an event found more than once (redb's earlier page versions).
    pub copies: u64,
    /// Records whose checksum matched but whose content does not read (reasons, the first 20).
    pub unreadable: Vec<String>,
    /// Of those, how many in all.
    pub unreadable_count: u64,
    /// Bytes of the file read.
    pub bytes: u64,
}

impl std::fmt::Display for Salvaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "salvaged {} events from {} bytes read record by record ({} copies left out, {} \
             unreadable); sequences are not known, the events are in the order they were \
             received; records written before records had checksums, and records on damaged \
             bytes, are not in it",
            self.written, self.bytes, self.copies, self.unreadable_count
        )?;
        for why in &self.unreadable {
            writeln!(f, "unreadable: {why}")?;
        }
        Ok(())
    }
}

/// One record found: where, and what orders it.
#[derive(Debug, Clone, Copy)]
struct Found {
    received_at_ms: i64,
    event_id: i64,
    offset: u64,
    len: usize,
}

/// Writes every checksummed record of the file `path` to `out` as `export` would (one NDJSON
/// line each), in the order they were received.
pub fn salvage(path: &Path, out: &mut impl Write) -> Result<Salvaged, LogError> {
    let cannot = |error: std::io::Error| {
        LogError::Unavailable(format!("cannot read {}: {error}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    // A gateway holds its store's file locked (redb's lock): never salvage a file being written.
    if held_by_another(&file) {
        return Err(crate::log::embedded::in_use(path));
    }
    let len = file.metadata().map_err(cannot)?.len();
    let mut report = Salvaged {
        bytes: len,
        ..Salvaged::default()
    };
    let mut found = Vec::new();
    let mut window = vec![0u8; WINDOW];
    // Where the next record may start: records never overlap.
    let mut resume = 0u64;
    let mut start = 0u64;
    while start < len {
        let size = (len - start).min(WINDOW as u64) as usize;
        let window = &mut window[..size];
        file.read_exact_at(window, start).map_err(cannot)?;
        for at in memchr::memmem::find_iter(window, &[0x00, 0x02]) {
            let offset = start + at as u64;
            if offset < resume || offset < VALUE_HEADER as u64 {
                continue;
            }
            // The first field of every record is its keys (tag 1, length-delimited).
            if window.get(at + 6).is_some_and(|&byte| byte != 0x0A) {
                continue;
            }
            if let Some(record_len) = record_at(&file, window, at, offset, len).map_err(cannot)? {
                let mut header = [0u8; VALUE_HEADER];
                file.read_exact_at(&mut header, offset - VALUE_HEADER as u64)
                    .map_err(cannot)?;
                let number = |bytes: &[u8]| {
                    i64::from_be_bytes(<[u8; 8]>::try_from(bytes).unwrap_or_default())
                };
                found.push(Found {
                    received_at_ms: number(&header[..8]),
                    event_id: number(&header[8..]),
                    offset,
                    len: record_len,
                });
                resume = offset + record_len as u64;
            }
        }
        // The next window starts where a record's start could still be cut: a few bytes back.
        if start + size as u64 >= len {
            break;
        }
        start += size as u64 - 8;
    }
    // Within one millisecond (a batch), in the order found: a page holds its records in
    // sequence order.
    found.sort_by_key(|record| (record.received_at_ms, record.offset));
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    for record in found {
        let mut payload = vec![0u8; record.len];
        file.read_exact_at(&mut payload, record.offset)
            .map_err(cannot)?;
        // The checksum (bytes 2 to 5) with the time and id tell copies of one record apart from
        // other records.
        let mut identity = payload[..6].to_vec();
        identity.extend_from_slice(&record.received_at_ms.to_be_bytes());
        identity.extend_from_slice(&record.event_id.to_be_bytes());
        identity.extend_from_slice(&(record.len as u64).to_be_bytes());
        if !seen.insert(identity) {
            report.copies += 1;
            continue;
        }
        let line = super::checked_event(payload.into()).and_then(|stored| super::line(&stored));
        match line {
            Ok(line) => {
                super::write_line(out, &line)?;
                report.written += 1;
            }
            Err(why) => {
                report.unreadable_count += 1;
                if report.unreadable.len() < 20 {
                    report
                        .unreadable
                        .push(format!("the record at byte {}: {why}", record.offset));
                }
            }
        }
    }
    Ok(report)
}

/// The length of the record at `offset` of the file (`at` in `window`), if one starts there:
/// read from the window, or from the file when it runs past the window's end.
fn record_at(
    file: &std::fs::File,
    window: &[u8],
    at: usize,
    offset: u64,
    file_len: u64,
) -> Result<Option<usize>, std::io::Error> {
    let mut longer: Option<Vec<u8>> = None;
    loop {
        let bytes = longer.as_deref().unwrap_or(&window[at..]);
        match sealed_len(bytes) {
            Sealed::Found(len) => return Ok(Some(len)),
            Sealed::No => return Ok(None),
            Sealed::NeedMore(needed) => {
                let available = file_len.saturating_sub(offset);
                if needed > MAX_RECORD || needed as u64 > available || needed <= bytes.len() {
                    return Ok(None);
                }
                let mut buffer = vec![0u8; needed];
                file.read_exact_at(&mut buffer, offset)?;
                longer = Some(buffer);
            }
        }
    }
}

/// Whether another process holds `file` locked (as redb does its store's file). The lock taken
/// here goes with the file when it is closed.
fn held_by_another(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this function borrows open; no memory is involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    locked != 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}
