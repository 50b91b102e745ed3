//! Every family the validation service exports, with its HELP text, and its image counter at
//! zero.

pub const IMAGES: &str = "medai_validation_images_total";
/// Accepted images returned resized to the model input size the caller named.
pub const RESIZED_TO_MODEL_INPUT: &str = "medai_validation_resized_to_model_input_total";

/// Describes the validation service's families and registers its counters at zero.
/// Idempotent; without an installed recorder it does nothing.
pub fn describe() {
    metrics::describe_counter!(
        IMAGES,
        "Images validated by outcome: accepted, or the stable reason they were refused."
    );
    metrics::describe_counter!(
        "medai_validation_quality_failures_total",
        "Accepted images whose quality report failed a check, by quality code."
    );
    metrics::describe_counter!(
        RESIZED_TO_MODEL_INPUT,
        "Accepted images returned resized to the model input size the caller named (checked at full resolution first)."
    );
    metrics::counter!(IMAGES, "outcome" => "accepted").increment(0);
    metrics::counter!(RESIZED_TO_MODEL_INPUT).increment(0);
}
