//! Explanations on request (issue 18): an occlusion-sensitivity map computed with forward
//! passes only, so it works for any model ONNX Runtime runs. The image is prepared as for a
//! prediction; then the model runs once on it whole and once per grid cell with that cell
//! filled with the image's mean (per channel). A cell's importance is how much its occlusion
//! lowers the probability of the result's top label.
//!
//! Cost is bounded three ways: a cap on the grid's cells, a few explanation slots of their own
//! (with a short waiting line; beyond it EXPLANATIONS_BUSY), and a time limit. The forward
//! passes go through the version's batch queue one batch at a time, so a prediction waits at
//! most one explanation batch: explanations never starve predictions.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use image::{ImageEncoder, RgbImage};
use ndarray::{Array4, Axis};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::RuntimeSettings;
use crate::error::InferenceError;
use crate::preprocess::{ImageInput, to_input_tensor};
use crate::repository::ModelRepository;

/// The grid when the request names none.
pub const DEFAULT_GRID: u32 = 8;

#[derive(Clone, Debug, PartialEq)]
pub struct OcclusionMap {
    pub model_name: String,
    pub model_version: String,
    pub target_label: String,
    pub baseline_probability: f32,
    pub grid_rows: u32,
    pub grid_columns: u32,
    /// Row-major, one per cell.
    pub importance: Vec<f32>,
    pub most_important: (u32, u32),
    pub heatmap_png: Vec<u8>,
    pub heatmap_width: u32,
    pub heatmap_height: u32,
    pub heatmap_sha256: String,
    pub forward_passes: u32,
    pub compute: Duration,
}

/// The model-input pixel range `[start, end)` of cell `index` of `cells` along `length`.
pub fn cell_span(index: u32, cells: u32, length: u32) -> (usize, usize) {
    let start = u64::from(index) * u64::from(length) / u64::from(cells);
    let end = u64::from(index + 1) * u64::from(length) / u64::from(cells);
    (start as usize, end as usize)
}

/// `tensor` (`[1, H, W, C]`) with cell (row, column) of the grid filled with `fill` per channel.
pub fn occlude(
    tensor: &Array4<f32>,
    grid: (u32, u32),
    cell: (u32, u32),
    fill: &[f32],
) -> Array4<f32> {
    let shape = tensor.shape();
    let (height, width) = (shape[1] as u32, shape[2] as u32);
    let (top, bottom) = cell_span(cell.0, grid.0, height);
    let (left, right) = cell_span(cell.1, grid.1, width);
    let mut occluded = tensor.clone();
    for y in top..bottom {
        for x in left..right {
            for (channel, value) in fill.iter().enumerate() {
                occluded[[0, y, x, channel]] = *value;
            }
        }
    }
    occluded
}

/// The mean of each channel of `tensor` (`[1, H, W, C]`).
pub fn channel_means(tensor: &Array4<f32>) -> Vec<f32> {
    tensor
        .index_axis(Axis(0), 0)
        .axis_iter(Axis(2))
        .map(|plane| plane.mean().unwrap_or(0.0))
        .collect()
}

pub struct Explainer {
    repository: Arc<ModelRepository>,
    slots: Arc<Semaphore>,
    slot_count: usize,
    /// Explanations running or waiting for a slot.
    waiting: AtomicUsize,
    max_waiting: usize,
    max_cells: u32,
    time_limit: Duration,
}

