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

/// Grey samples as a frame's decoded bytes hold them: 8 or 16 bits allocated (16-bit samples
/// in native byte order, as dicom-pixeldata leaves them), `bits_stored` significant bits,
/// signed or not. Read one at a time, they are what [`normalise_stored`] makes of them.
#[derive(Clone, Copy, Debug)]
pub struct GreySamples<'a> {
    pub data: &'a [u8],
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
}

impl GreySamples<'_> {
    /// How many samples the bytes hold.
    pub fn len(&self) -> usize {
        if self.bits_allocated == 16 {
            self.data.len() / 2
        } else {
            self.data.len()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `None` for a layout other than one grey sample of 8 or 16 bits allocated with
    /// `1..=bits_allocated` stored.
    fn is_supported(&self) -> bool {
        matches!(self.bits_allocated, 8 | 16)
            && (1..=self.bits_allocated).contains(&self.bits_stored)
    }

    /// What [`normalise_stored`] does to one sample.
    #[inline(always)]
    fn normaliser(&self) -> impl Fn(i32) -> i32 + Copy {
        let shift = 32 - u32::from(self.bits_stored);
        let signed = self.signed;
        move |raw: i32| {
            if signed {
                (raw << shift) >> shift
            } else {
                ((raw as u32) << shift >> shift) as i32
            }
        }
    }

    /// Each stored value, in order, normalised as [`normalise_stored`] does, mapped by `each`
    /// and collected (from an iterator of known length: one allocation, no capacity checks).
    #[inline(always)]
    fn map_collect<T>(&self, mut each: impl FnMut(i32) -> T) -> Vec<T> {
        let normalise = self.normaliser();
        if self.bits_allocated == 16 {
            self.data
                .chunks_exact(2)
                .map(|pair| each(normalise(i32::from(u16::from_ne_bytes([pair[0], pair[1]])))))
                .collect()
        } else {
            self.data
                .iter()
                .map(|&byte| each(normalise(i32::from(byte))))
                .collect()
        }
    }

    /// Each sample's stored value (as [`normalise_stored`] makes it) as 16 bits: the value
    /// itself when unsigned, its two's complement when signed (`bits_stored` ≤ 16, so it
    /// fits); `each` receives the raw sample's bits. The key is all a pixel needs for the
    /// lookup table and the range, in 16-bit lanes (eight a vector) instead of 32.
    #[inline(always)]
    fn run_keyed<R>(&self, keyed: impl KeyedRun<R>) -> R {
        let shift = 16 - u32::from(self.bits_stored);
        let mask = (u32::from(u16::MAX) >> shift) as u16;
        match (self.bits_allocated, self.signed) {
            // All 16 bits stored (CT, most often): the key is the raw sample itself, signed or
            // not, and the loops have no shift to make (a shift by a count known only at run
            // time kept them from vectorising: the range pass of a 512×512 frame took three
            // times the instructions).
            (16, _) if shift == 0 => keyed.run(self.data_16(), |raw: u16| raw),
            (16, false) => keyed.run(self.data_16(), move |raw: u16| raw & mask),
            (16, true) => keyed.run(self.data_16(), move |raw: u16| {
                (((raw << shift) as i16) >> shift) as u16
            }),
            (_, false) => keyed.run(self.data_8(), move |raw: u16| raw & mask),
            (_, true) => keyed.run(self.data_8(), move |raw: u16| {
                (((raw << shift) as i16) >> shift) as u16
            }),
        }
    }

    fn data_16(&self) -> impl Iterator<Item = u16> + '_ {
        self.data
            .as_chunks::<2>()
            .0
            .iter()
            .map(|&pair| u16::from_ne_bytes(pair))
    }

    fn data_8(&self) -> impl Iterator<Item = u16> + '_ {
        self.data.iter().map(|&byte| u16::from(byte))
    }

    /// The least and greatest stored value (`(i32::MAX, i32::MIN)` when there is none).
    fn range(&self) -> (i32, i32) {
        if self.is_empty() {
            return (i32::MAX, i32::MIN);
        }
        if self.signed {
            let (low, high) = self.run_keyed(SignedRange);
            (i32::from(low), i32::from(high))
        } else {
            let (low, high) = self.run_keyed(UnsignedRange);
            (i32::from(low), i32::from(high))
        }
    }

    /// The table's entry of each sample, in order: `table` holds the shown value of every
    /// stored value `v` of the image at `v as u16` (see [`GreyTransform::keyed_table`]).
    fn look_up(&self, table: &[u8; TABLE_LEVELS]) -> Vec<u8> {
        self.run_keyed(LookUp(table))
    }

    /// The stored values as [`normalise_stored`] leaves them (for the general path and tests).
    pub fn to_vec(&self) -> Vec<i32> {
        self.map_collect(|value| value)
    }
}

