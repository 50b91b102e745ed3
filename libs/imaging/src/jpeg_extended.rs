//! A decoder for 12-bit sequential DCT JPEG with Huffman coding (ISO/IEC 10918-1 process 4),
//! the DICOM "JPEG Extended" transfer syntax (1.2.840.10008.1.2.4.51) of 12-bit CT, MR and
//! radiographs. No Rust JPEG crate decodes it yet: jpeg-decoder and zune-jpeg take 8-bit DCT
//! only. DICOM uses 12-bit JPEG for grey images, so this decoder takes one component; colour,
//! progressive, hierarchical and arithmetic-coded streams are refused as unsupported.
//!
//! Every read is bounds-checked and every loop is bounded by the frame's block count, so a
//! malformed stream yields an error or a (garbled) image, never a panic or a hang.

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JpegError {
    #[error("the JPEG stream is malformed")]
    Malformed,
    #[error("the JPEG stream uses {0}, which this decoder does not")]
    Unsupported(&'static str),
}

/// A decoded grey image: row-major samples of `precision` bits.
#[derive(Debug, PartialEq, Eq)]
pub struct GreyImage {
    pub width: u32,
    pub height: u32,
    pub precision: u8,
    pub samples: Vec<u16>,
}

/// Natural (row-major) index of each zig-zag position (ISO/IEC 10918-1 figure A.6).
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// The frame's sole component.
#[derive(Clone, Copy)]
struct Frame {
    width: u16,
    height: u16,
    precision: u8,
    component_id: u8,
    quant_table: usize,
}

/// A Huffman table as ISO/IEC 10918-1 F.2.2.3 decodes it: per code length, the largest code,
/// and where codes of that length start among the values.
#[derive(Clone)]
struct Huffman {
    max_code: [i32; 17],
    value_offset: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: &[u8]) -> Result<Self, JpegError> {
        let mut max_code = [-1; 17];
        let mut value_offset = [0; 17];
        let (mut code, mut index) = (0_i32, 0_i32);
        for length in 1..=16 {
            let count = i32::from(counts[length - 1]);
            value_offset[length] = index - code;
            code += count;
            index += count;
            if count > 0 {
                max_code[length] = code - 1;
            }
            // Codes of a length must fit in it (C.2: no all-ones code of a length either).
            if code > (1 << length) {
                return Err(JpegError::Malformed);
            }
            code <<= 1;
        }
        Ok(Self {
            max_code,
            value_offset,
            values: values.to_vec(),
        })
    }

    fn decode(&self, bits: &mut BitReader<'_>) -> Result<u8, JpegError> {
        let mut code = 0_i32;
        for length in 1..=16 {
            code = (code << 1) | bits.bit() as i32;
            if code <= self.max_code[length] {
                let index = usize::try_from(code + self.value_offset[length])
                    .map_err(|_| JpegError::Malformed)?;
                return self.values.get(index).copied().ok_or(JpegError::Malformed);
            }
        }
        Err(JpegError::Malformed)
    }
}

