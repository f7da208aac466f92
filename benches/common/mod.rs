//! Shared by the inference benches.

use openclaw::inference::{LoadedModel, NamedTensor};

/// Fixed synthetic inputs at the model's pinned shapes: 0.1 everywhere, but
/// zero recurrent state (`h`, `c`) for the VAD.
pub fn inputs(m: &LoadedModel) -> Vec<NamedTensor> {
    m.manifest()
        .inputs
        .iter()
        .zip(m.input_shapes())
        .map(|(spec, shape)| {
            let fill = if matches!(spec.name.as_str(), "h" | "c") {
                0.0
            } else {
                0.1
            };
            NamedTensor::f32(
                spec.name.clone(),
                shape.clone(),
                vec![fill; shape.iter().product()],
            )
        })
        .collect()
}