/// Frees its place in the waiting line when dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Explainer {
    pub fn new(repository: Arc<ModelRepository>, settings: &RuntimeSettings) -> Self {
        Self {
            repository,
            slots: Arc::new(Semaphore::new(settings.explanation_slots.max(1))),
            slot_count: settings.explanation_slots.max(1),
            waiting: AtomicUsize::new(0),
            max_waiting: settings.explanation_waiting,
            max_cells: settings.explanation_max_cells,
            time_limit: Duration::from_secs(settings.explanation_time_limit_seconds.max(1)),
        }
    }

    /// Checks the grid against the cap and the model's input size; 0 means [`DEFAULT_GRID`].
    pub fn grid(
        &self,
        rows: u32,
        columns: u32,
        height: u32,
        width: u32,
    ) -> Result<(u32, u32), InferenceError> {
        let rows = if rows == 0 { DEFAULT_GRID } else { rows };
        let columns = if columns == 0 { DEFAULT_GRID } else { columns };
        let cells = u64::from(rows) * u64::from(columns);
        if cells > u64::from(self.max_cells) || rows > height || columns > width {
            return Err(InferenceError::ExplanationGridInvalid(format!(
                "a {rows}×{columns} grid is refused: at most {} cells and no more rows or columns than the model's {height}×{width} input",
                self.max_cells
            )));
        }
        Ok((rows, columns))
    }

    /// The occlusion map of `image` for `target_label` through version `version` of `name`.
    pub async fn explain(
        &self,
        name: &str,
        version: &str,
        target_label: &str,
        image: ImageInput,
        grid: (u32, u32),
        caller_deadline: Option<Instant>,
    ) -> Result<OcclusionMap, InferenceError> {
        let served = self.repository.select_any(name, version)?;
        let manifest = served.manifest.clone();
        let plan = manifest.preprocessing.clone();
        let (rows, columns) = self.grid(grid.0, grid.1, plan.height, plan.width)?;
        let target = manifest
            .labels
            .iter()
            .position(|label| label == target_label)
            .ok_or_else(|| {
                InferenceError::Failed("the result's label is not the model's".into())
            })?;
        let limit = Instant::now() + self.time_limit;
        let deadline = caller_deadline.map_or(limit, |at| at.min(limit));

        // A place in line, then a slot; both bounded.
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.slot_count + self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(InferenceError::ExplanationsBusy);
        }
        let _place = Waiting(&self.waiting);
        let _slot = tokio::time::timeout_at(deadline.into(), self.slots.clone().acquire_owned())
            .await
            .map_err(|_| InferenceError::ExplanationTimeLimit)?
            .map_err(|_| InferenceError::ExplanationsBusy)?;
        let started = Instant::now();

        let tensor = tokio::task::spawn_blocking(move || to_input_tensor(image, &plan))
            .await
            .map_err(|error| InferenceError::Failed(error.to_string()))?
            .map_err(|error| InferenceError::ImageInconsistent(error.to_string()))?;
        let fill = channel_means(&tensor);
        let cells: Vec<(u32, u32)> = (0..rows)
            .flat_map(|row| (0..columns).map(move |column| (row, column)))
            .collect();
        // Row 0 is the whole image; then one row per cell.
        let total = cells.len() + 1;
        let batch = served.max_batch_rows.max(1);
        let mut probabilities = Vec::with_capacity(total);
        let mut next = 0usize;
        while next < total {
            if Instant::now() >= deadline {
                return Err(InferenceError::ExplanationTimeLimit);
            }
            let end = (next + batch).min(total);
            let views: Vec<Array4<f32>> = (next..end)
                .map(|index| match index {
                    0 => tensor.clone(),
                    cell => occlude(&tensor, (rows, columns), cells[cell - 1], &fill),
                })
                .collect();
            let stacked = ndarray::concatenate(
                Axis(0),
                &views.iter().map(|view| view.view()).collect::<Vec<_>>(),
            )
            .map_err(|error| InferenceError::Failed(error.to_string()))?;
            let output =
                served
                    .infer(stacked, Some(deadline))
                    .await
                    .map_err(|error| match error {
                        InferenceError::DeadlinePassed => InferenceError::ExplanationTimeLimit,
                        other => other,
                    })?;
            probabilities.extend(
                output
                    .scores
                    .iter()
                    .map(|scores| scores.get(target).copied().unwrap_or(0.0)),
            );
            next = end;
        }
        let baseline = probabilities[0];
        let importance: Vec<f32> = probabilities[1..]
            .iter()
            .map(|occluded| baseline - occluded)
            .collect();
        let best = importance
            .iter()
            .enumerate()
            .fold(0usize, |best, (index, value)| {
                if *value > importance[best] {
                    index
                } else {
                    best
                }
            });
        let most_important = cells[best];
        let (width, height) = (manifest.preprocessing.width, manifest.preprocessing.height);
        let heatmap_png = heatmap(&importance, (rows, columns), width, height)?;
        Ok(OcclusionMap {
            model_name: manifest.name.clone(),
            model_version: manifest.version.clone(),
            target_label: target_label.to_owned(),
            baseline_probability: baseline,
            grid_rows: rows,
            grid_columns: columns,
            importance,
            most_important,
            heatmap_sha256: hex::encode(Sha256::digest(&heatmap_png)),
            heatmap_png,
            heatmap_width: width,
            heatmap_height: height,
            forward_passes: total as u32,
            compute: started.elapsed(),
        })
    }
}