/// Reads entropy-coded bits, removing the stuffed zero after each 0xFF. At a marker or the end
/// of the data it yields zero bits, as libjpeg does, so a truncated stream still ends.
struct BitReader<'a> {
    data: &'a [u8],
    at: usize,
    buffer: u32,
    available: u32,
    at_marker: bool,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            at: 0,
            buffer: 0,
            available: 0,
            at_marker: false,
        }
    }

    fn next_byte(&mut self) -> u8 {
        if self.at_marker {
            return 0;
        }
        match (self.data.get(self.at), self.data.get(self.at + 1)) {
            (Some(0xFF), Some(0x00)) => {
                self.at += 2;
                0xFF
            }
            (Some(0xFF), _) | (None, _) => {
                self.at_marker = true;
                0
            }
            (Some(&byte), _) => {
                self.at += 1;
                byte
            }
        }
    }

    fn bit(&mut self) -> u32 {
        if self.available == 0 {
            self.buffer = u32::from(self.next_byte());
            self.available = 8;
        }
        self.available -= 1;
        (self.buffer >> self.available) & 1
    }

    fn bits(&mut self, count: u8) -> u32 {
        (0..count).fold(0, |value, _| (value << 1) | self.bit())
    }

    /// The value of a `size`-bit magnitude category (F.2.2.1 RECEIVE and EXTEND).
    fn receive_extend(&mut self, size: u8) -> Result<i32, JpegError> {
        if size == 0 {
            return Ok(0);
        }
        if size > 16 {
            return Err(JpegError::Malformed);
        }
        let value = self.bits(size) as i32;
        Ok(if value < 1 << (size - 1) {
            value - (1 << size) + 1
        } else {
            value
        })
    }

    /// Discards the bits left of the current byte and steps over the restart marker that must
    /// come next.
    fn restart(&mut self) -> Result<(), JpegError> {
        self.available = 0;
        // Fill bytes (0xFF) may precede the marker.
        let mut at = self.at;
        while self.data.get(at) == Some(&0xFF) && self.data.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        match (self.data.get(at), self.data.get(at + 1)) {
            (Some(0xFF), Some(0xD0..=0xD7)) => {
                self.at = at + 2;
                self.at_marker = false;
                Ok(())
            }
            _ => Err(JpegError::Malformed),
        }
    }
}

/// Reads the header fields of marker segments, bounds-checked.
struct Segments<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Segments<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], JpegError> {
        let end = self.at.checked_add(count).ok_or(JpegError::Malformed)?;
        let taken = self.data.get(self.at..end).ok_or(JpegError::Malformed)?;
        self.at = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, JpegError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, JpegError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// The next marker code, skipping fill bytes.
    fn marker(&mut self) -> Result<u8, JpegError> {
        if self.u8()? != 0xFF {
            return Err(JpegError::Malformed);
        }
        loop {
            match self.u8()? {
                0xFF => continue,
                code => return Ok(code),
            }
        }
    }

    /// The payload of a marker segment (its length counts the two length bytes).
    fn segment(&mut self) -> Result<Segments<'a>, JpegError> {
        let length = usize::from(self.u16()?);
        let payload = self.take(length.checked_sub(2).ok_or(JpegError::Malformed)?)?;
        Ok(Segments {
            data: payload,
            at: 0,
        })
    }

    fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }
}

/// Decodes a 12-bit (or 8-bit) single-component sequential Huffman JPEG. `max_pixels` bounds
/// the frame the header may declare, before anything is allocated for it.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<GreyImage, JpegError> {
    let mut stream = Segments { data: bytes, at: 0 };
    if stream.marker()? != 0xD8 {
        return Err(JpegError::Malformed);
    }
    let mut quant: [Option<[u16; 64]>; 4] = [None; 4];
    let mut dc_tables: [Option<Huffman>; 4] = Default::default();
    let mut ac_tables: [Option<Huffman>; 4] = Default::default();
    let mut frame: Option<Frame> = None;
    let mut restart_interval = 0_u16;
    loop {
        match stream.marker()? {
            0xC0 | 0xC1 => frame = Some(read_frame(&mut stream.segment()?, max_pixels)?),
            0xC2 | 0xC6 | 0xCA | 0xCE => return Err(JpegError::Unsupported("progressive coding")),
            0xC3 | 0xC7 | 0xCB | 0xCF => return Err(JpegError::Unsupported("lossless coding")),
            0xC5 | 0xCD => return Err(JpegError::Unsupported("hierarchical coding")),
            0xC9 => return Err(JpegError::Unsupported("arithmetic coding")),
            0xC4 => read_huffman_tables(&mut stream.segment()?, &mut dc_tables, &mut ac_tables)?,
            0xDB => read_quant_tables(&mut stream.segment()?, &mut quant)?,
            0xDD => {
                let mut segment = stream.segment()?;
                restart_interval = segment.u16()?;
            }
            0xDA => {
                let frame = frame.ok_or(JpegError::Malformed)?;
                let mut scan = stream.segment()?;
                let (dc, ac) = read_scan_header(&mut scan, &frame)?;
                let tables = ScanTables {
                    dc: dc_tables[dc].as_ref().ok_or(JpegError::Malformed)?,
                    ac: ac_tables[ac].as_ref().ok_or(JpegError::Malformed)?,
                    quant: quant[frame.quant_table]
                        .as_ref()
                        .ok_or(JpegError::Malformed)?,
                };
                let entropy = bytes.get(stream.at..).unwrap_or_default();
                return decode_scan(entropy, &frame, &tables, restart_interval);
            }
            0xD8 | 0xD9 | 0xD0..=0xD7 | 0x01 => return Err(JpegError::Malformed),
            // APPn, COM and anything else with a length: not needed to decode.
            _ => {
                stream.segment()?;
            }
        }
    }
}

