//! A seeded mutation fuzzer for the files lors-lm reads: raw byte mutations (bit flips,
//! truncations, inserted noise, duplicated and swapped chunks, integer fields set to 0 / 1 /
//! max / negative), and mutations that know the structure of the file: GGUF header fields and
//! entries (duplicated, reordered, removed, counts and sizes set to extremes), JSON documents
//! (safetensors headers, meta.json, tokenizer.json: values set to extremes, array entries
//! duplicated, reordered or removed, keys removed or repeated) and TOML configs (values set to
//! extremes, lines duplicated, reordered or removed). Deterministic for a seed.

/// xorshift64*: small, seeded, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integer values that break size arithmetic: 0, 1, maxima, "negative" (two's complement),
/// just past common bounds.
pub const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    0x7F,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 40,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Raw byte mutations; `hot` is the prefix where integer fields live (a header).
pub fn bytes(rng: &mut Rng, data: &[u8], hot: usize) -> (Vec<u8>, String) {
    let mut b = data.to_vec();
    if b.is_empty() {
        return (vec![rng.next() as u8], "one byte".into());
    }
    let hot = hot.clamp(1, b.len());
    match rng.below(7) {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            (b, format!("{n} bit flips"))
        }
        1 => {
            let at = rng.below(b.len());
            b.truncate(at);
            (b, format!("truncated at {at}"))
        }
        2 => {
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let at = rng.below(hot.saturating_sub(width).max(1)) & !(width - 1);
            let v = *rng.pick(&INTERESTING);
            let end = (at + width).min(b.len());
            b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            (b, format!("u{} at {at} = {v:#x}", width * 8))
        }
        3 => {
            let at = rng.below(b.len() + 1);
            let n = 1 + rng.below(64);
            let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(at..at, noise);
            (b, format!("{n} random bytes inserted at {at}"))
        }
        4 | 5 => {
            let (s, len) = chunk(rng, b.len());
            let piece = b[s..s + len].to_vec();
            if rng.below(2) == 0 {
                let at = rng.below(b.len() + 1);
                b.splice(at..at, piece);
                (b, format!("bytes {s}..{} duplicated at {at}", s + len))
            } else {
                let (t, _) = chunk(rng, b.len() - len + 1);
                let other = b[t..(t + len).min(b.len())].to_vec();
                if t + len <= s || s + len <= t {
                    b[s..s + len].copy_from_slice(&other);
                    b[t..t + len].copy_from_slice(&piece);
                }
                (b, format!("bytes {s}.. and {t}.. swapped ({len})"))
            }
        }
        _ => {
            let at = rng.below(b.len());
            b[at] = *rng.pick(&[0u8, 0xFF, b'"', b'{', b'[', b'-', b'9']);
            (b, format!("byte {at} set"))
        }
    }
}

/// A random chunk (start, len) of a buffer of `n` bytes.
fn chunk(rng: &mut Rng, n: usize) -> (usize, usize) {
    let len = 1 + rng.below(n.clamp(1, 256));
    let len = len.min(n.max(1));
    (rng.below(n - len + 1), len)
}

// ------------------------------------------------------------------------------------------
// GGUF
// ------------------------------------------------------------------------------------------

/// The layout of a valid GGUF file: byte ranges of its metadata entries and tensor infos, and
/// the offsets and widths of its integer fields (counts, lengths, types, dimensions, offsets).
pub struct GgufLayout {
    pub kv: Vec<(usize, usize)>,
    pub infos: Vec<(usize, usize)>,
    pub fields: Vec<(usize, usize)>,
    pub header_end: usize,
}

