//! Segment's message shapes, validated field by field into store messages.
//!
//! Every check names the offending field by RFC 6901 JSON pointer, so a client can fix exactly
//! that field; a request with any bad field is rejected whole.

use std::borrow::Cow;
use std::io::Read;

use chrono::{DateTime, Utc};
use membrane_store::Message;
use serde_json::{Map, Value};

/// Most messages one `/v1/batch` request may carry.
pub const MAX_BATCH_MESSAGES: usize = 2_500;
/// Largest single message, serialized compactly (Segment's own per-message limit is 32 KB).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Deepest nesting of objects and arrays in a request body (the body itself is level 1).
pub const MAX_NESTING_DEPTH: usize = 32;
/// Longest event name, in characters (page and screen names count in their derived event name).
pub const MAX_EVENT_NAME_CHARS: usize = 200;
/// Longest `userId` or `anonymousId`, in characters.
pub const MAX_USER_ID_CHARS: usize = 256;

/// Reserved prefix of the events membrane writes for bucket transitions.
const RESERVED_EVENT_PREFIX: &str = "bucket:";

/// A precise complaint about one field of a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pointer}: {message}")]
pub struct FieldError {
    /// RFC 6901 JSON pointer to the offending field ("" = the whole body).
    pub pointer: String,
    pub message: String,
}

fn field_error(pointer: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        pointer: pointer.to_owned(),
        message: message.into(),
    }
}

/// Segment's message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Track,
    Identify,
    Page,
    Screen,
    /// Accepted and ignored: membrane does not merge identities yet.
    Alias,
    /// Accepted and ignored: membrane has no accounts.
    Group,
}

impl MessageType {
    const ALL: [MessageType; 6] = [
        MessageType::Track,
        MessageType::Identify,
        MessageType::Page,
        MessageType::Screen,
        MessageType::Alias,
        MessageType::Group,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MessageType::Track => "track",
            MessageType::Identify => "identify",
            MessageType::Page => "page",
            MessageType::Screen => "screen",
            MessageType::Alias => "alias",
            MessageType::Group => "group",
        }
    }

    fn from_name(name: &str) -> Option<MessageType> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// Which endpoint a body came to.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `/v1/track`, `/v1/page`, ...: one message of that type.
    Single(MessageType),
    /// `/v1/batch`: `{"batch": [message, ...], "sentAt"?: ...}`, each with its own `type`.
    Batch,
}

/// When a message reached us and when its client says it sent it: the reference points of
/// Segment's clock-skew correction.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    received_at: DateTime<Utc>,
    /// A batch's own `sentAt`, which its messages inherit (analytics-node sends it there).
    batch_sent_at: Option<DateTime<Utc>>,
}

/// Extracts the credential from an `Authorization` header value (Basic user or Bearer token).
pub fn credential(header: &str) -> Option<String> {
    if let Some(token) = header.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let encoded = header.strip_prefix("Basic ")?;
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split(':').next().unwrap_or_default().to_owned())
}

/// Why a request body could not be decoded from its `Content-Encoding`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("unsupported Content-Encoding `{0}`: send the body as is, or gzip it")]
    UnsupportedEncoding(String),
    #[error("the gzip body is corrupt: {0}")]
    CorruptGzip(String),
    #[error("the body inflates to more than {limit} bytes")]
    TooLarge { limit: usize },
}

/// The body as sent before its `Content-Encoding` (analytics-python gzips with `gzip=True`).
/// Inflating stops past `limit` bytes, so a small compressed body cannot expand without bound.
pub fn decode_body<'a>(
    content_encoding: Option<&str>,
    body: &'a [u8],
    limit: usize,
) -> Result<Cow<'a, [u8]>, BodyError> {
    let encoding = content_encoding.map(|e| e.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("" | "identity") => Ok(Cow::Borrowed(body)),
        Some("gzip" | "x-gzip") => {
            let mut inflated = Vec::new();
            // One byte past the limit tells "too large" apart from "exactly at the limit".
            flate2::read::MultiGzDecoder::new(body)
                .take(limit as u64 + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| BodyError::CorruptGzip(e.to_string()))?;
            if inflated.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            Ok(Cow::Owned(inflated))
        }
        Some(other) => Err(BodyError::UnsupportedEncoding(other.to_owned())),
    }
}

