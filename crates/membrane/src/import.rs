//! `membrane import`: bulk-loads Segment messages from a JSONL or CSV file through the same
//! validation and ingest transaction as the HTTP API, with progress, resumable after a crash.
//!
//! Each batch commits together with the file's checkpoint (byte offset and line of the next
//! unread line, in Postgres), so a killed or interrupted import run again continues exactly
//! after its last committed batch: no row is applied twice, with or without a `messageId`.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use membrane_store::{ImportFile, ImportProgress, Message, Store};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Bytes of the file's beginning that, with its path and size, identify it for resuming.
const HEAD_BYTES: u64 = 64 * 1024;
/// How often progress is printed when stdout is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct ImportArgs {
    /// A JSONL file (one Segment message per line, each with its `type`) or a CSV file (see
    /// README.md, "Importing events", for its columns).
    file: PathBuf,
    /// The file's format; by default `.csv` files are CSV and anything else JSONL.
    #[arg(long, value_enum)]
    format: Option<InputFormat>,
    /// Messages per transaction (and per checkpoint).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Import the file from its start even if an earlier import of it got further or finished
    /// (messages with a `messageId` seen before are still skipped).
    #[arg(long)]
    restart: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum InputFormat {
    Jsonl,
    Csv,
}

/// One message read from the file, with where the reader stands after it.
struct Record {
    message: Message,
    /// Byte offset and line count just past this record.
    end: (i64, i64),
}

pub async fn import(store: &Store, args: &ImportArgs) -> Result<()> {
    let path = &args.file;
    let display = path.display().to_string();
    let format = args.format.unwrap_or_else(|| {
        let is_csv = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        if is_csv {
            InputFormat::Csv
        } else {
            InputFormat::Jsonl
        }
    });
    let identity = identify_file(path)?;
    if args.restart {
        store.forget_import(&identity).await?;
    }
    let start = match store.import_checkpoint(&identity).await? {
        Some(checkpoint) => {
            let done = checkpoint.progress;
            if let Some(completed_at) = checkpoint.completed_at {
                println!(
                    "{display} was imported completely on {}: {} applied, {} duplicate(s); \
                     --restart imports it again",
                    completed_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    done.applied,
                    done.duplicates
                );
                return Ok(());
            }
            println!(
                "resuming {display} at line {} (byte {}): {} applied before",
                done.line + 1,
                done.byte_offset,
                done.applied
            );
            done
        }
        None => ImportProgress::default(),
    };

    let interrupted = Arc::new(AtomicBool::new(false));
    let on_signal = interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.store(true, Ordering::SeqCst);
        }
    });

    let now = Utc::now();
    let mut records: Box<dyn Iterator<Item = Result<Record>>> = match format {
        InputFormat::Jsonl => Box::new(JsonlRecords::open(path, start, now)?),
        InputFormat::Csv => Box::new(CsvRecords::open(path, start, now)?),
    };
    let mut progress = Progress::new(identity.size, start);
    let mut reached = start;
    let batch_size = args.batch.max(1);
    let mut pending = Vec::with_capacity(batch_size);
    let mut end = (start.byte_offset, start.line);
    loop {
        let next = records.next().transpose()?;
        if let Some(record) = next {
            pending.push(record.message);
            end = record.end;
            if pending.len() < batch_size {
                continue;
            }
        }
        // A full batch, or the file's end: commit with the checkpoint.
        let at_end = pending.len() < batch_size;
        if interrupted.load(Ordering::SeqCst) {
            progress.finish();
            bail!(
                "interrupted: {display} is imported up to line {}; run the same command again \
                 to resume there",
                reached.line
            );
        }
        if !pending.is_empty() || end.0 != reached.byte_offset {
            reached = store
                .ingest_import_batch(&identity, &pending, reached, end)
                .await
                .with_context(|| format!("cannot import {display} up to line {}", end.1))?;
            pending.clear();
            progress.update(reached);
        }
        if at_end {
            break;
        }
    }
    store.complete_import(&identity, reached).await?;
    progress.finish();
    println!(
        "imported {display}: {} message(s) applied, {} duplicate(s) skipped, {} line(s)",
        reached.applied, reached.duplicates, reached.line
    );
    Ok(())
}

