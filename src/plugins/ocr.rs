//! `ocr`: reads the text of a page image on the device (PP-OCRv4 through
//! [`crate::inference::ocr`]): boxes, their text, and the rows they form.
//!
//! The image never leaves the device: only the text does, which is the
//! point of running OCR at the edge (a scanned drawing is large and may be
//! confidential; its bill of materials is a few hundred bytes).

use super::infer::{read_in_root, EngineConfig};
use super::schema::Schema;
use super::util::{blocking, cfg_str, config_err, failed, invalid, Stop};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::boards::Board;
use crate::inference::ocr::{self, Charset, GrayImage, OcrError, OcrModels};
use crate::inference::Engine;
use crate::protocol::Value;
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;

const NAME: &str = "ocr";

/// Largest image file read (from `image_root` or inline).
const MAX_IMAGE_BYTES: u64 = 32 << 20;

/// The `ocr` plugin.
pub struct Ocr {
    engine: Arc<Engine>,
    image_root: Option<PathBuf>,
    models: OcrModels,
}

impl Ocr {
    /// Config keys: `models_dir`, `cache_bytes` (as `infer`), `image_root`
    /// (folder `image` paths are resolved in; without it only inline images
    /// are accepted), `det_model` and `rec_model` (default `ocr_det`,
    /// `ocr_rec`), `charset` (`all`, the default, or `ascii`; a task's
    /// `charset` overrides it).
    pub fn new(engine: Arc<Engine>, config: &toml::Table) -> Result<Ocr, PluginError> {
        let image_root = cfg_str(NAME, config, "image_root")?.map(PathBuf::from);
        let d = OcrModels::default();
        let charset = match cfg_str(NAME, config, "charset")? {
            None => d.charset,
            Some(c) => Charset::parse(&c).ok_or_else(|| {
                config_err(NAME, "charset", format!("`{c}` is not `all` or `ascii`"))
            })?,
        };
        let models = OcrModels {
            det: cfg_str(NAME, config, "det_model")?.unwrap_or(d.det),
            rec: cfg_str(NAME, config, "rec_model")?.unwrap_or(d.rec),
            charset,
        };
        Ok(Ocr {
            engine,
            image_root,
            models,
        })
    }
}

/// Config keys the `ocr` table may have.
pub(crate) const KEYS: &[&str] = &[
    "models_dir",
    "cache_bytes",
    "image_root",
    "det_model",
    "rec_model",
    "charset",
];

/// Builds `ocr` on a shared engine.
pub(crate) fn build(
    config: &toml::Table,
    board: &Board,
    engine: impl FnOnce(&EngineConfig) -> Result<Arc<Engine>, PluginError>,
) -> Result<Arc<dyn Plugin>, PluginError> {
    check_keys(NAME, config, KEYS)?;
    let ec = EngineConfig::from_config(NAME, config, board)?;
    Ok(Arc::new(Ocr::new(engine(&ec)?, config)?))
}

fn line_value(l: &ocr::Line) -> Value {
    let b = &l.bbox;
    Value::Map(vec![
        ("text".into(), Value::Str(l.text.clone())),
        (
            "confidence".into(),
            Value::Float((l.confidence as f64 * 1e4).round() / 1e4),
        ),
        (
            "box".into(),
            Value::List(
                [b.x0, b.y0, b.x1, b.y1]
                    .iter()
                    .map(|&v| Value::Int(v as i64))
                    .collect(),
            ),
        ),
    ])
}

