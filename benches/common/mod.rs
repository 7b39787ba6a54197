//! What the benches share: the request body they send, and logging set up as the binary does.
//!
//! Each bench includes this module (`mod common;`) and uses part of it.
#![allow(dead_code)]

use bytes::Bytes;

pub mod cpu;
pub mod plot;

/// Events in one batch request.
pub const BATCH: usize = 100;

/// The fixture split around `ChatEvent.Id`, so each request gets a fresh id for the price of one
/// copy of the bytes.
#[derive(Clone)]
pub struct Template {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
}

impl Template {
    /// Reads the fixture and finds `ChatEvent.Id` in it.
    pub fn load() -> Self {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/chat_closed.json"
        );
        let text = std::fs::read_to_string(path).expect("the fixture chat_closed.json is readable");
        let chat_event = text
            .find("\"ChatEvent\"")
            .expect("the fixture has a ChatEvent");
        let key = chat_event
            + text[chat_event..]
                .find("\"Id\"")
                .expect("ChatEvent has an Id");
        let after_key = key + "\"Id\"".len();
        let colon = after_key + text[after_key..].find(':').expect("a colon after \"Id\"");
        let start = colon
            + 1
            + text[colon + 1..]
                .find(|c: char| !c.is_whitespace())
                .expect("a value after \"Id\":");
        let end = start
            + text[start..]
                .find(|c: char| !c.is_ascii_digit())
                .expect("the Id is followed by more JSON");
        let template = Self {
            prefix: text.as_bytes()[..start].to_vec(),
            suffix: text.as_bytes()[end..].to_vec(),
        };
        // The splice must land on ChatEvent.Id and nowhere else.
        let probe: serde_json::Value =
            serde_json::from_slice(&template.body(987_654_321)).expect("the spliced body is JSON");
        assert_eq!(
            probe["ChatEvent"]["Id"], 987_654_321,
            "splice hits ChatEvent.Id"
        );
        template
    }

    /// Appends the fixture with `ChatEvent.Id` = `id` to `out`.
    pub fn write(&self, id: i64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(id.to_string().as_bytes());
        out.extend_from_slice(&self.suffix);
    }

    /// The fixture with `ChatEvent.Id` = `id`.
    pub fn body(&self, id: i64) -> Bytes {
        let mut body = Vec::with_capacity(self.prefix.len() + 20 + self.suffix.len());
        self.write(id, &mut body);
        Bytes::from(body)
    }

    /// A JSON array of `BATCH` events with ids `first..first + BATCH`, as `/v1/events:batch`
    /// takes it.
    pub fn batch(&self, first: i64) -> Bytes {
        let one = self.prefix.len() + 20 + self.suffix.len() + 2;
        let mut body = Vec::with_capacity(BATCH * one + 2);
        body.push(b'[');
        for i in 0..BATCH as i64 {
            if i > 0 {
                body.extend_from_slice(b",\n");
            }
            self.write(first + i, &mut body);
        }
        body.push(b']');
        Bytes::from(body)
    }
}

/// Logging as `main.rs` sets it up (`IQGW_LOG`, default `info`, to stderr). Without a subscriber,
/// every span the dependencies open (h2 opens several per request) would go through tracing's
/// `log` fallback, a cost the binary does not pay.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IQGW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Where benches put their stores: `target/tmp`, on the real disk (unlike /tmp on some machines).
pub fn data_parent() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Whether `path` is on tmpfs, where fsync costs nothing (a durable figure there means little).
pub fn is_tmpfs(path: &std::path::Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills plain data; the path is NUL-terminated and outlives the call.
    // `f_type` is i64 here but another integer type on other targets.
    #[allow(clippy::useless_conversion)]
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut stat) == 0 && i64::from(stat.f_type) == TMPFS_MAGIC
    }
}

/// The median of the finite values (the mean of the middle two for an even count); NaN if none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}