/// The file's path, size and the hash of its first block.
fn identify_file(path: &Path) -> Result<ImportFile> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("cannot read the size of {}", path.display()))?
        .len();
    let mut head = Vec::new();
    (&mut file)
        .take(HEAD_BYTES)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let absolute = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve the path of {}", path.display()))?;
    Ok(ImportFile {
        path: absolute.display().to_string(),
        size: i64::try_from(size).context("the file is larger than 8 EiB")?,
        head_sha256: hex::encode(Sha256::digest(&head)),
    })
}

/// Messages of a JSONL file, one object per line; blank lines are skipped.
struct JsonlRecords {
    reader: BufReader<File>,
    display: String,
    now: DateTime<Utc>,
    offset: i64,
    line: i64,
    buffer: Vec<u8>,
}

impl JsonlRecords {
    fn open(path: &Path, start: ImportProgress, now: DateTime<Utc>) -> Result<JsonlRecords> {
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        file.seek(SeekFrom::Start(u64::try_from(start.byte_offset)?))
            .with_context(|| format!("cannot seek in {}", path.display()))?;
        Ok(JsonlRecords {
            reader: BufReader::new(file),
            display: path.display().to_string(),
            now,
            offset: start.byte_offset,
            line: start.line,
            buffer: Vec::new(),
        })
    }
}

impl Iterator for JsonlRecords {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            self.buffer.clear();
            let read = match self.reader.read_until(b'\n', &mut self.buffer) {
                Ok(0) => return None,
                Ok(read) => read,
                Err(e) => return Some(Err(e).context(format!("cannot read {}", self.display))),
            };
            self.offset += read as i64;
            self.line += 1;
            let location = format!("{}:{}", self.display, self.line);
            let text = match std::str::from_utf8(&self.buffer) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => text,
                Err(e) => return Some(Err(anyhow::anyhow!("{location}: not UTF-8 text ({e})"))),
            };
            let parsed = serde_json::from_str::<Value>(text)
                .with_context(|| format!("{location}: not a JSON object"))
                .and_then(|value| {
                    membrane_http::parse_message(&value, None, "", self.now).map_err(|e| {
                        anyhow::anyhow!("{location}: field `{}`: {}", e.pointer, e.message)
                    })
                });
            return Some(parsed.map(|message| Record {
                message,
                end: (self.offset, self.line),
            }));
        }
    }
}

/// What a CSV column holds.
#[derive(Debug, Clone, PartialEq)]
enum Column {
    /// A top-level Segment field, taken as a string.
    Field(&'static str),
    /// `properties.NAME`: one key of a track's (or page's, screen's) properties.
    Property(String),
    /// `traits.NAME`: one key of an identify's traits.
    Trait(String),
}

/// The top-level Segment fields a CSV file may have as columns.
const CSV_FIELDS: [&str; 8] = [
    "type",
    "userId",
    "anonymousId",
    "event",
    "name",
    "category",
    "timestamp",
    "messageId",
];

/// Messages of a CSV file with a header row naming the columns.
struct CsvRecords {
    reader: csv::Reader<File>,
    columns: Vec<Column>,
    display: String,
    now: DateTime<Utc>,
    record: csv::StringRecord,
    lines: LineCounter,
}

impl CsvRecords {
    fn open(path: &Path, start: ImportProgress, now: DateTime<Utc>) -> Result<CsvRecords> {
        let display = path.display().to_string();
        let file = File::open(path).with_context(|| format!("cannot open {display}"))?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(file);
        let header = reader
            .headers()
            .with_context(|| format!("{display}:1: cannot read the header row"))?
            .clone();
        let columns = parse_header(&header).map_err(|e| anyhow::anyhow!("{display}:1: {e}"))?;
        if start.byte_offset > 0 {
            let mut position = csv::Position::new();
            position
                .set_byte(u64::try_from(start.byte_offset)?)
                .set_line(u64::try_from(start.line)? + 1);
            reader
                .seek(position)
                .with_context(|| format!("cannot seek in {display}"))?;
        }
        Ok(CsvRecords {
            reader,
            columns,
            display,
            now,
            record: csv::StringRecord::new(),
            lines: LineCounter::open(path, start)?,
        })
    }

