//! Offline tools over a stopped gateway's embedded store: `verify` reads every retained record
//! and reports the unreadable ones; `export` writes every readable event as NDJSON of raw bodies,
//! in order, and reports what it skipped, so an operator can rebuild a damaged store (post the
//! export to a new gateway: `iqchannels-gateway publish events.ndjson`).

use std::io::Write;
use std::path::Path;

use prost::Message;

use crate::log::embedded::{scan, Scanned};

mod salvage;
use crate::log::LogError;
use crate::wire::StoredEvent;
pub use salvage::{salvage, Salvaged};

/// What a scan found.
#[derive(Debug, Default)]
pub struct Report {
    /// The retained range `first..next`.
    pub first: u64,
    /// The sequence after the newest.
    pub next: u64,
    /// Readable records.
    pub readable: u64,
    /// Unreadable sequences, as ranges `(from, to)` inclusive, with the first reason seen.
    pub unreadable: Vec<(u64, u64, String)>,
}

impl Report {
    fn unreadable(&mut self, sequence: u64, why: String) {
        match self.unreadable.last_mut() {
            Some((_, to, _)) if *to + 1 == sequence => *to = sequence,
            _ => self.unreadable.push((sequence, sequence, why)),
        }
    }

    /// How many sequences were unreadable.
    pub fn unreadable_count(&self) -> u64 {
        self.unreadable
            .iter()
            .map(|(from, to, _)| to - from + 1)
            .sum()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "sequences {}..{}: {} readable, {} unreadable",
            self.first,
            self.next.saturating_sub(1),
            self.readable,
            self.unreadable_count()
        )?;
        for (from, to, why) in &self.unreadable {
            if from == to {
                writeln!(f, "unreadable: {from} ({why})")?;
            } else {
                writeln!(f, "unreadable: {from}-{to} ({why})")?;
            }
        }
        Ok(())
    }
}

/// A record's event: its stored payload decoded (decompressed, of any format), or why not.
fn event(payload: bytes::Bytes) -> Result<StoredEvent, String> {
    crate::wire::record::stored(payload)
        .map_err(|error| format!("payload does not decode: {error}"))
}

/// A record's event, checked against its record's digests (`verify`, `export`, the salvage).
pub(crate) fn checked_event(payload: bytes::Bytes) -> Result<StoredEvent, String> {
    let stored = event(payload.clone())?;
    crate::wire::record::check_digests(&payload, &stored).map_err(|error| error.to_string())?;
    Ok(stored)
}

/// Writes one line of an export.
pub(crate) fn write_line(out: &mut impl Write, line: &str) -> Result<(), LogError> {
    writeln!(out, "{line}")
        .map_err(|error| LogError::Unavailable(format!("cannot write the export: {error}")))
}

/// Checks every retained record of the store in `dir`: it must be readable and whole (its
/// checksum, its body's digest), its payload and typed envelope must decode, its raw body (if
/// any) must be JSON, and the typed form and the raw body must name the same event (`Id` and
/// `Type`).
pub fn verify(dir: &Path) -> Result<Report, LogError> {
    let mut report = Report::default();
    let bounds = scan(dir, |sequence, scanned| {
        let checked = match scanned {
            Scanned::Record(record) => checked_event(record.payload).and_then(|stored| {
                line(&stored)?;
                let envelope = crate::pb::webhook::v1::Envelope::decode(stored.envelope)
                    .map_err(|error| format!("envelope does not decode: {error}"))?;
                agree(&envelope, &stored.raw_json)
            }),
            Scanned::Unreadable(why) => Err(why),
        };
        match checked {
            Ok(()) => report.readable += 1,
            Err(why) => report.unreadable(sequence, why),
        }
        Ok(())
    })?;
    report.first = bounds.first;
    report.next = bounds.next;
    Ok(report)
}

/// What `export` did: read the store through its index, or (`--salvage`, or when the index
/// cannot be read at all) salvaged it record by record.
#[derive(Debug)]
pub enum Exported {
    /// Through the index: every retained sequence, readable or not.
    Indexed(Report),
    /// Record by record ([`salvage`]), with why the index was not used (`None`: asked for).
    Salvaged(Salvaged, Option<String>),
}

