//! The product's scenarios end to end (docs/scenarios.md), on real
//! processes and real models: a server with its embedded broker, an edge
//! agent `pi-1` holding the documents and incident files (plugins `ocr`
//! with PP-OCRv4, `validate`, `file`, `exec`), and a heavy node serving
//! Qwen2.5-Coder-0.5B-Instruct (`llm`). The examples' workflow files are run
//! as they are shipped; the figures (accuracy, time) are printed for
//! BENCHMARKS.md.
//!
//! What is asserted is what the pipeline guarantees, not what a 0.5B model
//! manages: every run ends, every extraction is JSON in the schema, OCR reads
//! the tables (deterministic models on fixed images), the rules on the true
//! items find exactly the planted anomalies, a fix runs only after its
//! approval. The model's accuracy is measured and reported, with only a floor
//! that catches a broken pipeline (answers that are no longer about the
//! document).
//!
//! `cargo test --all-features --test scenarios -- --nocapture --test-threads=1`

mod common;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// `python3` (the venv's in scripts/test.sh: Pillow, pinned).
fn python(args: &[&str]) -> std::process::Output {
    let out = Command::new("python3")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python3 {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn same_files(a: &Path, b: &Path) {
    let names = |d: &Path| -> BTreeSet<String> {
        walk(d)
            .into_iter()
            .map(|p| p.strip_prefix(d).unwrap().display().to_string())
            .collect()
    };
    assert_eq!(names(a), names(b), "{} vs {}", a.display(), b.display());
    for n in names(a) {
        assert!(
            std::fs::read(a.join(&n)).unwrap() == std::fs::read(b.join(&n)).unwrap(),
            "{n} differs from what the script makes"
        );
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The committed fixtures are what the scripts make, byte for byte, and
/// the reference rule checker reproduces the planted anomalies.
#[test]
fn the_fixture_scripts_make_the_committed_files() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("bom/docs");
    let truth = dir.path().join("bom/truth.json");
    python(&[
        "scripts/examples/make_bom_docs.py",
        docs.to_str().unwrap(),
        "--truth",
        truth.to_str().unwrap(),
    ]);
    same_files(&repo().join("examples/bom/docs"), &docs);
    assert_eq!(
        read_json(&truth),
        read_json(&repo().join("examples/bom/truth.json"))
    );
    let ops = dir.path().join("ops");
    python(&["scripts/examples/make_incidents.py", ops.to_str().unwrap()]);
    same_files(
        &repo().join("examples/ops/incidents"),
        &ops.join("incidents"),
    );
    python(&["scripts/examples/bom_rules.py"]);
}

#[cfg(feature = "llm")]
#[path = "support/llama_server.rs"]
mod llama_server;

#[cfg(feature = "llm")]
mod with_a_model {
    use super::llama_server;
    use super::*;
    use common::{Agent, Server};
    use serde_json::{json, Map};
    use std::time::{Duration, Instant};

    /// One test of this file at a time: each runs llama.cpp, whose threads
    /// spin-wait (two at once on 2 cores fall from ~30 to ~1 token/s).
    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        ONE.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fleet: the server, `pi-1` with the documents and incidents, and
    /// `heavy-1` serving the model with two slots.
    struct Fleet {
        server: Server,
        _pi: Agent,
        _heavy: Agent,
        dir: tempfile::TempDir,
    }

    fn fleet() -> Fleet {
        // Two threads: this file's tests run one at a time, and the OCR on
        // pi-1 is mostly done before the model steps start.
        fleet_with(&common::qwen_node_config(2048, 2).replace("threads = 1", "threads = 2"))
    }

    /// The fleet with this `llm` config on the heavy node.
    fn fleet_with(heavy_config: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("srv"), &[]);
        let heavy = Agent::start_on(dir.path(), "heavy-1", &server.broker(), heavy_config, "pc");
        let fixes = dir.path().join("fixes.log");
        let pi_config = format!(
            "[plugins.ocr]\nmodels_dir = {models:?}\nimage_root = {docs:?}\n\
             [plugins.validate]\n\
             [plugins.file]\nroot = {ops:?}\n\
             [plugins.exec]\n\
             [plugins.exec.commands.apply_fix]\nprogram = \"/bin/sh\"\n\
             args = [\"-c\", \"cat >> {fixes}\"]\n",
            models = repo().join("models").display().to_string(),
            docs = repo().join("examples/bom/docs").display().to_string(),
            ops = repo().join("examples/ops").display().to_string(),
            fixes = fixes.display(),
        );
        let pi = Agent::start(dir.path(), "pi-1", &server.broker(), &pi_config);
        server.wait_online("pi-1");
        server.wait_devices("the heavy node serving the model", |d| {
            d.iter().any(|d| {
                d.online
                    && d.capabilities
                        .iter()
                        .any(|c| c == &format!("llm:{}", common::QWEN))
            })
        });
        Fleet {
            server,
            _pi: pi,
            _heavy: heavy,
            dir,
        }
    }

    fn run(server: &Server, file: &str, inputs: Value) -> String {
        let toml = std::fs::read_to_string(repo().join(file)).unwrap();
        let inputs: Map<String, Value> = inputs.as_object().cloned().unwrap();
        server.client.workflow_start(&toml, &inputs).unwrap()
    }

    fn step<'a>(v: &'a Value, id: &str) -> &'a Value {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no step {id}: {v:#}"))
    }

    /// Seconds a step's task ran on its device.
    fn task_secs(server: &Server, v: &Value, id: &str) -> f64 {
        let t = server
            .client
            .task(step(v, id)["task_id"].as_str().unwrap(), None)
            .unwrap();
        (t.finished_ms
            .unwrap_or(0)
            .saturating_sub(t.started_ms.unwrap_or(0))) as f64
            / 1e3
    }

    fn same_text(a: &Value, b: &Value) -> bool {
        let norm = |v: &Value| match v {
            Value::Null => String::new(),
            Value::String(s) => s.split_whitespace().collect::<Vec<_>>().join(" "),
            other => other.to_string(),
        };
        norm(a) == norm(b)
    }

    fn same_number(a: &Value, b: &Value) -> bool {
        let num = |v: &Value| match v {
            Value::String(s) => s.trim().parse::<f64>().ok(),
            v => v.as_f64(),
        };
        matches!((num(a), num(b)), (Some(x), Some(y)) if (x - y).abs() < 1e-9)
    }

    const FIELDS: [&str; 6] = [
        "part_number",
        "description",
        "quantity",
        "unit",
        "material",
        "dimensions",
    ];

    fn issue_keys(list: &Value) -> BTreeSet<(i64, String, String)> {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["row"].as_i64().unwrap_or(0),
                    a["field"].as_str().unwrap_or("").to_string(),
                    a["kind"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Runs examples/bom/bom.toml on `docs` (truth.json's documents), all
    /// submitted at once; prints the figures, returns (OCR cell accuracy,
    /// extracted field accuracy).
    fn run_bom(f: &Fleet, docs: &[Value], label: &str) -> (f64, f64) {
        let started = Instant::now();
        let ids: Vec<String> = docs
            .iter()
            .map(|d| {
                let image = d["file"].as_str().unwrap().trim_start_matches("docs/");
                run(
                    &f.server,
                    "examples/bom/bom.toml",
                    json!({"device": "pi-1", "image": image}),
                )
            })
            .collect();
        let (mut cells, mut cells_ok) = (0usize, 0usize);
        let (mut fields, mut fields_ok) = (0usize, 0usize);
        let (mut tp, mut fp, mut fns) = (0usize, 0usize, 0usize);
        let (mut ocr_s, mut llm_s, mut check_s) = (0f64, 0f64, 0f64);
        let mut rows = Vec::new();
        for (d, id) in docs.iter().zip(&ids) {
            let v = f.server.workflow_end(id, Duration::from_secs(1800));
            assert_eq!(v["state"], "succeeded", "{v:#}");
            let items = d["items"].as_array().unwrap();
            // OCR: each true cell against the table cell in its row and column.
            let table = &step(&v, "read")["output"]["table"];
            let header: Vec<&str> = table["header"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap())
                .collect();
            assert_eq!(
                header,
                [
                    "Part No",
                    "Description",
                    "Qty",
                    "Unit",
                    "Material",
                    "Dimensions"
                ],
                "{}",
                d["file"]
            );
            let (mut c, mut c_ok) = (0, 0);
            for (i, item) in items.iter().enumerate() {
                for (col, field) in FIELDS.iter().enumerate() {
                    let want = &item[*field];
                    let got = &table["rows"][i][col];
                    c += 1;
                    let ok = if *field == "quantity" {
                        same_number(want, got)
                    } else {
                        same_text(want, if got.is_null() { &Value::Null } else { got })
                    };
                    c_ok += ok as usize;
                }
            }
            // Extraction: each true field against the model's item.
            let got = &v["output"]["items"];
            let (mut fl, mut fl_ok) = (0, 0);
            for (i, item) in items.iter().enumerate() {
                for field in FIELDS {
                    fl += 1;
                    let g = &got[i][field];
                    let ok = if field == "quantity" {
                        same_number(&item[field], g)
                    } else {
                        same_text(&item[field], g)
                    };
                    fl_ok += ok as usize;
                }
            }
            // Rule checks on what the model extracted, against the planted anomalies.
            let want = issue_keys(&d["anomalies"]);
            let found = issue_keys(&v["output"]["issues"]);
            tp += want.intersection(&found).count();
            fp += found.difference(&want).count();
            fns += want.difference(&found).count();
            // OCR's own compute (the plugin's det_ms + rec_ms); the model
            // step's task time includes its wait for a slot (all documents
            // are submitted at once), so the wall time per document is the
            // figure that counts.
            let out = &step(&v, "read")["output"];
            let o = (out["det_ms"].as_f64().unwrap_or(0.0) + out["rec_ms"].as_f64().unwrap_or(0.0))
                / 1e3;
            let (l, k) = (
                task_secs(&f.server, &v, "extract"),
                task_secs(&f.server, &v, "check"),
            );
            ocr_s += o;
            llm_s += l;
            check_s += k;
            rows.push(format!(
                "{:<16} cells {c_ok:>2}/{c:<2} fields {fl_ok:>2}/{fl:<2} anomalies want {} found {}  ocr {o:.1} s, model task {l:.1} s",
                d["file"].as_str().unwrap(),
                want.len(),
                found.len()
            ));
            cells += c;
            cells_ok += c_ok;
            fields += fl;
            fields_ok += fl_ok;
        }
        let wall = started.elapsed().as_secs_f64();
        let n = docs.len() as f64;
        for r in &rows {
            eprintln!("{r}");
        }
        let ocr_acc = cells_ok as f64 / cells as f64;
        let field_acc = fields_ok as f64 / fields as f64;
        eprintln!(
            "BOM scenario ({label}): {} documents; OCR cells {cells_ok}/{cells} = {:.1}%; \
             extracted fields {fields_ok}/{fields} = {:.1}%; anomalies: {tp} found, {fp} false, {fns} missed \
             (precision {:.2}, recall {:.2}); per document: OCR compute {:.2} s, model task {:.1} s \
             (with its wait for a slot), checks {:.3} s; wall {wall:.0} s ({:.1} s a document)",
            docs.len(),
            100.0 * ocr_acc,
            100.0 * field_acc,
            tp as f64 / (tp + fp).max(1) as f64,
            tp as f64 / (tp + fns).max(1) as f64,
            ocr_s / n,
            llm_s / n,
            check_s / n,
            wall / n,
        );
        (ocr_acc, field_acc)
    }

    /// Documents to bills of materials: all 24 documents through
    /// examples/bom/bom.toml on the embedded model.
    #[test]
    fn documents_become_checked_bills_of_materials() {
        let _one = one_at_a_time();
        let f = fleet();
        let truth = read_json(&repo().join("examples/bom/truth.json"));
        let docs = truth["documents"].as_array().unwrap();
        let (ocr_acc, field_acc) = run_bom(&f, docs, "embedded llama.cpp, 2 slots");
        assert!(
            ocr_acc >= 0.95,
            "OCR read {:.1}% of the cells",
            100.0 * ocr_acc
        );
        // A floor, not a target: below it the answers are not about the documents.
        assert!(field_acc >= 0.5, "extraction {:.1}%", 100.0 * field_acc);
    }

    /// The example's rules, run by the `validate` plugin on the true items
    /// of every document, give exactly the planted anomalies with their
    /// corrections.
    #[test]
    fn the_rules_find_exactly_the_planted_anomalies() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("srv"), &[]);
        let _pi = Agent::start(dir.path(), "pi-1", &server.broker(), "[plugins.validate]\n");
        server.wait_online("pi-1");
        let wf: toml::Table =
            toml::from_str(&std::fs::read_to_string(repo().join("examples/bom/bom.toml")).unwrap())
                .unwrap();
        let wf = serde_json::to_value(wf).unwrap();
        let check = wf["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == "check")
            .unwrap();
        let rules = check["input"]["rules"].clone();
        let truth = read_json(&repo().join("examples/bom/truth.json"));
        let mut planted = 0;
        for d in truth["documents"].as_array().unwrap() {
            let id = server.submit(common::task(
                "validate",
                json!({"records": d["items"], "rules": rules}),
            ));
            let t = server.wait(&id);
            assert!(common::succeeded(&t), "{t:?}");
            let out = t.result.unwrap();
            let key = |a: &Value| {
                (
                    a["row"].as_i64().unwrap(),
                    a["field"].as_str().unwrap().to_string(),
                    a["kind"].as_str().unwrap().to_string(),
                    a["suggestion"].to_string(),
                )
            };
            let want: BTreeSet<_> = d["anomalies"].as_array().unwrap().iter().map(key).collect();
            let got: BTreeSet<_> = out["issues"].as_array().unwrap().iter().map(key).collect();
            assert_eq!(got, want, "{}: {out:#}", d["file"]);
            planted += want.len();
        }
        assert_eq!(planted, 11);
    }

    /// Runs examples/ops/classify.toml on `incidents` (labels.json's), all
    /// submitted at once; prints the figures, returns the accuracy.
    fn run_classify(f: &Fleet, incidents: &[Value], label: &str) -> f64 {
        let labels = read_json(&repo().join("examples/ops/labels.json"));
        let cats: Vec<&str> = labels["categories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let started = Instant::now();
        let ids: Vec<String> = incidents
            .iter()
            .map(|i| {
                run(
                    &f.server,
                    "examples/ops/classify.toml",
                    json!({"device": "pi-1", "incident": i["id"]}),
                )
            })
            .collect();
        let mut right = 0;
        let mut model_s = 0f64;
        let mut confusions = Vec::new();
        for (inc, id) in incidents.iter().zip(&ids) {
            let v = f.server.workflow_end(id, Duration::from_secs(1800));
            assert_eq!(v["state"], "succeeded", "{v:#}");
            let got = v["output"]["category"].as_str().unwrap().to_string();
            assert!(cats.contains(&got.as_str()), "{got} is not a category");
            let want = inc["category"].as_str().unwrap();
            if got == want {
                right += 1;
            } else {
                confusions.push(format!("{}: {want} read as {got}", inc["id"]));
            }
            model_s += task_secs(&f.server, &v, "evidence") + task_secs(&f.server, &v, "classify");
        }
        let n = incidents.len();
        eprintln!(
            "ops scenario ({label}): {right}/{n} incidents classified right ({:.1}%; chance {:.1}%); \
             model tasks {:.1} s an incident (with their waits for a slot); wall {:.0} s ({:.1} s an incident); wrong: {}",
            100.0 * right as f64 / n as f64,
            100.0 / cats.len() as f64,
            model_s / n as f64,
            started.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64() / n as f64,
            confusions.join("; ")
        );
        right as f64 / n as f64
    }

    /// The operations assistant's classification: all 24 incidents through
    /// examples/ops/classify.toml, the category held to the fixed set.
    #[test]
    fn incidents_are_classified_into_the_fixed_categories() {
        let _one = one_at_a_time();
        let f = fleet();
        let labels = read_json(&repo().join("examples/ops/labels.json"));
        let incidents = labels["incidents"].as_array().unwrap();
        let acc = run_classify(&f, incidents, "embedded llama.cpp, 2 slots");
        // A floor at twice chance (8 categories), not a target.
        assert!(acc >= 0.25, "{:.1}% classified right", 100.0 * acc);
    }

    /// The same example files against an upstream pool: the heavy node's
    /// `llm` config serves the model name from llama-cpp-python's
    /// OpenAI-compatible server (a real peer, its own llama.cpp build);
    /// nothing in the workflows changes.
    #[test]
    fn the_same_examples_run_against_an_upstream_pool() {
        let _one = one_at_a_time();
        if llama_server::peer_skipped("the_same_examples_run_against_an_upstream_pool") {
            return;
        }
        let up = llama_server::Server::start();
        // max_concurrent 1: this server interrupts a stream when another
        // request arrives; 0.2.62 spells a schema as `json_object` + `schema`.
        let cfg = format!(
            "[plugins.llm.models.\"{}\"]\nbackend = \"openai\"\nupstream_model = \"qwen\"\n\
             schema_format = \"json_object\"\nhealth_interval_ms = 0\nqueue_timeout_ms = 1800000\n\
             upstreams = [{{ url = \"{}\", max_concurrent = 1, timeout_ms = 600000, read_timeout_ms = 600000 }}]\n",
            common::QWEN,
            up.url()
        );
        let f = fleet_with(&cfg);
        let truth = read_json(&repo().join("examples/bom/truth.json"));
        let docs = &truth["documents"].as_array().unwrap()[..2];
        let (ocr_acc, field_acc) = run_bom(&f, docs, "upstream pool: llama-cpp-python 0.2.62");
        assert!(ocr_acc >= 0.95, "{ocr_acc}");
        assert!(field_acc > 0.0, "{field_acc}");
        let labels = read_json(&repo().join("examples/ops/labels.json"));
        let some = &labels["incidents"].as_array().unwrap()[..4];
        run_classify(&f, some, "upstream pool: llama-cpp-python 0.2.62");
    }

    /// The whole triage: a report and a fix script from the model, the fix
    /// run on the device only once approved; a second run, denied after a
    /// server restart, runs nothing.
    #[test]
    fn a_proposed_fix_runs_on_the_device_only_after_approval() {
        let _one = one_at_a_time();
        let mut f = fleet();
        let fixes = f.dir.path().join("fixes.log");
        let id = run(
            &f.server,
            "examples/ops/triage.toml",
            json!({"device": "pi-1", "incident": "02"}),
        );
        let v = f.server.workflow_until(
            &id,
            "the fix awaiting approval",
            Duration::from_secs(1800),
            |v| step(v, "fix")["state"] == "awaiting_approval" || v["state"] != "running",
        );
        assert_eq!(step(&v, "fix")["state"], "awaiting_approval", "{v:#}");
        let script = step(&v, "report")["output"]["fix_script"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            step(&v, "fix")["proposed"]["input"]["stdin"],
            script.as_str()
        );
        assert!(step(&v, "fix")["task_id"].is_null());
        assert!(!fixes.exists(), "nothing ran before the approval");
        eprintln!(
            "triage of incident 02: {} / {}\nreport: {}\nfix:\n{script}",
            step(&v, "classify")["output"]["category"],
            step(&v, "report")["output"]["root_cause"],
            step(&v, "report")["output"]["report"]
        );
        f.server
            .client
            .workflow_decide(&id, Some("fix"), true)
            .unwrap();
        let v = f.server.workflow_end(&id, Duration::from_secs(120));
        assert_eq!(v["state"], "succeeded", "{v:#}");
        let t = f
            .server
            .client
            .task(step(&v, "fix")["task_id"].as_str().unwrap(), None)
            .unwrap();
        assert_eq!(t.device.as_deref(), Some("pi-1"));
        let applied = std::fs::read_to_string(&fixes).unwrap();
        assert_eq!(applied.trim_end(), script.trim_end());

        let id = run(
            &f.server,
            "examples/ops/triage.toml",
            json!({"device": "pi-1", "incident": "05"}),
        );
        f.server.workflow_until(
            &id,
            "the second fix awaiting approval",
            Duration::from_secs(1800),
            |v| step(v, "fix")["state"] == "awaiting_approval" || v["state"] != "running",
        );
        f.server.restart();
        f.server.wait_online("pi-1");
        let v = f.server.workflow_until(
            &id,
            "still awaiting after the restart",
            Duration::from_secs(60),
            |v| step(v, "fix")["state"] == "awaiting_approval",
        );
        assert!(step(&v, "fix")["task_id"].is_null());
        f.server.client.workflow_decide(&id, None, false).unwrap();
        let v = f.server.workflow_end(&id, Duration::from_secs(60));
        assert_eq!(v["state"], "failed", "{v:#}");
        assert!(v["error"].as_str().unwrap().contains("denied"), "{v:#}");
        assert_eq!(
            std::fs::read_to_string(&fixes).unwrap(),
            applied,
            "the denied fix never ran"
        );
    }
}
