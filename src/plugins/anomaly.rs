//! `anomaly`: rolling statistics over a sensor series, z-scores, thresholds
//! with hysteresis and alarm intervals; optionally (feature `inference`) the
//! `sensor_anomaly` classifier on feature rows.
//!
//! Each point is compared with the `window` points before it (not itself),
//! so a spike does not dilute its own baseline.

use super::schema::Schema;
use super::util::{as_f64, cfg_str, cfg_u64, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;

const NAME: &str = "anomaly";

/// The anomaly plugin.
pub struct Anomaly {
    max_points: usize,
    #[cfg(feature = "inference")]
    engine: Option<std::sync::Arc<crate::inference::Engine>>,
}

/// Parameters of one analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub window: usize,
    pub z_threshold: f64,
    /// Alarm on the raw value (`high`/`low` given) or on |z|.
    pub on_value: bool,
    pub high: f64,
    pub low: f64,
}

/// Per-point statistics and alarms.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub mean: Vec<Option<f64>>,
    pub std: Vec<Option<f64>>,
    pub z: Vec<Option<f64>>,
    pub flags: Vec<bool>,
    pub alarm: Vec<bool>,
    /// (first index, last index) of each alarm; open alarms end at the last point.
    pub intervals: Vec<(usize, usize)>,
}

/// The analysis itself (pure, for tests and reuse).
pub fn analyze(values: &[f64], p: &Params) -> Analysis {
    let n = values.len();
    let mut a = Analysis {
        mean: Vec::with_capacity(n),
        std: Vec::with_capacity(n),
        z: Vec::with_capacity(n),
        flags: Vec::with_capacity(n),
        alarm: Vec::with_capacity(n),
        intervals: Vec::new(),
    };
    // Running sums over the trailing window.
    let (mut sum, mut sumsq) = (0.0f64, 0.0f64);
    let mut in_alarm = false;
    let mut start = 0;
    for (i, &x) in values.iter().enumerate() {
        let k = i.min(p.window);
        let (mean, std, z) = if k >= 2 {
            let mean = sum / k as f64;
            let var = ((sumsq - sum * sum / k as f64) / (k as f64 - 1.0)).max(0.0);
            let std = var.sqrt();
            let z = if std > 1e-12 {
                Some((x - mean) / std)
            } else if (x - mean).abs() <= 1e-12 {
                Some(0.0)
            } else {
                // A flat baseline and a different value: unbounded z.
                None
            };
            (Some(mean), Some(std), z)
        } else {
            (None, None, Some(0.0))
        };
        let flag = match z {
            Some(z) => z.abs() > p.z_threshold,
            None => true,
        };
        let level = if p.on_value {
            x
        } else {
            z.map_or(f64::INFINITY, f64::abs)
        };
        if !in_alarm && level > p.high {
            in_alarm = true;
            start = i;
        } else if in_alarm && level < p.low {
            in_alarm = false;
            a.intervals.push((start, i - 1));
        }
        a.mean.push(mean);
        a.std.push(std);
        a.z.push(z);
        a.flags.push(flag);
        a.alarm.push(in_alarm);
        sum += x;
        sumsq += x * x;
        if i >= p.window {
            let old = values[i - p.window];
            sum -= old;
            sumsq -= old * old;
        }
    }
    if in_alarm {
        a.intervals.push((start, n - 1));
    }
    a
}

fn opt_f(x: Option<f64>) -> Value {
    x.map_or(Value::Null, Value::Float)
}

impl Anomaly {
    /// Config keys: `max_points` (default 1000000); with feature
    /// `inference`: `models_dir` (enables `features` rows through the
    /// `sensor_anomaly` model), `cache_bytes`.
    pub fn from_config(
        config: &toml::Table,
        board: &crate::boards::Board,
    ) -> Result<Anomaly, PluginError> {
        check_keys(NAME, config, &["max_points", "models_dir", "cache_bytes"])?;
        let max_points = cfg_u64(NAME, config, "max_points", 1_000_000, 2, 100_000_000)? as usize;
        let models_dir = cfg_str(NAME, config, "models_dir")?;
        let _ = board;
        #[cfg(feature = "inference")]
        let engine = match models_dir {
            None => None,
            Some(_) => {
                Some(super::infer::EngineConfig::from_config(NAME, config, board)?.open(NAME)?)
            }
        };
        #[cfg(not(feature = "inference"))]
        if models_dir.is_some() {
            return Err(super::util::config_err(
                NAME,
                "models_dir",
                "this agent is built without the `inference` feature",
            ));
        }
        Ok(Anomaly {
            max_points,
            #[cfg(feature = "inference")]
            engine,
        })
    }