/// An RGB PNG of `width`×`height`: each cell coloured from blue (no effect or raising the
/// probability) to red (the largest drop).
fn heatmap(
    importance: &[f32],
    (rows, columns): (u32, u32),
    width: u32,
    height: u32,
) -> Result<Vec<u8>, InferenceError> {
    let peak = importance.iter().copied().fold(0.0f32, f32::max);
    let mut picture = RgbImage::new(width, height);
    for row in 0..rows {
        let (top, bottom) = cell_span(row, rows, height);
        for column in 0..columns {
            let (left, right) = cell_span(column, columns, width);
            let value = importance[(row * columns + column) as usize];
            let level = if peak > 0.0 {
                (value / peak).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let red = (255.0 * level).round() as u8;
            let pixel = image::Rgb([red, 32, 255 - red]);
            for y in top..bottom {
                for x in left..right {
                    picture.put_pixel(x as u32, y as u32, pixel);
                }
            }
        }
    }
    let mut png = Cursor::new(Vec::new());
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(
            picture.as_raw(),
            width,
            height,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|error| InferenceError::Failed(error.to_string()))?;
    Ok(png.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_tile_the_input_and_occlusion_fills_only_its_cell() {
        // 8 cells over 240 pixels: 30 each; 7 over 240 tile without gaps or overlaps.
        assert_eq!(cell_span(0, 8, 240), (0, 30));
        assert_eq!(cell_span(7, 8, 240), (210, 240));
        let spans: Vec<(usize, usize)> = (0..7).map(|index| cell_span(index, 7, 240)).collect();
        assert_eq!(spans[0].0, 0);
        assert_eq!(spans[6].1, 240);
        assert!(spans.windows(2).all(|pair| pair[0].1 == pair[1].0));

        let tensor = Array4::from_shape_fn((1, 4, 4, 2), |(_, y, x, c)| (y * 4 + x + c) as f32);
        let means = channel_means(&tensor);
        assert_eq!(means, vec![7.5, 8.5]);
        let occluded = occlude(&tensor, (2, 2), (1, 0), &means);
        for y in 0..4 {
            for x in 0..4 {
                let inside = y >= 2 && x < 2;
                assert_eq!(
                    occluded[[0, y, x, 1]],
                    if inside { 8.5 } else { tensor[[0, y, x, 1]] }
                );
            }
        }
        let png = heatmap(&[0.0, 0.5, -0.1, 1.0], (2, 2), 6, 4).expect("png");
        let decoded = image::load_from_memory(&png).expect("decode").to_rgb8();
        assert_eq!(decoded.dimensions(), (6, 4));
        assert_eq!(decoded.get_pixel(5, 3).0, [255, 32, 0]);
        assert_eq!(decoded.get_pixel(0, 3).0, [0, 32, 255]);
    }
}
