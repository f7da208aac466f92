//! `infer` and `vad`: on-device inference through [`crate::inference`].
//!
//! Both share one [`Engine`] per model directory, so a model loaded for one
//! task is reused by the next. Runs are CPU-bound and go to tokio's blocking
//! pool so the agent's event loop never waits on a model.

use super::schema::{Kind, Schema};
use super::util::{cfg_str, config_err, failed, invalid};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::boards::Board;
use crate::inference::{vad, wav, DType, Engine, ModelRepo, NamedTensor, TensorData};
use crate::protocol::Value;
use async_trait::async_trait;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Settings shared by `infer` and `vad`.
pub(crate) struct EngineConfig {
    pub models_dir: PathBuf,
    pub cache_bytes: usize,
}

impl EngineConfig {
    pub(crate) fn from_config(
        plugin: &str,
        config: &toml::Table,
        board: &Board,
    ) -> Result<EngineConfig, PluginError> {
        let models_dir = PathBuf::from(
            cfg_str(plugin, config, "models_dir")?.unwrap_or_else(|| "models".into()),
        );
        let cache_bytes = match config.get("cache_bytes") {
            None => board.limits.model_cache_bytes as usize,
            Some(toml::Value::Integer(i)) if *i > 0 => *i as usize,
            Some(v) => {
                return Err(config_err(
                    plugin,
                    "cache_bytes",
                    format!("expected a positive integer, found {v}"),
                ))
            }
        };
        Ok(EngineConfig {
            models_dir,
            cache_bytes,
        })
    }

    pub(crate) fn open(&self, plugin: &str) -> Result<Arc<Engine>, PluginError> {
        let repo = ModelRepo::open(&self.models_dir)
            .map_err(|e| config_err(plugin, "models_dir", e.to_string()))?;
        Ok(Arc::new(Engine::new(repo, self.cache_bytes)))
    }
}

use super::util::{blocking, Stop};

/// Values the outputs of one `infer` task may have in all: more could not
/// come back in one result anyway (about 9 bytes each in the envelope).
const MAX_OUTPUT_VALUES: usize = 1 << 18;

/// Largest WAV file `vad` reads from its `audio_root` (about 35 minutes of
/// 16 kHz 16-bit mono); a bigger one is refused before it is read.
const MAX_WAV_BYTES: u64 = 64 << 20;

/// The generic `infer` plugin: named tensors in, named tensors out.
pub struct Infer {
    engine: Arc<Engine>,
    models: Vec<String>,
}

impl Infer {
    /// Config keys: `models_dir` (default `models`), `cache_bytes` (default:
    /// the board's `model_cache_bytes`).
    pub fn new(engine: Arc<Engine>, board: &Board) -> Infer {
        Infer {
            engine,
            models: board.models.clone(),
        }
    }
}

