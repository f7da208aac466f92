//! On-device ONNX inference with tract (cargo feature `inference`).
//!
//! Models are described by TOML manifests in a directory (`models/`): file,
//! sha256, provenance, licence, inputs with dtypes and (pinned) shapes, outputs
//! and post-processing. [`Engine`] loads a model once (hash check, facts pinned,
//! optimized, made runnable), keeps plans in a byte-bounded LRU cache and runs
//! them concurrently through `Arc`s.
//!
//! ```no_run
//! use openclaw::inference::{Engine, ModelRepo, NamedTensor};
//! let engine = Engine::new(ModelRepo::open("models")?, 64 << 20);
//! let out = engine.run("sensor_anomaly", vec![NamedTensor::f32("features", vec![1, 8], vec![0.0; 8])])?;
//! # Ok::<(), openclaw::inference::InferenceError>(())
//! ```

mod engine;
mod error;
mod manifest;
pub mod ocr;
pub mod post;
mod tensor;
pub mod vad;
pub mod wav;

pub use engine::{CacheStats, Engine, LoadedModel};
pub use error::InferenceError;
pub use manifest::{
    Dim, InputSpec, ModelManifest, ModelRepo, OutputSpec, PostKind, PostProcess, Precision, Source,
};
pub use tensor::{DType, NamedTensor, TensorData};
