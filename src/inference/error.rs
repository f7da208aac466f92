//! Error type of the inference module.

use std::path::PathBuf;

use super::wav::WavError;

/// Everything that can go wrong between a manifest on disk and a model output.
///
/// Messages always name the model (and the tensor, where one is involved) so an
/// agent can report them as they are.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// A manifest or the model directory could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File or directory being read.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A manifest is malformed or inconsistent.
    #[error("manifest {path}: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// No manifest in the repository has this name.
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Comma-separated names that exist.
        known: String,
    },
    /// The model file named by the manifest is not on disk.
    #[error("model `{model}`: file {path} is missing{hint}")]
    ModelFileMissing {
        /// Model name.
        model: String,
        /// Expected location.
        path: PathBuf,
        /// How to get it (e.g. run the fetch script).
        hint: String,
    },
    /// The model file's sha256 differs from the manifest's.
    #[error("model `{model}`: sha256 of {path} is {actual}, manifest says {expected}")]
    HashMismatch {
        /// Model name.
        model: String,
        /// File checked.
        path: PathBuf,
        /// Hash from the manifest.
        expected: String,
        /// Hash of the file.
        actual: String,
    },
    /// tract does not implement an operator the model uses.
    #[error("model `{model}`: unsupported operator: {detail}")]
    UnsupportedOp {
        /// Model name.
        model: String,
        /// tract's explanation, including the node.
        detail: String,
    },
    /// The model could not be parsed, typed or optimized for another reason.
    #[error("model `{model}`: cannot load: {detail}")]
    Load {
        /// Model name.
        model: String,
        /// tract's explanation.
        detail: String,
    },
    /// A required input tensor was not given.
    #[error("model `{model}`: missing input `{tensor}`")]
    MissingInput {
        /// Model name.
        model: String,
        /// Input name.
        tensor: String,
    },
    /// An input tensor the model does not have was given.
    #[error("model `{model}`: unexpected input `{tensor}` (inputs are: {expected})")]
    UnexpectedInput {
        /// Model name.
        model: String,
        /// Given tensor name.
        tensor: String,
        /// The model's inputs.
        expected: String,
    },
    /// An input tensor has the wrong element type.
    #[error("model `{model}`: input `{tensor}` has dtype {actual}, expected {expected}")]
    DTypeMismatch {
        /// Model name.
        model: String,
        /// Input name.
        tensor: String,
        /// Expected dtype.
        expected: String,
        /// Given dtype.
        actual: String,
    },
    /// An input tensor has the wrong shape.
    #[error("model `{model}`: input `{tensor}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Model name.
        model: String,
        /// Input name.
        tensor: String,
        /// Pinned shape from the manifest.
        expected: Vec<usize>,
        /// Given shape.
        actual: Vec<usize>,
    },
    /// A tensor's data does not agree with its declared dtype or shape.
    #[error("tensor `{tensor}`: {message}")]
    BadTensor {
        /// Tensor name.
        tensor: String,
        /// What is inconsistent.
        message: String,
    },
    /// Running the plan failed.
    #[error("model `{model}`: run failed: {detail}")]
    Run {
        /// Model name.
        model: String,
        /// tract's explanation.
        detail: String,
    },
    /// A WAV file could not be decoded.
    #[error(transparent)]
    Wav(#[from] WavError),
}

impl InferenceError {
    /// Classifies a tract load error: operator support problems get their own variant.
    pub(crate) fn from_load(model: &str, err: &tract_onnx::prelude::TractError) -> Self {
        let detail = format!("{err:#}");
        let lower = detail.to_ascii_lowercase();
        if lower.contains("unimplemented") || lower.contains("not supported") {
            InferenceError::UnsupportedOp {
                model: model.to_string(),
                detail,
            }
        } else {
            InferenceError::Load {
                model: model.to_string(),
                detail,
            }
        }
    }
}
