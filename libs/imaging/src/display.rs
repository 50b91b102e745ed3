//! The grey display transform of DICOM PS3.3 C.11: stored values → modality LUT (rescale) →
//! VOI (the first window, or the image's own range when there is none) → 8-bit, inverted for
//! MONOCHROME1 so that bright always means more signal. Models see this image.
//!
//! It works from the stored sample values rather than dicom-pixeldata's image conversion,
//! so that the sign of JPEG 2000 samples follows the dataset, a window narrower than one
//! value or a constant image cannot trip the converter, and the transform can be checked
//! against the reference decoder.

/// The VOI LUT functions of C.11.2.1.2 and C.11.2.1.3.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub center: f64,
    pub width: f64,
    pub function: VoiFunction,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GreyTransform {
    pub slope: f64,
    pub intercept: f64,
    /// None, or a window the standard does not allow (LINEAR needs width ≥ 1): the image's
    /// own range is used instead.
    pub window: Option<Window>,
    pub invert: bool,
}

/// Makes stored values what the header says they are: `bits_stored` significant bits, sign
/// extended when the data is signed. Bits above them may hold overlays in old files, and a
/// JPEG 2000 code stream may disagree with the dataset about the sign; the dataset decides,
/// as in the reference decoder.
pub fn normalise_stored(values: &mut [i32], bits_stored: u16, signed: bool) {
    if !(1..32).contains(&bits_stored) {
        return;
    }
    let shift = 32 - u32::from(bits_stored);
    for value in values {
        *value = if signed {
            (*value << shift) >> shift
        } else {
            ((*value as u32) << shift >> shift) as i32
        };
    }
}

/// The levels a lookup table of [`GreyTransform::apply`] covers: every 16-bit stored value.
const TABLE_LEVELS: usize = 1 << 16;

impl GreyTransform {
    /// The 8-bit display values of `stored`.
    pub fn apply(&self, stored: &[i32]) -> Vec<u8> {
        let rescaled = |value: i32| f64::from(value) * self.slope + self.intercept;
        let (low, high) = stored
            .iter()
            .fold((i32::MAX, i32::MIN), |(low, high), &value| {
                (low.min(value), high.max(value))
            });
        let window = self.window.filter(Window::is_valid).unwrap_or_else(|| {
            let (a, b) = (rescaled(low), rescaled(high));
            let (low, high) = (a.min(b), a.max(b));
            Window {
                center: (low + high) / 2.0,
                width: high - low,
                function: VoiFunction::LinearExact,
            }
        });
        let shown = |value: i32| {
            // Non-negative after the clamp, so adding one half and truncating rounds half up.
            let byte = (window.fraction(rescaled(value)) * 255.0).clamp(0.0, 255.0) + 0.5;
            let byte = byte as u8;
            if self.invert { 255 - byte } else { byte }
        };
        // Stored values span at most 2^16 levels: one table entry per level costs less than
        // the arithmetic per pixel whenever there are more pixels than levels.
        let levels = i64::from(high) - i64::from(low) + 1;
        if levels > 0 && levels <= TABLE_LEVELS as i64 && levels as usize <= stored.len() {
            // Every stored value of up to 16 bits: a table of 2^16 entries indexed by a u16
            // needs no bounds check, so the lookup is a load per pixel.
            let mut table = Box::new([0_u8; TABLE_LEVELS]);
            for (entry, value) in table.iter_mut().zip(low..=high) {
                *entry = shown(value);
            }
            stored
                .iter()
                .map(|&value| table[usize::from((value - low) as u16)])
                .collect()
        } else if levels > 0 && levels as usize <= stored.len() {
            let table: Vec<u8> = (low..=high).map(shown).collect();
            stored
                .iter()
                .map(|&value| table[(value - low) as usize])
                .collect()
        } else {
            stored.iter().map(|&value| shown(value)).collect()
        }
    }
}

impl Window {
    fn is_valid(&self) -> bool {
        let least = match self.function {
            VoiFunction::Linear => 1.0,
            VoiFunction::LinearExact | VoiFunction::Sigmoid => f64::MIN_POSITIVE,
        };
        self.center.is_finite() && self.width.is_finite() && self.width >= least
    }

