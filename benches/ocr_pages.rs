//! Page OCR (`inference::ocr`, the `ocr` plugin's pipeline) on whole pages:
//! per page the detection and recognition time, and with `--truth` the
//! share of the true table cells read exactly, the measure of
//! scripts/examples/ocr_reference.py (the same pipeline on onnxruntime),
//! so the two are compared on the same pages in one session:
//!
//! ```text
//! cargo bench --bench ocr_pages -- --truth examples/bom/truth.json examples/bom/docs/*.png
//! python3 scripts/examples/ocr_reference.py --truth examples/bom/truth.json examples/bom/docs/*.png
//! ```
//!
//! `--charset ascii` reads with the Latin-only mask, as examples/bom/bom.toml does.

use openclaw::inference::ocr::{read_page, Charset, GrayImage, OcrModels};
use openclaw::inference::{Engine, ModelRepo};
use std::path::Path;
use std::time::Instant;

fn main() {
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut take = |flag: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        args.remove(i);
        Some(args.remove(i))
    };
    let truth = take("--truth");
    let charset = take("--charset")
        .map(|c| Charset::parse(&c).expect("--charset all|ascii"))
        .unwrap_or(Charset::All);
    if args.is_empty() {
        eprintln!("usage: ocr_pages [--truth TRUTH.json] [--charset all|ascii] IMAGE...");
        std::process::exit(2);
    }
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let engine = Engine::new(ModelRepo::open(&models).expect("models/"), 256 << 20);
    let ocr = OcrModels {
        charset,
        ..OcrModels::default()
    };
    // Load both models before timing (the plugin keeps them cached too).
    let warm = GrayImage::filled(64, 48, 255);
    read_page(&engine, &ocr, &warm, &|| false).expect("warm-up");
    let truth: Option<serde_json::Value> = truth.map(|t| {
        serde_json::from_slice(&std::fs::read(t).expect("truth file")).expect("truth JSON")
    });
    let (mut cells, mut found) = (0usize, 0usize);
    let (mut det_total, mut rec_total) = (0f64, 0f64);
    let started = Instant::now();
    for path in &args {
        let img = GrayImage::decode(&std::fs::read(path).expect("image")).expect("decode");
        let page = read_page(&engine, &ocr, &img, &|| false).expect("read");
        det_total += page.det_ms;
        rec_total += page.rec_ms;
        let mut line = format!(
            "{path}: {} boxes, det {:.0} ms, rec {:.0} ms",
            page.lines.len(),
            page.det_ms,
            page.rec_ms
        );
        if let Some(t) = &truth {
            let name = Path::new(path).file_name().unwrap().to_string_lossy();
            let doc = t["documents"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["file"].as_str().is_some_and(|f| f.ends_with(&*name)));
            if let Some(doc) = doc {
                let texts: Vec<&str> = page.lines.iter().map(|l| l.text.trim()).collect();
                let (mut c, mut f) = (0, 0);
                for item in doc["items"].as_array().unwrap() {
                    for (_, v) in item.as_object().unwrap() {
                        let want = match v {
                            serde_json::Value::Null => continue,
                            serde_json::Value::String(s) => s.trim().to_string(),
                            other => other.to_string(),
                        };
                        c += 1;
                        f += texts.contains(&want.as_str()) as usize;
                    }
                }
                line.push_str(&format!(", cells {f}/{c}"));
                cells += c;
                found += f;
            }
        }
        println!("{line}");
    }
    let n = args.len() as f64;
    println!(
        "{} pages in {:.2} s: det {:.0} ms, rec {:.0} ms a page (tract, {:?}){}",
        args.len(),
        started.elapsed().as_secs_f64(),
        det_total / n,
        rec_total / n,
        charset,
        if cells > 0 {
            format!(
                "; cells read exactly {found}/{cells} = {:.1}%",
                100.0 * found as f64 / cells as f64
            )
        } else {
            String::new()
        }
    )
}