fn tensor_from_value(v: &Value, i: usize) -> Result<NamedTensor, PluginError> {
    let field = |k: &str| format!("inputs[{i}].{k}");
    let name = match v.get("name") {
        Some(Value::Str(s)) => s.clone(),
        _ => return Err(invalid("infer", &field("name"), "expected a string")),
    };
    let dtype = match v.get("dtype") {
        None => DType::F32,
        Some(Value::Str(s)) => match s.as_str() {
            "f32" => DType::F32,
            "i64" => DType::I64,
            "i32" => DType::I32,
            "u8" => DType::U8,
            "i8" => DType::I8,
            "bool" => DType::Bool,
            other => {
                return Err(invalid(
                    "infer",
                    &field("dtype"),
                    format!("`{other}` is not one of f32, i64, i32, u8, i8, bool"),
                ))
            }
        },
        _ => return Err(invalid("infer", &field("dtype"), "expected a string")),
    };
    let shape: Vec<usize> = match v.get("shape") {
        Some(Value::List(dims)) => dims
            .iter()
            .map(|d| match d {
                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                _ => Err(invalid(
                    "infer",
                    &field("shape"),
                    "dimensions must be non-negative integers",
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(invalid(
                "infer",
                &field("shape"),
                "expected a list of integers",
            ))
        }
    };
    let nums: Vec<f64> = match v.get("data") {
        Some(Value::List(xs)) => xs
            .iter()
            .map(|x| match x {
                Value::Int(n) => Ok(*n as f64),
                Value::Float(f) => Ok(*f),
                Value::Bool(b) => Ok(*b as u8 as f64),
                _ => Err(invalid("infer", &field("data"), "expected numbers")),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Bytes(b)) if dtype == DType::U8 => b.iter().map(|x| *x as f64).collect(),
        _ => {
            return Err(invalid(
                "infer",
                &field("data"),
                "expected a list of numbers",
            ))
        }
    };
    // Checked: dimensions like [2^32, 2^32] must not wrap to a small count.
    let want = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .ok_or_else(|| {
            invalid(
                "infer",
                &field("shape"),
                format!("{shape:?} has too many values"),
            )
        })?;
    if nums.len() != want {
        return Err(invalid(
            "infer",
            &field("data"),
            format!(
                "{} values for shape {shape:?} ({want} expected)",
                nums.len()
            ),
        ));
    }
    let data = match dtype {
        DType::F32 => TensorData::F32(nums.iter().map(|x| *x as f32).collect()),
        DType::I64 => TensorData::I64(nums.iter().map(|x| *x as i64).collect()),
        DType::I32 => TensorData::I32(nums.iter().map(|x| *x as i32).collect()),
        DType::U8 => TensorData::U8(nums.iter().map(|x| *x as u8).collect()),
        DType::I8 => TensorData::I8(nums.iter().map(|x| *x as i8).collect()),
        DType::Bool => TensorData::Bool(nums.iter().map(|x| *x != 0.0).collect()),
        DType::F16 => unreachable!("not accepted above"),
    };
    Ok(NamedTensor::new(name, shape, data))
}

fn tensor_to_value(t: NamedTensor) -> Value {
    let data = match t.data {
        TensorData::F32(v) => v.into_iter().map(|x| Value::Float(x as f64)).collect(),
        TensorData::F16(v) => NamedTensor::new("", vec![v.len()], TensorData::F16(v))
            .to_f32_vec()
            .into_iter()
            .map(|x| Value::Float(x as f64))
            .collect(),
        TensorData::I64(v) => v.into_iter().map(Value::Int).collect(),
        TensorData::I32(v) => v.into_iter().map(|x| Value::Int(x as i64)).collect(),
        TensorData::I8(v) => v.into_iter().map(|x| Value::Int(x as i64)).collect(),
        TensorData::U8(v) => v.into_iter().map(|x| Value::Int(x as i64)).collect(),
        TensorData::Bool(v) => v.into_iter().map(Value::Bool).collect(),
    };
    Value::Map(vec![
        ("name".into(), Value::Str(t.name)),
        ("dtype".into(), Value::Str(t.dtype.to_string())),
        (
            "shape".into(),
            Value::List(t.shape.into_iter().map(|d| Value::Int(d as i64)).collect()),
        ),
        ("data".into(), Value::List(data)),
    ])
}

#[async_trait]
impl Plugin for Infer {
    fn name(&self) -> &'static str {
        "infer"
    }

    fn description(&self) -> String {
        "Runs an ONNX model on this device (classification, OCR, embeddings) on the input tensor or image.".into()
    }

    fn input_schema(&self) -> Schema {
        let tensor = Schema::object()
            .req("name", Schema::string().desc("the model's input name"))
            .field(
                "dtype",
                Schema::enumeration(&["f32", "i64", "i32", "u8", "i8", "bool"]),
            )
            .req("shape", Schema::array(Schema::integer(0, i64::MAX)))
            .req(
                "data",
                Schema::array(Schema::of(&[Kind::Number, Kind::Boolean])),
            );
        Schema::object()
            .req(
                "model",
                Schema::enumeration(&self.engine.repo().names()).desc("a model of models_dir"),
            )
            // An empty list reaches the engine, which names the inputs it needs.
            .req("inputs", Schema::array(tensor).len(0, 64))
    }

    fn concurrency(&self) -> usize {
        // CPU-bound on the blocking pool: one run per core.
        super::util::cpus()
    }

    fn capabilities(&self) -> Vec<String> {
        self.models.iter().map(|m| format!("model:{m}")).collect()
    }

    fn validate(&self) -> Result<(), PluginError> {
        let known = self.engine.repo().names();
        for m in &self.models {
            if !known.contains(&m.as_str()) {
                return Err(config_err(
                    "infer",
                    "models",
                    format!(
                        "the board lists model `{m}` but the repository has only: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let model = match task.input.get("model") {
            Some(Value::Str(s)) => s.clone(),
            _ => {
                return Err(invalid(
                    "infer",
                    "model",
                    "expected the model name as a string",
                ))
            }
        };
        if !matches!(task.input.get("inputs"), Some(Value::List(_))) {
            return Err(invalid("infer", "inputs", "expected a list of tensors"));
        }
        let engine = self.engine.clone();
        let started = std::time::Instant::now();
        let input = task.input.clone();
        let stop = Stop::of(&task);
        // Pre- and post-processing on the blocking thread too, each step
        // checking for a cancel or the deadline; the model run itself
        // cannot be interrupted (its thread keeps the task's slot).
        let outputs = blocking("infer", &task, move || {
            let mut inputs = Vec::new();
            if let Some(Value::List(l)) = input.get("inputs") {
                for (i, v) in l.iter().enumerate() {
                    stop.check("infer")?;
                    inputs.push(tensor_from_value(v, i)?);
                }
            }
            stop.check("infer")?;
            let outputs = engine
                .run(&model, inputs)
                .map_err(|e| invalid_or_failed(e.to_string()))?;
            stop.check("infer")?;
            let values: usize = outputs.iter().map(|t| t.data.len()).sum();
            if values > MAX_OUTPUT_VALUES {
                return Err(failed(
                    "infer",
                    format!("the outputs have {values} values, more than one result carries ({MAX_OUTPUT_VALUES})"),
                ));
            }
            let mut out = Vec::with_capacity(outputs.len());
            for t in outputs {
                stop.check("infer")?;
                out.push(tensor_to_value(t));
            }
            Ok(out)
        })
        .await?;
        Ok(Value::Map(vec![
            ("outputs".into(), Value::List(outputs)),
            (
                "elapsed_us".into(),
                Value::Int(started.elapsed().as_micros() as i64),
            ),
        ]))
    }
}

fn invalid_or_failed(message: String) -> PluginError {
    // Shape, dtype and name mismatches are the caller's; the rest are ours.
    if message.contains("input `") || message.contains("unknown model") {
        invalid("infer", "inputs", message)
    } else {
        failed("infer", message)
    }
}

/// The `vad` plugin: speech segments of 16 kHz mono audio.
pub struct Vad {
    engine: Arc<Engine>,
    audio_root: Option<PathBuf>,
}

impl Vad {
    /// Config keys: `models_dir`, `cache_bytes` (as `infer`), `audio_root`
    /// (folder `wav` paths are resolved in; without it only inline audio is accepted).
    pub fn new(engine: Arc<Engine>, config: &toml::Table) -> Result<Vad, PluginError> {
        let audio_root = cfg_str("vad", config, "audio_root")?.map(PathBuf::from);
        Ok(Vad { engine, audio_root })
    }
}

/// Resolves `rel` inside `root` (the config key `root_key`), refusing
/// anything that escapes it; errors name the input `field`.
pub(crate) fn resolve_in_root(
    plugin: &str,
    field: &str,
    root_key: &str,
    root: Option<&Path>,
    rel: &str,
) -> Result<PathBuf, PluginError> {
    let root = root.ok_or_else(|| {
        invalid(
            plugin,
            field,
            format!("no {root_key} is configured; send the data inline"),
        )
    })?;
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(invalid(
            plugin,
            field,
            format!("`{rel}` must be a plain relative path inside the {root_key}"),
        ));
    }
    let root = root
        .canonicalize()
        .map_err(|e| failed(plugin, format!("{root_key} {}: {e}", root.display())))?;
    let full = root
        .join(p)
        .canonicalize()
        .map_err(|e| invalid(plugin, field, format!("`{rel}`: {e}")))?;
    if !full.starts_with(&root) {
        return Err(invalid(
            plugin,
            field,
            format!("`{rel}` leads outside the {root_key}"),
        ));
    }
    Ok(full)
}

/// Reads `rel` beneath `root` (checked by name, then read through a handle
/// on the root: no symlinks, no special files, at most `max` bytes; see file.rs).
pub(crate) fn read_in_root(
    plugin: &str,
    field: &str,
    root_key: &str,
    root: Option<&Path>,
    rel: &str,
    max: u64,
) -> Result<Vec<u8>, PluginError> {
    resolve_in_root(plugin, field, root_key, root, rel)?;
    let root = root.unwrap_or(Path::new("."));
    super::file::read_beneath(root, Path::new(rel), max).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => invalid(
            plugin,
            field,
            format!("`{rel}` is a symlink or goes through one; not followed"),
        ),
        _ => invalid(plugin, field, format!("`{rel}`: {e}")),
    })
}

#[async_trait]
impl Plugin for Vad {
    fn name(&self) -> &'static str {
        "vad"
    }

    fn description(&self) -> String {
        "Voice activity detection on audio samples (Silero VAD).".into()
    }

    fn input_schema(&self) -> Schema {
        // Exactly one of the three; `execute` says so when that fails.
        Schema::object()
            .field(
                "wav",
                Schema::string().desc("path of a WAV file in audio_root"),
            )
            .field("wav_base64", Schema::string().desc("a WAV file, base64"))
            .field(
                "pcm",
                Schema::array(Schema::number()).desc("16 kHz mono samples, -1..1"),
            )
    }

    fn concurrency(&self) -> usize {
        super::util::cpus()
    }

    fn capabilities(&self) -> Vec<String> {
        vec![format!("model:{}", vad::MODEL)]
    }

    fn validate(&self) -> Result<(), PluginError> {
        self.engine
            .repo()
            .get(vad::MODEL)
            .map_err(|e| config_err("vad", "models_dir", e.to_string()))?;
        if let Some(root) = &self.audio_root {
            if !root.is_dir() {
                return Err(config_err(
                    "vad",
                    "audio_root",
                    format!("{} is not a directory", root.display()),
                ));
            }
        }
        Ok(())
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let pcm: Vec<f32> = match (
            task.input.get("wav"),
            task.input.get("wav_base64"),
            task.input.get("pcm"),
        ) {
            (Some(Value::Str(rel)), None, None) => {
                let bytes = read_in_root(
                    "vad",
                    "wav",
                    "audio_root",
                    self.audio_root.as_deref(),
                    rel,
                    MAX_WAV_BYTES,
                )?;
                wav::parse_wav(&bytes).map_err(|e| invalid("vad", "wav", e.to_string()))?
            }
            (None, Some(Value::Str(b64)), None) => {
                let bytes =
                    super::util::base64_decode(b64).map_err(|m| invalid("vad", "wav_base64", m))?;
                wav::parse_wav(&bytes).map_err(|e| invalid("vad", "wav_base64", e.to_string()))?
            }
            (None, None, Some(Value::List(xs))) => xs
                .iter()
                .map(|x| match x {
                    Value::Float(f) => Ok(*f as f32),
                    Value::Int(i) => Ok(*i as f32),
                    _ => Err(invalid(
                        "vad",
                        "pcm",
                        "expected numbers (16 kHz mono, -1..1)",
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(invalid(
                    "vad",
                    "input",
                    "give exactly one of `wav` (path in audio_root), `wav_base64` or `pcm`",
                ))
            }
        };
        let duration_s = pcm.len() as f64 / 16_000.0;
        let engine = self.engine.clone();
        let segs = blocking("vad", &task, move || {
            vad::segments(&engine, &pcm).map_err(|e| failed("vad", e.to_string()))
        })
        .await?;
        Ok(Value::Map(vec![
            (
                "segments".into(),
                Value::List(
                    segs.into_iter()
                        .map(|s| {
                            Value::Map(vec![
                                ("start_s".into(), Value::Float(s.start_s as f64)),
                                ("end_s".into(), Value::Float(s.end_s as f64)),
                            ])
                        })
                        .collect(),
                ),
            ),
            ("duration_s".into(), Value::Float(duration_s)),
            ("model".into(), Value::Str(vad::MODEL.into())),
        ]))
    }
}

/// The engine of `ec`'s model directory: the one already opened for it, or
/// a new one kept in `engines` for the next plugin.
pub(crate) fn shared_engine(
    plugin: &str,
    ec: &EngineConfig,
    engines: &mut Vec<(PathBuf, Arc<Engine>)>,
) -> Result<Arc<Engine>, PluginError> {
    Ok(match engines.iter().find(|(d, _)| *d == ec.models_dir) {
        Some((_, e)) => e.clone(),
        None => {
            let e = ec.open(plugin)?;
            engines.push((ec.models_dir.clone(), e.clone()));
            e
        }
    })
}

/// Builds `infer`/`vad` from their config tables, sharing one engine per
/// model directory.
pub(crate) fn build(
    name: &str,
    config: &toml::Table,
    board: &Board,
    engines: &mut Vec<(PathBuf, Arc<Engine>)>,
) -> Result<Arc<dyn Plugin>, PluginError> {
    let keys: &[&str] = if name == "vad" {
        &["models_dir", "cache_bytes", "audio_root"]
    } else {
        &["models_dir", "cache_bytes"]
    };
    check_keys(name, config, keys)?;
    let ec = EngineConfig::from_config(name, config, board)?;
    let engine = shared_engine(name, &ec, engines)?;
    Ok(if name == "vad" {
        Arc::new(Vad::new(engine, config)?)
    } else {
        Arc::new(Infer::new(engine, board))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_values_are_checked() {
        let v = Value::from(serde_json::json!({"name": "x", "shape": [1, 2], "data": [1.0, 2.0]}));
        let t = tensor_from_value(&v, 0).unwrap();
        assert_eq!(t.shape, vec![1, 2]);
        let bad = Value::from(serde_json::json!({"name": "x", "shape": [1, 3], "data": [1.0]}));
        let e = tensor_from_value(&bad, 0).unwrap_err().to_string();
        assert!(
            e.contains("inputs[0].data") && e.contains("3 expected"),
            "{e}"
        );
        let bad = Value::from(
            serde_json::json!({"name": "x", "dtype": "f64", "shape": [1], "data": [1]}),
        );
        assert!(tensor_from_value(&bad, 0)
            .unwrap_err()
            .to_string()
            .contains("dtype"));
    }

    #[test]
    fn hostile_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.wav"), b"x").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.wav"), b"x").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.wav"),
            dir.path().join("link.wav"),
        )
        .unwrap();
        let resolve = |rel| resolve_in_root("vad", "wav", "audio_root", Some(dir.path()), rel);
        assert!(resolve("a.wav").is_ok());
        for bad in ["../x.wav", "/etc/passwd", "link.wav", "sub/../../x"] {
            let e = resolve(bad).unwrap_err().to_string();
            assert!(e.contains("`wav`"), "{bad}: {e}");
        }
        let e = resolve_in_root("ocr", "image", "image_root", None, "a.png")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no image_root"), "{e}");
    }
}
