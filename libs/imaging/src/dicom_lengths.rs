//! A walk over a DICOM byte stream's element and item headers, done before the parser sees it.
//! It bounds everything the parser would otherwise trust:
//!
//! - every defined length must fit in the bytes that follow it (parsers reserve a value's
//!   declared length before reading it, so a few kilobytes declaring a multi-gigabyte element
//!   would cost gigabytes; found by the fuzzer, see tests/data);
//! - sequences nest at most [`MAX_SEQUENCE_DEPTH`] deep (dicom-rs builds nested sequences by
//!   recursion, so thousands of levels overflow the stack and abort the process);
//! - at most [`MAX_ELEMENTS`] elements and items (each costs the parser far more memory than its
//!   eight header bytes);
//! - the image attributes (rows, columns, frames, samples, bits) are read on the way, and the
//!   top-level pixel data is refused from them before its value is read.
//!
//! The walk follows dicom-rs's own reader (`DataSetReader`) state for state, without recursion:
//! a sequence starts at an explicit SQ, at an implicit-VR element the standard dictionary calls
//! SQ, or at any element of undefined length; items end at their length or their delimiter. A
//! deflated data set is inflated as a stream, never held: before the pixel data at most
//! `max_bytes` (what an uncompressed file could carry), then the pixel data's declared size, so
//! a small file can neither inflate into gigabytes nor make the service inflate more than the
//! image it declares.

use std::io::{BufReader, Read};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

use crate::error::ImageError;
use crate::limits::ImageLimits;

const UNDEFINED: u32 = 0xFFFF_FFFF;
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const IMPLICIT_LITTLE: &str = "1.2.840.10008.1.2";
const EXPLICIT_BIG: &str = "1.2.840.10008.1.2.2";

/// The most sequences that may be open at once. Real objects nest a few levels (a structured
/// report's content tree perhaps ten); dicom-rs recurses once per level, and thousands of levels
/// overflow a decoding thread's stack, which aborts the whole process.
pub const MAX_SEQUENCE_DEPTH: usize = 32;

/// The most data elements and items an object may hold, nested ones included. An enhanced
/// multi-frame object at the frame limit has tens of thousands; each costs the parser some
/// hundred bytes of memory for as few as eight on the wire.
pub const MAX_ELEMENTS: u32 = 200_000;

#[derive(Debug, PartialEq, Eq)]
pub enum LengthProblem {
    /// The first offset at which a declared length does not fit.
    Overrun { offset: u64 },
    /// A deflated data set inflates to more than the cap.
    InflatesTooLarge { cap: u64 },
    /// A deflated data set that does not inflate.
    BadDeflate,
    /// Sequences nested deeper than [`MAX_SEQUENCE_DEPTH`].
    NestingTooDeep { limit: usize },
    /// More elements and items than [`MAX_ELEMENTS`].
    TooManyElements { limit: u32 },
    /// A structure dicom-rs refuses too: an item where none may be, an item or sequence that
    /// runs past the one holding it, a fragment of undefined length.
    Malformed,
    /// The image attributes, read before the pixel data, break a limit.
    Refused(ImageError),
}

impl From<LengthProblem> for ImageError {
    fn from(problem: LengthProblem) -> Self {
        match problem {
            LengthProblem::InflatesTooLarge { cap } => ImageError::DecodedSizeTooLarge {
                declared: cap.saturating_add(1),
                limit: cap,
            },
            LengthProblem::BadDeflate | LengthProblem::Malformed => {
                ImageError::Undecodable { format: "DICOM" }
            }
            LengthProblem::Overrun { .. } => ImageError::DicomDeclaredLengthExceedsInput,
            LengthProblem::NestingTooDeep { limit } => ImageError::DicomNestingTooDeep { limit },
            LengthProblem::TooManyElements { limit } => ImageError::DicomTooManyElements { limit },
            LengthProblem::Refused(error) => error,
        }
    }
}

/// The image attributes of the top-level data set, as declared, before anything is decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeclaredPixels {
    pub rows: Option<u32>,
    pub columns: Option<u32>,
    pub frames: Option<u32>,
    pub samples_per_pixel: Option<u32>,
    pub bits_allocated: Option<u32>,
}

