//! A walk over a DICOM byte stream's element and item headers, done before the parser sees it:
//! every defined length must fit in the bytes that follow it. Parsers reserve a value's declared
//! length before reading it, so without this walk a few kilobytes declaring a multi-gigabyte
//! element cost gigabytes of memory (found by the fuzzer; see tests/data).
//!
//! The walk is linear: sequences and items of undefined length, explicit-VR sequences and the
//! items of a sequence are descended into, because their content is more headers; values and
//! encapsulated pixel-data fragments are skipped. Implicit-VR sequences of defined length are
//! skipped whole (their VR is unknown without a dictionary); their content is bounded by their
//! own checked length. A deflated data set is inflated first, under a hard cap on its inflated
//! size (so a small file cannot inflate into gigabytes either), and then walked the same way.

use std::io::Read;

const UNDEFINED: u32 = 0xFFFF_FFFF;
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const IMPLICIT_LITTLE: &str = "1.2.840.10008.1.2";
const EXPLICIT_BIG: &str = "1.2.840.10008.1.2.2";

#[derive(Debug, PartialEq, Eq)]
pub enum LengthProblem {
    /// The first offset at which a declared length does not fit.
    Overrun { offset: usize },
    /// A deflated data set inflates to more than the cap.
    InflatesTooLarge { cap: u64 },
    /// A deflated data set that does not inflate.
    BadDeflate,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
    little_endian: bool,
}

impl Cursor<'_> {
    fn u16_at(&self, offset: usize) -> Option<u16> {
        let pair: [u8; 2] = self.bytes.get(offset..offset + 2)?.try_into().ok()?;
        Some(if self.little_endian {
            u16::from_le_bytes(pair)
        } else {
            u16::from_be_bytes(pair)
        })
    }

    fn u32_at(&self, offset: usize) -> Option<u32> {
        let quad: [u8; 4] = self.bytes.get(offset..offset + 4)?.try_into().ok()?;
        Some(if self.little_endian {
            u32::from_le_bytes(quad)
        } else {
            u32::from_be_bytes(quad)
        })
    }

    fn remaining_after(&self, header: usize) -> usize {
        self.bytes.len().saturating_sub(self.position + header)
    }
}

/// Whether an explicit header has two reserved bytes and a 32-bit length: every VR but the
/// 16-bit-length ones (PS3.5 7.1.2), and, as dicom-rs reads it, any unknown VR (taken as UN).
/// Reading an unknown VR the other way let a 6 KB file declare a 3 GB value (fuzzer finding).
fn long_form(vr: &[u8]) -> bool {
    !matches!(
        vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

pub fn check_declared_lengths(bytes: &[u8], inflated_cap: u64) -> Result<(), LengthProblem> {
    let start = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        132
    } else if bytes.starts_with(b"DICM") {
        4
    } else {
        0
    };
    let mut cursor = Cursor {
        bytes,
        position: start,
        little_endian: true,
    };
    // The file meta group: always explicit VR little endian. It ends where dicom-rs ends it:
    // after (0002,0000) Group Length's count of bytes, whatever the elements inside claim to
    // be; only without a group length, at the first element of another group. Ending it
    // anywhere else let a deflated data set be inflated from the wrong offset and checked as
    // harmless garbage, while dicom-rs inflated the real one (a fuzzer finding).
    let mut transfer_syntax = String::new();
    let group_length_end = (cursor.u16_at(start) == Some(0x0002)
        && cursor.u16_at(start + 2) == Some(0x0000)
        && cursor.u16_at(start + 6) == Some(4))
    .then(|| cursor.u32_at(start + 8))
    .flatten()
    .map(|length| start + 12 + length as usize);
    if let Some(end) = group_length_end {
        cursor.position = start + 12;
        if end > bytes.len() {
            return Err(LengthProblem::Overrun { offset: start });
        }
    }
    let in_meta = |cursor: &Cursor<'_>| match group_length_end {
        Some(end) => cursor.position < end,
        None => cursor.u16_at(cursor.position) == Some(0x0002),
    };
    while in_meta(&cursor) {
        let element = cursor.u16_at(cursor.position + 2).unwrap_or(0);
        let vr = bytes
            .get(cursor.position + 4..cursor.position + 6)
            .unwrap_or(b"  ");
        let (header, length) = if long_form(vr) {
            (12, cursor.u32_at(cursor.position + 8))
        } else {
            (8, cursor.u16_at(cursor.position + 6).map(u32::from))
        };
        let Some(length) = length else { return Ok(()) };
        let length = length as usize;
        if length > cursor.remaining_after(header) {
            return Err(LengthProblem::Overrun {
                offset: cursor.position,
            });
        }
        let group = cursor.u16_at(cursor.position).unwrap_or(0);
        if (group, element) == (0x0002, 0x0010) {
            let value = &bytes[cursor.position + header..cursor.position + header + length];
            transfer_syntax = String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_owned();
        }
        cursor.position += header + length;
    }
    let (explicit, little_endian) = match transfer_syntax.as_str() {
        DEFLATED => {
            let mut inflated = Vec::new();
            flate2::read::DeflateDecoder::new(&bytes[cursor.position..])
                .take(inflated_cap + 1)
                .read_to_end(&mut inflated)
                .map_err(|_| LengthProblem::BadDeflate)?;
            if inflated.len() as u64 > inflated_cap {
                return Err(LengthProblem::InflatesTooLarge { cap: inflated_cap });
            }
            return walk_data_set(&inflated, 0, true, true);
        }
        IMPLICIT_LITTLE => (false, true),
        EXPLICIT_BIG => (true, false),
        _ => (true, true),
    };
    walk_data_set(bytes, cursor.position, explicit, little_endian)
}

