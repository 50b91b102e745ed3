//! Each model's DICOM frame policy (see `medai_imaging::FramePolicy`): what a model does with a
//! multi-frame object, set beside its quality profile. A model named nowhere gets the default,
//! and the default's default is `refuse`: a model is shown one frame of a multi-frame object
//! only where its operators said which, never silently the first.

use std::collections::BTreeMap;

use medai_imaging::FramePolicy;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FramePolicies {
    /// For models without their own policy; `refuse` unless set.
    #[serde(default)]
    pub default: FramePolicy,
    /// Per model name (as the request names it): `refuse`, `first_frame` or `middle_frame`.
    #[serde(default)]
    pub by_model: BTreeMap<String, FramePolicy>,
}

impl FramePolicies {
    pub fn for_model(&self, model: &str) -> FramePolicy {
        self.by_model.get(model).copied().unwrap_or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_without_a_policy_gets_the_default_and_the_default_refuses() {
        let policies = FramePolicies {
            by_model: BTreeMap::from([("brain".to_owned(), FramePolicy::MiddleFrame)]),
            ..FramePolicies::default()
        };
        assert_eq!(policies.for_model("brain"), FramePolicy::MiddleFrame);
        assert_eq!(policies.for_model("other"), FramePolicy::Refuse);
        assert_eq!(policies.for_model(""), FramePolicy::Refuse);
    }

    #[test]
    fn policies_load_from_the_environment_by_their_snake_case_names() {
        let environment = BTreeMap::from([
            (
                "MEDAI_VALIDATION_FRAMES__DEFAULT".to_owned(),
                "first_frame".to_owned(),
            ),
            (
                "MEDAI_VALIDATION_FRAMES__BY_MODEL__BRAIN-MRI-TUMOR".to_owned(),
                "middle_frame".to_owned(),
            ),
        ]);
        #[derive(Deserialize)]
        struct Holder {
            frames: FramePolicies,
        }
        let loaded: Holder =
            medai_runtime::config::load_config("MEDAI_VALIDATION_", None, &environment)
                .expect("loads");
        assert_eq!(loaded.frames.default, FramePolicy::FirstFrame);
        assert_eq!(
            loaded.frames.for_model("brain-mri-tumor"),
            FramePolicy::MiddleFrame
        );
        let unknown = BTreeMap::from([(
            "MEDAI_VALIDATION_FRAMES__DEFAULT".to_owned(),
            "every_other_frame".to_owned(),
        )]);
        assert!(
            medai_runtime::config::load_config::<Holder>("MEDAI_VALIDATION_", None, &unknown)
                .is_err(),
            "an unknown policy is refused at load"
        );
    }
}