/// What the walk learnt: the declared image, whether the top level has pixel data (and how
/// many bytes it decodes to, checked against the limits), and the data set's size as the
/// parser will hold it (inflated, for a deflated one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkOutcome {
    pub declared: DeclaredPixels,
    pub pixel_bytes: Option<u64>,
    pub data_set_bytes: u64,
}

/// Where the walk reads from: the bytes themselves, or a deflated data set inflating as it
/// goes. Positions count from the data set's start (inflated bytes for a deflated one).
trait Source {
    /// Fills `buffer`, or answers false when fewer bytes are left (the data ends here).
    fn read_or_end(&mut self, buffer: &mut [u8]) -> Result<bool, LengthProblem>;
    /// Passes over a value of `length` bytes whose header starts at `header_offset`.
    fn skip(&mut self, length: u64, header_offset: u64) -> Result<(), LengthProblem>;
    /// Refuses a container (item or sequence) declaring more bytes than can follow.
    fn check_fits(&self, length: u64, header_offset: u64) -> Result<(), LengthProblem>;
    fn position(&self) -> u64;
    /// The pixel data legitimately adds its declared size to what may be inflated.
    fn allow_pixels(&mut self, bytes: u64);
}

struct SliceSource<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Source for SliceSource<'_> {
    fn read_or_end(&mut self, buffer: &mut [u8]) -> Result<bool, LengthProblem> {
        let Some(slice) = self.bytes.get(self.position..self.position + buffer.len()) else {
            return Ok(false);
        };
        buffer.copy_from_slice(slice);
        self.position += buffer.len();
        Ok(true)
    }

    fn skip(&mut self, length: u64, header_offset: u64) -> Result<(), LengthProblem> {
        self.check_fits(length, header_offset)?;
        self.position += length as usize;
        Ok(())
    }

    fn check_fits(&self, length: u64, header_offset: u64) -> Result<(), LengthProblem> {
        if length > (self.bytes.len() - self.position) as u64 {
            return Err(LengthProblem::Overrun {
                offset: header_offset,
            });
        }
        Ok(())
    }

    fn position(&self) -> u64 {
        self.position as u64
    }

    fn allow_pixels(&mut self, _bytes: u64) {}
}

struct DeflateSource<'a> {
    inflating: BufReader<flate2::read::DeflateDecoder<&'a [u8]>>,
    position: u64,
    /// What the image's attributes allow, besides its pixel data.
    base_cap: u64,
    cap: u64,
}

impl DeflateSource<'_> {
    /// Inflates up to `length` more bytes into `sink`, never past the cap; the count inflated.
    fn inflate(
        &mut self,
        length: u64,
        sink: &mut impl std::io::Write,
    ) -> Result<u64, LengthProblem> {
        let allowed = length.min(self.cap.saturating_sub(self.position));
        let inflated = std::io::copy(&mut (&mut self.inflating).take(allowed), sink)
            .map_err(|_| LengthProblem::BadDeflate)?;
        self.position += inflated;
        if inflated == allowed && allowed < length {
            return Err(LengthProblem::InflatesTooLarge { cap: self.cap });
        }
        Ok(inflated)
    }
}