/// Validates a whole request body; alias and group messages yield nothing to store.
pub fn parse_request(
    body: &Value,
    shape: Shape,
    received_at: DateTime<Utc>,
) -> Result<Vec<Message>, FieldError> {
    check_storable(body, "")?;
    match shape {
        Shape::Single(kind) => {
            check_message_size(body, "")?;
            let arrival = Arrival {
                received_at,
                batch_sent_at: None,
            };
            Ok(parse_segment(body, Some(kind), "", arrival)?
                .into_iter()
                .collect())
        }
        Shape::Batch => {
            let object = body
                .as_object()
                .ok_or_else(|| field_error("", "expected a JSON object with a `batch` array"))?;
            let items = match object.get("batch") {
                Some(Value::Array(items)) => items,
                Some(other) => {
                    return Err(field_error(
                        "/batch",
                        format!("expected an array of messages, got {}", kind_of(other)),
                    ))
                }
                None => {
                    return Err(field_error(
                        "/batch",
                        "missing `batch`: expected an array of messages",
                    ))
                }
            };
            if items.len() > MAX_BATCH_MESSAGES {
                return Err(field_error(
                    "/batch",
                    format!(
                        "{} messages in one batch; at most {MAX_BATCH_MESSAGES} are accepted",
                        items.len()
                    ),
                ));
            }
            let arrival = Arrival {
                received_at,
                batch_sent_at: optional_time(object, "sentAt", "")?,
            };
            let mut messages = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let pointer = format!("/batch/{index}");
                check_message_size(item, &pointer)?;
                messages.extend(parse_segment(item, None, &pointer, arrival)?);
            }
            Ok(messages)
        }
    }
}

/// Validates one message at `pointer` (`expected_type`: the endpoint's type name, if any), with
/// `now` as the time it was received. Alias and group messages, which membrane ignores, are
/// refused here: a caller that keeps every message would otherwise lose them silently.
pub fn parse_message(
    value: &Value,
    expected_type: Option<&str>,
    pointer: &str,
    now: DateTime<Utc>,
) -> Result<Message, FieldError> {
    let expected = match expected_type {
        Some(name) => Some(
            MessageType::from_name(name)
                .ok_or_else(|| field_error(&format!("{pointer}/type"), unsupported_type(name)))?,
        ),
        None => None,
    };
    check_storable(value, pointer)?;
    let arrival = Arrival {
        received_at: now,
        batch_sent_at: None,
    };
    parse_segment(value, expected, pointer, arrival)?.ok_or_else(|| {
        field_error(
            &format!("{pointer}/type"),
            "alias and group messages carry nothing membrane stores",
        )
    })
}

fn unsupported_type(name: &str) -> String {
    let known: Vec<&str> = MessageType::ALL.iter().map(|kind| kind.name()).collect();
    format!(
        "unsupported type \"{name}\": expected one of {}",
        known.join(", ")
    )
}

/// Validates one message; `None` for the types membrane accepts and ignores.
fn parse_segment(
    value: &Value,
    expected_type: Option<MessageType>,
    pointer: &str,
    arrival: Arrival,
) -> Result<Option<Message>, FieldError> {
    let at = |field: &str| format!("{pointer}/{field}");
    let object = value.as_object().ok_or_else(|| {
        field_error(
            pointer,
            format!("expected a message object, got {}", kind_of(value)),
        )
    })?;
    let kind = match (object.get("type"), expected_type) {
        (None, Some(kind)) => kind,
        (None, None) => {
            return Err(field_error(
                &at("type"),
                "missing `type`: every message of a batch names its type",
            ))
        }
        (Some(Value::String(name)), expected) => {
            let kind = MessageType::from_name(name)
                .ok_or_else(|| field_error(&at("type"), unsupported_type(name)))?;
            if let Some(expected) = expected.filter(|expected| *expected != kind) {
                return Err(field_error(
                    &at("type"),
                    format!(
                        "`type` is \"{name}\" but this endpoint takes \"{}\"",
                        expected.name()
                    ),
                ));
            }
            kind
        }
        (Some(other), _) => {
            return Err(field_error(
                &at("type"),
                format!("expected a string, got {}", kind_of(other)),
            ))
        }
    };
    let user_id = user_of(object, pointer)?;
    let message_id = optional_string(object, "messageId", pointer)?;
    // Validated for every type, so a bad timestamp is reported whatever the message is.
    let occurred_at = occurred_at(object, pointer, arrival)?;
    let message = match kind {
        MessageType::Track => {
            let event = required_event_name(object, pointer)?;
            Message::Track {
                message_id,
                user_id,
                event,
                occurred_at,
                properties: optional_object(object, "properties", pointer)?,
            }
        }
        MessageType::Page | MessageType::Screen => {
            let name = optional_string(object, "name", pointer)?;
            let category = optional_string(object, "category", pointer)?;
            let mut properties = optional_object(object, "properties", pointer)?;
            let event = viewed_event_name(kind, name.as_deref(), category.as_deref());
            check_event_name(&event, &at("name"))?;
            // Segment's facade copies `name` and `category` into the properties.
            for (field, text) in [("name", name), ("category", category)] {
                if let Some(text) = text {
                    properties.insert(field.to_owned(), Value::String(text));
                }
            }
            Message::Track {
                message_id,
                user_id,
                event,
                occurred_at,
                properties,
            }
        }
        MessageType::Identify => Message::Identify {
            message_id,
            user_id,
            traits: optional_object(object, "traits", pointer)?,
        },
        MessageType::Alias | MessageType::Group => return Ok(None),
    };
    Ok(Some(message))
}

