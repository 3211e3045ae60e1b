//! JSON lines (`.jsonl`, `.ndjson`, optionally `.gz`/`.zst`): one document per line, the
//! string in the line's `--text-field`. Blank lines and empty strings are skipped; anything
//! else that is not an object with a string in that field is an error naming the file and line.
use std::fmt;
use std::io::{BufRead, BufReader};

use anyhow::{bail, Result};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::{open_stream, read_error_hint, InputPath, RawPiece, ReadOptions, Reader, TextMode};
use crate::data::split::doc_key;

/// What a line's text field held.
enum Field {
    Text(String),
    Missing(Vec<String>),
    NotString(&'static str),
    NotObject,
}

/// Deserializes a line, keeping only the text field (other fields are skipped unparsed).
struct FieldSeed<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Field;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Field, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Field;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Field, A::Error> {
        let mut found = None;
        let mut keys = Vec::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0 && found.is_none() {
                let value: serde_json::Value = map.next_value()?;
                found = Some(match value {
                    serde_json::Value::String(s) => Field::Text(s),
                    serde_json::Value::Null => Field::NotString("null"),
                    serde_json::Value::Bool(_) => Field::NotString("a boolean"),
                    serde_json::Value::Number(_) => Field::NotString("a number"),
                    serde_json::Value::Array(_) => Field::NotString("an array"),
                    serde_json::Value::Object(_) => Field::NotString("an object"),
                });
            } else {
                if keys.len() < 20 {
                    keys.push(key.into_owned());
                }
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found.unwrap_or(Field::Missing(keys)))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Field, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<Field, E> {
        Ok(Field::NotObject)
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Field, E> {
        Ok(Field::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Field, E> {
        Ok(Field::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<Field, E> {
        Ok(Field::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Field, E> {
        Ok(Field::NotObject)
    }
    fn visit_unit<E>(self) -> std::result::Result<Field, E> {
        Ok(Field::NotObject)
    }
}

/// The text field of one line (`line` without its newline), or an error saying what is wrong.
fn parse_line(line: &str, field: &str) -> std::result::Result<String, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let parsed = FieldSeed(field).deserialize(&mut de).and_then(|f| de.end().map(|_| f));
    match parsed {
        Ok(Field::Text(s)) => Ok(s),
        Ok(Field::Missing(keys)) => Err(format!(
            "no {field:?} field (the line has {}); pass --text-field NAME",
            if keys.is_empty() { "no fields".to_string() } else { format!("fields {}", keys.join(", ")) }
        )),
        Ok(Field::NotString(kind)) => Err(format!("field {field:?} is {kind}, not a string")),
        Ok(Field::NotObject) => Err("not a JSON object".to_string()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

/// Reads one JSON lines file.
pub(super) struct JsonLinesReader {
    input: InputPath,
    lines: BufReader<Box<dyn std::io::Read + Send>>,
    opts: ReadOptions,
    line_no: u64,
    buf: Vec<u8>,
    warned: bool,
}

impl JsonLinesReader {
    pub(super) fn open(input: &InputPath, opts: &ReadOptions) -> Result<JsonLinesReader> {
        Ok(JsonLinesReader {
            input: input.clone(),
            lines: BufReader::with_capacity(1 << 20, open_stream(input)?),
            opts: opts.clone(),
            line_no: 0,
            buf: Vec::new(),
            warned: false,
        })
    }
}

impl Reader for JsonLinesReader {
    fn next_piece(&mut self) -> Result<Option<RawPiece>> {
        let path = &self.input.path;
        loop {
            self.buf.clear();
            let n = self.lines.read_until(b'\n', &mut self.buf).map_err(|e| {
                anyhow::anyhow!(
                    "could not read {} after line {}{}: {e}",
                    path.display(),
                    self.line_no,
                    read_error_hint(&self.input)
                )
            })?;
            if n == 0 {
                return Ok(None);
            }
            self.line_no += 1;
            let line_no = self.line_no;
            let bytes = self.buf.trim_ascii();
            if bytes.is_empty() {
                continue;
            }
            let lossy = matches!(self.opts.mode, TextMode::Utf8 { lossy: true });
            let line = match std::str::from_utf8(bytes) {
                Ok(s) => std::borrow::Cow::Borrowed(s),
                Err(e) if lossy => {
                    if self.opts.warn && !self.warned {
                        self.warned = true;
                        crate::data::progress(&format!(
                            "warning: {} line {line_no} is not valid UTF-8 (column {}); replacing invalid bytes \
                             with U+FFFD (--lossy)",
                            path.display(),
                            e.valid_up_to() + 1
                        ));
                    }
                    String::from_utf8_lossy(bytes)
                }
                Err(e) => bail!(
                    "{}: line {line_no}: not valid UTF-8 (invalid byte 0x{:02x} at column {}); JSON must be UTF-8: \
                     convert the file, or pass --lossy to replace invalid bytes with U+FFFD",
                    path.display(),
                    bytes[e.valid_up_to()],
                    e.valid_up_to() + 1
                ),
            };
            let text = parse_line(&line, &self.opts.text_field)
                .map_err(|why| anyhow::anyhow!("{}: line {line_no}: {why}", path.display()))?;
            if text.is_empty() {
                continue;
            }
            let text = text.into_bytes();
            return Ok(Some(RawPiece { key: doc_key(self.opts.seed, &text), last: true, text }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(parse_line(r#"{"id": 1, "text": "héllo\n", "x": [1, {"text": 2}]}"#, "text").unwrap(), "héllo\n");
        assert_eq!(parse_line(r#"{"content": "a", "text": "b"}"#, "content").unwrap(), "a");
        let err = parse_line(r#"{"id": 1, "body": "b"}"#, "text").unwrap_err();
        assert!(err.contains("no \"text\" field") && err.contains("id, body"), "{err}");
        assert!(parse_line(r#"{"text": 5}"#, "text").unwrap_err().contains("is a number, not a string"));
        assert!(parse_line(r#"{"text": null}"#, "text").unwrap_err().contains("null"));
        assert!(parse_line(r#"["text"]"#, "text").unwrap_err().contains("not a JSON object"));
        assert!(parse_line(r#"{"text": "a"} x"#, "text").unwrap_err().contains("invalid JSON"));
        assert!(parse_line(r#"{"text": "a"#, "text").unwrap_err().contains("invalid JSON"));
        assert!(parse_line(r#"{"text": "\ud800"}"#, "text").unwrap_err().contains("invalid JSON"));
    }
}
