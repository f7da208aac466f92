//! The `embedded` backend: llama.cpp through `llama-cpp-2` (being written).
