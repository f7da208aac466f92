//! Voice activity detection with Silero VAD: per-window speech probabilities and
//! speech segments. Segmenting follows silero-vad 6.2.3's
//! `get_speech_timestamps` (MIT) without its max-speech-duration splitting.

use super::{Engine, InferenceError, NamedTensor};

/// Default model name in the repository.
pub const MODEL: &str = "silero_vad";
/// Samples per model call at 16 kHz.
pub const WINDOW: usize = 512;
/// Samples of the previous window prepended to each call.
pub const CONTEXT: usize = 64;
const SR: f32 = 16_000.0;

/// A stretch of speech, in seconds from the start of the audio.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// Start time (s).
    pub start_s: f32,
    /// End time (s).
    pub end_s: f32,
}

/// Segmenting thresholds; the defaults are silero-vad's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadParams {
    /// Probability at or above which a window is speech.
    pub threshold: f32,
    /// Probability below which speech ends (default: threshold - 0.15).
    pub neg_threshold: Option<f32>,
    /// Shorter speech is dropped.
    pub min_speech_ms: u32,
    /// Silence shorter than this does not end speech.
    pub min_silence_ms: u32,
    /// Padding added on each side of a segment.
    pub speech_pad_ms: u32,
}

impl Default for VadParams {
    fn default() -> Self {
        VadParams {
            threshold: 0.5,
            neg_threshold: None,
            min_speech_ms: 250,
            min_silence_ms: 100,
            speech_pad_ms: 30,
        }
    }
}

/// Speech probability of each 512-sample window (the last one zero-padded).
///
/// Frames go through the model in batches of the manifest's pinned
/// `sequence_length`, carrying the LSTM state between batches.
pub fn probabilities(
    engine: &Engine,
    model: &str,
    pcm_f32_16k: &[f32],
) -> Result<Vec<f32>, InferenceError> {
    let loaded = engine.load(model)?;
    let bad = |what: String| InferenceError::Run {
        model: model.to_string(),
        detail: what,
    };
    let batch = match loaded.input_shapes().first().map(Vec::as_slice) {
        Some([n, w]) if *w == CONTEXT + WINDOW && *n > 0 => *n,
        other => {
            return Err(bad(format!(
                "input 0 has shape {other:?}, expected [n, {}]",
                CONTEXT + WINDOW
            )))
        }
    };
    let windows = pcm_f32_16k.len().div_ceil(WINDOW);
    // frame i = last CONTEXT samples before window i (zeros at the start) + window i.
    let sample = |i: isize| {
        if i >= 0 {
            pcm_f32_16k.get(i as usize).copied().unwrap_or(0.0)
        } else {
            0.0
        }
    };
    let (mut h, mut c) = (vec![0f32; 128], vec![0f32; 128]);
    let mut probs = Vec::with_capacity(windows);
    let mut frames = vec![0f32; batch * (CONTEXT + WINDOW)];
    for first in (0..windows).step_by(batch) {
        for (k, frame) in frames.chunks_mut(CONTEXT + WINDOW).enumerate() {
            let start = ((first + k) * WINDOW) as isize - CONTEXT as isize;
            for (j, v) in frame.iter_mut().enumerate() {
                *v = sample(start + j as isize);
            }
        }
        let out = loaded.run(vec![
            NamedTensor::f32("input", vec![batch, CONTEXT + WINDOW], frames.clone()),
            NamedTensor::f32("h", vec![1, 1, 128], h),
            NamedTensor::f32("c", vec![1, 1, 128], c),
        ])?;
        let get = |i: usize, len: usize| {
            out.get(i)
                .and_then(|t| t.as_f32())
                .filter(|v| v.len() == len)
                .map(<[f32]>::to_vec)
        };
        let p = get(0, batch).ok_or_else(|| bad(format!("output 0 is not {batch} f32")))?;
        h = get(1, 128).ok_or_else(|| bad("output `hn` is not 1x1x128 f32".into()))?;
        c = get(2, 128).ok_or_else(|| bad("output `cn` is not 1x1x128 f32".into()))?;
        probs.extend_from_slice(&p[..batch.min(windows - first)]);
    }
    Ok(probs)
}

/// Speech segments of 16 kHz mono audio, with the default model and thresholds.
pub fn segments(engine: &Engine, pcm_f32_16k: &[f32]) -> Result<Vec<Segment>, InferenceError> {
    segments_with(engine, MODEL, pcm_f32_16k, &VadParams::default())
}

/// Speech segments with a chosen model and thresholds.
pub fn segments_with(
    engine: &Engine,
    model: &str,
    pcm_f32_16k: &[f32],
    params: &VadParams,
) -> Result<Vec<Segment>, InferenceError> {
    let probs = probabilities(engine, model, pcm_f32_16k)?;
    Ok(segments_from_probs(&probs, pcm_f32_16k.len(), params))
}

/// Turns per-window probabilities into segments (pure; no model involved).
pub fn segments_from_probs(probs: &[f32], audio_len: usize, p: &VadParams) -> Vec<Segment> {
    let neg = p.neg_threshold.unwrap_or((p.threshold - 0.15).max(0.01));
    let ms = |v: u32| SR as usize * v as usize / 1000;
    let (min_speech, min_silence, pad) = (
        ms(p.min_speech_ms),
        ms(p.min_silence_ms),
        ms(p.speech_pad_ms),
    );
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut start: Option<usize> = None;
    let mut temp_end = 0usize;
    for (i, &prob) in probs.iter().enumerate() {
        let cur = WINDOW * i;
        if prob >= p.threshold && temp_end != 0 {
            temp_end = 0;
        }
        if prob >= p.threshold && start.is_none() {
            start = Some(cur);
            continue;
        }
        if let (true, Some(s)) = (prob < neg, start) {
            if temp_end == 0 {
                temp_end = cur;
            }
            if cur - temp_end < min_silence {
                continue;
            }
            if temp_end - s > min_speech {
                spans.push((s, temp_end));
            }
            start = None;
            temp_end = 0;
        }
    }
    if let Some(s) = start {
        if audio_len.saturating_sub(s) > min_speech {
            spans.push((s, audio_len));
        }
    }
    // Pad, splitting the gap when neighbours are closer than two pads.
    let n = spans.len();
    for i in 0..n {
        if i == 0 {
            spans[i].0 = spans[i].0.saturating_sub(pad);
        }
        if i + 1 < n {
            let gap = spans[i + 1].0 - spans[i].1;
            if gap < 2 * pad {
                spans[i].1 += gap / 2;
                spans[i + 1].0 = spans[i + 1].0.saturating_sub(gap / 2);
            } else {
                spans[i].1 = (spans[i].1 + pad).min(audio_len);
                spans[i + 1].0 = spans[i + 1].0.saturating_sub(pad);
            }
        } else {
            spans[i].1 = (spans[i].1 + pad).min(audio_len);
        }
    }
    spans
        .into_iter()
        .map(|(s, e)| Segment {
            start_s: s as f32 / SR,
            end_s: e as f32 / SR,
        })
        .collect()
}
