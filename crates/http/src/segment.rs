//! Segment's message shapes, validated field by field into store messages.

use chrono::{DateTime, Utc};
use membrane_store::Message;
use serde_json::{Map, Value};

/// A precise complaint about one field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Which endpoint a body came to.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `/v1/track` or `/v1/identify`: one message of that type.
    Single(&'static str),
    /// `/v1/batch`: `{"batch": [message, ...]}`, each with its own `type`.
    Batch,
}

/// Extracts the write key from an `Authorization` header value (Basic user or Bearer token).
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

pub fn parse_request(
    body: &Value,
    shape: Shape,
    now: DateTime<Utc>,
) -> Result<Vec<Message>, FieldError> {
    match shape {
        Shape::Single(kind) => Ok(vec![parse_message(body, Some(kind), "", now)?]),
        Shape::Batch => {
            let object = body
                .as_object()
                .ok_or_else(|| field_error("", "expected a JSON object with a `batch` array"))?;
            let items = object
                .get("batch")
                .ok_or_else(|| {
                    field_error("/batch", "missing `batch`: expected an array of messages")
                })?
                .as_array()
                .ok_or_else(|| field_error("/batch", "expected an array of messages"))?;
            items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_message(item, None, &format!("/batch/{i}"), now))
                .collect()
        }
    }
}

/// Validates one message at `pointer`. `expected_type` is the endpoint's type, if any.
pub fn parse_message(
    value: &Value,
    expected_type: Option<&str>,
    pointer: &str,
    now: DateTime<Utc>,
) -> Result<Message, FieldError> {
    let at = |field: &str| format!("{pointer}/{field}");
    let object = value
        .as_object()
        .ok_or_else(|| field_error(pointer, "expected a JSON object"))?;
    let kind = match (object.get("type"), expected_type) {
        (None, Some(kind)) => kind.to_owned(),
        (None, None) => {
            return Err(field_error(
                &at("type"),
                "missing `type`: expected \"track\" or \"identify\"",
            ))
        }
        (Some(Value::String(kind)), expected) => {
            if let Some(expected) = expected.filter(|e| e != kind) {
                return Err(field_error(
                    &at("type"),
                    format!("`type` is \"{kind}\" but this endpoint takes \"{expected}\""),
                ));
            }
            kind.clone()
        }
        (Some(_), _) => return Err(field_error(&at("type"), "expected a string")),
    };
    let user_id = user_of(object, pointer)?;
    let message_id = optional_string(object, "messageId", pointer)?;
    match kind.as_str() {
        "track" => {
            let event = match object.get("event") {
                Some(Value::String(event)) if !event.is_empty() => event.clone(),
                Some(Value::String(_)) => {
                    return Err(field_error(&at("event"), "the event name is empty"))
                }
                Some(_) => return Err(field_error(&at("event"), "expected a string")),
                None => {
                    return Err(field_error(
                        &at("event"),
                        "missing `event` (the event name)",
                    ))
                }
            };
            if event.starts_with("bucket:") {
                return Err(field_error(
                    &at("event"),
                    "event names beginning `bucket:` are reserved for membrane's transitions",
                ));
            }
            Ok(Message::Track {
                message_id,
                user_id,
                event,
                occurred_at: timestamp(object, pointer, now)?,
                properties: optional_object(object, "properties", pointer)?,
            })
        }
        "identify" => Ok(Message::Identify {
            message_id,
            user_id,
            traits: optional_object(object, "traits", pointer)?,
        }),
        other => Err(field_error(
            &at("type"),
            format!("unsupported type \"{other}\": expected \"track\" or \"identify\""),
        )),
    }
}

fn user_of(object: &Map<String, Value>, pointer: &str) -> Result<String, FieldError> {
    for field in ["userId", "anonymousId"] {
        match object.get(field) {
            None | Some(Value::Null) => continue,
            Some(Value::String(id)) if !id.is_empty() => return Ok(id.clone()),
            Some(Value::Number(n)) => return Ok(n.to_string()),
            Some(_) => {
                return Err(field_error(
                    &format!("{pointer}/{field}"),
                    "expected a non-empty string",
                ))
            }
        }
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
        Some(_) => Err(field_error(
            &format!("{pointer}/{field}"),
            "expected a string",
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
        Some(_) => Err(field_error(
            &format!("{pointer}/{field}"),
            "expected an object",
        )),
    }
}

fn timestamp(
    object: &Map<String, Value>,
    pointer: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, FieldError> {
    match object.get("timestamp") {
        None | Some(Value::Null) => Ok(now),
        Some(Value::String(text)) => DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                field_error(
                    &format!("{pointer}/timestamp"),
                    format!(
                        "`{text}` is not an RFC 3339 timestamp ({e}), e.g. 2026-11-27T09:30:00Z"
                    ),
                )
            }),
        Some(_) => Err(field_error(
            &format!("{pointer}/timestamp"),
            "expected an RFC 3339 timestamp string",
        )),
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
    fn basic_user_and_bearer_carry_the_write_key() {
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
}
