//! A tiny WAV reader: mono 16 kHz, PCM16 or IEEE f32. Anything else is refused
//! with a message saying what the file is.

use std::path::Path;

/// Sample rate the VAD model expects.
pub const SAMPLE_RATE: u32 = 16_000;

/// Why a WAV file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WavError {
    /// The file could not be read.
    #[error("wav {path}: {message}")]
    Io {
        /// File path.
        path: String,
        /// OS error text.
        message: String,
    },
    /// Not a RIFF/WAVE file or truncated.
    #[error("wav: not a valid WAVE file: {0}")]
    Malformed(String),
    /// A valid WAVE file in a format this reader does not take.
    #[error("wav: unsupported format: {0} (need mono 16000 Hz, 16-bit PCM or 32-bit float)")]
    Unsupported(String),
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Reads a WAV file into f32 samples in [-1, 1].
pub fn read_wav(path: impl AsRef<Path>) -> Result<Vec<f32>, WavError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| WavError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse_wav(&bytes)
}

/// Decodes WAV bytes into f32 samples in [-1, 1].
pub fn parse_wav(bytes: &[u8]) -> Result<Vec<f32>, WavError> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(WavError::Malformed("missing RIFF/WAVE header".into()));
    }
    let mut pos = 12;
    let mut fmt: Option<(u16, u16, u32, u16)> = None;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let len = u32_at(bytes, pos + 4) as usize;
        let body = pos + 8;
        let end = body.checked_add(len).filter(|e| *e <= bytes.len());
        match id {
            b"fmt " => {
                let end = end.ok_or_else(|| WavError::Malformed("truncated fmt chunk".into()))?;
                if len < 16 {
                    return Err(WavError::Malformed(format!("fmt chunk of {len} bytes")));
                }
                let mut format = u16_at(bytes, body);
                // WAVE_FORMAT_EXTENSIBLE: the real format is the sub-format GUID's first two bytes.
                if format == 0xFFFE && end - body >= 26 {
                    format = u16_at(bytes, body + 24);
                }
                fmt = Some((
                    format,
                    u16_at(bytes, body + 2),
                    u32_at(bytes, body + 4),
                    u16_at(bytes, body + 14),
                ));
            }
            b"data" => {
                let (format, channels, rate, bits) =
                    fmt.ok_or_else(|| WavError::Malformed("data chunk before fmt chunk".into()))?;
                // Some writers leave the data length at 0 or too large when streaming: take what is there.
                let end = end.unwrap_or(bytes.len());
                let data = &bytes[body..end];
                if channels != 1 {
                    return Err(WavError::Unsupported(format!("{channels} channels")));
                }
                if rate != SAMPLE_RATE {
                    return Err(WavError::Unsupported(format!("{rate} Hz")));
                }
                return match (format, bits) {
                    (1, 16) => Ok(data
                        .chunks_exact(2)
                        .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32 / 32768.0)
                        .collect()),
                    (3, 32) => Ok(data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()),
                    (1, b) => Err(WavError::Unsupported(format!("{b}-bit integer PCM"))),
                    (3, b) => Err(WavError::Unsupported(format!("{b}-bit float"))),
                    (f, _) => Err(WavError::Unsupported(format!(
                        "format tag {f:#06x} (compressed?)"
                    ))),
                };
            }
            _ => {}
        }
        // Chunks are padded to even sizes.
        pos = body.saturating_add(len).saturating_add(len & 1);
    }
    Err(WavError::Malformed("no data chunk".into()))
}

/// Encodes mono 16 kHz PCM16 WAV bytes (for tests and tools).
pub fn encode_pcm16(samples: &[f32]) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + samples.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    out.extend_from_slice(&(SAMPLE_RATE * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        let v = (s.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}