fn read_frame(segment: &mut Segments<'_>, max_pixels: u64) -> Result<Frame, JpegError> {
    let precision = segment.u8()?;
    let height = segment.u16()?;
    let width = segment.u16()?;
    let components = segment.u8()?;
    if !matches!(precision, 8 | 12) {
        return Err(JpegError::Malformed);
    }
    if components != 1 {
        return Err(JpegError::Unsupported("more than one colour component"));
    }
    if height == 0 {
        return Err(JpegError::Unsupported(
            "a height given after the scan (DNL)",
        ));
    }
    if width == 0 || u64::from(width) * u64::from(height) > max_pixels {
        return Err(JpegError::Malformed);
    }
    let component_id = segment.u8()?;
    let _sampling = segment.u8()?;
    let quant_table = usize::from(segment.u8()?);
    if quant_table > 3 {
        return Err(JpegError::Malformed);
    }
    Ok(Frame {
        width,
        height,
        precision,
        component_id,
        quant_table,
    })
}

fn read_quant_tables(
    segment: &mut Segments<'_>,
    quant: &mut [Option<[u16; 64]>; 4],
) -> Result<(), JpegError> {
    while !segment.is_empty() {
        let precision_and_id = segment.u8()?;
        let id = usize::from(precision_and_id & 0x0F);
        let wide = precision_and_id >> 4;
        let slot = quant.get_mut(id).ok_or(JpegError::Malformed)?;
        let mut table = [0_u16; 64];
        for entry in &mut table {
            *entry = match wide {
                0 => u16::from(segment.u8()?),
                1 => segment.u16()?,
                _ => return Err(JpegError::Malformed),
            };
        }
        *slot = Some(table);
    }
    Ok(())
}

fn read_huffman_tables(
    segment: &mut Segments<'_>,
    dc_tables: &mut [Option<Huffman>; 4],
    ac_tables: &mut [Option<Huffman>; 4],
) -> Result<(), JpegError> {
    while !segment.is_empty() {
        let class_and_id = segment.u8()?;
        let id = usize::from(class_and_id & 0x0F);
        let tables = match class_and_id >> 4 {
            0 => &mut *dc_tables,
            1 => &mut *ac_tables,
            _ => return Err(JpegError::Malformed),
        };
        let slot = tables.get_mut(id).ok_or(JpegError::Malformed)?;
        let mut counts = [0_u8; 16];
        counts.copy_from_slice(segment.take(16)?);
        let total: usize = counts.iter().map(|&count| usize::from(count)).sum();
        if total > 256 {
            return Err(JpegError::Malformed);
        }
        *slot = Some(Huffman::new(&counts, segment.take(total)?)?);
    }
    Ok(())
}

