//! The input size of each model, learnt from the inference service and kept for a second, so
//! the gateway can name it to validation: validation then checks the full image and returns it
//! resized to the model's input (issue 14), and only model-sized pixels cross the two hops
//! after it. Sources, both existing RPCs: KServe v2 `ModelMetadata` (the active version's input
//! tensor, `[-1, height, width, channels]`: manifests are NHWC only) and `ListModels` (which
//! versions are active, canary or shadow).
//!
//! A size is named only when exactly one version can take the request: while a model has a
//! canary or a shadow, or the request names another version, the full image travels as before,
//! since a version of another size must not get an image resized for a different one. A
//! lifecycle change that lands between a lookup and the prediction is caught by inference,
//! which refuses a model-sized image of the wrong size; [`ModelInputSizes::forget`] then drops
//! what was known and the gateway sends the full image.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use medai_proto::inference::v1::{ListModelsRequest, ModelVersionInfo};
use medai_proto::kserve::{ModelMetadataRequest, ModelMetadataResponse};
use medai_proto::validation::v1::ModelInputSize;

use crate::downstream::Downstream;

/// How long what was learnt about a model is used before it is asked again: about the time
/// every inference replica takes to serve a lifecycle change.
pub const MODEL_INPUT_SIZE_TTL: Duration = Duration::from_secs(1);

/// The longest a lookup may hold up a prediction: past it the full image is sent, as when
/// inference cannot be asked (the prediction then meets the same trouble on its own deadline).
pub const MODEL_INPUT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Most models remembered at once; past it the memory starts over.
const MAX_MODELS: usize = 1024;

/// What one lookup learnt about a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SingleVersionInput {
    pub active_version: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Default)]
pub struct ModelInputSizes {
    /// `gateway.model_input_resize`: off, no size is ever named.
    enabled: bool,
    known: Mutex<HashMap<String, (Instant, Option<SingleVersionInput>)>>,
}

impl ModelInputSizes {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            known: Mutex::default(),
        }
    }

    /// The input size to name to validation for a request for `model` (and `version`, empty for
    /// whichever version inference routes to), or `None` to have the full image sent. A lookup
    /// that fails names none, and that is remembered like an answer, so an unreachable
    /// inference service is not asked again before every request.
    pub async fn for_request(
        &self,
        downstream: &Downstream,
        model: &str,
        version: &str,
        correlation_id: &str,
        time_left: Option<Duration>,
    ) -> Option<ModelInputSize> {
        if !self.enabled {
            return None;
        }
        let known = match self.fresh(model, Instant::now()) {
            Some(known) => known,
            None => {
                let bound = time_left.map_or(MODEL_INPUT_LOOKUP_TIMEOUT, |left| {
                    left.min(MODEL_INPUT_LOOKUP_TIMEOUT)
                });
                let learnt = learn(downstream, model, correlation_id, Some(bound))
                    .await
                    .flatten();
                self.remember(model, learnt.clone(), Instant::now());
                learnt
            }
        };
        size_for_version(known.as_ref(), version)
    }

    /// Drops what is known of `model`: inference refused an image resized to it.
    pub fn forget(&self, model: &str) {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(model);
    }

    fn fresh(&self, model: &str, now: Instant) -> Option<Option<SingleVersionInput>> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (learnt_at, input) = known.get(model)?;
        (now.saturating_duration_since(*learnt_at) < MODEL_INPUT_SIZE_TTL).then(|| input.clone())
    }

    fn remember(&self, model: &str, input: Option<SingleVersionInput>, now: Instant) {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= MAX_MODELS && !known.contains_key(model) {
            known.clear();
        }
        known.insert(model.to_owned(), (now, input));
    }
}

/// The size for a request naming `version` (empty: the routed one).
fn size_for_version(known: Option<&SingleVersionInput>, version: &str) -> Option<ModelInputSize> {
    let known = known?;
    (version.is_empty() || version == known.active_version).then_some(ModelInputSize {
        width: known.width,
        height: known.height,
    })
}

/// Asks inference; `None` when it could not be asked (nothing is remembered then), `Some(None)`
/// when the model has no single version to size for.
async fn learn(
    downstream: &Downstream,
    model: &str,
    correlation_id: &str,
    time_left: Option<Duration>,
) -> Option<Option<SingleVersionInput>> {
    let versions = downstream
        .inference
        .clone()
        .list_models(downstream.request(ListModelsRequest {}, correlation_id, time_left))
        .await
        .ok()?
        .into_inner()
        .versions;
    let metadata = downstream
        .kserve
        .clone()
        .model_metadata(downstream.request(
            ModelMetadataRequest {
                name: model.to_owned(),
                version: String::new(),
            },
            correlation_id,
            time_left,
        ))
        .await
        .ok()?
        .into_inner();
    Some(single_version_input(model, &versions, &metadata))
}

