//! Uncompressed 8-bit colour pixel data as DICOM allows it to be stored, turned into what every
//! later step expects: interleaved RGB. dicom-pixeldata cannot take a frame out of 4:2:2
//! subsampled YBR (it sizes frames as if every pixel had three samples) nor give the stored
//! values of colour-by-plane data, so both are rewritten here before it sees them.

/// How the samples of an uncompressed colour frame are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColourLayout {
    /// R G B per pixel (Planar Configuration 0).
    RgbInterleaved,
    /// All R, then all G, then all B (Planar Configuration 1).
    RgbPlanar,
    /// Y Cb Cr per pixel, full range (YBR_FULL, Planar Configuration 0).
    YbrFullInterleaved,
    /// All Y, then all Cb, then all Cr (YBR_FULL, Planar Configuration 1).
    YbrFullPlanar,
    /// Y Y Cb Cr per horizontal pair of pixels (YBR_FULL_422).
    YbrFull422,
}

impl ColourLayout {
    pub fn of(photometric: &str, planar_configuration: u32) -> Option<Self> {
        match (photometric, planar_configuration) {
            ("RGB", 0) => Some(Self::RgbInterleaved),
            ("RGB", _) => Some(Self::RgbPlanar),
            ("YBR_FULL", 0) => Some(Self::YbrFullInterleaved),
            ("YBR_FULL", _) => Some(Self::YbrFullPlanar),
            ("YBR_FULL_422", _) => Some(Self::YbrFull422),
            _ => None,
        }
    }

    /// Bytes of one stored frame, or None when the layout cannot hold this size (4:2:2 needs
    /// an even number of columns).
    pub fn frame_bytes(self, rows: u32, columns: u32) -> Option<usize> {
        let pixels = rows as usize * columns as usize;
        match self {
            Self::YbrFull422 if columns % 2 == 1 => None,
            Self::YbrFull422 => Some(pixels * 2),
            _ => Some(pixels * 3),
        }
    }

    /// Already what the decoder handles: nothing to rewrite.
    pub fn is_interleaved_rgb(self) -> bool {
        self == Self::RgbInterleaved
    }
}

/// The first frame of `stored` as interleaved RGB, or None when it is shorter than one frame.
pub fn to_interleaved_rgb(
    stored: &[u8],
    layout: ColourLayout,
    rows: u32,
    columns: u32,
) -> Option<Vec<u8>> {
    let frame = stored.get(..layout.frame_bytes(rows, columns)?)?;
    let pixels = rows as usize * columns as usize;
    let planes = || {
        let (first, rest) = frame.split_at(pixels);
        let (second, third) = rest.split_at(pixels);
        first
            .iter()
            .zip(second)
            .zip(third)
            .map(|((&a, &b), &c)| [a, b, c])
    };
    let rgb = match layout {
        ColourLayout::RgbInterleaved => frame.to_vec(),
        ColourLayout::RgbPlanar => planes().flatten().collect(),
        ColourLayout::YbrFullInterleaved => frame
            .chunks_exact(3)
            .flat_map(|ybr| ybr_full_to_rgb(ybr[0], ybr[1], ybr[2]))
            .collect(),
        ColourLayout::YbrFullPlanar => planes()
            .flat_map(|[y, cb, cr]| ybr_full_to_rgb(y, cb, cr))
            .collect(),
        ColourLayout::YbrFull422 => frame
            .chunks_exact(4)
            .flat_map(|pair| {
                let [y0, y1, cb, cr] = [pair[0], pair[1], pair[2], pair[3]];
                let [a, b] = [ybr_full_to_rgb(y0, cb, cr), ybr_full_to_rgb(y1, cb, cr)];
                a.into_iter().chain(b)
            })
            .collect(),
    };
    Some(rgb)
}

/// PS3.3 C.7.6.3.1.2: full-range YCbCr (ITU-R BT.601 coefficients) to RGB.
fn ybr_full_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let (y, cb, cr) = (f32::from(y), f32::from(cb) - 128.0, f32::from(cr) - 128.0);
    let channel = |value: f32| value.round().clamp(0.0, 255.0) as u8;
    [
        channel(y + 1.402 * cr),
        channel(y - 0.344_136 * cb - 0.714_136 * cr),
        channel(y + 1.772 * cb),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_are_interleaved() {
        let planar = [1, 2, 10, 20, 100, 200];
        assert_eq!(
            to_interleaved_rgb(&planar, ColourLayout::RgbPlanar, 1, 2),
            Some(vec![1, 10, 100, 2, 20, 200])
        );
    }

    #[test]
    fn ybr_422_shares_chroma_between_a_pair_of_pixels() {
        // Grey chroma: both pixels keep their own luma as R = G = B.
        let stored = [50, 200, 128, 128];
        assert_eq!(
            to_interleaved_rgb(&stored, ColourLayout::YbrFull422, 1, 2),
            Some(vec![50, 50, 50, 200, 200, 200])
        );
        // Pure red in BT.601 full range: Y 76, Cb 85, Cr 255.
        let red = to_interleaved_rgb(&[76, 76, 85, 255], ColourLayout::YbrFull422, 1, 2)
            .expect("one frame");
        assert!(red[0] >= 253 && red[1] <= 2 && red[2] <= 2, "{red:?}");
    }

    #[test]
    fn a_short_frame_or_odd_width_is_refused() {
        assert_eq!(
            to_interleaved_rgb(&[0; 5], ColourLayout::RgbInterleaved, 1, 2),
            None
        );
        assert_eq!(ColourLayout::YbrFull422.frame_bytes(2, 3), None);
        assert_eq!(ColourLayout::of("PALETTE COLOR", 0), None);
    }
}
