//! Reading model outputs: class labels and CTC text.

use super::{InferenceError, LoadedModel, NamedTensor};

/// The labels of a model: the manifest's `labels`, or the metadata entry named by
/// `labels_metadata_key`. For CTC models the list is completed as PP-OCR does:
/// `blank` first and a space last.
pub fn labels(model: &LoadedModel) -> Result<Vec<String>, InferenceError> {
    let m = model.manifest();
    let pp = &m.postprocess;
    if let Some(key) = &pp.labels_metadata_key {
        let text = model.metadata(key).ok_or_else(|| InferenceError::Load {
            model: m.name.clone(),
            detail: format!("metadata key `{key}` (labels) is absent"),
        })?;
        let mut v = vec!["blank".to_string()];
        v.extend(text.lines().map(str::to_string));
        v.push(" ".to_string());
        return Ok(v);
    }
    Ok(pp.labels.clone())
}

/// Index and value of the largest element of each row of the last axis.
pub fn argmax_rows(t: &NamedTensor) -> Vec<(usize, f32)> {
    argmax_rows_in(t, None)
}

/// [`argmax_rows`] among the columns `allowed` marks (and column 0, the
/// CTC blank, always); all columns without a mask.
fn argmax_rows_in(t: &NamedTensor, allowed: Option<&[bool]>) -> Vec<(usize, f32)> {
    let values = t.to_f32_vec();
    let width = t.shape.last().copied().unwrap_or(0).max(1);
    let ok = |i: usize| allowed.is_none_or(|m| i == 0 || m.get(i).copied().unwrap_or(false));
    values
        .chunks(width)
        .map(|row| {
            row.iter().enumerate().filter(|(i, _)| ok(*i)).fold(
                (0, f32::NEG_INFINITY),
                |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                },
            )
        })
        .collect()
}

/// Best label and its probability for each batch row of a classifier output.
pub fn top_labels(t: &NamedTensor, labels: &[String]) -> Vec<(String, f32)> {
    argmax_rows(t)
        .into_iter()
        .map(|(i, p)| (labels.get(i).cloned().unwrap_or_else(|| format!("#{i}")), p))
        .collect()
}

/// Greedy CTC decoding of a `[1, steps, classes]` probability tensor: best class
/// per step, repeats merged, blanks (class 0) dropped. Returns the text and the
/// mean probability of the kept steps.
pub fn ctc_greedy(t: &NamedTensor, dictionary: &[String]) -> (String, f32) {
    ctc_greedy_in(t, dictionary, None)
}

/// [`ctc_greedy`] choosing, at each step, only among the classes `allowed`
/// marks (the blank always): a document known to be in Latin script is
/// read without the Chinese dictionary's look-alikes (`×` for `x`).
pub fn ctc_greedy_in(
    t: &NamedTensor,
    dictionary: &[String],
    allowed: Option<&[bool]>,
) -> (String, f32) {
    let rows = argmax_rows_in(t, allowed);
    let mut text = String::new();
    let (mut sum, mut kept) = (0f32, 0usize);
    let mut prev = usize::MAX;
    for (i, p) in rows {
        if i != prev && i != 0 {
            text.push_str(dictionary.get(i).map(String::as_str).unwrap_or("\u{fffd}"));
            sum += p;
            kept += 1;
        }
        prev = i;
    }
    (text, if kept == 0 { 0.0 } else { sum / kept as f32 })
}

/// Normalizes an 8-bit grayscale image (row-major `height x width`) the way
/// PP-OCR does, `(v / 255 - 0.5) / 0.5`, replicated to 3 channels: `[1, 3, h, w]` data.
pub fn gray_to_nchw(pixels: &[u8], height: usize, width: usize) -> Vec<f32> {
    assert_eq!(pixels.len(), height * width, "gray image size");
    let plane: Vec<f32> = pixels
        .iter()
        .map(|&v| ((v as f64 / 255.0 - 0.5) / 0.5) as f32)
        .collect();
    let mut out = Vec::with_capacity(3 * plane.len());
    for _ in 0..3 {
        out.extend_from_slice(&plane);
    }
    out
}