/// Walks a valid GGUF (version 2 or 3) file; None if it is not one.
pub fn gguf_layout(b: &[u8]) -> Option<GgufLayout> {
    let u32_at = |p: usize| b.get(p..p + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()));
    let u64_at = |p: usize| b.get(p..p + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap()));
    let mut fields = vec![(4, 4), (8, 8), (16, 8)];
    let (n_tensors, n_kv) = (u64_at(8)? as usize, u64_at(16)? as usize);
    let mut p = 24;
    // One value of `ty` at p: its end.
    fn value_end(b: &[u8], ty: u32, p: usize, fields: &mut Vec<(usize, usize)>) -> Option<usize> {
        let u32_at = |p: usize| b.get(p..p + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()));
        let u64_at = |p: usize| b.get(p..p + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap()));
        Some(match ty {
            0 | 1 | 7 => p + 1,
            2 | 3 => p + 2,
            4..=6 => {
                fields.push((p, 4));
                p + 4
            }
            10..=12 => {
                fields.push((p, 8));
                p + 8
            }
            8 => {
                fields.push((p, 8));
                p + 8 + u64_at(p)? as usize
            }
            9 => {
                fields.push((p, 4));
                fields.push((p + 4, 8));
                let (ety, n) = (u32_at(p)?, u64_at(p + 4)? as usize);
                let mut q = p + 12;
                let mut scratch = vec![];
                for _ in 0..n {
                    q = value_end(b, ety, q, &mut scratch)?;
                }
                fields.extend(scratch.into_iter().take(64));
                q
            }
            _ => return None,
        })
    }
    let mut kv = vec![];
    for _ in 0..n_kv {
        let start = p;
        fields.push((p, 8));
        p += 8 + u64_at(p)? as usize;
        let ty = u32_at(p)?;
        fields.push((p, 4));
        p = value_end(b, ty, p + 4, &mut fields)?;
        kv.push((start, p));
    }
    let mut infos = vec![];
    for _ in 0..n_tensors {
        let start = p;
        fields.push((p, 8));
        p += 8 + u64_at(p)? as usize;
        let n_dims = u32_at(p)? as usize;
        fields.push((p, 4));
        p += 4;
        for _ in 0..n_dims {
            fields.push((p, 8));
            p += 8;
        }
        fields.push((p, 4));
        fields.push((p + 4, 8));
        p += 12;
        infos.push((start, p));
    }
    (p <= b.len()).then_some(GgufLayout { kv, infos, fields, header_end: p })
}

/// A GGUF mutation: an integer field set to an extreme, an entry duplicated (its count
/// raised or not), two entries reordered, an entry removed, or a raw byte mutation.
pub fn gguf(rng: &mut Rng, data: &[u8], layout: &GgufLayout) -> (Vec<u8>, String) {
    let mut b = data.to_vec();
    let bump = |b: &mut Vec<u8>, at: usize, delta: i64| {
        let v = u64::from_le_bytes(b[at..at + 8].try_into().unwrap()).wrapping_add(delta as u64);
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    match rng.below(6) {
        0 | 1 => {
            let &(at, width) = rng.pick(&layout.fields);
            let v = *rng.pick(&INTERESTING);
            b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            (b, format!("field at {at} (u{}) = {v:#x}", width * 8))
        }
        2 => {
            let (entries, count_at, what) = match rng.below(2) {
                0 => (&layout.kv, 16, "metadata entry"),
                _ => (&layout.infos, 8, "tensor info"),
            };
            let &(s, e) = rng.pick(entries);
            let piece = b[s..e].to_vec();
            let at = rng.pick(entries).1;
            b.splice(at..at, piece);
            let counted = rng.below(2) == 0;
            if counted {
                bump(&mut b, count_at, 1);
            }
            (b, format!("{what} at {s} duplicated at {at} (count raised: {counted})"))
        }
        3 => {
            let entries = if rng.below(2) == 0 { &layout.kv } else { &layout.infos };
            let (i, j) = (rng.below(entries.len()), rng.below(entries.len()));
            let (a, z) = (entries[i.min(j)], entries[i.max(j)]);
            if a == z {
                return (b, "no-op reorder".into());
            }
            let mut out = b[..a.0].to_vec();
            out.extend_from_slice(&b[z.0..z.1]);
            out.extend_from_slice(&b[a.1..z.0]);
            out.extend_from_slice(&b[a.0..a.1]);
            out.extend_from_slice(&b[z.1..]);
            (out, format!("entries at {} and {} swapped", a.0, z.0))
        }
        4 => {
            let (entries, count_at) = if rng.below(2) == 0 { (&layout.kv, 16) } else { (&layout.infos, 8) };
            let &(s, e) = rng.pick(entries);
            b.drain(s..e);
            let counted = rng.below(2) == 0;
            if counted {
                bump(&mut b, count_at, -1);
            }
            (b, format!("entry at {s} removed (count lowered: {counted})"))
        }
        _ => bytes(rng, data, layout.header_end),
    }
}

// ------------------------------------------------------------------------------------------
// JSON and TOML
// ------------------------------------------------------------------------------------------

use serde_json::Value;

/// Replacement values for a JSON node.
fn extreme(rng: &mut Rng) -> Value {
    match rng.below(9) {
        0 => Value::from(*rng.pick(&INTERESTING)),
        1 => Value::from(-(1 + rng.below(1 << 20) as i64)),
        2 => Value::from(i64::MIN),
        3 => serde_json::json!(1e308),
        4 => Value::from(""),
        5 => Value::from("x".repeat(1 + rng.below(3000))),
        6 => Value::Null,
        7 => serde_json::json!([]),
        _ => serde_json::json!({}),
    }
}

/// Mutate one node of `v` chosen at random (depth-first walk, stopping at a random node).
fn mutate_node(rng: &mut Rng, v: &mut Value, depth: usize) -> String {
    let descend = depth < 12 && rng.below(3) != 0;
    match v {
        Value::Array(items) if !items.is_empty() => {
            if descend {
                let i = rng.below(items.len());
                return mutate_node(rng, &mut items[i], depth + 1);
            }
            match rng.below(4) {
                0 => {
                    let i = rng.below(items.len());
                    let dup = items[i].clone();
                    items.insert(rng.below(items.len() + 1), dup);
                    "array entry duplicated".into()
                }
                1 => {
                    let (i, j) = (rng.below(items.len()), rng.below(items.len()));
                    items.swap(i, j);
                    "array entries swapped".into()
                }
                2 => {
                    items.remove(rng.below(items.len()));
                    "array entry removed".into()
                }
                _ => {
                    *v = extreme(rng);
                    "array replaced".into()
                }
            }
        }
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            if descend {
                return mutate_node(rng, map.get_mut(&key).unwrap(), depth + 1);
            }
            match rng.below(3) {
                0 => {
                    map.remove(&key);
                    format!("key {key:?} removed")
                }
                1 => {
                    map.insert(key.clone(), extreme(rng));
                    format!("key {key:?} set to an extreme")
                }
                _ => {
                    let new = format!("{key}_{}", rng.below(10));
                    let val = map[&key].clone();
                    map.insert(new.clone(), val);
                    format!("key {new:?} added")
                }
            }
        }
        _ => {
            *v = extreme(rng);
            "value set to an extreme".into()
        }
    }
}

