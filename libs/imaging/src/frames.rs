//! Which frame of a multi-frame DICOM object a model is shown, and whether the pixel data holds
//! the frames its header declares.
//!
//! A model takes one image. A multi-frame object (an enhanced MR, an ultrasound loop) is either
//! refused or one frame of it is chosen by a policy named per model, and the chosen frame is
//! reported with the image ([`JudgedFrame`]) so that the answer and the ledger record say which
//! frame of how many was judged. Nothing is chosen silently.

use serde::{Deserialize, Serialize};

use crate::error::ImageError;

/// What a model does with a DICOM object of more than one frame.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FramePolicy {
    /// Refused with DICOM_MULTI_FRAME_NOT_SUPPORTED, from the header, before anything is
    /// decoded. The default: a model trained on single images says what it accepts.
    #[default]
    Refuse,
    /// Frame 1 is judged.
    FirstFrame,
    /// Frame ⌊N/2⌋ + 1 of N is judged (the middle of a sweep or a loop).
    MiddleFrame,
}

impl FramePolicy {
    /// The stable name the answer and the ledger record carry.
    pub fn code(self) -> &'static str {
        match self {
            Self::Refuse => "REFUSE",
            Self::FirstFrame => "FIRST_FRAME",
            Self::MiddleFrame => "MIDDLE_FRAME",
        }
    }

    /// The 0-based index of the frame this policy judges in an object of `frames` frames
    /// (at least 1), or the refusal.
    pub fn frame_index(self, frames: u32) -> Result<u32, ImageError> {
        let frames = frames.max(1);
        match self {
            _ if frames == 1 => Ok(0),
            Self::Refuse => Err(ImageError::DicomMultiFrameNotSupported { frames }),
            Self::FirstFrame => Ok(0),
            Self::MiddleFrame => Ok(frames / 2),
        }
    }
}

/// Which frame of the source object a canonical image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JudgedFrame {
    /// 1-based, as DICOM numbers frames.
    pub frame_number: u32,
    pub number_of_frames: u32,
    pub policy: FramePolicy,
}

/// Checks that native (uncompressed) pixel data of `byte_length` bytes holds exactly the
/// `declared` frames of `frame_bytes` each: no fewer (a frame would be read past the data), and
/// not a whole frame more (frames the header does not declare would go unjudged). A padding
/// byte or a partial trailing frame is tolerated, as readers do.
pub fn check_native_frames(
    byte_length: u64,
    frame_bytes: u64,
    declared: u32,
) -> Result<(), ImageError> {
    if frame_bytes == 0 {
        return Err(ImageError::Undecodable { format: "DICOM" });
    }
    let held = byte_length / frame_bytes;
    if held == u64::from(declared.max(1)) {
        return Ok(());
    }
    Err(ImageError::DicomFrameCountMismatch {
        declared: declared.max(1),
        held: u32::try_from(held).unwrap_or(u32::MAX),
    })
}

/// Checks that encapsulated pixel data can hold the `declared` frames: a frame needs at least
/// one fragment, and a multi-frame object must carry each frame in one fragment (as RLE and
/// most encoders write it) so a frame can be found without decoding the others; an offset
/// table, when present, must have one entry per frame.
pub fn check_encapsulated_frames(
    fragments: usize,
    offset_table_entries: usize,
    declared: u32,
) -> Result<(), ImageError> {
    let declared = declared.max(1);
    let as_count = |count: usize| u32::try_from(count).unwrap_or(u32::MAX);
    let mismatch = |held: usize| ImageError::DicomFrameCountMismatch {
        declared,
        held: as_count(held),
    };
    if fragments == 0 || as_count(fragments) < declared {
        return Err(mismatch(fragments));
    }
    if declared > 1 && as_count(fragments) != declared {
        return Err(mismatch(fragments));
    }
    if offset_table_entries > 0 && as_count(offset_table_entries) != declared {
        return Err(mismatch(offset_table_entries));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_names_its_frame_and_refuse_refuses_only_multi_frame_objects() {
        assert_eq!(FramePolicy::Refuse.frame_index(1), Ok(0));
        assert_eq!(
            FramePolicy::Refuse.frame_index(0),
            Ok(0),
            "absent or 0 is one"
        );
        assert_eq!(
            FramePolicy::Refuse.frame_index(2),
            Err(ImageError::DicomMultiFrameNotSupported { frames: 2 })
        );
        assert_eq!(FramePolicy::FirstFrame.frame_index(30), Ok(0));
        assert_eq!(FramePolicy::MiddleFrame.frame_index(1), Ok(0));
        assert_eq!(FramePolicy::MiddleFrame.frame_index(2), Ok(1));
        assert_eq!(FramePolicy::MiddleFrame.frame_index(3), Ok(1));
        assert_eq!(FramePolicy::MiddleFrame.frame_index(30), Ok(15));
        assert_eq!(FramePolicy::default(), FramePolicy::Refuse);
    }

    #[test]
    fn native_pixel_data_must_hold_the_declared_frames() {
        assert_eq!(check_native_frames(8192, 8192, 1), Ok(()));
        assert_eq!(check_native_frames(8193, 8192, 1), Ok(()), "a padding byte");
        assert_eq!(check_native_frames(6000, 400, 15), Ok(()));
        assert_eq!(
            check_native_frames(8192, 8192, 3),
            Err(ImageError::DicomFrameCountMismatch {
                declared: 3,
                held: 1
            })
        );
        assert_eq!(
            check_native_frames(4 * 8192, 8192, 1),
            Err(ImageError::DicomFrameCountMismatch {
                declared: 1,
                held: 4
            }),
            "undeclared frames are not left unjudged"
        );
        assert!(check_native_frames(100, 0, 1).is_err());
    }

    #[test]
    fn encapsulated_pixel_data_must_carry_one_fragment_per_frame() {
        assert_eq!(check_encapsulated_frames(1, 0, 1), Ok(()));
        assert_eq!(
            check_encapsulated_frames(3, 0, 1),
            Ok(()),
            "one frame in several fragments"
        );
        assert_eq!(check_encapsulated_frames(30, 30, 30), Ok(()));
        assert_eq!(check_encapsulated_frames(15, 0, 15), Ok(()));
        assert_eq!(
            check_encapsulated_frames(2, 2, 3),
            Err(ImageError::DicomFrameCountMismatch {
                declared: 3,
                held: 2
            })
        );
        assert!(check_encapsulated_frames(4, 0, 2).is_err());
        assert!(check_encapsulated_frames(2, 1, 2).is_err());
        assert!(check_encapsulated_frames(0, 0, 1).is_err());
    }
}