impl Exported {
    /// Whether something could not be exported.
    pub fn incomplete(&self) -> bool {
        match self {
            Exported::Indexed(report) => report.unreadable_count() > 0,
            // Without the index, what is missing is not known: a salvage is never complete.
            Exported::Salvaged(..) => true,
        }
    }
}

impl std::fmt::Display for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exported::Indexed(report) => write!(f, "{report}"),
            Exported::Salvaged(salvaged, why) => {
                if let Some(why) = why {
                    writeln!(f, "the store cannot be read through its index ({why})")?;
                }
                write!(f, "{salvaged}")
            }
        }
    }
}

/// `export` as the command runs it: through the index; record by record when `salvage` is
/// asked for, or when the index cannot be read at all (the file exists but does not open, or
/// the pages that locate its records are damaged): nothing was written then.
pub fn export_or_salvage(
    dir: &Path,
    out: &mut impl Write,
    salvage_only: bool,
) -> Result<Exported, LogError> {
    let path = dir.join("events.redb");
    if salvage_only {
        return Ok(Exported::Salvaged(salvage(&path, out)?, None));
    }
    match export(dir, out) {
        Ok(report) => Ok(Exported::Indexed(report)),
        // Not a damaged store: newer, in use by a running gateway, or empty.
        Err(error @ (LogError::NewerFormat { .. } | LogError::Misconfigured(_))) => Err(error),
        Err(error) if path.is_file() => {
            let why = error.to_string();
            Ok(Exported::Salvaged(salvage(&path, out)?, Some(why)))
        }
        Err(error) => Err(error),
    }
}

/// Writes every readable event of the store in `dir` to `out`, one line each, in sequence order:
/// the original webhook body (compacted onto one line when it spans several), or the protobuf
/// JSON mapping of the envelope for an event that has none (a typed gRPC Publish).
pub fn export(dir: &Path, out: &mut impl Write) -> Result<Report, LogError> {
    let mut report = Report::default();
    let bounds = scan(dir, |sequence, scanned| {
        let line = match scanned {
            Scanned::Record(record) => {
                checked_event(record.payload).and_then(|stored| line(&stored))
            }
            Scanned::Unreadable(why) => Err(why),
        };
        match line {
            Ok(line) => {
                write_line(out, &line)?;
                report.readable += 1;
            }
            Err(why) => report.unreadable(sequence, why),
        }
        Ok(())
    })?;
    report.first = bounds.first;
    report.next = bounds.next;
    Ok(report)
}

/// Whether the typed `envelope` and the original body `raw` (empty for none) name the same event:
/// the body decoded again (tolerantly, as the gateway would) has the same `ChatEvent.Id` and
/// `Type`.
fn agree(envelope: &crate::pb::webhook::v1::Envelope, raw: &[u8]) -> Result<(), String> {
    if raw.is_empty() {
        return Ok(());
    }
    let again = crate::decode::decode(raw)
        .map_err(|error| format!("the original body no longer decodes: {error}"))?;
    let name = |envelope: &crate::pb::webhook::v1::Envelope| {
        envelope
            .chat_event
            .as_ref()
            .map(|event| (event.id, event.r#type.clone()))
            .unwrap_or_default()
    };
    let (typed, original) = (name(envelope), name(&again.envelope));
    if typed != original {
        return Err(format!(
            "the typed form is event {} of type {:?}, the original body event {} of type {:?}",
            typed.0, typed.1, original.0, original.1
        ));
    }
    Ok(())
}

/// One NDJSON line for a stored event.
pub(crate) fn line(stored: &StoredEvent) -> Result<String, String> {
    if stored.raw_json.is_empty() {
        return crate::pb::to_json("iqchannels.webhook.v1.Envelope", &stored.envelope)
            .map(|value| value.to_string())
            .map_err(|error| error.to_string());
    }
    let text = std::str::from_utf8(&stored.raw_json)
        .map_err(|error| format!("raw body is not UTF-8: {error}"))?;
    if !text.contains('\n') {
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|error| format!("raw body is not JSON: {error}"))?;
        return Ok(text.trim().to_owned());
    }
    // NDJSON needs one line: the body without the whitespace between its tokens (its numbers
    // untouched, so int64 ids beyond 2^53 stay exact).
    crate::decode::compact_json(text).ok_or_else(|| "raw body is not JSON".to_owned())
}

#[cfg(test)]
mod tests;