/// A JSON text mutated: one node (see [`mutate_node`]), a key repeated in the text (JSON
/// readers keep one of the two), or raw bytes.
pub fn json(rng: &mut Rng, text: &[u8]) -> (Vec<u8>, String) {
    let Ok(mut v) = serde_json::from_slice::<Value>(text) else { return bytes(rng, text, text.len()) };
    match rng.below(5) {
        0 => bytes(rng, text, text.len()),
        1 => {
            // Repeat the first key of the top-level object with another value.
            let what = mutate_node(rng, &mut v, 0);
            let mut out = serde_json::to_vec(&v).unwrap();
            if let Some(first) = serde_json::from_slice::<Value>(text).ok().and_then(|o| {
                o.as_object().and_then(|m| m.iter().next().map(|(k, v)| format!("{}:{},", Value::from(k.as_str()), v)))
            }) {
                if out.first() == Some(&b'{') && out.len() > 2 {
                    out.splice(1..1, first.into_bytes());
                }
            }
            (out, format!("first key repeated; {what}"))
        }
        _ => {
            let what = mutate_node(rng, &mut v, 0);
            (serde_json::to_vec(&v).unwrap(), what)
        }
    }
}

/// A TOML config mutated line by line: a value set to an extreme, a line duplicated,
/// removed or moved, or raw bytes.
pub fn toml_text(rng: &mut Rng, text: &str) -> (Vec<u8>, String) {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        return bytes(rng, text.as_bytes(), text.len());
    }
    let i = rng.below(lines.len());
    let what = match rng.below(5) {
        0 => {
            if let Some((k, _)) = lines[i].split_once(" = ") {
                let v = match rng.below(6) {
                    0 => rng.pick(&INTERESTING).to_string(),
                    1 => "-1".into(),
                    2 => "1e308".into(),
                    3 => "\"\"".into(),
                    4 => "nan".into(),
                    _ => "[]".into(),
                };
                lines[i] = format!("{k} = {v}");
            }
            format!("line {i} value set")
        }
        1 => {
            let dup = lines[i].clone();
            lines.insert(rng.below(lines.len() + 1), dup);
            format!("line {i} duplicated")
        }
        2 => {
            lines.remove(i);
            format!("line {i} removed")
        }
        3 => {
            let l = lines.remove(i);
            lines.insert(rng.below(lines.len() + 1), l);
            format!("line {i} moved")
        }
        _ => return bytes(rng, text.as_bytes(), text.len()),
    };
    (lines.join("\n").into_bytes(), what)
}

/// A safetensors file with its JSON header mutated (the length prefix recomputed, or, at
/// times, left as it was), or raw bytes.
pub fn safetensors(rng: &mut Rng, data: &[u8]) -> (Vec<u8>, String) {
    let n = data.get(..8).map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap()) as usize);
    if n == 0 || 8 + n > data.len() || rng.below(4) == 0 {
        return bytes(rng, data, 8 + n.min(data.len()));
    }
    let (header, what) = json(rng, &data[8..8 + n]);
    let len = if rng.below(8) == 0 { n } else { header.len() };
    let mut out = (len as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data[8 + n..]);
    (out, format!("header: {what}"))
}