/// The DC and AC table ids of the scan's one component.
fn read_scan_header(
    segment: &mut Segments<'_>,
    frame: &Frame,
) -> Result<(usize, usize), JpegError> {
    if segment.u8()? != 1 || segment.u8()? != frame.component_id {
        return Err(JpegError::Malformed);
    }
    let tables = segment.u8()?;
    // Spectral selection and successive approximation mean nothing in a sequential frame;
    // some encoders write them wrong, and libjpeg (so DCMTK and GDCM) only warns.
    let _spectral_and_approximation = segment.take(3)?;
    let (dc, ac) = (usize::from(tables >> 4), usize::from(tables & 0x0F));
    if dc > 3 || ac > 3 {
        return Err(JpegError::Malformed);
    }
    Ok((dc, ac))
}

struct ScanTables<'a> {
    dc: &'a Huffman,
    ac: &'a Huffman,
    quant: &'a [u16; 64],
}

fn decode_scan(
    entropy: &[u8],
    frame: &Frame,
    tables: &ScanTables<'_>,
    restart_interval: u16,
) -> Result<GreyImage, JpegError> {
    let (width, height) = (usize::from(frame.width), usize::from(frame.height));
    let (blocks_wide, blocks_high) = (width.div_ceil(8), height.div_ceil(8));
    let level_shift = f32::from(1_u16 << (frame.precision - 1));
    let max_sample = f32::from(u16::MAX >> (16 - frame.precision));
    let cosines = idct_cosines();
    let mut samples = vec![0_u16; width * height];
    let mut bits = BitReader::new(entropy);
    let mut predictor = 0_i32;
    for block in 0..blocks_wide * blocks_high {
        if restart_interval > 0 && block > 0 && block % usize::from(restart_interval) == 0 {
            bits.restart()?;
            predictor = 0;
        }
        let mut coefficients = [0_f32; 64];
        let size = tables.dc.decode(&mut bits)?;
        predictor = predictor.wrapping_add(bits.receive_extend(size)?);
        coefficients[0] = predictor as f32 * f32::from(tables.quant[0]);
        let mut position = 1;
        while position < 64 {
            let symbol = tables.ac.decode(&mut bits)?;
            let (run, size) = (usize::from(symbol >> 4), symbol & 0x0F);
            if size == 0 {
                if run != 15 {
                    break; // end of block
                }
                position += 16;
                continue;
            }
            position += run;
            let quantiser = tables.quant.get(position).ok_or(JpegError::Malformed)?;
            coefficients[ZIGZAG[position]] =
                bits.receive_extend(size)? as f32 * f32::from(*quantiser);
            position += 1;
        }
        let pixels = inverse_dct(&coefficients, &cosines);
        let (top, left) = ((block / blocks_wide) * 8, (block % blocks_wide) * 8);
        for y in 0..8.min(height - top) {
            for x in 0..8.min(width - left) {
                let sample = (pixels[y * 8 + x] + level_shift)
                    .round()
                    .clamp(0.0, max_sample);
                samples[(top + y) * width + left + x] = sample as u16;
            }
        }
    }
    Ok(GreyImage {
        width: u32::from(frame.width),
        height: u32::from(frame.height),
        precision: frame.precision,
        samples,
    })
}

/// `cosines[x * 8 + u]` = C(u)/2 · cos((2x + 1)uπ/16), with C(0) = 1/√2 (A.3.3).
fn idct_cosines() -> [f32; 64] {
    let mut table = [0_f32; 64];
    for (index, entry) in table.iter_mut().enumerate() {
        let (x, u) = ((index / 8) as f64, (index % 8) as f64);
        let scale = if u == 0.0 {
            std::f64::consts::FRAC_1_SQRT_2
        } else {
            1.0
        };
        *entry = (scale / 2.0 * ((2.0 * x + 1.0) * u * std::f64::consts::PI / 16.0).cos()) as f32;
    }
    table
}