/// The event name Segment gives page and screen calls in event destinations (analytics.js
/// facade, as Amplitude and Mixpanel receive them): "Viewed {category} {name} Page" for a named
/// page, "Loaded a Page" for an unnamed one; likewise "... Screen".
fn viewed_event_name(kind: MessageType, name: Option<&str>, category: Option<&str>) -> String {
    let noun = if kind == MessageType::Screen {
        "Screen"
    } else {
        "Page"
    };
    match (
        category.filter(|c| !c.is_empty()),
        name.filter(|n| !n.is_empty()),
    ) {
        (Some(category), Some(name)) => format!("Viewed {category} {name} {noun}"),
        (None, Some(name)) => format!("Viewed {name} {noun}"),
        // As in the facade, a category without a name does not name the page.
        (_, None) => format!("Loaded a {noun}"),
    }
}

fn required_event_name(object: &Map<String, Value>, pointer: &str) -> Result<String, FieldError> {
    let event_pointer = format!("{pointer}/event");
    match object.get("event") {
        Some(Value::String(event)) => {
            check_event_name(event, &event_pointer)?;
            Ok(event.clone())
        }
        None | Some(Value::Null) => Err(field_error(
            &event_pointer,
            "missing `event` (the event name)",
        )),
        Some(other) => Err(field_error(
            &event_pointer,
            format!("expected a string, got {}", kind_of(other)),
        )),
    }
}

fn check_event_name(event: &str, pointer: &str) -> Result<(), FieldError> {
    if event.trim().is_empty() {
        return Err(field_error(pointer, "the event name is empty"));
    }
    let length = event.chars().count();
    if length > MAX_EVENT_NAME_CHARS {
        return Err(field_error(
            pointer,
            format!("the event name has {length} characters; at most {MAX_EVENT_NAME_CHARS}"),
        ));
    }
    if event.starts_with(RESERVED_EVENT_PREFIX) {
        return Err(field_error(
            pointer,
            "event names beginning `bucket:` are reserved for membrane's transitions",
        ));
    }
    Ok(())
}

fn user_of(object: &Map<String, Value>, pointer: &str) -> Result<String, FieldError> {
    for field in ["userId", "anonymousId"] {
        let field_pointer = format!("{pointer}/{field}");
        let id = match object.get(field) {
            None | Some(Value::Null) => continue,
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            // Some clients send numeric ids; Segment stringifies them.
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(field_error(
                    &field_pointer,
                    format!("expected a non-empty string, got {}", describe(other)),
                ))
            }
        };
        let length = id.chars().count();
        if length > MAX_USER_ID_CHARS {
            return Err(field_error(
                &field_pointer,
                format!("`{field}` has {length} characters; at most {MAX_USER_ID_CHARS}"),
            ));
        }
        return Ok(id);
    }
    Err(field_error(
        &format!("{pointer}/userId"),
        "missing `userId`: a message needs a `userId` or an `anonymousId`",
    ))
}

