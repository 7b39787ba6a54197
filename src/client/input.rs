//! `publish`'s inputs, read as a stream: each input (a file, or `-` for stdin) is split into
//! events as it is read, on a thread of its own, and handed over through a window bounded in
//! events and bytes, so that memory stays small however large the input (an export of a whole
//! store). An input is a JSON array of events, NDJSON (one event per line), or JSON values one
//! after the other (a single event pretty-printed over several lines, or several).

use std::io::{BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Bytes of events read ahead of the one being sent, at most (an event larger than this is read
/// alone).
pub const WINDOW_BYTES: usize = 4 << 20;

/// Events read ahead of the one being sent, at most.
pub const WINDOW_EVENTS: usize = 256;

/// The longest line (or array item, or value) read: longer is rejected without being sent (the
/// gateway's limit, `--max-body-bytes`, is far below).
pub const MAX_EVENT_BYTES: usize = 64 << 20;

/// One event of an input, in order.
pub struct Item {
    /// `FILE#N` (`stdin#N`): the input and the event's 1-based position in it.
    pub place: String,
    /// The event's bytes, or why this part of the input cannot be sent (not JSON, too long).
    pub body: Result<Bytes, String>,
    /// Bytes of all inputs read so far (for the progress bar).
    pub read: u64,
    /// The event's room in the window, given back when the item is dropped.
    _window: OwnedSemaphorePermit,
}

/// An input opened, not yet read.
pub struct Opened {
    name: String,
    reader: Box<dyn Read + Send>,
}

/// Opens every input first, so that a missing file is an error before anything is sent. Returns
/// them with their total size when every input is a file of known size.
pub fn open(inputs: &[String]) -> std::io::Result<(Vec<Opened>, Option<u64>)> {
    let mut opened = Vec::with_capacity(inputs.len());
    let mut total = Some(0u64);
    for input in inputs {
        if input == "-" {
            total = None;
            opened.push(Opened {
                name: "stdin".to_owned(),
                reader: Box::new(std::io::stdin()),
            });
            continue;
        }
        let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{input}: {e}"));
        let file = std::fs::File::open(input).map_err(named)?;
        let length = file.metadata().map_err(named)?.len();
        total = total.map(|total| total + length);
        opened.push(Opened {
            name: input.clone(),
            reader: Box::new(file),
        });
    }
    Ok((opened, total))
}

/// Reads `inputs` in order on a thread of their own; their events arrive on the receiver, at
/// most [`WINDOW_EVENTS`] and [`WINDOW_BYTES`] ahead of the ones dropped. A read error ends the
/// stream with that error. Reading stops once the receiver is dropped.
pub fn spawn_reader(inputs: Vec<Opened>) -> mpsc::Receiver<std::io::Result<Item>> {
    let (tx, rx) = mpsc::channel(WINDOW_EVENTS);
    let window = Arc::new(Semaphore::new(WINDOW_BYTES));
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let read = Arc::new(AtomicU64::new(0));
        for input in inputs {
            let reader = Counting {
                inner: input.reader,
                read: read.clone(),
            };
            let mut index = 0;
            let mut emit = |body: Result<Bytes, String>| {
                index += 1;
                let size = body.as_ref().map_or(0, Bytes::len).clamp(1, WINDOW_BYTES);
                let Ok(permit) = runtime.block_on(window.clone().acquire_many_owned(size as u32))
                else {
                    return false;
                };
                let item = Item {
                    place: format!("{}#{index}", input.name),
                    body,
                    read: read.load(Ordering::Relaxed),
                    _window: permit,
                };
                tx.blocking_send(Ok(item)).is_ok()
            };
            let reader = std::io::BufReader::with_capacity(64 << 10, reader);
            match split(reader, &mut emit) {
                Ok(true) => {}
                Ok(false) => return, // Nobody listens any more.
                Err(error) => {
                    let error =
                        std::io::Error::new(error.kind(), format!("{}: {error}", input.name));
                    let _ = tx.blocking_send(Err(error));
                    return;
                }
            }
        }
    });
    rx
}

