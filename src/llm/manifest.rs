//! GGUF model manifests in `models/llm/` (being written).