fn optional_string(
    object: &Map<String, Value>,
    field: &str,
    pointer: &str,
) -> Result<Option<String>, FieldError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(field_error(
            &format!("{pointer}/{field}"),
            format!("expected a string, got {}", kind_of(other)),
        )),
    }
}

fn optional_object(
    object: &Map<String, Value>,
    field: &str,
    pointer: &str,
) -> Result<Map<String, Value>, FieldError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(other) => Err(field_error(
            &format!("{pointer}/{field}"),
            format!("expected an object, got {}", kind_of(other)),
        )),
    }
}

/// When the message happened, per Segment: the device's time (`originalTimestamp`, else
/// `timestamp`) shifted by the device clock's skew when the client says when it sent the
/// message: `receivedAt - (sentAt - originalTimestamp)`. Without `sentAt` the device's time is
/// taken as is (server-side libraries and historical imports); without any, the arrival time.
fn occurred_at(
    object: &Map<String, Value>,
    pointer: &str,
    arrival: Arrival,
) -> Result<DateTime<Utc>, FieldError> {
    let original = optional_time(object, "originalTimestamp", pointer)?;
    let timestamp = optional_time(object, "timestamp", pointer)?;
    let sent_at = optional_time(object, "sentAt", pointer)?.or(arrival.batch_sent_at);
    Ok(match (original.or(timestamp), sent_at) {
        (Some(device_time), Some(sent_at)) => arrival.received_at - (sent_at - device_time),
        (Some(device_time), None) => device_time,
        (None, _) => arrival.received_at,
    })
}

fn optional_time(
    object: &Map<String, Value>,
    field: &str,
    pointer: &str,
) -> Result<Option<DateTime<Utc>>, FieldError> {
    let field_pointer = format!("{pointer}/{field}");
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => DateTime::parse_from_rfc3339(text)
            .map(|time| Some(time.with_timezone(&Utc)))
            .map_err(|e| {
                field_error(
                    &field_pointer,
                    format!(
                        "`{text}` is not an RFC 3339 timestamp ({e}), e.g. 2026-11-27T09:30:00Z"
                    ),
                )
            }),
        Some(other) => Err(field_error(
            &field_pointer,
            format!(
                "expected an RFC 3339 timestamp string, got {}",
                kind_of(other)
            ),
        )),
    }
}

/// Checks that `body` (found at `pointer`) can be written: no nesting deeper than
/// [`MAX_NESTING_DEPTH`], and no U+0000, which Postgres text and jsonb refuse.
fn check_storable(body: &Value, pointer: &str) -> Result<(), FieldError> {
    match first_unstorable(body, 1) {
        Some((within, Unstorable::TooDeep)) => Err(field_error(
            &format!("{pointer}{within}"),
            format!("nested deeper than {MAX_NESTING_DEPTH} levels of objects and arrays"),
        )),
        Some((within, Unstorable::Nul)) => Err(field_error(
            &format!("{pointer}{within}"),
            "contains the NUL character (\\u0000), which Postgres text cannot hold; remove it",
        )),
        None => Ok(()),
    }
}

/// Why a part of a body cannot be written.
enum Unstorable {
    TooDeep,
    /// A string or object key holding U+0000.
    Nul,
}

/// The pointer, relative to `value` at `depth`, of the first object or array nested deeper
/// than [`MAX_NESTING_DEPTH`] or the first string or key holding U+0000. Pointers are only
/// built on the way out of a failure: every request walks its whole body here.
fn first_unstorable(value: &Value, depth: usize) -> Option<(String, Unstorable)> {
    let within = |token: &dyn Fn() -> String, child: &Value| {
        first_unstorable(child, depth + 1)
            .map(|(rest, problem)| (format!("/{}{rest}", token()), problem))
    };
    match value {
        Value::Object(_) | Value::Array(_) if depth > MAX_NESTING_DEPTH => {
            Some((String::new(), Unstorable::TooDeep))
        }
        Value::Object(map) => map.iter().find_map(|(key, child)| {
            if key.contains('\0') {
                return Some((format!("/{}", escape(key)), Unstorable::Nul));
            }
            within(&|| escape(key), child)
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, child)| within(&|| index.to_string(), child)),
        Value::String(text) if text.contains('\0') => Some((String::new(), Unstorable::Nul)),
        _ => None,
    }
}