    /// Where `value` falls in the window, from 0 (darkest) to 1 (brightest). A window of no
    /// width (a constant image) shows everything at the bottom.
    fn fraction(&self, value: f64) -> f64 {
        match self.function {
            VoiFunction::Linear => {
                let (center, width) = (self.center - 0.5, self.width - 1.0);
                if value <= center - width / 2.0 {
                    0.0
                } else if value > center + width / 2.0 {
                    1.0
                } else {
                    (value - center) / width + 0.5
                }
            }
            VoiFunction::LinearExact => {
                if self.width <= 0.0 || value <= self.center - self.width / 2.0 {
                    0.0
                } else if value > self.center + self.width / 2.0 {
                    1.0
                } else {
                    (value - self.center) / self.width + 0.5
                }
            }
            VoiFunction::Sigmoid => 1.0 / (1.0 + (-4.0 * (value - self.center) / self.width).exp()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(center: f64, width: f64) -> Option<Window> {
        Some(Window {
            center,
            width,
            function: VoiFunction::Linear,
        })
    }

    #[test]
    fn a_linear_window_follows_the_standard_formula() {
        let transform = GreyTransform {
            slope: 1.0,
            intercept: -1024.0,
            window: linear(40.0, 400.0),
            invert: false,
        };
        // Rescaled: -1024, -161 (below the bottom edge, -160), 40 (the centre), 1000.
        let shown = transform.apply(&[0, 863, 1064, 2024]);
        assert_eq!(shown[0], 0);
        assert_eq!(shown[1], 0, "x ≤ c − 0.5 − (w − 1)/2 is the minimum");
        assert_eq!(shown[2], 128, "((40 − 39.5)/399 + 0.5) × 255 rounds to 128");
        assert_eq!(shown[3], 255);
    }

    #[test]
    fn monochrome1_is_inverted_after_the_window() {
        let transform = GreyTransform {
            slope: 1.0,
            intercept: 0.0,
            window: None,
            invert: true,
        };
        assert_eq!(transform.apply(&[0, 50, 100]), vec![255, 127, 0]);
    }

    #[test]
    fn without_a_usable_window_the_image_range_is_used() {
        for window in [None, linear(100.0, 0.5), linear(f64::NAN, 10.0)] {
            let transform = GreyTransform {
                slope: -2.0,
                intercept: 10.0,
                window,
                invert: false,
            };
            // A negative slope turns the largest stored value into the darkest.
            assert_eq!(transform.apply(&[0, 5, 10]), vec![255, 128, 0]);
        }
    }

    #[test]
    fn a_constant_image_shows_dark_and_does_not_divide_by_zero() {
        let transform = GreyTransform {
            slope: 1.0,
            intercept: 0.0,
            window: None,
            invert: false,
        };
        assert_eq!(transform.apply(&[7; 4]), vec![0; 4]);
        assert!(transform.apply(&[]).is_empty());
    }

    #[test]
    fn the_lookup_table_and_the_direct_path_agree() {
        let transform = GreyTransform {
            slope: 0.7,
            intercept: -300.0,
            window: linear(40.0, 350.0),
            invert: true,
        };
        let many: Vec<i32> = (-1000..1000).collect(); // as many pixels as levels: a table
        let by_table = transform.apply(&many);
        for (index, &value) in many.iter().enumerate().step_by(37) {
            // Two pixels, two thousand levels: computed directly.
            let direct = transform.apply(&[value, -1000, 999]);
            assert_eq!(direct[0], by_table[index], "stored value {value}");
        }
    }

    #[test]
    fn a_full_16_bit_range_is_shown_through_the_table_as_computed_directly() {
        let transform = GreyTransform {
            slope: 1.0,
            intercept: 0.0,
            window: None,
            invert: false,
        };
        // 2^16 levels (the table's size) in twice as many pixels: shown through the table.
        let stored: Vec<i32> = (i32::from(i16::MIN)..=i32::from(i16::MAX))
            .chain((i32::from(i16::MIN)..=i32::from(i16::MAX)).rev())
            .collect();
        let shown = transform.apply(&stored);
        assert_eq!((shown[0], shown[65535], shown[65536]), (0, 255, 255));
        for (index, &value) in stored.iter().enumerate().step_by(97) {
            // Three pixels, 2^16 levels: computed directly.
            let direct = transform.apply(&[value, i32::from(i16::MIN), i32::from(i16::MAX)]);
            assert_eq!(direct[0], shown[index], "stored value {value}");
        }
    }

    #[test]
    fn stored_values_keep_only_their_bits_and_follow_the_sign() {
        let mut values = vec![0x1FFF, 0x0FFF, 0xE000 | 0x0123];
        normalise_stored(&mut values, 13, true);
        assert_eq!(values, vec![-1, 4095, 0x0123], "13-bit two's complement");
        let mut values = vec![0xF123];
        normalise_stored(&mut values, 12, false);
        assert_eq!(
            values,
            vec![0x123],
            "overlay bits above bits stored are dropped"
        );
        let mut values = vec![-5];
        normalise_stored(&mut values, 16, true);
        assert_eq!(values, vec![-5], "already signed values stay as they are");
    }
}
