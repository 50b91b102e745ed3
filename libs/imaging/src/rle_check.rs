//! A structural check of an RLE Lossless frame (DICOM PS3.5 Annex G) before the codec sees it.
//! dicom-rs 0.10's RLE decoder indexes past its buffers on some malformed frames (a segment
//! that decodes to fewer bytes than the frame needs, a header whose segment count runs past
//! the fragment); those frames are refused here instead.

/// The 64-byte RLE header: a segment count and 15 offsets, little-endian.
const HEADER_BYTES: usize = 64;
const MAX_SEGMENTS: usize = 15;

/// Whether `fragment` is an RLE frame of `segments` segments, each decoding to at least
/// `pixels` bytes, with offsets inside the fragment and in order.
pub fn rle_frame_is_sound(fragment: &[u8], segments: usize, pixels: usize) -> bool {
    if fragment.len() < HEADER_BYTES || segments == 0 || segments > MAX_SEGMENTS {
        return false;
    }
    let word = |index: usize| {
        let at = 4 * index;
        u32::from_le_bytes([
            fragment[at],
            fragment[at + 1],
            fragment[at + 2],
            fragment[at + 3],
        ]) as usize
    };
    if word(0) != segments {
        return false;
    }
    let mut offsets: Vec<usize> = (1..=segments).map(word).collect();
    offsets.push(fragment.len());
    if offsets[0] != HEADER_BYTES {
        return false;
    }
    offsets.windows(2).all(|pair| {
        pair[0] <= pair[1]
            && pair[1] <= fragment.len()
            && packbits_length(&fragment[pair[0]..pair[1]], pixels) >= pixels
    })
}

/// How many bytes a PackBits segment decodes to, counting no further than `enough`.
fn packbits_length(segment: &[u8], enough: usize) -> usize {
    let mut produced = 0usize;
    let mut at = 0usize;
    while at < segment.len() && produced < enough {
        let header = segment[at] as i8;
        at += 1;
        match header {
            0..=127 => {
                let literal = header as usize + 1;
                if at + literal > segment.len() {
                    return produced + (segment.len() - at);
                }
                produced += literal;
                at += literal;
            }
            -127..=-1 => {
                if at >= segment.len() {
                    return produced;
                }
                // A run: the next byte, 1 - header times.
                produced += (1 - i32::from(header)) as usize;
                at += 1;
            }
            // -128 is a no-op.
            _ => {}
        }
    }
    produced
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(segments: &[Vec<u8>]) -> Vec<u8> {
        let mut header = vec![0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&(segments.len() as u32).to_le_bytes());
        let mut offset = HEADER_BYTES;
        for (index, segment) in segments.iter().enumerate() {
            let at = 4 * (index + 1);
            header[at..at + 4].copy_from_slice(&(offset as u32).to_le_bytes());
            offset += segment.len();
        }
        segments.iter().fold(header, |mut bytes, segment| {
            bytes.extend_from_slice(segment);
            bytes
        })
    }

    #[test]
    fn packbits_runs_and_literals_are_counted() {
        // A run of 4 (header -3), then a literal of 2.
        assert_eq!(packbits_length(&[0xFD, 7, 0x01, 1, 2], 100), 6);
        // A truncated literal counts only what is there.
        assert_eq!(packbits_length(&[0x05, 1, 2], 100), 2);
        assert_eq!(packbits_length(&[0x80, 0xFF], 100), 0);
    }

    #[test]
    fn sound_frames_pass_and_broken_ones_do_not() {
        let run_of_4 = vec![0xFD, 9];
        assert!(rle_frame_is_sound(
            &frame(std::slice::from_ref(&run_of_4)),
            1,
            4
        ));
        // The segment decodes to fewer bytes than the frame needs.
        assert!(!rle_frame_is_sound(
            &frame(std::slice::from_ref(&run_of_4)),
            1,
            5
        ));
        // The header's count is not the segments the image needs.
        assert!(!rle_frame_is_sound(
            &frame(std::slice::from_ref(&run_of_4)),
            2,
            4
        ));
        // An offset past the end, or out of order.
        let mut past = frame(&[run_of_4.clone(), run_of_4.clone()]);
        past[8..12].copy_from_slice(&10_000u32.to_le_bytes());
        assert!(!rle_frame_is_sound(&past, 2, 4));
        // Too short for a header; an absurd segment count.
        assert!(!rle_frame_is_sound(&[1, 0, 0, 0], 1, 4));
        let mut absurd = frame(&[run_of_4]);
        absurd[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!rle_frame_is_sound(&absurd, 1, 4));
    }

    #[test]
    fn the_fuzzers_reproducer_is_refused_without_a_panic() {
        let bytes =
            include_bytes!("../../../services/validation/tests/data/fuzz-rle-decoder-panic.dcm");
        let limits = crate::limits::ImageLimits {
            min_side: 1,
            ..crate::limits::ImageLimits::default()
        };
        // Called directly, not on the blocking pool: a panic would fail this test.
        assert!(matches!(
            crate::decode::decode_image(bytes, None, &limits),
            Err(crate::error::ImageError::Undecodable { .. })
        ));
    }
}
