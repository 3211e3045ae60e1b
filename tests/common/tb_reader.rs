//! An independent reader of TensorBoard event files, to validate what `lors_lm::monitor::tensorboard::Board`
//! writes: its own TFRecord framing checks (u64 LE length, masked CRC32C of the length, data,
//! masked CRC32C of the data), its own CRC32C and its own protobuf wire decoding; nothing from
//! tensorboard-rs or tensorboard-proto, which write the files.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// `SessionLog.SessionStatus.START` (tensorboard/compat/proto/event.proto).
const SESSION_START: u64 = 1;
/// `DataType.DT_STRING` (tensorboard/compat/proto/types.proto).
const DT_STRING: u64 = 7;
/// TensorBoard's text plugin.
const TEXT_PLUGIN: &str = "text";

/// What [`read_event_file`] found in one event file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFileContents {
    /// Scalar (`simple_value`) summaries as (tag, step, value), in file order.
    pub scalars: Vec<(String, i64, f32)>,
    /// Text-plugin summaries as (tag, step, text), in file order.
    pub texts: Vec<(String, i64, String)>,
    /// Every tensor summary (text, custom-scalars layout, ...) as (plugin name, tag, step).
    pub tensors: Vec<(String, String, i64)>,
    /// Complete, valid records read.
    pub records: usize,
    /// The last record is cut short (the writer was killed mid-write); everything before it
    /// is valid.
    pub truncated_tail: bool,
    /// The `file_version` of the file (the first event: "brain.Event:2").
    pub file_version: Option<String>,
    /// Steps of SessionLog START events (one per `Board::open`).
    pub session_starts: Vec<i64>,
}

/// Read and validate every record of one event file: TFRecord framing (u64 LE length, masked
/// CRC32C of the length bytes, data, masked CRC32C of the data) and the protobuf of each
/// event. An error names the file, the record index and its byte offset. A last record cut
/// short is not an error: `truncated_tail` is set and the records before it are returned.
pub fn read_event_file(path: &Path) -> Result<EventFileContents> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read event file {}", path.display()))?;
    let mut out = EventFileContents::default();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let index = out.records;
        let rest = &bytes[offset..];
        let fail = |what: String| anyhow!("{}: record {index} at byte offset {offset}: {what}", path.display());
        if rest.len() < 12 {
            out.truncated_tail = true;
            break;
        }
        let len_bytes = &rest[..8];
        let stored = u32::from_le_bytes(rest[8..12].try_into().unwrap());
        let computed = masked_crc32c(len_bytes);
        if stored != computed {
            return Err(fail(format!("length CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap());
        let total = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(16))
            .ok_or_else(|| fail(format!("record length {len} is impossible")))?;
        if rest.len() < total {
            out.truncated_tail = true;
            break;
        }
        let data = &rest[12..total - 4];
        let stored = u32::from_le_bytes(rest[total - 4..total].try_into().unwrap());
        let computed = masked_crc32c(data);
        if stored != computed {
            return Err(fail(format!("data CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")));
        }
        decode_event(data, &mut out).map_err(|e| fail(format!("bad Event protobuf: {e:#}")))?;
        out.records += 1;
        offset += total;
    }
    Ok(out)
}

/// Decode one `Event` (wall_time=1 double, step=2 int64, file_version=3 string, summary=5,
/// session_log=7) into `out`.
fn decode_event(data: &[u8], out: &mut EventFileContents) -> Result<()> {
    let mut step = 0i64;
    let mut summaries = Vec::new();
    let mut session_status = None;
    for field in Fields(data) {
        match field? {
            (1, Wire::Fixed64) => {}
            (2, Wire::Varint(v)) => step = v as i64,
            (3, Wire::Bytes(b)) => out.file_version = Some(utf8(b, "file_version")?),
            (5, Wire::Bytes(b)) => summaries.push(b),
            (7, Wire::Bytes(b)) => {
                for field in Fields(b) {
                    if let (1, Wire::Varint(v)) = field? {
                        session_status = Some(v);
                    }
                }
            }
            (1 | 2 | 3 | 5 | 7, _) => bail!("wrong wire type for a field of Event"),
            _ => {}
        }
    }
    if session_status == Some(SESSION_START) {
        out.session_starts.push(step);
    }
    for summary in summaries {
        for field in Fields(summary) {
            match field? {
                (1, Wire::Bytes(value)) => decode_value(value, step, out)?,
                (1, _) => bail!("wrong wire type for Summary.value"),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Decode one `Summary.Value`: tag=1, simple_value=2 (float), metadata=9 (plugin_data=1 →
/// plugin_name=1), tensor=8 (dtype=1, string_val=8).
fn decode_value(data: &[u8], step: i64, out: &mut EventFileContents) -> Result<()> {
    let mut tag = String::new();
    let mut simple = None;
    let mut plugin = String::new();
    // (dtype, string_val): raw bytes, as a non-text tensor (a serialized proto) is no UTF-8.
    let mut strings: Option<(u64, Vec<&[u8]>)> = None;
    for field in Fields(data) {
        match field? {
            (1, Wire::Bytes(b)) => tag = utf8(b, "tag")?,
            (2, Wire::Fixed32(v)) => simple = Some(f32::from_bits(v)),
            (9, Wire::Bytes(b)) => {
                for field in Fields(b) {
                    if let (1, Wire::Bytes(pd)) = field? {
                        for field in Fields(pd) {
                            if let (1, Wire::Bytes(name)) = field? {
                                plugin = utf8(name, "plugin_name")?;
                            }
                        }
                    }
                }
            }
            (8, Wire::Bytes(b)) => {
                let (mut dtype, mut vals) = (0, Vec::new());
                for field in Fields(b) {
                    match field? {
                        (1, Wire::Varint(v)) => dtype = v,
                        (8, Wire::Bytes(s)) => vals.push(s),
                        _ => {}
                    }
                }
                strings = Some((dtype, vals));
            }
            (1 | 2 | 8 | 9, _) => bail!("wrong wire type for a field of Summary.Value"),
            _ => {}
        }
    }
    if let Some(v) = simple {
        out.scalars.push((tag, step, v));
    } else if let Some((dtype, vals)) = strings {
        if plugin == TEXT_PLUGIN && dtype == DT_STRING {
            let vals: Vec<String> = vals.into_iter().map(|v| utf8(v, "text string_val")).collect::<Result<_>>()?;
            out.texts.push((tag.clone(), step, vals.join("\n")));
        }
        out.tensors.push((plugin, tag, step));
    }
    Ok(())
}

fn utf8(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{what} is not UTF-8"))
}

/// A protobuf field's payload, by wire type.
enum Wire<'a> {
    Varint(u64),
    /// (its value is not needed: only `Event.wall_time` has this type)
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterator over the (field number, payload) pairs of one protobuf message.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(v);
            }
        }
        bail!("bad varint")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("field runs past the end of its message");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn field(&mut self) -> Result<(u64, Wire<'a>)> {
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?)?;
                Wire::Bytes(self.take(len)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            t => bail!("unsupported wire type {t}"),
        };
        Ok((key >> 3, wire))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Wire<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = self.field();
        if item.is_err() {
            self.0 = &[]; // stop after the first error
        }
        Some(item)
    }
}

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli), as TFRecord framing uses it.

const CRC32C_TABLE: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC32C (Castagnoli polynomial, reflected) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC32C that TFRecord framing stores: rotate right by 15, add 0xa282ead8.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}