/// Counts the bytes read from an input.
struct Counting {
    inner: Box<dyn Read + Send>,
    read: Arc<AtomicU64>,
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Where `emit` is told of each event of one input: `false` from it stops the split.
pub type Emit<'a> = dyn FnMut(Result<Bytes, String>) -> bool + 'a;

/// Splits one input into events, calling `emit` for each: a JSON array's items; else, when its
/// first line is a whole JSON value (or not JSON at all), one event per non-blank line (NDJSON;
/// a bad line is sent as it is, for the gateway to say what is wrong with it); else the JSON
/// values one after the other (a pretty-printed event). What cannot be split (a broken array, a
/// broken value) is one item that says why; the rest of that input is not read. Returns `false`
/// when `emit` stopped it.
pub fn split<R: BufRead>(mut reader: R, emit: &mut Emit<'_>) -> std::io::Result<bool> {
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(true);
        }
        let blank = buffer
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        let all_blank = blank == buffer.len();
        reader.consume(blank);
        if !all_blank {
            break;
        }
    }
    if reader.fill_buf()?.first() == Some(&b'[') {
        return split_array(reader, emit);
    }
    let Some(first) = read_line(&mut reader)? else {
        return Ok(true);
    };
    let whole = match &first {
        Ok(line) => match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
            Ok(_) => true,
            Err(error) => error.classify() != serde_json::error::Category::Eof,
        },
        Err(_) => true,
    };
    if !whole {
        let Ok(first) = first else {
            return Ok(true);
        };
        // The newline `read_line` took off (whitespace, should the input have none).
        let first = std::io::Cursor::new(first).chain(&b"\n"[..]);
        return split_values(first.chain(reader), emit);
    }
    let mut line = Some(first);
    while let Some(next) = line {
        let keep = match next {
            Ok(text) if text.iter().all(u8::is_ascii_whitespace) => true,
            other => emit(other),
        };
        if !keep {
            return Ok(false);
        }
        line = read_line(&mut reader)?;
    }
    Ok(true)
}

/// The next line without its `\n`; `Err` (and the line skipped) when it is longer than
/// [`MAX_EVENT_BYTES`]; `None` at the end.
fn read_line<R: BufRead>(reader: &mut R) -> std::io::Result<Option<Result<Bytes, String>>> {
    let mut line = Vec::new();
    let limit = MAX_EVENT_BYTES as u64 + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.len() <= MAX_EVENT_BYTES {
        // The window counts the line's length: no spare capacity beyond it.
        line.shrink_to_fit();
        return Ok(Some(Ok(Bytes::from(line))));
    }
    // Too long: skip to the end of the line without keeping it.
    let mut skipped = line.len() as u64;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            break;
        }
        match buffer.iter().position(|&b| b == b'\n') {
            Some(at) => {
                reader.consume(at + 1);
                skipped += at as u64;
                break;
            }
            None => {
                let n = buffer.len();
                reader.consume(n);
                skipped += n as u64;
            }
        }
    }
    Ok(Some(Err(format!(
        "a line of {skipped} bytes, longer than any event the gateway takes; not sent"
    ))))
}

fn raw_bytes(raw: Box<RawValue>) -> Bytes {
    let text: Box<str> = raw.into();
    Bytes::from(text.into_string())
}

/// Why the rest of an input is not sent.
fn unreadable(what: &str, error: &serde_json::Error) -> String {
    format!("{what} is not valid JSON ({error}); the rest of this input is not sent")
}

/// The items of a JSON array, each sent as it is parsed.
fn split_array<R: BufRead>(reader: R, emit: &mut Emit<'_>) -> std::io::Result<bool> {
    struct Items<'e, 'a> {
        emit: &'e mut Emit<'a>,
        stopped: &'e mut bool,
    }
    impl<'de> Visitor<'de> for Items<'_, '_> {
        type Value = ();

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("an array of events")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(item) = seq.next_element::<Box<RawValue>>()? {
                if !(self.emit)(Ok(raw_bytes(item))) {
                    *self.stopped = true;
                    return Err(serde::de::Error::custom("stopped"));
                }
            }
            Ok(())
        }
    }
    let mut stopped = false;
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let parsed = serde::Deserializer::deserialize_seq(
        &mut deserializer,
        Items {
            emit,
            stopped: &mut stopped,
        },
    )
    .and_then(|()| deserializer.end());
    if stopped {
        return Ok(false);
    }
    match parsed {
        Ok(()) => Ok(true),
        Err(error) if error.is_io() => Err(std::io::Error::other(error)),
        Err(error) => Ok(emit(Err(unreadable("the array", &error)))),
    }
}