    /// The record just read, as a Segment message object.
    fn to_object(&self, location: &str) -> Result<Value> {
        if self.record.len() != self.columns.len() {
            bail!(
                "{location}: {} cell(s) but the header names {} column(s)",
                self.record.len(),
                self.columns.len()
            );
        }
        let mut object = Map::new();
        let (mut properties, mut traits) = (Map::new(), Map::new());
        for (column, cell) in self.columns.iter().zip(self.record.iter()) {
            // An empty cell is an absent field.
            if cell.is_empty() {
                continue;
            }
            match column {
                Column::Field(name) => {
                    object.insert((*name).to_owned(), Value::String(cell.to_owned()));
                }
                Column::Property(key) => {
                    properties.insert(key.clone(), cell_value(cell));
                }
                Column::Trait(key) => {
                    traits.insert(key.clone(), cell_value(cell));
                }
            }
        }
        if !properties.is_empty() {
            object.insert("properties".to_owned(), Value::Object(properties));
        }
        if !traits.is_empty() {
            object.insert("traits".to_owned(), Value::Object(traits));
        }
        Ok(Value::Object(object))
    }
}

/// A property or trait cell: JSON if it parses as JSON (numbers, booleans, null, quoted
/// strings, objects, arrays), else the text as a string.
fn cell_value(cell: &str) -> Value {
    serde_json::from_str(cell).unwrap_or_else(|_| Value::String(cell.to_owned()))
}

fn parse_header(header: &csv::StringRecord) -> Result<Vec<Column>, String> {
    let mut columns = Vec::with_capacity(header.len());
    for (index, name) in header.iter().enumerate() {
        let name = name.trim();
        let column = if let Some(key) = name.strip_prefix("properties.") {
            Column::Property(key.to_owned())
        } else if let Some(key) = name.strip_prefix("traits.") {
            Column::Trait(key.to_owned())
        } else if let Some(field) = CSV_FIELDS.iter().find(|field| **field == name) {
            Column::Field(field)
        } else {
            return Err(format!(
                "column {} `{name}` is unknown: expected one of {}, or properties.NAME or \
                 traits.NAME",
                index + 1,
                CSV_FIELDS.join(", ")
            ));
        };
        if matches!(&column, Column::Property(key) | Column::Trait(key) if key.is_empty()) {
            return Err(format!("column {} `{name}` names no key", index + 1));
        }
        if columns.contains(&column) {
            return Err(format!("column {} `{name}` appears twice", index + 1));
        }
        columns.push(column);
    }
    if !columns.contains(&Column::Field("type")) {
        return Err(format!(
            "no `type` column: the header row needs `type` and a `userId` or `anonymousId` \
             column; it has {}",
            header.iter().collect::<Vec<_>>().join(",")
        ));
    }
    Ok(columns)
}

/// The CSV column a message's JSON pointer points into (`/properties/plan` is `properties.plan`).
fn column_of(pointer: &str) -> String {
    let mut tokens = pointer
        .split('/')
        .skip(1)
        .map(|token| token.replace("~1", "/").replace("~0", "~"));
    match tokens.next() {
        Some(first) if first == "properties" || first == "traits" => match tokens.next() {
            Some(key) => format!("{first}.{key}"),
            None => first,
        },
        Some(first) => first,
        None => String::new(),
    }
}

impl Iterator for CsvRecords {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            match self.reader.read_record(&mut self.record) {
                Ok(false) => return None,
                Ok(true) => {}
                Err(e) => {
                    let start = e.position().map_or(0, csv::Position::byte);
                    let line = match self.lines.line_starting(start) {
                        Ok(line) => line,
                        Err(read) => return Some(Err(read.into())),
                    };
                    return Some(Err(anyhow::anyhow!("{}:{line}: {e}", self.display)));
                }
            }
            let start = self.record.position().map_or(0, csv::Position::byte);
            let (line, next) = match self.lines.line_starting(start).and_then(|line| {
                let next = self.reader.position().byte();
                Ok((line, (next, self.lines.newlines_before(next)?)))
            }) {
                Ok(lines) => lines,
                Err(read) => {
                    return Some(Err(read).context(format!("cannot read {}", self.display)))
                }
            };
            let location = format!("{}:{line}", self.display);
            // A row of empty cells (e.g. a blank line in a one-column file) carries nothing.
            if self.record.iter().all(str::is_empty) {
                continue;
            }
            let end = (next.0 as i64, next.1);
            let parsed = self.to_object(&location).and_then(|value| {
                membrane_http::parse_message(&value, None, "", self.now).map_err(|e| {
                    let column = column_of(&e.pointer);
                    if column.is_empty() {
                        anyhow::anyhow!("{location}: {}", e.message)
                    } else {
                        anyhow::anyhow!("{location}: column `{column}`: {}", e.message)
                    }
                })
            });
            return Some(parsed.map(|message| Record { message, end }));
        }
    }
}