/// A pass over a frame's samples given as raw 16-bit values and the function that makes each
/// its key (see [`GreySamples::run_keyed`]); generic so that each layout gets its own loop.
trait KeyedRun<R> {
    fn run(self, raw: impl Iterator<Item = u16>, key: impl Fn(u16) -> u16 + Copy) -> R;
}

/// The least and greatest key of unsigned samples.
struct UnsignedRange;

impl KeyedRun<(u16, u16)> for UnsignedRange {
    #[inline(always)]
    fn run(self, raw: impl Iterator<Item = u16>, key: impl Fn(u16) -> u16 + Copy) -> (u16, u16) {
        raw.map(key)
            .fold((u16::MAX, u16::MIN), |(low, high), value| {
                (low.min(value), high.max(value))
            })
    }
}

/// The least and greatest value of signed samples (their keys read as two's complement).
struct SignedRange;

impl KeyedRun<(i16, i16)> for SignedRange {
    #[inline(always)]
    fn run(self, raw: impl Iterator<Item = u16>, key: impl Fn(u16) -> u16 + Copy) -> (i16, i16) {
        raw.map(|raw| key(raw) as i16)
            .fold((i16::MAX, i16::MIN), |(low, high), value| {
                (low.min(value), high.max(value))
            })
    }
}

/// Each sample's entry of a keyed table.
struct LookUp<'t>(&'t [u8; TABLE_LEVELS]);

impl KeyedRun<Vec<u8>> for LookUp<'_> {
    #[inline(always)]
    fn run(self, raw: impl Iterator<Item = u16>, key: impl Fn(u16) -> u16 + Copy) -> Vec<u8> {
        let table = self.0;
        raw.map(|raw| table[usize::from(key(raw))]).collect()
    }
}