    fn params(&self, input: &Input) -> Result<Params, PluginError> {
        let window = input.opt_int("window", 2, 100_000)?.unwrap_or(20) as usize;
        let z_threshold = input.opt_num("z_threshold")?.unwrap_or(3.0);
        if z_threshold <= 0.0 {
            return Err(input.err("z_threshold", "must be greater than 0"));
        }
        let on = input.opt_str("on")?;
        let high = input.opt_num("high")?;
        let low = input.opt_num("low")?;
        let on_value = match on {
            None => high.is_some(),
            Some("value") => true,
            Some("z") => false,
            Some(_) => return Err(input.err("on", "expected `value` or `z`")),
        };
        if on_value && high.is_none() {
            return Err(input.err("high", "required when alarming on `value`"));
        }
        let high = high.unwrap_or(z_threshold);
        let low = low.unwrap_or(high);
        if low > high {
            return Err(input.err("low", format!("{low} is above high ({high})")));
        }
        Ok(Params {
            window,
            z_threshold,
            on_value,
            high,
            low,
        })
    }

    fn series(&self, input: &Input) -> Result<Value, PluginError> {
        let values: Vec<f64> = match input.get("values") {
            Some(Value::List(xs)) => xs
                .iter()
                .enumerate()
                .map(|(i, x)| match as_f64(x) {
                    Some(f) if f.is_finite() => Ok(f),
                    _ => Err(input.err(&format!("values[{i}]"), "expected a finite number")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(input.err("values", "expected a list of numbers")),
            None => return Err(input.err("values", "missing (expected a list of numbers)")),
        };
        if values.len() > self.max_points {
            return Err(input.err(
                "values",
                format!(
                    "{} points, more than max_points ({})",
                    values.len(),
                    self.max_points
                ),
            ));
        }
        let times: Option<Vec<Value>> = match input.get("timestamps") {
            None => None,
            Some(Value::List(ts)) if ts.len() == values.len() => Some(ts.clone()),
            Some(Value::List(ts)) => {
                return Err(input.err(
                    "timestamps",
                    format!("{} timestamps for {} values", ts.len(), values.len()),
                ))
            }
            Some(_) => return Err(input.err("timestamps", "expected a list")),
        };
        let p = self.params(input)?;
        let a = analyze(&values, &p);
        let at = |i: usize| match &times {
            Some(t) => t[i].clone(),
            None => Value::Int(i as i64),
        };
        let intervals = a
            .intervals
            .iter()
            .map(|&(s, e)| {
                let peak = values[s..=e]
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max);
                map(vec![
                    ("start_index", Value::Int(s as i64)),
                    ("end_index", Value::Int(e as i64)),
                    ("start", at(s)),
                    ("end", at(e)),
                    ("points", Value::Int((e - s + 1) as i64)),
                    ("peak", Value::Float(peak)),
                ])
            })
            .collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n.max(1.0);
        let std = if values.len() > 1 {
            (values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let flagged = a.flags.iter().filter(|f| **f).count();
        Ok(map(vec![
            ("mean", Value::List(a.mean.into_iter().map(opt_f).collect())),
            ("std", Value::List(a.std.into_iter().map(opt_f).collect())),
            ("z", Value::List(a.z.into_iter().map(opt_f).collect())),
            (
                "flags",
                Value::List(a.flags.into_iter().map(Value::Bool).collect()),
            ),
            (
                "alarm",
                Value::List(a.alarm.into_iter().map(Value::Bool).collect()),
            ),
            ("alarms", Value::List(intervals)),
            (
                "summary",
                map(vec![
                    ("count", Value::Int(values.len() as i64)),
                    ("mean", Value::Float(mean)),
                    ("std", Value::Float(std)),
                    (
                        "min",
                        Value::Float(values.iter().copied().fold(f64::INFINITY, f64::min)),
                    ),
                    (
                        "max",
                        Value::Float(values.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
                    ),
                    ("flagged", Value::Int(flagged as i64)),
                    ("window", Value::Int(p.window as i64)),
                ]),
            ),
        ]))
    }

    /// Feature rows through the classifier.
    #[cfg(feature = "inference")]
    async fn classify(&self, task: &TaskContext, input: &Input<'_>) -> Result<Value, PluginError> {
        use crate::inference::{NamedTensor, TensorData};
        const MODEL: &str = "sensor_anomaly";
        let engine = self
            .engine
            .clone()
            .ok_or_else(|| input.err("features", "no models_dir is configured for `anomaly`"))?;
        match input.opt_str("model")? {
            None | Some(MODEL) => {}
            Some(other) => {
                return Err(input.err("model", format!("`{other}`: only `{MODEL}` is supported")))
            }
        }
        let rows: Vec<Vec<f32>> = match input.get("features") {
            Some(Value::List(rows)) if !rows.is_empty() && rows.len() <= 10_000 => rows
                .iter()
                .enumerate()
                .map(|(i, r)| match r {
                    Value::List(xs) if xs.len() == 8 => xs
                        .iter()
                        .map(|x| as_f64(x).filter(|f| f.is_finite()).map(|f| f as f32))
                        .collect::<Option<Vec<f32>>>()
                        .ok_or_else(|| input.err(&format!("features[{i}]"), "expected numbers")),
                    _ => Err(input.err(
                        &format!("features[{i}]"),
                        "expected 8 numbers: vib_rms_g, vib_peak_g, vib_crest, vib_kurtosis, \
                         shaft_band_ratio, temp_c, temp_slope_c_per_min, temp_std_c",
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(input.err("features", "expected 1 to 10000 rows of 8 numbers")),
        };
        let labels = engine
            .repo()
            .get(MODEL)
            .map(|m| m.postprocess.labels.clone())
            .map_err(|e| super::util::failed(NAME, e.to_string()))?;
        let out = super::util::blocking(NAME, task, move || {
            let mut results = Vec::new();
            for row in rows {
                let t = NamedTensor::new("features", vec![1, 8], TensorData::F32(row));
                let outs = engine
                    .run(MODEL, vec![t])
                    .map_err(|e| super::util::failed(NAME, e.to_string()))?;
                let probs = outs
                    .into_iter()
                    .find(|o| o.name == "probabilities")
                    .ok_or_else(|| super::util::failed(NAME, "model gave no `probabilities`"))?
                    .to_f32_vec();
                results.push(probs);
            }
            Ok(results)
        })
        .await?;
        let classes = out
            .into_iter()
            .map(|probs| {
                let (best, p) = probs
                    .iter()
                    .copied()
                    .enumerate()
                    .fold((0, f32::MIN), |a, (i, p)| if p > a.1 { (i, p) } else { a });
                map(vec![
                    (
                        "label",
                        Value::Str(
                            labels
                                .get(best)
                                .cloned()
                                .unwrap_or_else(|| best.to_string()),
                        ),
                    ),
                    ("p", Value::Float(p as f64)),
                    (
                        "probabilities",
                        Value::List(probs.iter().map(|p| Value::Float(*p as f64)).collect()),
                    ),
                ])
            })
            .collect();
        Ok(map(vec![
            ("model", Value::Str(MODEL.into())),
            (
                "labels",
                Value::List(labels.into_iter().map(Value::Str).collect()),
            ),
            ("classes", Value::List(classes)),
        ]))
    }
}

#[async_trait]
impl Plugin for Anomaly {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Rolling statistics over a sensor series: z-scores, thresholds with hysteresis, alarm intervals.".into()
    }

    fn input_schema(&self) -> Schema {
        Schema::object()
            .field(
                "values",
                Schema::array(Schema::number()).len(1, self.max_points),
            )
            .field(
                "timestamps",
                Schema::array(Schema::any()).len(1, self.max_points),
            )
            .field("window", Schema::integer(2, 100_000))
            .field("z_threshold", Schema::number())
            .field("high", Schema::number())
            .field("low", Schema::number())
            .field("on", Schema::enumeration(&["value", "z"]))
            .field(
                "features",
                Schema::array(Schema::array(Schema::number()).len(8, 8)).len(1, 10_000),
            )
            .field("model", Schema::enumeration(&["sensor_anomaly"]))
    }

    fn concurrency(&self) -> usize {
        super::util::cpus()
    }

    fn capabilities(&self) -> Vec<String> {
        #[cfg(feature = "inference")]
        if self.engine.is_some() {
            return vec!["model:sensor_anomaly".into()];
        }
        Vec::new()
    }

    fn validate(&self) -> Result<(), PluginError> {
        #[cfg(feature = "inference")]
        if let Some(e) = &self.engine {
            e.repo()
                .get("sensor_anomaly")
                .map_err(|e| super::util::config_err(NAME, "models_dir", e.to_string()))?;
        }
        Ok(())
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let input = Input::new(NAME, &task.input)?;
        if input.get("features").is_some() || input.get("model").is_some() {
            #[cfg(feature = "inference")]
            return self.classify(&task, &input).await;
            #[cfg(not(feature = "inference"))]
            return Err(input.err(
                "features",
                "this agent is built without the `inference` feature",
            ));
        }
        // O(n) over at most max_points: cheap, but keep big series off the
        // async threads.
        let value = task.input.clone();
        let me = Anomaly {
            max_points: self.max_points,
            #[cfg(feature = "inference")]
            engine: None,
        };
        super::util::blocking(NAME, &task, move || me.series(&Input::new(NAME, &value)?)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin() -> Anomaly {
        Anomaly {
            max_points: 1000,
            #[cfg(feature = "inference")]
            engine: None,
        }
    }

    fn run(v: serde_json::Value) -> Result<serde_json::Value, String> {
        let v = Value::from(v);
        let input = Input::new(NAME, &v).map_err(|e| e.to_string())?;
        plugin()
            .series(&input)
            .map(serde_json::Value::from)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rolling_stats_match_a_direct_computation() {
        let xs: Vec<f64> = (0..50).map(|i| ((i * 7) % 11) as f64).collect();
        let p = Params {
            window: 5,
            z_threshold: 3.0,
            on_value: true,
            high: 100.0,
            low: 100.0,
        };
        let a = analyze(&xs, &p);
        for i in 2..xs.len() {
            let w = &xs[i.saturating_sub(5)..i];
            let m = w.iter().sum::<f64>() / w.len() as f64;
            let s = (w.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (w.len() - 1) as f64).sqrt();
            assert!((a.mean[i].unwrap() - m).abs() < 1e-9, "mean at {i}");
            assert!((a.std[i].unwrap() - s).abs() < 1e-9, "std at {i}");
        }
        assert_eq!(a.mean[0], None);
    }

    #[test]
    fn hysteresis_enters_above_high_and_leaves_below_low() {
        let xs = [10.0, 31.0, 29.0, 26.0, 24.0, 22.0, 31.0, 35.0];
        let r = run(
            json!({"values": xs, "high": 30, "low": 25, "timestamps": [0, 1, 2, 3, 4, 5, 6, 7]}),
        )
        .unwrap();
        assert_eq!(
            r["alarm"],
            json!([false, true, true, true, false, false, true, true])
        );
        assert_eq!(r["alarms"][0]["start"], 1);
        assert_eq!(r["alarms"][0]["end"], 3);
        assert_eq!(r["alarms"][0]["peak"], 31.0);
        assert_eq!(r["alarms"][1]["start_index"], 6);
        assert_eq!(r["alarms"][1]["end_index"], 7);
        assert_eq!(r["summary"]["count"], 8);
    }

    #[test]
    fn z_scores_flag_a_spike() {
        let mut xs: Vec<f64> = (0..40).map(|i| 20.0 + (i % 3) as f64 * 0.1).collect();
        xs[30] = 30.0;
        let r = run(json!({"values": xs, "window": 10})).unwrap();
        let flags: Vec<usize> = r["flags"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, f)| f.as_bool().unwrap())
            .map(|(i, _)| i)
            .collect();
        assert!(flags.contains(&30), "{flags:?}");
        assert!(r["z"][30].as_f64().unwrap() > 10.0);
        // On |z| by default: the spike is an alarm interval.
        assert_eq!(r["alarms"][0]["start_index"], 30);
        // A flat baseline then a step: z is unbounded (null) and flagged.
        let r = run(json!({"values": [1, 1, 1, 1, 5]})).unwrap();
        assert_eq!(r["z"][4], serde_json::Value::Null);
        assert_eq!(r["flags"][4], true);
    }

    #[test]
    fn bad_input_names_the_field() {
        for (input, field) in [
            (json!({}), "`values`"),
            (json!({"values": "x"}), "`values`"),
            (json!({"values": [1, "a"]}), "`values[1]`"),
            (json!({"values": [1, 2], "window": 1}), "`window`"),
            (
                json!({"values": [1, 2], "z_threshold": -1}),
                "`z_threshold`",
            ),
            (json!({"values": [1, 2], "high": 1, "low": 2}), "`low`"),
            (json!({"values": [1, 2], "on": "value"}), "`high`"),
            (json!({"values": [1, 2], "on": "x"}), "`on`"),
            (json!({"values": [1, 2], "timestamps": [1]}), "`timestamps`"),
            (json!({"values": vec![0; 1001]}), "max_points"),
        ] {
            let e = run(input.clone()).unwrap_err();
            assert!(e.contains("`anomaly`") && e.contains(field), "{input}: {e}");
        }
    }
}