/// The separable 8×8 inverse DCT: rows, then columns.
fn inverse_dct(coefficients: &[f32; 64], cosines: &[f32; 64]) -> [f32; 64] {
    let mut rows = [0_f32; 64];
    for v in 0..8 {
        for x in 0..8 {
            rows[v * 8 + x] = (0..8)
                .map(|u| cosines[x * 8 + u] * coefficients[v * 8 + u])
                .sum();
        }
    }
    let mut pixels = [0_f32; 64];
    for y in 0..8 {
        for x in 0..8 {
            pixels[y * 8 + x] = (0..8).map(|v| cosines[y * 8 + v] * rows[v * 8 + x]).sum();
        }
    }
    pixels
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 12-bit 8×8 grey JPEG whose one block has only a DC coefficient: every sample is the
    /// level shift plus DC/8.
    fn flat_block(dc_diff_category: u8, dc_bits: &[u8]) -> Vec<u8> {
        let mut jpeg = vec![0xFF, 0xD8];
        // DQT: 8-bit table 0, all ones.
        jpeg.extend([0xFF, 0xDB, 0x00, 67, 0x00]);
        jpeg.extend([1_u8; 64]);
        // SOF1: precision 12, 8×8, one component (id 1, 1×1, table 0).
        jpeg.extend([0xFF, 0xC1, 0x00, 11, 12, 0, 8, 0, 8, 1, 1, 0x11, 0]);
        // DHT DC 0: one code of length 1 ("0") for the category.
        let mut dc = vec![0x00, 1];
        dc.extend([0_u8; 15]);
        dc.push(dc_diff_category);
        jpeg.extend([0xFF, 0xC4, 0, (2 + dc.len()) as u8]);
        jpeg.extend(&dc);
        // DHT AC 0: one code of length 1 ("0") for end of block.
        let mut ac = vec![0x10, 1];
        ac.extend([0_u8; 15]);
        ac.push(0x00);
        jpeg.extend([0xFF, 0xC4, 0, (2 + ac.len()) as u8]);
        jpeg.extend(&ac);
        // SOS: one component, tables 0/0, full spectrum.
        jpeg.extend([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 0, 63, 0]);
        jpeg.extend(dc_bits);
        jpeg.extend([0xFF, 0xD9]);
        jpeg
    }

    #[test]
    fn a_flat_block_decodes_to_its_dc_level() {
        // Bits: DC code "0", then 11 magnitude bits 10000000000 (= +1024), then AC EOB "0".
        // 0 10000000000 0 + padding ones → 0100 0000 0000 0111 1111...
        let jpeg = flat_block(11, &[0b0100_0000, 0b0000_0111]);
        let image = decode(&jpeg, 1 << 20).expect("decodes");
        assert_eq!((image.width, image.height, image.precision), (8, 8, 12));
        // DC 1024 × quantiser 1 → each sample 1024/8 = 128 above the level shift 2048.
        assert!(
            image.samples.iter().all(|&sample| sample == 2048 + 128),
            "{:?}",
            &image.samples[..8]
        );
    }

    #[test]
    fn refusals_are_errors_not_panics() {
        let jpeg = flat_block(11, &[0b0100_0000, 0b0000_0111]);
        assert_eq!(
            decode(&jpeg, 63),
            Err(JpegError::Malformed),
            "more pixels than allowed"
        );
        for cut in 0..jpeg.len() {
            let _ = decode(&jpeg[..cut], 1 << 20);
        }
        let mut progressive = jpeg.clone();
        let sof = progressive
            .windows(2)
            .position(|pair| pair == [0xFF, 0xC1])
            .expect("SOF");
        progressive[sof + 1] = 0xC2;
        assert_eq!(
            decode(&progressive, 1 << 20),
            Err(JpegError::Unsupported("progressive coding"))
        );
        for index in 0..jpeg.len() {
            for bit in 0..8 {
                let mut flipped = jpeg.clone();
                flipped[index] ^= 1 << bit;
                let _ = decode(&flipped, 1 << 20);
            }
        }
    }

    #[test]
    fn the_inverse_dct_of_a_lone_dc_is_flat() {
        let mut coefficients = [0_f32; 64];
        coefficients[0] = 80.0;
        let pixels = inverse_dct(&coefficients, &idct_cosines());
        assert!(pixels.iter().all(|pixel| (pixel - 10.0).abs() < 1e-4));
    }
}