impl GreyTransform {
    /// The 8-bit display values of `stored`.
    pub fn apply(&self, stored: &[i32]) -> Vec<u8> {
        let (low, high) = stored
            .iter()
            .fold((i32::MAX, i32::MIN), |(low, high), &value| {
                (low.min(value), high.max(value))
            });
        let shown = self.shown(low, high);
        // Stored values span at most 2^16 levels: one table entry per level costs less than
        // the arithmetic per pixel whenever there are more pixels than levels.
        let levels = i64::from(high) - i64::from(low) + 1;
        if levels > 0 && levels <= TABLE_LEVELS as i64 && levels as usize <= stored.len() {
            // Every stored value of up to 16 bits: a table of 2^16 entries indexed by a u16
            // needs no bounds check, so the lookup is a load per pixel.
            let table = Self::table(low, high, &shown);
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

    /// The 8-bit display values of a grey frame's samples, read straight from its bytes: what
    /// [`GreyTransform::apply`] gives for their stored values ([`GreySamples::to_vec`]),
    /// without that full-size intermediate. `None` for a layout [`GreySamples`] does not hold.
    pub fn apply_samples(&self, samples: &GreySamples<'_>) -> Option<Vec<u8>> {
        if !samples.is_supported() {
            return None;
        }
        let (low, high) = samples.range();
        let count = samples.len();
        let shown = self.shown(low, high);
        // At most 2^16 levels: the table path of `apply` whenever the pixels outnumber them.
        let levels = i64::from(high) - i64::from(low) + 1;
        if levels > 0 && levels as usize <= count {
            let table = Self::keyed_table(low, high, &shown);
            Some(samples.look_up(&table))
        } else {
            Some(samples.map_collect(shown))
        }
    }

    /// The table of shown values of `low..=high` (at most 2^16 levels), indexed by the level's
    /// offset from `low`.
    fn table(low: i32, high: i32, shown: &impl Fn(i32) -> u8) -> Box<[u8; TABLE_LEVELS]> {
        let mut table = Box::new([0_u8; TABLE_LEVELS]);
        for (entry, value) in table.iter_mut().zip(low..=high) {
            *entry = shown(value);
        }
        table
    }

    /// The shown values of `low..=high` (at most 2^16 levels of up to 16 bits), each at the
    /// level's 16 bits (`v as u16`, two's complement for a negative one): what
    /// [`GreySamples::look_up`] indexes by a sample's key, with no offset to subtract.
    fn keyed_table(low: i32, high: i32, shown: &impl Fn(i32) -> u8) -> Box<[u8; TABLE_LEVELS]> {
        let mut table = Box::new([0_u8; TABLE_LEVELS]);
        for value in low..=high {
            table[usize::from(value as u16)] = shown(value);
        }
        table
    }

    /// The display value of one stored value, for an image whose stored values span
    /// `low..=high` (the window when there is no usable one).
    fn shown(&self, low: i32, high: i32) -> impl Fn(i32) -> u8 {
        let (slope, intercept, invert) = (self.slope, self.intercept, self.invert);
        let rescaled = move |value: i32| f64::from(value) * slope + intercept;
        let window = self.window.filter(Window::is_valid).unwrap_or_else(|| {
            let (a, b) = (rescaled(low), rescaled(high));
            let (low, high) = (a.min(b), a.max(b));
            Window {
                center: (low + high) / 2.0,
                width: high - low,
                function: VoiFunction::LinearExact,
            }
        });
        move |value: i32| {
            // Non-negative after the clamp, so adding one half and truncating rounds half up.
            let byte = (window.fraction(rescaled(value)) * 255.0).clamp(0.0, 255.0) + 0.5;
            let byte = byte as u8;
            if invert { 255 - byte } else { byte }
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
    use crate::test_support::noise_bytes;

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
    fn display_values_read_straight_from_the_bytes_equal_those_of_the_stored_values() {
        let windows = [
            None,
            linear(40.0, 350.0),
            linear(100.0, 0.5),
            Some(Window {
                center: -20.0,
                width: 900.0,
                function: VoiFunction::Sigmoid,
            }),
            Some(Window {
                center: 3.0,
                width: 0.25,
                function: VoiFunction::LinearExact,
            }),
        ];
        let mut compared = 0;
        for bits_allocated in [8_u16, 16] {
            for bits_stored in 1..=bits_allocated {
                for signed in [false, true] {
                    // 3 samples: fewer pixels than levels, computed directly; 4096: the table.
                    for (pixels, seed) in [(3_usize, 1_u32), (4096, 2), (4096, 3)] {
                        let data = noise_bytes(pixels * usize::from(bits_allocated / 8), seed);
                        let samples = GreySamples {
                            data: &data,
                            bits_allocated,
                            bits_stored,
                            signed,
                        };
                        // The stored values as the general path makes them.
                        let mut stored: Vec<i32> = if bits_allocated == 16 {
                            data.chunks_exact(2)
                                .map(|pair| i32::from(u16::from_ne_bytes([pair[0], pair[1]])))
                                .collect()
                        } else {
                            data.iter().map(|&byte| i32::from(byte)).collect()
                        };
                        normalise_stored(&mut stored, bits_stored, signed);
                        assert_eq!(samples.to_vec(), stored, "{bits_allocated}/{bits_stored}");
                        for window in windows {
                            for invert in [false, true] {
                                let transform = GreyTransform {
                                    slope: if signed { -1.5 } else { 0.75 },
                                    intercept: -100.0,
                                    window,
                                    invert,
                                };
                                assert_eq!(
                                    transform.apply_samples(&samples),
                                    Some(transform.apply(&stored)),
                                    "{bits_allocated} bits, {bits_stored} stored, signed \
                                     {signed}, {pixels} pixels, {window:?}, invert {invert}"
                                );
                                compared += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(compared, 2 * (8 + 16) * 3 * 5 * 2);
        let odd = GreySamples {
            data: &[1, 2, 3],
            bits_allocated: 12,
            bits_stored: 12,
            signed: false,
        };
        let transform = GreyTransform {
            slope: 1.0,
            intercept: 0.0,
            window: None,
            invert: false,
        };
        assert_eq!(transform.apply_samples(&odd), None, "not a layout it reads");
    }

    /// The keyed table holds each level at its own 16 bits: levels across the whole 16-bit
    /// range, negative ones wrapping to the top of the table, must each find their own entry.
    #[test]
    fn sixteen_bit_samples_of_every_level_are_shown_through_the_keyed_table_as_directly() {
        let transform = GreyTransform {
            slope: 1.25,
            intercept: -3000.0,
            window: None,
            invert: false,
        };
        // Every 16-bit pattern twice, in an order that mixes them: more pixels than levels.
        let data: Vec<u8> = (0..2 * 65536_u32)
            .flat_map(|index| ((index.wrapping_mul(40_503) % 65536) as u16).to_ne_bytes())
            .collect();
        for (bits_stored, signed) in [(16, false), (16, true), (15, true), (12, false)] {
            let samples = GreySamples {
                data: &data,
                bits_allocated: 16,
                bits_stored,
                signed,
            };
            let stored = samples.to_vec();
            let shown = transform
                .apply_samples(&samples)
                .expect("a layout it reads");
            // The stored values computed one by one, three at a time: no table.
            for (index, &value) in stored.iter().enumerate().step_by(331) {
                let (low, high) = if signed {
                    (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1)
                } else {
                    (0, (1 << bits_stored) - 1)
                };
                let direct = transform.apply(&[value, low, high]);
                assert_eq!(
                    direct[0], shown[index],
                    "{bits_stored} bits stored, signed {signed}, stored value {value}"
                );
            }
            assert_eq!(shown, transform.apply(&stored), "{bits_stored} {signed}");
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