/// Counts line breaks up to a byte offset, reading the file a second time: the csv crate's own
/// line numbers miss CRLF line ends, and file:line must name the line an editor shows.
struct LineCounter {
    reader: BufReader<File>,
    offset: u64,
    newlines: i64,
}

impl LineCounter {
    fn open(path: &Path, start: ImportProgress) -> Result<LineCounter> {
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let offset = u64::try_from(start.byte_offset)?;
        file.seek(SeekFrom::Start(offset))
            .with_context(|| format!("cannot seek in {}", path.display()))?;
        Ok(LineCounter {
            reader: BufReader::new(file),
            offset,
            newlines: start.line,
        })
    }

    /// Line breaks before byte `offset`; offsets are asked for in increasing order.
    fn newlines_before(&mut self, offset: u64) -> std::io::Result<i64> {
        while self.offset < offset {
            let buffer = self.reader.fill_buf()?;
            if buffer.is_empty() {
                break;
            }
            let take = buffer
                .len()
                .min(usize::try_from(offset - self.offset).unwrap_or(usize::MAX));
            self.newlines += buffer[..take].iter().filter(|b| **b == b'\n').count() as i64;
            self.reader.consume(take);
            self.offset += take as u64;
        }
        Ok(self.newlines)
    }

    /// The line of the record the csv crate places at `offset`, which may be the LF of the
    /// previous record's CRLF: line ends there are skipped.
    fn line_starting(&mut self, offset: u64) -> std::io::Result<i64> {
        self.newlines_before(offset)?;
        loop {
            let buffer = self.reader.fill_buf()?;
            match buffer.first() {
                Some(b'\n') => self.newlines += 1,
                Some(b'\r') => {}
                _ => return Ok(self.newlines + 1),
            }
            self.reader.consume(1);
            self.offset += 1;
        }
    }
}

/// A progress bar on a terminal; otherwise a plain line every few seconds.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_line: Instant,
}

impl Progress {
    fn new(total_bytes: i64, start: ImportProgress) -> Progress {
        let total = u64::try_from(total_bytes).unwrap_or_default();
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stdout(),
            );
            let style = indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let mut progress = Progress {
            bar,
            total,
            last_line: Instant::now(),
        };
        progress.update(start);
        progress
    }

    fn update(&mut self, reached: ImportProgress) {
        let message = format!(
            "line {}: {} applied, {} duplicate(s)",
            reached.line, reached.applied, reached.duplicates
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(u64::try_from(reached.byte_offset).unwrap_or_default());
                bar.set_message(message);
            }
            None if self.last_line.elapsed() >= PLAIN_PROGRESS_EVERY => {
                self.last_line = Instant::now();
                let percent = if self.total == 0 {
                    100.0
                } else {
                    reached.byte_offset as f64 * 100.0 / self.total as f64
                };
                println!("progress: {percent:.1}% ({message})");
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_fields_properties_and_traits() {
        let header =
            csv::StringRecord::from(vec!["type", "userId", "properties.amount", "traits.plan"]);
        assert_eq!(
            parse_header(&header).expect("a valid header"),
            [
                Column::Field("type"),
                Column::Field("userId"),
                Column::Property("amount".to_owned()),
                Column::Trait("plan".to_owned()),
            ]
        );
        let unknown = csv::StringRecord::from(vec!["type", "user"]);
        let error = parse_header(&unknown).expect_err("`user` is no column");
        assert!(error.starts_with("column 2 `user` is unknown"), "{error}");
    }

    #[test]
    fn cells_are_json_when_they_parse_as_json() {
        assert_eq!(cell_value("120"), Value::from(120));
        assert_eq!(cell_value("true"), Value::Bool(true));
        assert_eq!(cell_value("\"42\""), Value::from("42"));
        assert_eq!(cell_value("pro"), Value::from("pro"));
    }

    #[test]
    fn pointers_map_back_to_columns() {
        assert_eq!(column_of("/userId"), "userId");
        assert_eq!(column_of("/properties/amount"), "properties.amount");
        assert_eq!(column_of("/traits/a~1b/c"), "traits.a/b");
        assert_eq!(column_of(""), "");
    }
}
