//! The fast reader of an export's entry lines, for the offline verifier's hot loop: it accepts
//! only the exact form `medai audit export` writes (serde's field order, no whitespace, only
//! the short escapes) and reads it in place, unescaping into one reused buffer. Every other
//! line (another spelling of an entry, a checkpoint, anything malformed) is declined and read
//! by the export's serde parser instead, so what is accepted, the values read and every error
//! stay that parser's: whatever this accepts, serde reads as the same entry.

use crate::chain::{EntryDigest, Hash};

/// Where a string field's text lies: in the line itself, or unescaped in the scratch buffer.
#[derive(Clone, Copy)]
enum Text {
    Line(usize, usize),
    Scratch(usize, usize),
}

/// Reads entry lines one after the other, reusing its buffer: no allocation per line.
#[derive(Default)]
pub(crate) struct EntryLineReader {
    scratch: Vec<u8>,
}

impl EntryLineReader {
    /// The digest of `line` (trimmed, ASCII without control characters) if it is an entry
    /// line in the exact exported form; `None` to have the line parsed by serde.
    pub(crate) fn digest(&mut self, line: &[u8]) -> Option<EntryDigest> {
        self.scratch.clear();
        let mut at = 0;
        expect(line, &mut at, br#"{"type":"entry","seq":"#)?;
        let seq = number(line, &mut at)?;
        let mut fields = [Text::Line(0, 0); 8];
        for (field, key) in fields.iter_mut().zip([
            &br#","recorded_at":"#[..],
            br#","actor":"#,
            br#","action":"#,
            br#","resource":"#,
            br#","outcome":"#,
            br#","context":"#,
            br#","prev_hash":"#,
            br#","hash":"#,
        ]) {
            expect(line, &mut at, key)?;
            *field = self.string(line, &mut at)?;
        }
        expect(line, &mut at, br#","encoding_version":"#)?;
        let encoding_version = u32::try_from(number(line, &mut at)?).ok()?;
        expect(line, &mut at, b"}")?;
        if at != line.len() {
            return None;
        }
        let text = |field: Text| match field {
            Text::Line(start, end) => &line[start..end],
            Text::Scratch(start, end) => &self.scratch[start..end],
        };
        Some(EntryDigest::of_fields(
            seq,
            encoding_version,
            [
                text(fields[0]),
                text(fields[1]),
                text(fields[2]),
                text(fields[3]),
                text(fields[4]),
                text(fields[5]),
            ],
            text(fields[6]),
            text(fields[7]),
        ))
    }

    /// A JSON string at `at` with no `\u` escapes (declined: serde decodes those).
    fn string(&mut self, line: &[u8], at: &mut usize) -> Option<Text> {
        if line.get(*at) != Some(&b'"') {
            return None;
        }
        let start = *at + 1;
        let stop = start + memchr::memchr2(b'"', b'\\', line.get(start..)?)?;
        if line[stop] == b'"' {
            *at = stop + 1;
            return Some(Text::Line(start, stop));
        }
        let scratch_start = self.scratch.len();
        let mut position = start;
        loop {
            let stop = position + memchr::memchr2(b'"', b'\\', line.get(position..)?)?;
            self.scratch.extend_from_slice(&line[position..stop]);
            if line[stop] == b'"' {
                *at = stop + 1;
                return Some(Text::Scratch(scratch_start, self.scratch.len()));
            }
            let unescaped = match line.get(stop + 1)? {
                b'"' => b'"',
                b'\\' => b'\\',
                b'/' => b'/',
                b'b' => 0x08,
                b'f' => 0x0c,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                _ => return None,
            };
            self.scratch.push(unescaped);
            position = stop + 2;
        }
    }
}

fn expect(line: &[u8], at: &mut usize, text: &[u8]) -> Option<()> {
    let end = at.checked_add(text.len())?;
    if line.get(*at..end)? != text {
        return None;
    }
    *at = end;
    Some(())
}

/// A JSON unsigned integer as serde reads it into a u64: `0` or digits without a leading zero,
/// declined when it does not fit.
fn number(line: &[u8], at: &mut usize) -> Option<u64> {
    let digits = line
        .get(*at..)?
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .count();
    if digits == 0 || (digits > 1 && line[*at] == b'0') {
        return None;
    }
    let mut value: u64 = 0;
    for byte in &line[*at..*at + digits] {
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
    }
    *at += digits;
    Some(value)
}

/// Decodes 64 hex digits (either case, as `hex::decode_to_slice` accepts) into a hash.
pub(crate) fn decode_hex_hash(text: &[u8]) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    // Branch-free: an invalid digit's value has its high bit set, collected in `invalid`.
    let mut invalid = 0u8;
    for (byte, pair) in hash.iter_mut().zip(text.chunks_exact(2)) {
        let (high, low) = (
            HEX_VALUES[usize::from(pair[0])],
            HEX_VALUES[usize::from(pair[1])],
        );
        invalid |= high | low;
        *byte = (high << 4) | (low & 0x0f);
    }
    (invalid & 0x80 == 0).then_some(hash)
}

/// The value of every byte as a hex digit, 0xff for a byte that is not one.
const HEX_VALUES: [u8; 256] = {
    let mut table = [0xff_u8; 256];
    let mut index = 0;
    while index < 10 {
        table[b'0' as usize + index] = index as u8;
        index += 1;
    }
    let mut index = 0;
    while index < 6 {
        table[b'a' as usize + index] = 10 + index as u8;
        table[b'A' as usize + index] = 10 + index as u8;
        index += 1;
    }
    table
};