/// The active version's input size when it alone takes `model`'s requests: no canary, no
/// shadow, one active version, and the metadata describes that version's one NHWC input.
pub fn single_version_input(
    model: &str,
    versions: &[ModelVersionInfo],
    metadata: &ModelMetadataResponse,
) -> Option<SingleVersionInput> {
    let of_model: Vec<&ModelVersionInfo> = versions
        .iter()
        .filter(|version| version.name == model)
        .collect();
    if of_model
        .iter()
        .any(|version| !version.rollout_role.is_empty())
    {
        return None;
    }
    let [active] = of_model
        .iter()
        .filter(|version| version.status == "ACTIVE")
        .collect::<Vec<_>>()[..]
    else {
        return None;
    };
    if metadata.name != model || metadata.versions != [active.version.clone()] {
        return None;
    }
    let [input] = &metadata.inputs[..] else {
        return None;
    };
    let [-1, height, width, _channels] = input.shape[..] else {
        return None;
    };
    Some(SingleVersionInput {
        active_version: active.version.clone(),
        width: u32::try_from(width).ok().filter(|side| *side > 0)?,
        height: u32::try_from(height).ok().filter(|side| *side > 0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use medai_proto::kserve::model_metadata_response::TensorMetadata;

    fn version(name: &str, version: &str, status: &str, role: &str) -> ModelVersionInfo {
        ModelVersionInfo {
            name: name.to_owned(),
            version: version.to_owned(),
            status: status.to_owned(),
            ready: true,
            rollout_role: role.to_owned(),
            ..ModelVersionInfo::default()
        }
    }

    fn metadata(name: &str, version: &str, shape: Vec<i64>) -> ModelMetadataResponse {
        ModelMetadataResponse {
            name: name.to_owned(),
            versions: vec![version.to_owned()],
            platform: "onnxruntime_onnx".to_owned(),
            inputs: vec![TensorMetadata {
                name: "input".to_owned(),
                datatype: "FP32".to_owned(),
                shape,
            }],
            outputs: Vec::new(),
        }
    }

    #[test]
    fn the_active_version_alone_gives_its_nhwc_height_and_width() {
        let versions = [
            version("brain", "1", "STAGED", ""),
            version("brain", "2", "ACTIVE", ""),
            version("light", "1", "ACTIVE", "SHADOW"),
        ];
        let known = single_version_input(
            "brain",
            &versions,
            &metadata("brain", "2", vec![-1, 240, 200, 3]),
        );
        assert_eq!(
            known,
            Some(SingleVersionInput {
                active_version: "2".to_owned(),
                width: 200,
                height: 240,
            })
        );
        let size = |version: &str| size_for_version(known.as_ref(), version);
        assert_eq!(
            size(""),
            Some(ModelInputSize {
                width: 200,
                height: 240
            })
        );
        assert_eq!(size("2"), size(""));
        // Another named version is not sized for: the full image goes, as before.
        assert_eq!(size("1"), None);
    }

    #[test]
    fn a_canary_a_shadow_or_a_mismatched_answer_names_no_size() {
        let shape = vec![-1, 64, 64, 1];
        for role in ["CANARY", "SHADOW"] {
            let versions = [
                version("light", "1", "ACTIVE", ""),
                version("light", "2", "STAGED", role),
            ];
            assert_eq!(
                single_version_input("light", &versions, &metadata("light", "1", shape.clone())),
                None,
                "{role}"
            );
        }
        let versions = [version("light", "1", "ACTIVE", "")];
        // The metadata describes another version than the active one (a change in between).
        assert_eq!(
            single_version_input("light", &versions, &metadata("light", "2", shape.clone())),
            None
        );
        // No active version, or a shape that is not [-1, H, W, C].
        assert_eq!(
            single_version_input(
                "light",
                &[version("light", "1", "STAGED", "")],
                &metadata("light", "1", shape)
            ),
            None
        );
        for shape in [
            vec![-1, 64, 64],
            vec![-1, 0, 64, 1],
            vec![-1, -1, 64, 1],
            vec![1, 64, 64, 1],
        ] {
            assert_eq!(
                single_version_input("light", &versions, &metadata("light", "1", shape.clone())),
                None,
                "{shape:?}"
            );
        }
        assert_eq!(size_for_version(None, ""), None);
    }

    #[test]
    fn what_was_learnt_is_used_for_a_second_and_can_be_forgotten() {
        let sizes = ModelInputSizes::new(true);
        let now = Instant::now();
        let known = SingleVersionInput {
            active_version: "1".to_owned(),
            width: 64,
            height: 64,
        };
        sizes.remember("light", Some(known.clone()), now);
        assert_eq!(sizes.fresh("light", now), Some(Some(known.clone())));
        assert_eq!(
            sizes.fresh(
                "light",
                now + MODEL_INPUT_SIZE_TTL - Duration::from_millis(1)
            ),
            Some(Some(known))
        );
        assert_eq!(sizes.fresh("light", now + MODEL_INPUT_SIZE_TTL), None);
        assert_eq!(sizes.fresh("brain", now), None);
        sizes.forget("light");
        assert_eq!(sizes.fresh("light", now), None);
        // A model with a rollout is remembered as having no single size.
        sizes.remember("brain", None, now);
        assert_eq!(sizes.fresh("brain", now), Some(None));
    }
}
