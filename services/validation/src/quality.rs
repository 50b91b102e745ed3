//! Image quality measured from the pixels themselves, on luminance scaled to 0–1:
//! - mean brightness;
//! - RMS contrast (the standard deviation of luminance);
//! - noise: Immerkær's estimate of the noise standard deviation (a Laplacian-difference mask
//!   that cancels image structure), "Fast Noise Variance Estimation", CVIU 1996;
//! - sharpness: the variance of the 4-neighbour Laplacian (low for blurred or smeared images);
//! - saturated fraction: pixels clipped at black or white.
//!
//! Each is compared with a threshold from a profile chosen per model, else per modality, else the
//! default; every check reports its value, threshold, verdict and a stable code. Images too small
//! for a 3×3 mask report those checks as not measurable instead of a made-up value.

use std::collections::BTreeMap;

use medai_runtime::config::from_str_or_native;
use serde::{Deserialize, Serialize};

use medai_imaging::decode::CanonicalImage;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QualityThresholds {
    #[serde(
        default = "defaults::min_brightness",
        deserialize_with = "from_str_or_native"
    )]
    pub min_brightness: f64,
    #[serde(
        default = "defaults::max_brightness",
        deserialize_with = "from_str_or_native"
    )]
    pub max_brightness: f64,
    #[serde(
        default = "defaults::min_contrast",
        deserialize_with = "from_str_or_native"
    )]
    pub min_contrast: f64,
    #[serde(
        default = "defaults::max_noise",
        deserialize_with = "from_str_or_native"
    )]
    pub max_noise: f64,
    #[serde(
        default = "defaults::min_sharpness",
        deserialize_with = "from_str_or_native"
    )]
    pub min_sharpness: f64,
    #[serde(
        default = "defaults::max_saturated_fraction",
        deserialize_with = "from_str_or_native"
    )]
    pub max_saturated_fraction: f64,
    /// Refuse (IMAGE_QUALITY_INSUFFICIENT) instead of only reporting when a check fails.
    #[serde(default)]
    pub refuse_on_failure: bool,
}

mod defaults {
    pub fn min_brightness() -> f64 {
        0.02
    }
    pub fn max_brightness() -> f64 {
        0.98
    }
    pub fn min_contrast() -> f64 {
        0.02
    }
    pub fn max_noise() -> f64 {
        0.2
    }
    pub fn min_sharpness() -> f64 {
        0.0001
    }
    pub fn max_saturated_fraction() -> f64 {
        0.5
    }
}

impl Default for QualityThresholds {
    fn default() -> Self {
        Self {
            min_brightness: defaults::min_brightness(),
            max_brightness: defaults::max_brightness(),
            min_contrast: defaults::min_contrast(),
            max_noise: defaults::max_noise(),
            min_sharpness: defaults::min_sharpness(),
            max_saturated_fraction: defaults::max_saturated_fraction(),
            refuse_on_failure: false,
        }
    }
}

/// Threshold profiles: per model (the strictest say), then per modality, then the default.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QualityPolicy {
    #[serde(default)]
    pub default: QualityThresholds,
    #[serde(default)]
    pub by_modality: BTreeMap<String, QualityThresholds>,
    #[serde(default)]
    pub by_model: BTreeMap<String, QualityThresholds>,
}

