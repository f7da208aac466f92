//! Decode speed of the embedded backend against a plain llama-cpp-2 loop on
//! the same model, prompt and threads:
//! `cargo bench --features llm --bench llm [-- MODEL [THREADS [TOKENS]]]`
//! (default qwen2.5-coder-0.5b-instruct, 1 thread, 64 tokens; fetch the
//! model first with `openclaw-admin models fetch`).

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use openclaw::llm::embedded::{Embedded, ModelConfig};
use openclaw::llm::manifest::LlmRepo;
use openclaw::llm::{Backend, ChatMessage, ChatRequest};
use tokio_util::sync::CancellationToken;

const USER: &str = "Write a long story about a lighthouse keeper.";

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let name = args
        .first()
        .cloned()
        .unwrap_or_else(|| "qwen2.5-coder-0.5b-instruct".into());
    let threads: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let tokens: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llm");
    let repo = LlmRepo::open(&dir).unwrap();
    let m = repo.get(&name).unwrap().clone();
    let path = repo.model_path(&m);
    assert!(
        path.exists(),
        "{} missing: run `openclaw-admin models fetch {name}`",
        path.display()
    );
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));

    // A plain loop: one sequence, greedy, the same chat prompt.
    {
        let backend = LlamaBackend::init().unwrap();
        let t = Instant::now();
        let model =
            LlamaModel::load_from_file(&backend, &path, &LlamaModelParams::default()).unwrap();
        let load = t.elapsed();
        let tmpl = model.chat_template(None).unwrap_or_else(|_| {
            LlamaChatTemplate::new(m.chat_template.as_deref().unwrap_or("chatml")).unwrap()
        });
        let prompt = model
            .apply_chat_template(
                &tmpl,
                &[LlamaChatMessage::new("user".into(), USER.into()).unwrap()],
                true,
            )
            .unwrap();
        let toks = model.vocab().tokenize(prompt.as_bytes(), true, true);
        let mut ctx = model
            .new_context(
                &backend,
                LlamaContextParams::default()
                    .with_n_ctx(NonZeroU32::new(2048))
                    .with_n_threads(threads as i32)
                    .with_n_threads_batch(threads as i32),
            )
            .unwrap();
        let mut batch = LlamaBatch::new(512, 1);
        batch.add_sequence(&toks, 0, false).unwrap();
        let t = Instant::now();
        ctx.decode(&mut batch).unwrap();
        let mut sampler = LlamaSampler::greedy();
        let mut tok = sampler.sample(&ctx, batch.n_tokens() - 1);
        let first = t.elapsed();
        let mut pos = toks.len() as i32;
        let t = Instant::now();
        let mut n = 0;
        while n < tokens && !model.vocab().is_eog(tok) {
            batch.clear();
            batch.add(tok, pos, &[0], true).unwrap();
            pos += 1;
            ctx.decode(&mut batch).unwrap();
            tok = sampler.sample(&ctx, 0);
            n += 1;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "direct llama-cpp-2: load {:.2} s (no sha256), prompt {} tokens -> first token {:.0} ms, decode {n} tokens {:.1} tokens/s ({threads} thread(s))",
            load.as_secs_f64(),
            toks.len(),
            first.as_secs_f64() * 1e3,
            f64::from(n) / secs
        );
    }

    // Ours: one request through the engine thread.
    let mut c = ModelConfig::new(&name);
    c.context = 2048;
    c.slots = 1;
    c.threads = Some(threads);
    let e = Embedded::with_repo(repo, vec![c], 8 << 30).unwrap();
    let load = e.preload(&name).unwrap();
    let req = ChatRequest {
        model: name.clone(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: USER.into(),
            name: None,
        }],
        max_tokens: Some(tokens + 1),
        temperature: Some(0.0),
        top_p: None,
        top_k: None,
        seed: None,
        stop: Vec::new(),
        response_format: None,
    };
    let t = Instant::now();
    let mut first = None;
    let out = e
        .chat(
            &req,
            &mut |_| {
                if first.is_none() {
                    first = Some(t.elapsed());
                }
            },
            &CancellationToken::new(),
        )
        .unwrap();
    let total = t.elapsed();
    let first = first.unwrap_or(total);
    let n = out.completion_tokens.saturating_sub(1);
    println!(
        "embedded backend:   load {:.2} s (sha256 included), prompt {} tokens -> first piece {:.0} ms, decode {n} tokens {:.1} tokens/s ({threads} thread(s))",
        load.as_secs_f64(),
        out.prompt_tokens,
        first.as_secs_f64() * 1e3,
        f64::from(n) / (total - first).as_secs_f64()
    );
}