#[async_trait]
impl Plugin for Ocr {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Reads the text of a page image (PNG or PGM) on this device: text boxes, their text and the table rows they form (PP-OCRv4).".into()
    }

    fn input_schema(&self) -> Schema {
        // Exactly one of the two; `execute` says so when that fails.
        Schema::object()
            .field(
                "image",
                Schema::string().desc("path of a PNG or PGM file in the device's image_root"),
            )
            .field(
                "image_base64",
                Schema::string().desc("a PNG or PGM file, base64"),
            )
            .field(
                "charset",
                Schema::enumeration(&["all", "ascii"]).desc(
                    "the characters lines may be read as: `ascii` for documents in Latin script",
                ),
            )
            .field(
                "min_confidence",
                Schema::number()
                    .range(0.0, 1.0)
                    .desc("drop lines read with less confidence (default 0)"),
            )
    }

    fn concurrency(&self) -> usize {
        super::util::cpus()
    }

    fn capabilities(&self) -> Vec<String> {
        vec![
            format!("model:{}", self.models.det),
            format!("model:{}", self.models.rec),
        ]
    }

    fn validate(&self) -> Result<(), PluginError> {
        for (key, m) in [
            ("det_model", &self.models.det),
            ("rec_model", &self.models.rec),
        ] {
            self.engine
                .repo()
                .get(m)
                .map_err(|e| config_err(NAME, key, e.to_string()))?;
        }
        if let Some(root) = &self.image_root {
            if !root.is_dir() {
                return Err(config_err(
                    NAME,
                    "image_root",
                    format!("{} is not a directory", root.display()),
                ));
            }
        }
        Ok(())
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let (bytes, field) = match (task.input.get("image"), task.input.get("image_base64")) {
            (Some(Value::Str(rel)), None) => (
                read_in_root(
                    NAME,
                    "image",
                    "image_root",
                    self.image_root.as_deref(),
                    rel,
                    MAX_IMAGE_BYTES,
                )?,
                "image",
            ),
            (None, Some(Value::Str(b64))) => {
                if b64.len() as u64 > MAX_IMAGE_BYTES / 3 * 4 + 4 {
                    return Err(invalid(
                        NAME,
                        "image_base64",
                        format!("more than {MAX_IMAGE_BYTES} bytes"),
                    ));
                }
                (
                    super::util::base64_decode(b64)
                        .map_err(|m| invalid(NAME, "image_base64", m))?,
                    "image_base64",
                )
            }
            _ => {
                return Err(invalid(
                    NAME,
                    "input",
                    "give exactly one of `image` (a path in image_root) or `image_base64`",
                ))
            }
        };
        let min_confidence = match task.input.get("min_confidence") {
            None => 0.0,
            Some(v) => match super::util::as_f64(v) {
                Some(x) if (0.0..=1.0).contains(&x) => x as f32,
                _ => {
                    return Err(invalid(
                        NAME,
                        "min_confidence",
                        "expected a number from 0 to 1",
                    ))
                }
            },
        };
        let engine = self.engine.clone();
        let mut models = self.models.clone();
        match task.input.get("charset") {
            None => {}
            Some(Value::Str(c)) if Charset::parse(c).is_some() => {
                models.charset = Charset::parse(c).unwrap_or(models.charset)
            }
            Some(_) => return Err(invalid(NAME, "charset", "expected `all` or `ascii`")),
        }
        let stop = Stop::of(&task);
        let started = std::time::Instant::now();
        let page = blocking(NAME, &task, move || {
            let img = GrayImage::decode(&bytes).map_err(|e| invalid(NAME, field, e.to_string()))?;
            stop.check(NAME)?;
            let page = match ocr::read_page(&engine, &models, &img, &|| stop.stopped()) {
                Ok(p) => p,
                Err(OcrError::Stopped) => {
                    stop.check(NAME)?;
                    return Err(failed(NAME, "stopped"));
                }
                Err(e @ OcrError::Image(_)) => return Err(invalid(NAME, field, e.to_string())),
                Err(e) => return Err(failed(NAME, e.to_string())),
            };
            Ok((page, img.width, img.height))
        })
        .await?;
        let (page, width, height) = page;
        let keep: Vec<bool> = page
            .lines
            .iter()
            .map(|l| l.confidence >= min_confidence)
            .collect();
        let rows: Vec<Vec<usize>> = page
            .rows
            .iter()
            .map(|r| r.iter().copied().filter(|&i| keep[i]).collect::<Vec<_>>())
            .filter(|r| !r.is_empty())
            .collect();
        let shown = ocr::Page {
            lines: page.lines.clone(),
            rows: rows.clone(),
            ..Default::default()
        };
        let table = ocr::table(&shown);
        Ok(Value::Map(vec![
            ("text".into(), Value::Str(shown.text())),
            (
                "table".into(),
                match &table {
                    None => Value::Null,
                    Some(t) => Value::Map(vec![
                        (
                            "header".into(),
                            Value::List(t.header.iter().cloned().map(Value::Str).collect()),
                        ),
                        (
                            "rows".into(),
                            Value::List(
                                t.rows
                                    .iter()
                                    .map(|r| {
                                        Value::List(r.iter().cloned().map(Value::Str).collect())
                                    })
                                    .collect(),
                            ),
                        ),
                    ]),
                },
            ),
            (
                "table_text".into(),
                Value::Str(table.as_ref().map(ocr::Table::text).unwrap_or_default()),
            ),
            (
                "rows".into(),
                Value::List(
                    rows.iter()
                        .map(|r| {
                            Value::List(
                                r.iter()
                                    .map(|&i| Value::Str(page.lines[i].text.clone()))
                                    .collect(),
                            )
                        })
                        .collect(),
                ),
            ),
            (
                "lines".into(),
                Value::List(
                    rows.iter()
                        .flatten()
                        .map(|&i| line_value(&page.lines[i]))
                        .collect(),
                ),
            ),
            ("width".into(), Value::Int(width as i64)),
            ("height".into(), Value::Int(height as i64)),
            ("det_ms".into(), Value::Float(page.det_ms.round())),
            ("rec_ms".into(), Value::Float(page.rec_ms.round())),
            (
                "elapsed_ms".into(),
                Value::Int(started.elapsed().as_millis() as i64),
            ),
        ]))
    }
}