/// JSON values one after the other (whitespace between them).
fn split_values<R: Read>(reader: R, emit: &mut Emit<'_>) -> std::io::Result<bool> {
    let values = serde_json::Deserializer::from_reader(reader).into_iter::<Box<RawValue>>();
    for value in values {
        let keep = match value {
            Ok(value) => emit(Ok(raw_bytes(value))),
            Err(error) if error.is_io() => return Err(std::io::Error::other(error)),
            Err(error) => {
                emit(Err(unreadable("the input", &error)));
                return Ok(true);
            }
        };
        if !keep {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(input: &[u8]) -> Vec<Result<String, String>> {
        let mut out = Vec::new();
        let mut emit = |body: Result<Bytes, String>| {
            out.push(body.map(|b| String::from_utf8_lossy(&b).into_owned()));
            true
        };
        split(std::io::BufReader::with_capacity(8, input), &mut emit).expect("reads");
        out
    }

    fn ok(texts: &[&str]) -> Vec<Result<String, String>> {
        texts.iter().map(|t| Ok(t.to_string())).collect()
    }

    #[test]
    fn inputs_split_as_array_object_or_ndjson() {
        assert_eq!(
            items(b" [{\"a\":1}, {\"b\":2}] "),
            ok(&["{\"a\":1}", "{\"b\":2}"])
        );
        assert_eq!(items(b"{\n \"a\": 1\n}\n"), ok(&["{\n \"a\": 1\n}"]));
        assert_eq!(
            items(b"{\"a\":1}\n\n{\"b\":2}\nnot json\n"),
            ok(&["{\"a\":1}", "{\"b\":2}", "not json"])
        );
        assert_eq!(
            items(b"not json\n{\"a\":1}"),
            ok(&["not json", "{\"a\":1}"])
        );
        assert_eq!(
            items(b"{\n\"a\": 1\n}\n{\n\"b\": [2]\n}"),
            ok(&["{\n\"a\": 1\n}", "{\n\"b\": [2]\n}"])
        );
        assert_eq!(items(b""), ok(&[]));
        assert_eq!(items(b" \n\t\n"), ok(&[]));
        assert_eq!(items(b"[]"), ok(&[]));
    }

    #[test]
    fn what_cannot_be_split_is_one_item_saying_why() {
        let broken = items(b"[{\"a\":1}, {\"b\" 2}, {\"c\":3}]");
        assert_eq!(broken[0], Ok("{\"a\":1}".to_owned()));
        assert_eq!(broken.len(), 2, "{broken:?}");
        let why = broken[1].as_ref().expect_err("a reason");
        assert!(why.contains("the array is not valid JSON"), "{why}");
        let broken = items(b"{\n\"a\": 1\n}\n{\n\"b\" 2\n}");
        assert_eq!(broken.len(), 2, "{broken:?}");
        assert!(broken[1].is_err());
    }

    #[tokio::test]
    async fn the_window_bounds_what_is_read_ahead() {
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(100_000));
        let lines = 200;
        let input = line.repeat(lines).into_bytes();
        {
            let mut rx = spawn_reader(vec![Opened {
                name: "big".to_owned(),
                reader: Box::new(std::io::Cursor::new(input)),
            }]);
            // Nothing taken: the reader stops at the window.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let ahead = rx.len();
            assert!(
                ahead * line.len() <= WINDOW_BYTES,
                "{ahead} events of {} bytes read ahead",
                line.len()
            );
            assert!(ahead > 0);
            let mut count = 0;
            while let Some(item) = rx.recv().await {
                let item = item.expect("reads");
                count += 1;
                assert_eq!(item.place, format!("big#{count}"));
                assert_eq!(item.body.expect("an event").len(), line.len() - 1);
            }
            assert_eq!(count, lines);
        }
    }
}