impl QualityPolicy {
    /// The profile for a model and modality, and its name for the report.
    pub fn profile(&self, model: &str, modality: &str) -> (String, &QualityThresholds) {
        if let Some(thresholds) = self.by_model.get(model) {
            return (format!("model:{model}"), thresholds);
        }
        if let Some(thresholds) = self.by_modality.get(modality) {
            return (format!("modality:{modality}"), thresholds);
        }
        ("default".to_owned(), &self.default)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QualityMeasures {
    pub mean_brightness: f64,
    pub rms_contrast: f64,
    /// `None` when the image is too small for the 3×3 masks.
    pub noise: Option<f64>,
    pub sharpness: Option<f64>,
    pub saturated_fraction: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    AtLeast,
    AtMost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    NotMeasurable,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QualityCheck {
    /// Stable code of the failure this check guards against, for example QUALITY_BLUR.
    pub code: &'static str,
    pub value: f64,
    pub threshold: f64,
    pub comparison: Comparison,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QualityReport {
    pub profile: String,
    pub measures: QualityMeasures,
    pub checks: Vec<QualityCheck>,
    pub refuse_on_failure: bool,
}

impl QualityReport {
    pub fn passed(&self) -> bool {
        self.checks
            .iter()
            .all(|check| check.verdict != Verdict::Fail)
    }

    pub fn failed_codes(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|check| check.verdict == Verdict::Fail)
            .map(|check| check.code)
            .collect()
    }
}

/// Luminance in 0–1, row-major, of an image whose samples are not grey levels (colour).
fn luminance(image: &CanonicalImage) -> Vec<f64> {
    let channels = image.channels as usize;
    image
        .pixels
        .chunks_exact(channels.max(1))
        .map(|rgb| {
            let component = |index: usize| f64::from(rgb.get(index).copied().unwrap_or(0)) / 255.0;
            0.299 * component(0) + 0.587 * component(1) + 0.114 * component(2)
        })
        .collect()
}

pub fn measure(image: &CanonicalImage) -> QualityMeasures {
    let (width, height) = (image.width as usize, image.height as usize);
    match (image.channels, image.bit_depth) {
        // Grey levels are measured as the integers they are: every sum below is exact, and
        // luminance (level / full scale) is applied once to each sum instead of to each pixel.
        (1, 16) => {
            let levels: Vec<u16> = image
                .pixels
                .chunks_exact(2)
                .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
                .collect();
            grey_measures(&levels, width, height, 65535)
        }
        (1, _) => grey_measures(&image.pixels, width, height, 255),
        _ => float_measures(&luminance(image), width, height),
    }
}

/// Pixels summed per block before the block's sums join the image's: a block's sums of squares
/// fit 64 bits for any sample of up to 16 bits.
const BLOCK: usize = 1 << 16;

/// Exact integer sums over the image, as [`grey_measures`] needs them.
#[derive(Default)]
struct GreySums {
    sum: u128,
    squares: u128,
    saturated: usize,
    immerkaer: u128,
    laplacian_sum: i128,
    laplacian_squares: u128,
}

/// The measures of grey levels `0..=full_scale`, luminance being level / full scale. Equal to
/// [`float_measures`] of the luminance up to rounding (`float_measures` rounds each pixel's
/// term; here only the final sums are rounded).
fn grey_measures<T: GreyLevel>(
    levels: &[T],
    width: usize,
    height: usize,
    full_scale: u32,
) -> QualityMeasures {
    let mut sums = GreySums::default();
    // One pass for brightness, contrast and saturation.
    for block in levels.chunks(BLOCK) {
        let (sum, squares, saturated) = T::block_stats(block, full_scale);
        sums.sum += u128::from(sum);
        sums.squares += u128::from(squares);
        sums.saturated += saturated;
    }
    let masks_apply = width >= 3 && height >= 3 && levels.len() == width * height;
    if masks_apply {
        let (immerkaer, laplacian_sum, laplacian_squares) = T::mask_sums(levels, width, height);
        sums.immerkaer = immerkaer;
        sums.laplacian_sum = laplacian_sum;
        sums.laplacian_squares = laplacian_squares;
    }
    let scale = f64::from(full_scale);
    let count = levels.len().max(1);
    let mean = sums.sum as f64 / scale / count as f64;
    // n·Σv² − (Σv)², exact in 128 bits: a constant image has no contrast, not a rounding error.
    let variance = exact_variance(sums.squares, sums.sum, count) / (scale * scale);
    let (noise, sharpness) = if masks_apply {
        let inner = (width - 2) * (height - 2);
        let immerkaer = sums.immerkaer as f64 / scale;
        let noise = (std::f64::consts::PI / 2.0).sqrt() * immerkaer / (6.0 * inner as f64);
        let sharpness = exact_variance(
            sums.laplacian_squares,
            sums.laplacian_sum.unsigned_abs(),
            inner,
        ) / (scale * scale);
        (Some(noise), Some(sharpness))
    } else {
        (None, None)
    };
    QualityMeasures {
        mean_brightness: mean,
        rms_contrast: variance.sqrt(),
        noise,
        sharpness,
        saturated_fraction: sums.saturated as f64 / count as f64,
    }
}

/// The variance of `count` integers from the sum of their squares and the absolute value of
/// their sum: (n·Σv² − (Σv)²) / n², with the difference exact (both terms fit 128 bits for any
/// image the limits admit).
fn exact_variance(squares: u128, sum: u128, count: usize) -> f64 {
    let count = count as u128;
    let spread = count
        .saturating_mul(squares)
        .saturating_sub(sum.saturating_mul(sum));
    spread as f64 / (count as f64 * count as f64)
}

/// [`GreyLevel::block_stats`], one level at a time.
fn plain_block_stats<T: GreyLevel>(block: &[T], full_scale: u32) -> (u64, u64, usize) {
    let (mut sum, mut squares, mut saturated) = (0_u64, 0_u64, 0_usize);
    for &level in block {
        let level: u32 = level.into();
        sum += u64::from(level);
        squares += u64::from(level) * u64::from(level);
        saturated += usize::from(level == 0 || level >= full_scale);
    }
    (sum, squares, saturated)
}

/// A grey level type, with the two passes of [`grey_measures`] over one block of pixels.
trait GreyLevel: Copy + Into<u32> {
    /// The sum of the levels, of their squares, and the levels at 0 or `full_scale`.
    fn block_stats(block: &[Self], full_scale: u32) -> (u64, u64, usize) {
        plain_block_stats(block, full_scale)
    }

    /// Over the inner pixels of a `width × height` image (both at least 3): the sums of
    /// Immerkær's absolute mask response, of the Laplacian and of its square. One pass over 3×3
    /// neighbourhoods, three rows at a time.
    fn mask_sums(levels: &[Self], width: usize, height: usize) -> (u128, i128, u128) {
        let (mut immerkaer, mut laplacian_sum, mut laplacian_squares) = (0_u128, 0_i128, 0_u128);
        for y in 1..height - 1 {
            let above = &levels[(y - 1) * width..y * width];
            let row = &levels[y * width..(y + 1) * width];
            let below = &levels[(y + 1) * width..(y + 2) * width];
            // Each neighbour as a slice of the inner columns, so that the loop below indexes
            // nothing out of range and runs vectorised.
            let mut start = 0;
            while start < width - 2 {
                let end = (start + BLOCK).min(width - 2);
                let cut = |by: usize| start + by..end + by;
                let sums_of_block = Self::neighbourhood_sums(
                    [&above[cut(0)], &above[cut(1)], &above[cut(2)]],
                    [&row[cut(0)], &row[cut(1)], &row[cut(2)]],
                    [&below[cut(0)], &below[cut(1)], &below[cut(2)]],
                );
                immerkaer += u128::from(sums_of_block.0);
                laplacian_sum += i128::from(sums_of_block.1);
                laplacian_squares += u128::from(sums_of_block.2);
                start = end;
            }
        }
        (immerkaer, laplacian_sum, laplacian_squares)
    }

    /// Over one block of inner pixels (each slice holds the same neighbour of every pixel,
    /// left to right): the sums of Immerkær's absolute mask response, of the Laplacian and of
    /// its square. Per pixel the mask responses fit 32 bits for samples of up to 16 bits.
    fn neighbourhood_sums(
        above: [&[Self]; 3],
        row: [&[Self]; 3],
        below: [&[Self]; 3],
    ) -> (u64, i64, u64) {
        let n = row[1].len();
        let ([up_left, up, up_right], [left, centre, right], [down_left, down, down_right]) = (
            above.map(|line| &line[..n]),
            row.map(|line| &line[..n]),
            below.map(|line| &line[..n]),
        );
        let (mut immerkaer, mut laplacian_sum, mut laplacian_squares) = (0_u64, 0_i64, 0_u64);
        for x in 0..n {
            let at = |line: &[Self]| line[x].into() as i32;
            let centre = at(centre);
            let edges = at(up) + at(left) + at(right) + at(down);
            let corners = at(up_left) + at(up_right) + at(down_left) + at(down_right);
            immerkaer += u64::from((4 * centre - 2 * edges + corners).unsigned_abs());
            let laplacian = edges - 4 * centre;
            laplacian_sum += i64::from(laplacian);
            laplacian_squares +=
                u64::from(laplacian.unsigned_abs()) * u64::from(laplacian.unsigned_abs());
        }
        (immerkaer, laplacian_sum, laplacian_squares)
    }
}

impl GreyLevel for u16 {}

/// 8-bit levels, the canonical grey image (every DICOM display image, most PNGs): the
/// brightness sums from a histogram of the 256 levels, and the masks as separable second
/// differences in 16-bit lanes, so that the loops vectorise eight to sixteen pixels wide.
impl GreyLevel for u8 {
    /// From the histogram of the block's levels (four interleaved tables, so that runs of one
    /// level do not wait on one counter): a load and an increment per level instead of the
    /// widening sums and products, then 256 exact products. A block holds at most 2^16
    /// levels, so every count fits 32 bits.
    fn block_stats(block: &[Self], full_scale: u32) -> (u64, u64, usize) {
        let mut counts = [[0_u32; 256]; 4];
        // Sixteen levels a step, four to each table: the step's own count and branch are paid
        // once per sixteen levels (2.2 instructions a level instead of 3.1).
        let (groups, rest) = block.as_chunks::<16>();
        for group in groups {
            for quad in group.as_chunks::<4>().0 {
                for (table, &level) in counts.iter_mut().zip(quad) {
                    table[usize::from(level)] += 1;
                }
            }
        }
        for &level in rest {
            counts[0][usize::from(level)] += 1;
        }
        let (mut sum, mut squares, mut saturated) = (0_u64, 0_u64, 0_u64);
        for level in 0..256_u32 {
            let index = level as usize;
            let count = counts
                .iter()
                .map(|table| u64::from(table[index]))
                .sum::<u64>();
            sum += count * u64::from(level);
            squares += count * u64::from(level * level);
            if level == 0 || level >= full_scale {
                saturated += count;
            }
        }
        (sum, squares, saturated as usize)
    }

    /// The 3×3 masks are separable: Immerkær's is the outer product of [1 −2 1] with itself,
    /// so it is the vertical second difference of the rows' horizontal second differences
    /// `h`; the Laplacian is the vertical second difference `v` plus `h`. Each row's `h` is
    /// computed once and serves the three output rows it takes part in; the sums are the same
    /// integers as the direct masks' ([`GreyLevel::neighbourhood_sums`]). Output rows go two
    /// at a time ([`mask_row_pair`]): the pair's four pixel rows are read and widened once
    /// (five row reads a pair instead of ten), and both rows' Immerkær responses join their
    /// column's total in one update. The loop only writes 16-bit lanes, so it runs eight to
    /// sixteen pixels a vector; the squared Laplacians are summed in a second loop over each
    /// row (16 × 16 → 32-bit multiply-adds); the Laplacian's sum telescopes to the image's
    /// borders and needs no pass at all.
    fn mask_sums(levels: &[Self], width: usize, height: usize) -> (u128, i128, u128) {
        // Per pixel: |h|, |v| ≤ 2 × 255, |Laplacian| ≤ 4 × 255 and |Immerkær| ≤ 16 × 255 fit
        // 16 bits; a column's total of 8 pairs of rows of |Immerkær| (16 × 4080 < 2^16) fits
        // 16 bits; 2048 squared Laplacians (2048 × 1020² < 2^31) fit a 32-bit strip sum.
        const PAIRS_PER_COLUMN_TOTAL: usize = 8;
        const STRIP: usize = 2048;
        let inner = width - 2;
        let line = |y: usize| &levels[y * width..(y + 1) * width];
        let second_difference = |line: &[u8], into: &mut [i16]| {
            let (left, centre, right) = (&line[..inner], &line[1..=inner], &line[2..inner + 2]);
            for (((out, &left), &centre), &right) in
                into.iter_mut().zip(left).zip(centre).zip(right)
            {
                *out = i16::from(left) + i16::from(right) - 2 * i16::from(centre);
            }
        };
        let squares_of = |laplacian: &[i16]| -> u128 {
            laplacian
                .chunks(STRIP)
                .map(|strip| {
                    let squares: i32 = strip
                        .iter()
                        .map(|&value| i32::from(value) * i32::from(value))
                        .sum();
                    u128::from(squares.unsigned_abs())
                })
                .sum()
        };
        // The `h` of the pixel rows y − 1, y, y + 1 and y + 2 of the pair (y, y + 1).
        let mut h = [
            vec![0_i16; inner],
            vec![0_i16; inner],
            vec![0_i16; inner],
            vec![0_i16; inner],
        ];
        let mut laplacians = [vec![0_i16; inner], vec![0_i16; inner]];
        let mut column_totals = vec![0_u16; inner];
        second_difference(line(0), &mut h[0]);
        second_difference(line(1), &mut h[1]);
        let (mut immerkaer, mut laplacian_squares) = (0_u128, 0_u128);
        let mut pairs_in_totals = 0;
        let mut y = 1;
        while y + 2 < height {
            let [h_above, h_row, h_below, h_after] = &mut h;
            let [first, second] = &mut laplacians;
            mask_row_pair(
                [line(y - 1), line(y), line(y + 1), line(y + 2)],
                h_above,
                h_row,
                h_below,
                h_after,
                first,
                second,
                &mut column_totals,
            );
            laplacian_squares += squares_of(first) + squares_of(second);
            pairs_in_totals += 1;
            if pairs_in_totals == PAIRS_PER_COLUMN_TOTAL {
                immerkaer += u128::from(
                    column_totals
                        .iter()
                        .map(|&total| u64::from(total))
                        .sum::<u64>(),
                );
                column_totals.fill(0);
                pairs_in_totals = 0;
            }
            h.swap(0, 2);
            h.swap(1, 3);
            y += 2;
        }
        if y + 1 < height {
            // One inner row left (an even number of inner rows went in pairs): y = height − 2,
            // with `h` of rows y − 1 and y in h[0] and h[1]; at most 15 rows in the totals.
            let (up, centre, below) = (&line(y - 1)[1..=inner], &line(y)[1..=inner], line(y + 1));
            let (down_left, down, down_right) =
                (&below[..inner], &below[1..=inner], &below[2..inner + 2]);
            let (h_up, h_centre) = (&h[0][..inner], &h[1][..inner]);
            let (laplacian, totals) = (&mut laplacians[0][..inner], &mut column_totals[..inner]);
            for x in 0..inner {
                let h_down =
                    i16::from(down_left[x]) + i16::from(down_right[x]) - 2 * i16::from(down[x]);
                let vertical = i16::from(up[x]) + i16::from(down[x]) - 2 * i16::from(centre[x]);
                laplacian[x] = vertical + h_centre[x];
                totals[x] += (h_up[x] + h_down - 2 * h_centre[x]).unsigned_abs();
            }
            laplacian_squares += squares_of(laplacian);
        }
        immerkaer += u128::from(
            column_totals
                .iter()
                .map(|&total| u64::from(total))
                .sum::<u64>(),
        );
        // Σ of the Laplacian over the inner pixels telescopes: in each inner column the
        // vertical second differences sum to (p[H−1] − p[H−2]) − (p[1] − p[0]), and in each
        // inner row the horizontal ones to (p[W−1] − p[W−2]) − (p[1] − p[0]).
        let at = |x: usize, y: usize| i64::from(levels[y * width + x]);
        let mut laplacian_sum = 0_i64;
        for x in 1..width - 1 {
            laplacian_sum += (at(x, height - 1) - at(x, height - 2)) - (at(x, 1) - at(x, 0));
        }
        for y in 1..height - 1 {
            laplacian_sum += (at(width - 1, y) - at(width - 2, y)) - (at(1, y) - at(0, y));
        }
        (immerkaer, i128::from(laplacian_sum), laplacian_squares)
    }
}

/// The output rows y and y + 1 of the separable 8-bit masks ([`GreyLevel::mask_sums`] of
/// `u8`): `rows` are the pixel rows y − 1 ..= y + 2 (whole width), `h_above` and `h_row` the
/// horizontal second differences of rows y − 1 and y (inner columns). Writes those of rows
/// y + 1 and y + 2 into `h_below` and `h_after`, the two rows' Laplacians into `first` and
/// `second`, and adds both rows'
/// |Immerkær| to each column's total. Each output a `&mut` parameter of its own, so that the
/// compiler knows they do not alias (inside an array it did not, and the loop took 4 % more
/// instructions), and 16-bit lanes only, so that the loop vectorises.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mask_row_pair(
    rows: [&[u8]; 4],
    h_above: &[i16],
    h_row: &[i16],
    h_below: &mut [i16],
    h_after: &mut [i16],
    first: &mut [i16],
    second: &mut [i16],
    totals: &mut [u16],
) {
    let inner = h_below.len();
    let [above, row, below, after] = rows;
    let (above, row) = (&above[1..=inner], &row[1..=inner]);
    let (below_left, below, below_right) =
        (&below[..inner], &below[1..=inner], &below[2..inner + 2]);
    let (after_left, after, after_right) =
        (&after[..inner], &after[1..=inner], &after[2..inner + 2]);
    let (h_above, h_row) = (&h_above[..inner], &h_row[..inner]);
    let h_after = &mut h_after[..inner];
    let (first, second, totals) = (
        &mut first[..inner],
        &mut second[..inner],
        &mut totals[..inner],
    );
    for x in 0..inner {
        let (row_level, below_level, after_level) =
            (i16::from(row[x]), i16::from(below[x]), i16::from(after[x]));
        let h_of_below = i16::from(below_left[x]) + i16::from(below_right[x]) - 2 * below_level;
        let h_of_after = i16::from(after_left[x]) + i16::from(after_right[x]) - 2 * after_level;
        h_below[x] = h_of_below;
        h_after[x] = h_of_after;
        first[x] = i16::from(above[x]) + below_level - 2 * row_level + h_row[x];
        second[x] = row_level + after_level - 2 * below_level + h_of_below;
        totals[x] += (h_above[x] + h_of_below - 2 * h_row[x]).unsigned_abs()
            + (h_row[x] + h_of_after - 2 * h_of_below).unsigned_abs();
    }
}

/// The measures of luminance values in 0–1, row-major.
fn float_measures(values: &[f64], width: usize, height: usize) -> QualityMeasures {
    let count = values.len().max(1) as f64;
    // One pass for brightness, contrast and saturation.
    let (mut sum, mut squares, mut saturated) = (0.0_f64, 0.0_f64, 0_usize);
    for &value in values {
        sum += value;
        squares += value * value;
        saturated += usize::from(value <= 0.0 || value >= 1.0);
    }
    let mean = sum / count;
    let variance = (squares / count - mean * mean).max(0.0);
    let masks_apply = width >= 3 && height >= 3 && values.len() == width * height;
    let (noise, sharpness) = if masks_apply {
        // One pass over 3×3 neighbourhoods, three rows at a time, for Immerkær's noise
        // estimate and the variance of the Laplacian.
        let (mut immerkaer, mut laplacian_sum, mut laplacian_squares) = (0.0_f64, 0.0_f64, 0.0_f64);
        let rows: Vec<&[f64]> = values.chunks_exact(width).collect();
        for three in rows.windows(3) {
            let (above, row, below) = (three[0], three[1], three[2]);
            for ((up, centre), down) in above.windows(3).zip(row.windows(3)).zip(below.windows(3)) {
                let edges = up[1] + centre[0] + centre[2] + down[1];
                let corners = up[0] + up[2] + down[0] + down[2];
                immerkaer += (4.0 * centre[1] - 2.0 * edges + corners).abs();
                let laplacian = edges - 4.0 * centre[1];
                laplacian_sum += laplacian;
                laplacian_squares += laplacian * laplacian;
            }
        }
        let inner = ((width - 2) * (height - 2)) as f64;
        let noise = (std::f64::consts::PI / 2.0).sqrt() * immerkaer / (6.0 * inner);
        let laplacian_mean = laplacian_sum / inner;
        let sharpness = (laplacian_squares / inner - laplacian_mean * laplacian_mean).max(0.0);
        (Some(noise), Some(sharpness))
    } else {
        (None, None)
    };
    QualityMeasures {
        mean_brightness: mean,
        rms_contrast: variance.sqrt(),
        noise,
        sharpness,
        saturated_fraction: saturated as f64 / count,
    }
}

fn check(
    code: &'static str,
    value: Option<f64>,
    threshold: f64,
    comparison: Comparison,
) -> QualityCheck {
    let verdict = match value {
        None => Verdict::NotMeasurable,
        Some(value) if !value.is_finite() => Verdict::Fail,
        Some(value) => {
            let passes = match comparison {
                Comparison::AtLeast => value >= threshold,
                Comparison::AtMost => value <= threshold,
            };
            if passes { Verdict::Pass } else { Verdict::Fail }
        }
    };
    QualityCheck {
        code,
        value: value.filter(|value| value.is_finite()).unwrap_or(0.0),
        threshold,
        comparison,
        verdict,
    }
}

pub fn assess(image: &CanonicalImage, policy: &QualityPolicy, model: &str) -> QualityReport {
    let (profile, thresholds) = policy.profile(model, &image.metadata.modality);
    let measures = measure(image);
    QualityReport {
        profile,
        measures,
        checks: checks(&measures, thresholds),
        refuse_on_failure: thresholds.refuse_on_failure,
    }
}

fn checks(measures: &QualityMeasures, thresholds: &QualityThresholds) -> Vec<QualityCheck> {
    vec![
        check(
            "QUALITY_BRIGHTNESS_LOW",
            Some(measures.mean_brightness),
            thresholds.min_brightness,
            Comparison::AtLeast,
        ),
        check(
            "QUALITY_BRIGHTNESS_HIGH",
            Some(measures.mean_brightness),
            thresholds.max_brightness,
            Comparison::AtMost,
        ),
        check(
            "QUALITY_CONTRAST_LOW",
            Some(measures.rms_contrast),
            thresholds.min_contrast,
            Comparison::AtLeast,
        ),
        check(
            "QUALITY_NOISE_HIGH",
            measures.noise,
            thresholds.max_noise,
            Comparison::AtMost,
        ),
        check(
            "QUALITY_BLUR",
            measures.sharpness,
            thresholds.min_sharpness,
            Comparison::AtLeast,
        ),
        check(
            "QUALITY_SATURATION_HIGH",
            Some(measures.saturated_fraction),
            thresholds.max_saturated_fraction,
            Comparison::AtMost,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use medai_imaging::decode::{SafeMetadata, SourceFormat};

    fn grey(width: u32, height: u32, pixel: impl Fn(u32, u32) -> u8) -> CanonicalImage {
        let pixels = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .map(|(x, y)| pixel(x, y))
            .collect();
        CanonicalImage {
            width,
            height,
            channels: 1,
            bit_depth: 8,
            photometric_interpretation: "MONOCHROME2",
            pixels,
            source_format: SourceFormat::Png,
            metadata: SafeMetadata {
                modality: "MR".to_owned(),
                ..SafeMetadata::default()
            },
        }
    }

    /// A deterministic pseudo-random sequence, so the tests need no RNG crate.
    fn noise(x: u32, y: u32) -> i32 {
        let mut state = x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663);
        state ^= state >> 13;
        state = state.wrapping_mul(0x5bd1_e995);
        (state >> 24) as i32 % 41 - 20
    }

    fn pattern(x: u32, y: u32) -> i32 {
        if (x / 8 + y / 8).is_multiple_of(2) {
            70
        } else {
            180
        }
    }

    fn blurred(image: &CanonicalImage) -> CanonicalImage {
        let (width, height) = (image.width as usize, image.height as usize);
        let mut pixels = image.pixels.clone();
        for y in 2..height - 2 {
            for x in 2..width - 2 {
                let mut sum = 0u32;
                for dy in 0..5 {
                    for dx in 0..5 {
                        sum += u32::from(image.pixels[(y + dy - 2) * width + (x + dx - 2)]);
                    }
                }
                pixels[y * width + x] = (sum / 25) as u8;
            }
        }
        CanonicalImage {
            pixels,
            ..image.clone()
        }
    }

    #[test]
    fn a_constant_image_is_measurable_and_fails_contrast_and_sharpness() {
        let report = assess(&grey(64, 64, |_, _| 128), &QualityPolicy::default(), "m");
        assert!((report.measures.mean_brightness - 128.0 / 255.0).abs() < 1e-9);
        assert!(report.measures.rms_contrast < 1e-12);
        assert!(report.measures.noise.expect("measurable") < 1e-12);
        assert_eq!(
            report.failed_codes(),
            vec!["QUALITY_CONTRAST_LOW", "QUALITY_BLUR"]
        );
    }

    #[test]
    fn added_noise_raises_the_noise_estimate_and_blur_lowers_sharpness() {
        let clean = grey(96, 96, |x, y| pattern(x, y) as u8);
        let noisy = grey(96, 96, |x, y| {
            (pattern(x, y) + noise(x, y)).clamp(0, 255) as u8
        });
        let (clean_measures, noisy_measures) = (measure(&clean), measure(&noisy));
        assert!(noisy_measures.noise.expect("noise") > 3.0 * clean_measures.noise.expect("noise"));
        let soft = measure(&blurred(&clean));
        assert!(
            soft.sharpness.expect("sharpness") < clean_measures.sharpness.expect("sharpness") / 2.0
        );
    }

    #[test]
    fn saturation_and_brightness_are_reported_with_their_thresholds() {
        let white = assess(
            &grey(64, 64, |x, _| if x < 48 { 255 } else { 200 }),
            &QualityPolicy::default(),
            "m",
        );
        let saturation = white
            .checks
            .iter()
            .find(|check| check.code == "QUALITY_SATURATION_HIGH")
            .expect("check");
        assert!((saturation.value - 0.75).abs() < 1e-9);
        assert_eq!(
            (saturation.threshold, saturation.verdict),
            (0.5, Verdict::Fail)
        );
        assert!(white.failed_codes().contains(&"QUALITY_SATURATION_HIGH"));
    }

    #[test]
    fn tiny_images_report_masks_as_not_measurable() {
        let report = assess(
            &grey(2, 2, |x, y| (x * 100 + y * 50) as u8),
            &QualityPolicy::default(),
            "m",
        );
        let blur = report
            .checks
            .iter()
            .find(|check| check.code == "QUALITY_BLUR")
            .expect("check");
        assert_eq!(blur.verdict, Verdict::NotMeasurable);
        assert!(report.checks.iter().all(|check| check.value.is_finite()));
    }

    /// The measures as they were computed before grey images were measured in integers:
    /// every pixel converted to f64 luminance, then the float passes.
    fn float_reference(image: &CanonicalImage) -> QualityMeasures {
        let values: Vec<f64> = match (image.channels, image.bit_depth) {
            (1, 16) => image
                .pixels
                .chunks_exact(2)
                .map(|pair| f64::from(u16::from_le_bytes([pair[0], pair[1]])) / 65535.0)
                .collect(),
            (1, _) => image
                .pixels
                .iter()
                .map(|value| f64::from(*value) / 255.0)
                .collect(),
            _ => luminance(image),
        };
        float_measures(&values, image.width as usize, image.height as usize)
    }

    fn grey16(width: u32, height: u32, level: impl Fn(u32, u32) -> u16) -> CanonicalImage {
        let pixels = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .flat_map(|(x, y)| level(x, y).to_le_bytes())
            .collect();
        CanonicalImage {
            bit_depth: 16,
            pixels,
            ..grey(width, height, |_, _| 0)
        }
    }

    #[test]
    fn integer_grey_measures_equal_the_float_measures_and_give_the_same_verdicts() {
        let spread = |x: u32, y: u32| (pattern(x, y) + 3 * noise(x, y)).clamp(0, 255) as u8;
        let images = [
            grey(96, 80, spread),
            grey(64, 64, |_, _| 128),
            grey(64, 64, |x, _| if x < 48 { 255 } else { 0 }),
            grey(3, 3, |x, y| (x * 90 + y * 40) as u8),
            grey(2, 2, |x, y| (x * 100 + y * 50) as u8),
            blurred(&grey(96, 96, |x, y| pattern(x, y) as u8)),
            grey16(128, 96, |x, y| {
                (i32::from(spread(x, y)) * 257 + noise(y, x) * 300).clamp(0, 65535) as u16
            }),
            grey16(64, 64, |x, y| if (x + y) % 7 == 0 { 65535 } else { 0 }),
        ];
        // Relative to the figure, with an absolute floor for figures that are zero in exact
        // arithmetic (the float passes leave ~1e-17 there); contrast is compared as variance.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-12;
        let thresholds = QualityThresholds::default();
        for (index, image) in images.iter().enumerate() {
            let (ours, reference) = (measure(image), float_reference(image));
            assert!(
                close(ours.mean_brightness, reference.mean_brightness)
                    && close(ours.rms_contrast.powi(2), reference.rms_contrast.powi(2))
                    && ours.saturated_fraction == reference.saturated_fraction
                    && ours.noise.is_some() == reference.noise.is_some()
                    && ours
                        .noise
                        .zip(reference.noise)
                        .is_none_or(|(a, b)| close(a, b))
                    && ours
                        .sharpness
                        .zip(reference.sharpness)
                        .is_none_or(|(a, b)| close(a, b)),
                "image {index}: {ours:?} against {reference:?}"
            );
            let verdicts = |measures: &QualityMeasures| {
                checks(measures, &thresholds)
                    .iter()
                    .map(|check| (check.code, check.verdict))
                    .collect::<Vec<_>>()
            };
            assert_eq!(verdicts(&ours), verdicts(&reference), "image {index}");
        }
    }

    /// The 8-bit mask sums through the direct 3×3 masks (the generic pass every grey level
    /// type had before the separable one).
    fn direct_mask_sums(levels: &[u8], width: usize, height: usize) -> (u128, i128, u128) {
        let wide: Vec<u16> = levels.iter().map(|&level| u16::from(level)).collect();
        <u16 as GreyLevel>::mask_sums(&wide, width, height)
    }

    #[test]
    fn the_separable_8_bit_masks_give_the_sums_of_the_direct_masks() {
        let spread = |x: u32, y: u32| (pattern(x, y) + 3 * noise(x, y)).clamp(0, 255) as u8;
        let images = [
            grey(96, 80, spread),
            grey(64, 64, |_, _| 128),
            grey(64, 64, |x, _| if x < 48 { 255 } else { 0 }),
            // The extremes of every mask: a checkerboard of 0 and 255.
            grey(67, 41, |x, y| if (x + y) % 2 == 0 { 255 } else { 0 }),
            grey(3, 3, |x, y| (x * 90 + y * 40) as u8),
            grey(3, 200, |x, y| ((x * 31 + y * 17) % 256) as u8),
            // Wider than one strip of the separable pass.
            grey(2100, 5, |x, y| (noise(x, y) * 6).clamp(0, 255) as u8),
            blurred(&grey(96, 96, |x, y| pattern(x, y) as u8)),
        ];
        for image in &images {
            let (width, height) = (image.width as usize, image.height as usize);
            assert_eq!(
                <u8 as GreyLevel>::mask_sums(&image.pixels, width, height),
                direct_mask_sums(&image.pixels, width, height),
                "{width}×{height}"
            );
        }
        let checkerboard = &images[3];
        let (immerkaer, _, laplacian_squares) =
            <u8 as GreyLevel>::mask_sums(&checkerboard.pixels, 67, 41);
        assert_eq!(
            (immerkaer, laplacian_squares),
            (65 * 39 * 8 * 255, 65 * 39 * 1020 * 1020),
            "every inner pixel at the masks' extremes"
        );
    }

    #[test]
    fn the_8_bit_strip_sums_give_the_block_sums_of_one_level_at_a_time() {
        let spread = |index: usize| {
            let (x, y) = ((index % 251) as u32, (index / 251) as u32);
            (pattern(x, y) + 5 * noise(x, y)).clamp(0, 255) as u8
        };
        // Short, odd and whole blocks (2^16, one 32-bit strip).
        for length in [0, 1, 15, 16, 17, 4079, 4080, 4081, 9000, BLOCK - 1, BLOCK] {
            let levels: Vec<u8> = (0..length).map(spread).collect();
            let extremes: Vec<u8> = (0..length)
                .map(|index| [0, 255, 254, 1][index % 4])
                .collect();
            for block in [&levels, &extremes] {
                for full_scale in [255, 200, 1, 256, 1000] {
                    assert_eq!(
                        <u8 as GreyLevel>::block_stats(block, full_scale),
                        plain_block_stats(block, full_scale),
                        "{length} levels, full scale {full_scale}"
                    );
                }
            }
        }
        let white = vec![255_u8; BLOCK];
        assert_eq!(
            <u8 as GreyLevel>::block_stats(&white, 255),
            (255 * BLOCK as u64, 255 * 255 * BLOCK as u64, BLOCK),
            "every lane at its largest sums"
        );
    }

    #[test]
    fn profiles_are_chosen_per_model_then_modality_then_default() {
        let strict = QualityThresholds {
            min_contrast: 0.9,
            ..QualityThresholds::default()
        };
        let policy = QualityPolicy {
            default: QualityThresholds::default(),
            by_modality: BTreeMap::from([("MR".to_owned(), strict.clone())]),
            by_model: BTreeMap::from([("brain".to_owned(), QualityThresholds::default())]),
        };
        assert_eq!(policy.profile("brain", "MR").0, "model:brain");
        assert_eq!(policy.profile("other", "MR").0, "modality:MR");
        assert_eq!(policy.profile("other", "CT").0, "default");
    }
}
