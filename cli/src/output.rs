//! How results are printed: a table for people, JSON (`--json`) for
//! scripts; progress bars on standard error, never in the way of either.

use std::time::{Duration, SystemTime};

use comfy_table::{Table, presets::NOTHING};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Where results go.
pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// Prints `value` as JSON, or as the table `table` makes of it.
    pub fn emit<T: Serialize>(&self, value: &T, table: impl FnOnce(&T) -> Table) {
        if self.json {
            match serde_json::to_string_pretty(value) {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("idem: cannot print JSON: {e}"),
            }
        } else {
            println!("{}", table(value));
        }
    }

    /// A line for people (nothing with `--json`).
    pub fn note(&self, text: &str) {
        if !self.json {
            eprintln!("{text}");
        }
    }

    /// A progress bar over `total` items (hidden with `--json` or when
    /// standard error is not a terminal).
    pub fn progress(&self, total: u64, what: &str) -> ProgressBar {
        if self.json {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} ({eta})") {
            bar.set_style(style);
        }
        bar.set_message(what.to_owned());
        bar
    }
}

/// A table with the given column headers.
pub fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header);
    table
}

/// A time for people and JSON alike: RFC 3339, milliseconds, UTC.
pub fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Milliseconds since the epoch as a time.
pub fn millis(at: u64) -> String {
    time(SystemTime::UNIX_EPOCH + Duration::from_millis(at))
}

/// Bytes as text when they are UTF-8, else base64.
pub fn text_or_base64(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("base64:{}", data_encoding::BASE64.encode(bytes)),
    }
}

/// `--since`: a duration back from now ("2h") or an RFC 3339 time.
pub fn parse_since(text: &str) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{text} ago is before the epoch"));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!("{text:?} is neither a duration (\"2h\") nor a time (\"2026-11-26T10:00:00Z\")")
    })
}