fn walk_data_set(
    bytes: &[u8],
    start: usize,
    explicit: bool,
    little_endian: bool,
) -> Result<(), LengthProblem> {
    let mut cursor = Cursor {
        bytes,
        position: start,
        little_endian,
    };
    // Inside encapsulated pixel data, items are fragments of bytes, not data sets.
    let mut in_fragments = false;
    while cursor.position + 8 <= bytes.len() {
        let (Some(group), Some(element)) = (
            cursor.u16_at(cursor.position),
            cursor.u16_at(cursor.position + 2),
        ) else {
            break;
        };
        if group == 0xFFFE {
            let length = cursor.u32_at(cursor.position + 4).unwrap_or(0);
            match element {
                0xE000 if length != UNDEFINED => {
                    if length as usize > cursor.remaining_after(8) {
                        return Err(LengthProblem::Overrun {
                            offset: cursor.position,
                        });
                    }
                    cursor.position += 8 + if in_fragments { length as usize } else { 0 };
                }
                0xE0DD => {
                    in_fragments = false;
                    cursor.position += 8;
                }
                _ => cursor.position += 8,
            }
            continue;
        }
        let (header, length, sequence) = if explicit {
            let vr = &bytes[cursor.position + 4..cursor.position + 6];
            if long_form(vr) {
                (12, cursor.u32_at(cursor.position + 8), vr == b"SQ")
            } else {
                (8, cursor.u16_at(cursor.position + 6).map(u32::from), false)
            }
        } else {
            (8, cursor.u32_at(cursor.position + 4), false)
        };
        let Some(length) = length else { break };
        if length == UNDEFINED {
            in_fragments = group == 0x7FE0 && element == 0x0010;
            cursor.position += header;
            continue;
        }
        if length as usize > cursor.remaining_after(header) {
            return Err(LengthProblem::Overrun {
                offset: cursor.position,
            });
        }
        cursor.position += header + if sequence { 0 } else { length as usize };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 1 << 30;

    #[test]
    fn the_meta_group_ends_where_its_group_length_says() {
        // A fuzzer finding: an element of group 0003 inside the meta group. Ending the group
        // there inflated garbage (and passed); dicom-rs inflates from the group length's end,
        // where this deflate stream is corrupt (and, read lazily, declares a 2.5 GB value).
        let bytes = include_bytes!("../tests/data/fuzz-deflate-after-meta-group-length.dcm");
        assert_eq!(
            check_declared_lengths(bytes, CAP),
            Err(LengthProblem::BadDeflate)
        );
    }

    #[test]
    fn a_group_length_beyond_the_input_is_an_overrun() {
        let mut bytes = vec![0_u8; 128];
        bytes.extend(b"DICM");
        bytes.extend([0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
        bytes.extend(1_000_u32.to_le_bytes());
        assert_eq!(
            check_declared_lengths(&bytes, CAP),
            Err(LengthProblem::Overrun { offset: 132 })
        );
    }
}