/// Escapes one key as an RFC 6901 reference token.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn check_message_size(message: &Value, pointer: &str) -> Result<(), FieldError> {
    let size = serialized_size(message);
    if size > MAX_MESSAGE_BYTES {
        return Err(field_error(
            pointer,
            format!("the message is {size} bytes; at most {MAX_MESSAGE_BYTES} bytes are accepted"),
        ));
    }
    Ok(())
}

/// Bytes of `value` as compact JSON, counted without building the text.
fn serialized_size(value: &Value) -> usize {
    struct ByteCounter(usize);
    impl std::io::Write for ByteCounter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = ByteCounter(0);
    // Serializing a `Value` into a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// A JSON value's kind, for error messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Like [`kind_of`], but says so when a string is empty.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::String(text) if text.is_empty() => "an empty string",
        other => kind_of(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn batch_errors_name_the_field_by_pointer() {
        let body = json!({"batch": [
            {"type": "track", "userId": "u1", "event": "a"},
            {"type": "track", "event": "a"}
        ]});
        let error = parse_request(&body, Shape::Batch, Utc::now()).unwrap_err();
        assert_eq!(error.pointer, "/batch/1/userId");
    }

    #[test]
    fn basic_user_and_bearer_carry_the_credential() {
        // "key:" in base64
        assert_eq!(credential("Basic a2V5Og==").as_deref(), Some("key"));
        assert_eq!(credential("Bearer key").as_deref(), Some("key"));
        assert_eq!(credential("Digest x"), None);
    }

    #[test]
    fn anonymous_id_stands_in_for_a_missing_user_id() {
        let message = parse_message(
            &json!({"event": "a", "anonymousId": "anon-1"}),
            Some("track"),
            "",
            Utc::now(),
        )
        .unwrap();
        assert!(matches!(message, Message::Track { user_id, .. } if user_id == "anon-1"));
    }

    /// `membrane import` validates lines with this: a NUL would otherwise fail the write.
    #[test]
    fn a_single_message_with_a_nul_is_refused_at_its_pointer() {
        let error = parse_message(
            &json!({"type": "track", "userId": "u", "event": "a", "properties": {"note": "a\u{0}"}}),
            None,
            "/line/7",
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.pointer, "/line/7/properties/note");
        assert!(error.message.contains("NUL"), "{}", error.message);
    }

    #[test]
    fn pages_and_screens_are_named_as_segment_names_them() {
        let cases = [
            (
                MessageType::Page,
                Some("Pricing"),
                None,
                "Viewed Pricing Page",
            ),
            (
                MessageType::Page,
                Some("Pricing"),
                Some("Docs"),
                "Viewed Docs Pricing Page",
            ),
            (MessageType::Page, None, Some("Docs"), "Loaded a Page"),
            (
                MessageType::Screen,
                Some("Home"),
                None,
                "Viewed Home Screen",
            ),
            (MessageType::Screen, None, None, "Loaded a Screen"),
        ];
        for (kind, name, category, expected) in cases {
            assert_eq!(viewed_event_name(kind, name, category), expected);
        }
    }

    #[test]
    fn gzip_bodies_inflate_within_the_limit() {
        use std::io::Write;
        let gzip = |bytes: &[u8]| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(bytes).expect("writing to a Vec");
            encoder.finish().expect("finishing into a Vec")
        };
        let body = br#"{"batch": []}"#;
        let compressed = gzip(body);
        assert_eq!(
            decode_body(Some("gzip"), &compressed, body.len()).unwrap(),
            &body[..]
        );
        assert_eq!(
            decode_body(Some("gzip"), &compressed, body.len() - 1),
            Err(BodyError::TooLarge {
                limit: body.len() - 1
            })
        );
        assert_eq!(decode_body(None, body, 1).unwrap(), &body[..]);
        assert!(matches!(
            decode_body(Some("gzip"), body, 100),
            Err(BodyError::CorruptGzip(_))
        ));
        assert_eq!(
            decode_body(Some("br"), body, 100),
            Err(BodyError::UnsupportedEncoding("br".to_owned()))
        );
    }

    #[test]
    fn pointers_escape_slashes_and_tildes() {
        assert_eq!(escape("a/b~c"), "a~1b~0c");
    }
}