impl Source for DeflateSource<'_> {
    fn read_or_end(&mut self, buffer: &mut [u8]) -> Result<bool, LengthProblem> {
        let wanted = buffer.len() as u64;
        let mut filled = std::io::Cursor::new(buffer);
        Ok(self.inflate(wanted, &mut filled)? == wanted)
    }

    fn skip(&mut self, length: u64, header_offset: u64) -> Result<(), LengthProblem> {
        if self.inflate(length, &mut std::io::sink())? < length {
            return Err(LengthProblem::Overrun {
                offset: header_offset,
            });
        }
        Ok(())
    }

    /// Unknown until inflated; the cap bounds what inflating it costs.
    fn check_fits(&self, _length: u64, _header_offset: u64) -> Result<(), LengthProblem> {
        Ok(())
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn allow_pixels(&mut self, bytes: u64) {
        // An odd length is padded to even.
        self.cap = self.base_cap.saturating_add(bytes).saturating_add(1);
    }
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

/// Walks the object in `bytes` (see the module documentation), refusing it at the first
/// problem; otherwise answers what its header declares.
pub fn check_declared_lengths(
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<WalkOutcome, LengthProblem> {
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
            return Err(LengthProblem::Overrun {
                offset: start as u64,
            });
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
        // A meta group cut short: nothing follows for the parser to trust.
        let Some(length) = length else {
            return Ok(WalkOutcome::default());
        };
        let length = length as usize;
        if length > cursor.remaining_after(header) {
            return Err(LengthProblem::Overrun {
                offset: cursor.position as u64,
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
    let data_set = &bytes[cursor.position.min(bytes.len())..];
    let (explicit, little_endian) = match transfer_syntax.as_str() {
        DEFLATED => {
            let base_cap = limits.max_bytes as u64;
            let mut source = DeflateSource {
                inflating: BufReader::with_capacity(
                    64 * 1024,
                    flate2::read::DeflateDecoder::new(data_set),
                ),
                position: 0,
                base_cap,
                cap: base_cap,
            };
            return walk_data_set(&mut source, true, true, limits);
        }
        IMPLICIT_LITTLE => (false, true),
        EXPLICIT_BIG => (true, false),
        _ => (true, true),
    };
    let mut source = SliceSource {
        bytes: data_set,
        position: 0,
    };
    walk_data_set(&mut source, explicit, little_endian, limits)
}

/// A sequence or item the parser is inside of.
struct Open {
    sequence: bool,
    /// Where it ends, when its length is defined; else at its delimiter.
    end: Option<u64>,
    /// Encapsulated pixel data: its items are fragments of bytes, not data sets.
    fragments: bool,
}

const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);

/// Whether dicom-rs reads this element as a sequence: by its VR in explicit syntaxes, by the
/// standard dictionary in implicit VR (where pixel and overlay data are always OW).
fn is_sequence(explicit: bool, vr: [u8; 2], group: u16, element: u16) -> bool {
    if group == 0xFFFE {
        return false;
    }
    if explicit {
        return &vr == b"SQ";
    }
    if (group, element) == PIXEL_DATA || (group >> 8 == 0x60 && element == 0x3000) {
        return false;
    }
    StandardDataDictionary
        .by_tag(Tag(group, element))
        .is_some_and(|entry| entry.vr().relaxed() == VR::SQ)
}

/// The data set's headers, in dicom-rs's `DataSetReader` order, without recursion.
fn walk_data_set(
    source: &mut impl Source,
    explicit: bool,
    little_endian: bool,
    limits: &ImageLimits,
) -> Result<WalkOutcome, LengthProblem> {
    let u16_of = |pair: [u8; 2]| {
        if little_endian {
            u16::from_le_bytes(pair)
        } else {
            u16::from_be_bytes(pair)
        }
    };
    let u32_of = |quad: [u8; 4]| {
        if little_endian {
            u32::from_le_bytes(quad)
        } else {
            u32::from_be_bytes(quad)
        }
    };
    let mut outcome = WalkOutcome::default();
    let mut open: Vec<Open> = Vec::new();
    let mut depth = 0_usize;
    let mut elements = 0_u32;
    // Whether an item header (or a sequence delimiter) comes next.
    let mut in_sequence = false;
    loop {
        // Close what ends here, as the reader does after each value, item and delimiter.
        while let Some(&Open {
            end: Some(end),
            sequence,
            ..
        }) = open.last()
        {
            let position = source.position();
            if end > position {
                break;
            }
            if end < position {
                return Err(LengthProblem::Malformed);
            }
            open.pop();
            depth -= usize::from(sequence);
            in_sequence = !sequence;
        }
        let header_offset = source.position();
        // Inside a fragment item the reader takes its bytes, never a header.
        if let Some(&Open {
            sequence: false,
            fragments: true,
            end: Some(end),
        }) = open.last()
        {
            source.skip(end - header_offset, header_offset)?;
            continue;
        }
        let mut tag = [0_u8; 4];
        if !source.read_or_end(&mut tag)? {
            break;
        }
        let group = u16_of([tag[0], tag[1]]);
        let element = u16_of([tag[2], tag[3]]);
        elements += 1;
        if elements > MAX_ELEMENTS {
            return Err(LengthProblem::TooManyElements {
                limit: MAX_ELEMENTS,
            });
        }
        // Items and delimiters have no VR, in every syntax.
        let mut vr = [0_u8; 2];
        let length = if group == 0xFFFE || !explicit {
            let mut quad = [0_u8; 4];
            if !source.read_or_end(&mut quad)? {
                break;
            }
            u32_of(quad)
        } else {
            if !source.read_or_end(&mut vr)? {
                break;
            }
            if long_form(&vr) {
                let mut reserved_and_length = [0_u8; 6];
                if !source.read_or_end(&mut reserved_and_length)? {
                    break;
                }
                u32_of([
                    reserved_and_length[2],
                    reserved_and_length[3],
                    reserved_and_length[4],
                    reserved_and_length[5],
                ])
            } else {
                let mut pair = [0_u8; 2];
                if !source.read_or_end(&mut pair)? {
                    break;
                }
                u32::from(u16_of(pair))
            }
        };
        let defined = (length != UNDEFINED).then_some(u64::from(length));
        if in_sequence {
            match (group, element) {
                (0xFFFE, 0xE000) => {
                    let Some(holder) = open.last() else {
                        return Err(LengthProblem::Malformed);
                    };
                    let fragments = holder.fragments;
                    if let Some(length) = defined {
                        source.check_fits(length, header_offset)?;
                    } else if fragments {
                        return Err(LengthProblem::Malformed);
                    }
                    open.push(Open {
                        sequence: false,
                        end: defined.map(|length| source.position() + length),
                        fragments,
                    });
                    in_sequence = false;
                }
                (0xFFFE, 0xE00D) => {
                    if open.pop().is_some_and(|closed| closed.sequence) {
                        depth -= 1;
                    }
                    in_sequence = true;
                }
                (0xFFFE, 0xE0DD) => {
                    if open.pop().is_some_and(|closed| closed.sequence) {
                        depth -= 1;
                    }
                    in_sequence = false;
                }
                _ => return Err(LengthProblem::Malformed),
            }
            continue;
        }
        let top_level = open.is_empty();
        if (group, element) == (0xFFFE, 0xE00D) {
            // An item delimiter ends the item being read; outside any, the reader ignores it.
            if let Some(closed) = open.pop() {
                depth -= usize::from(closed.sequence);
                in_sequence = true;
            }
            continue;
        }
        let encapsulated = (group, element) == PIXEL_DATA && defined.is_none();
        if top_level && (group, element) == PIXEL_DATA {
            // Before a single pixel is read, let alone inflated or decoded.
            let bytes = crate::decode::check_declared_pixels(&outcome.declared, limits)
                .map_err(LengthProblem::Refused)?;
            outcome.pixel_bytes = Some(bytes);
            source.allow_pixels(bytes);
        }
        if encapsulated || defined.is_none() || is_sequence(explicit, vr, group, element) {
            if let Some(length) = defined {
                source.check_fits(length, header_offset)?;
            }
            depth += 1;
            if depth > MAX_SEQUENCE_DEPTH {
                return Err(LengthProblem::NestingTooDeep {
                    limit: MAX_SEQUENCE_DEPTH,
                });
            }
            open.push(Open {
                sequence: true,
                end: defined.map(|length| source.position() + length),
                fragments: encapsulated,
            });
            in_sequence = true;
            continue;
        }
        let length = u64::from(length);
        if top_level
            && length <= 64
            && let Some(field) = image_attribute(&mut outcome.declared, group, element)
        {
            let mut value = [0_u8; 64];
            let value = &mut value[..length as usize];
            if !source.read_or_end(value)? {
                return Err(LengthProblem::Overrun {
                    offset: header_offset,
                });
            }
            *field = parse_number(value, explicit.then_some(vr), group, element, little_endian);
            continue;
        }
        source.skip(length, header_offset)?;
    }
    outcome.data_set_bytes = source.position();
    Ok(outcome)
}

/// The field of the declared image a top-level element sets, if it is one of them.
fn image_attribute(
    declared: &mut DeclaredPixels,
    group: u16,
    element: u16,
) -> Option<&mut Option<u32>> {
    match (group, element) {
        (0x0028, 0x0002) => Some(&mut declared.samples_per_pixel),
        (0x0028, 0x0008) => Some(&mut declared.frames),
        (0x0028, 0x0010) => Some(&mut declared.rows),
        (0x0028, 0x0011) => Some(&mut declared.columns),
        (0x0028, 0x0100) => Some(&mut declared.bits_allocated),
        _ => None,
    }
}

/// The first value of a numeric element as dicom-rs's `to_int` reads it: binary by its VR
/// (explicit, else the dictionary's: Number of Frames is IS, the rest US), or decimal text.
fn parse_number(
    value: &[u8],
    explicit_vr: Option<[u8; 2]>,
    group: u16,
    element: u16,
    little_endian: bool,
) -> Option<u32> {
    let vr = explicit_vr.unwrap_or(if (group, element) == (0x0028, 0x0008) {
        *b"IS"
    } else {
        *b"US"
    });
    let pair = || -> Option<[u8; 2]> { value.get(..2)?.try_into().ok() };
    let quad = || -> Option<[u8; 4]> { value.get(..4)?.try_into().ok() };
    match &vr {
        b"US" => pair().map(|pair| {
            u32::from(if little_endian {
                u16::from_le_bytes(pair)
            } else {
                u16::from_be_bytes(pair)
            })
        }),
        b"SS" => pair().and_then(|pair| {
            let value = if little_endian {
                i16::from_le_bytes(pair)
            } else {
                i16::from_be_bytes(pair)
            };
            u32::try_from(value).ok()
        }),
        b"UL" => quad().map(|quad| {
            if little_endian {
                u32::from_le_bytes(quad)
            } else {
                u32::from_be_bytes(quad)
            }
        }),
        b"SL" => quad().and_then(|quad| {
            let value = if little_endian {
                i32::from_le_bytes(quad)
            } else {
                i32::from_be_bytes(quad)
            };
            u32::try_from(value).ok()
        }),
        b"IS" | b"DS" => std::str::from_utf8(value)
            .ok()?
            .split('\\')
            .next()?
            .trim_matches([' ', '\0'])
            .parse()
            .ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ImageLimits {
        ImageLimits::default()
    }

    #[test]
    fn the_meta_group_ends_where_its_group_length_says() {
        // A fuzzer finding: an element of group 0003 inside the meta group. Ending the group
        // there inflated garbage (and passed); dicom-rs inflates from the group length's end,
        // where this deflate stream is corrupt (and, read lazily, declares a 2.5 GB value).
        let bytes = include_bytes!(
            "../../../services/validation/tests/data/fuzz-deflate-after-meta-group-length.dcm"
        );
        assert_eq!(
            check_declared_lengths(bytes, &limits()),
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
            check_declared_lengths(&bytes, &limits()),
            Err(LengthProblem::Overrun { offset: 132 })
        );
    }

    /// Explicit VR little endian elements, for data sets written by hand.
    fn element(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(group.to_le_bytes());
        bytes.extend(element.to_le_bytes());
        bytes.extend(vr);
        if long_form(vr) {
            bytes.extend([0, 0]);
            bytes.extend((value.len() as u32).to_le_bytes());
        } else {
            bytes.extend((value.len() as u16).to_le_bytes());
        }
        bytes.extend(value);
        bytes
    }

    fn item_header(element: u16, length: u32) -> Vec<u8> {
        let mut bytes = vec![0xFE, 0xFF];
        bytes.extend(element.to_le_bytes());
        bytes.extend(length.to_le_bytes());
        bytes
    }

    fn grey_header(rows: u16, columns: u16) -> Vec<u8> {
        let mut bytes = element(0x0028, 0x0002, b"US", &1_u16.to_le_bytes());
        bytes.extend(element(0x0028, 0x0010, b"US", &rows.to_le_bytes()));
        bytes.extend(element(0x0028, 0x0011, b"US", &columns.to_le_bytes()));
        bytes.extend(element(0x0028, 0x0100, b"US", &8_u16.to_le_bytes()));
        bytes
    }

    /// (0040,A730) nested `depth` deep, with defined or undefined lengths; `explicit_vr` false
    /// writes it in implicit VR, where only the dictionary says it is a sequence.
    fn nested(depth: usize, defined: bool, explicit_vr: bool) -> Vec<u8> {
        let mut inner = Vec::new();
        for _ in 0..depth {
            let mut item = item_header(
                0xE000,
                if defined {
                    inner.len() as u32
                } else {
                    UNDEFINED
                },
            );
            item.extend(&inner);
            if !defined {
                item.extend(item_header(0xE00D, 0));
            }
            let mut sequence = vec![0x40, 0x00, 0x30, 0xA7];
            if explicit_vr {
                sequence.extend(b"SQ\0\0");
            }
            sequence.extend(
                (if defined {
                    item.len() as u32
                } else {
                    UNDEFINED
                })
                .to_le_bytes(),
            );
            sequence.extend(item);
            if !defined {
                sequence.extend(item_header(0xE0DD, 0));
            }
            inner = sequence;
        }
        inner
    }

    fn walk_explicit(data_set: &[u8]) -> Result<WalkOutcome, LengthProblem> {
        let mut source = SliceSource {
            bytes: data_set,
            position: 0,
        };
        walk_data_set(&mut source, true, true, &limits())
    }

    fn deflated(data_set: &[u8]) -> Vec<u8> {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut encoder, data_set).expect("deflate");
        encoder.finish().expect("deflate")
    }

    fn deflate_source<'a>(compressed: &'a [u8], limits: &ImageLimits) -> DeflateSource<'a> {
        DeflateSource {
            inflating: BufReader::with_capacity(
                64 * 1024,
                flate2::read::DeflateDecoder::new(compressed),
            ),
            position: 0,
            base_cap: limits.max_bytes as u64,
            cap: limits.max_bytes as u64,
        }
    }

    #[test]
    fn nesting_is_bounded_in_every_encoding_without_recursion() {
        let too_deep = Err(LengthProblem::NestingTooDeep {
            limit: MAX_SEQUENCE_DEPTH,
        });
        for defined in [true, false] {
            assert_eq!(walk_explicit(&nested(5_000, defined, true)), too_deep);
            assert_eq!(
                walk_explicit(&nested(MAX_SEQUENCE_DEPTH + 1, defined, true)),
                too_deep
            );
            assert!(walk_explicit(&nested(MAX_SEQUENCE_DEPTH, defined, true)).is_ok());
            // Implicit VR: a defined-length (0040,A730) is a sequence by the dictionary alone.
            let mut implicit = SliceSource {
                bytes: &nested(5_000, defined, false),
                position: 0,
            };
            assert_eq!(
                walk_data_set(&mut implicit, false, true, &limits()),
                too_deep
            );
            // Deflated: walked as it inflates.
            let compressed = deflated(&nested(5_000, defined, true));
            let mut source = deflate_source(&compressed, &limits());
            assert_eq!(walk_data_set(&mut source, true, true, &limits()), too_deep);
        }
    }

    #[test]
    fn sequences_closed_by_length_or_delimiter_do_not_add_up() {
        // Many sequences one after another, each a few levels deep, are not deep nesting.
        let mut data_set = Vec::new();
        for _ in 0..100 {
            data_set.extend(nested(4, true, true));
            data_set.extend(nested(4, false, true));
        }
        assert!(walk_explicit(&data_set).is_ok());
    }

    #[test]
    fn elements_and_items_are_counted() {
        // Empty, distinct elements: eight bytes each on the wire.
        let mut data_set = Vec::new();
        for _ in 0..=MAX_ELEMENTS {
            data_set.extend(element(0x0009, 0x1000, b"UN", &[]));
        }
        assert_eq!(
            walk_explicit(&data_set),
            Err(LengthProblem::TooManyElements {
                limit: MAX_ELEMENTS
            })
        );
        // Empty items in one sequence count too.
        let mut data_set = element(0x0040, 0xA730, b"SQ", &[]);
        data_set.truncate(8);
        data_set.extend(UNDEFINED.to_le_bytes());
        for _ in 0..=MAX_ELEMENTS {
            data_set.extend(item_header(0xE000, 0));
        }
        assert_eq!(
            walk_explicit(&data_set),
            Err(LengthProblem::TooManyElements {
                limit: MAX_ELEMENTS
            })
        );
    }

    #[test]
    fn the_declared_image_is_read_and_checked_before_its_pixels() {
        let mut data_set = grey_header(64, 80);
        data_set.extend(element(0x7FE0, 0x0010, b"OB", &[7; 64 * 80]));
        let outcome = walk_explicit(&data_set).expect("walks");
        assert_eq!(
            (outcome.declared.rows, outcome.declared.columns),
            (Some(64), Some(80))
        );
        assert_eq!(outcome.pixel_bytes, Some(64 * 80));
        assert_eq!(outcome.data_set_bytes, data_set.len() as u64);
        let mut huge = grey_header(16_384, 16_384);
        huge.extend(element(0x7FE0, 0x0010, b"OB", &[0; 16]));
        assert!(matches!(
            walk_explicit(&huge),
            Err(LengthProblem::Refused(
                ImageError::DimensionsOutOfRange { .. }
            ))
        ));
    }

    #[test]
    fn a_deflate_bomb_is_refused_after_inflating_its_header_only() {
        // 16384 × 16384 declared, and 64 MiB of the promised zeros really there.
        let mut data_set = grey_header(16_384, 16_384);
        data_set.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        data_set.extend((16_384_u32 * 16_384).to_le_bytes());
        data_set.extend(vec![0_u8; 64 << 20]);
        let compressed = deflated(&data_set);
        let mut source = deflate_source(&compressed, &limits());
        assert!(matches!(
            walk_data_set(&mut source, true, true, &limits()),
            Err(LengthProblem::Refused(
                ImageError::DimensionsOutOfRange { .. }
            ))
        ));
        // The walk read up to the pixel data's header and stopped there.
        assert!(source.position < 1024, "{} bytes inflated", source.position);
    }

    #[test]
    fn inflating_stops_at_what_the_header_allows() {
        // 64 × 64 declared (4 KiB), 32 MiB of pixel data: the walk may inflate at most
        // max_bytes besides the declared pixels, and stops there.
        let small = ImageLimits {
            max_bytes: 1 << 20,
            ..ImageLimits::default()
        };
        let mut data_set = grey_header(64, 64);
        data_set.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        data_set.extend((32_u32 << 20).to_le_bytes());
        data_set.extend(vec![0_u8; 32 << 20]);
        let compressed = deflated(&data_set);
        let mut source = deflate_source(&compressed, &small);
        let cap = (1 << 20) + 64 * 64 + 1;
        assert_eq!(
            walk_data_set(&mut source, true, true, &small),
            Err(LengthProblem::InflatesTooLarge { cap })
        );
        assert!(source.position <= cap, "{} inflated", source.position);
        // Before any pixel data, the cap is max_bytes alone.
        let mut padding = element(0x0009, 0x1000, b"OB", &[]);
        padding.truncate(8);
        padding.extend((8_u32 << 20).to_le_bytes());
        padding.extend(vec![0_u8; 8 << 20]);
        let compressed = deflated(&padding);
        let mut source = deflate_source(&compressed, &small);
        assert_eq!(
            walk_data_set(&mut source, true, true, &small),
            Err(LengthProblem::InflatesTooLarge { cap: 1 << 20 })
        );
    }

    #[test]
    fn numbers_are_read_as_their_vr_says() {
        assert_eq!(
            parse_number(&[0, 2], Some(*b"US"), 0x0028, 0x0010, true),
            Some(512)
        );
        assert_eq!(
            parse_number(&[2, 0], Some(*b"US"), 0x0028, 0x0010, false),
            Some(512)
        );
        assert_eq!(parse_number(b"12 ", None, 0x0028, 0x0008, true), Some(12));
        assert_eq!(
            parse_number(b"3\\4", Some(*b"IS"), 0x0028, 0x0008, true),
            Some(3)
        );
        assert_eq!(
            parse_number(&[0xFF, 0xFF], Some(*b"SS"), 0x0028, 0x0010, true),
            None
        );
        assert_eq!(parse_number(&[1], Some(*b"OB"), 0x0028, 0x0010, true), None);
    }
}
