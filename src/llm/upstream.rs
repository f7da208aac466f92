//! The `openai` backend: a pool of OpenAI-compatible upstreams (being written).
