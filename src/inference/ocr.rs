//! Page OCR with PP-OCRv4: the DB detector finds text boxes on the page,
//! the CTC recognizer reads each box, and boxes are grouped into rows.
//!
//! The pipeline (scripts/examples/ocr_reference.py is the same in Python,
//! on onnxruntime, as the baseline):
//! 1. the page (8-bit gray) is scaled down to fit the detector's pinned
//!    input (480x640) and placed top-left on a white canvas;
//! 2. the probability map is cut at 0.3; each 4-connected component is a
//!    box if its mean probability is at least 0.6 and both sides are 3 px
//!    or more; the box grows by `area * 1.5 / perimeter` on every side (the
//!    detector draws text regions shrunk) and is mapped back to the page;
//! 3. each box is cut from the page at full resolution, scaled to height
//!    48 (width at most the recognizer's 320, squeezed beyond), placed left
//!    on a white 48x320 canvas and read by greedy CTC;
//! 4. a box joins a row when its vertical centre lies within the span of
//!    the row's first box; rows top to bottom, cells left to right.

use super::{post, Engine, InferenceError, NamedTensor};

/// Largest page the decoders accept (both sides and pixels), so that an
/// image header cannot make us allocate gigabytes.
pub const MAX_SIDE: usize = 16_384;
pub const MAX_PIXELS: usize = 40_000_000;

/// Probability above which a detector pixel is text.
const BIN_THRESHOLD: f32 = 0.3;
/// Mean probability a component needs to be a box.
const BOX_THRESHOLD: f32 = 0.6;
/// How far boxes grow back (PP-OCR's `unclip_ratio`).
const UNCLIP_RATIO: f32 = 1.5;
/// Most boxes read on one page: more is not a document but noise.
pub const MAX_BOXES: usize = 2_000;

/// Errors of page OCR.
#[derive(Debug, thiserror::Error)]
pub enum OcrError {
    #[error("image: {0}")]
    Image(String),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error("model `{model}`: {detail}")]
    Model { model: String, detail: String },
    #[error("stopped")]
    Stopped,
}

/// An 8-bit grayscale image, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl GrayImage {
    /// A `width x height` image of one value.
    pub fn filled(width: usize, height: usize, v: u8) -> GrayImage {
        GrayImage {
            width,
            height,
            pixels: vec![v; width * height],
        }
    }

    /// Reads a binary PGM (P5, maxval up to 255) or a PNG (any colour type,
    /// composited on white, 16-bit cut to 8).
    pub fn decode(bytes: &[u8]) -> Result<GrayImage, OcrError> {
        if bytes.starts_with(b"P5") {
            decode_pgm(bytes)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            decode_png(bytes)
        } else {
            Err(OcrError::Image(
                "not a binary PGM (P5) or PNG file (by its first bytes)".into(),
            ))
        }
    }

    fn at(&self, x: usize, y: usize) -> f32 {
        self.pixels[y * self.width + x] as f32
    }

    /// The part `[x0, x1) x [y0, y1)` (clamped to the image).
    pub fn crop(&self, x0: usize, y0: usize, x1: usize, y1: usize) -> GrayImage {
        let (x1, y1) = (x1.min(self.width), y1.min(self.height));
        let (x0, y0) = (x0.min(x1), y0.min(y1));
        let mut pixels = Vec::with_capacity((x1 - x0) * (y1 - y0));
        for y in y0..y1 {
            pixels.extend_from_slice(&self.pixels[y * self.width + x0..y * self.width + x1]);
        }
        GrayImage {
            width: x1 - x0,
            height: y1 - y0,
            pixels,
        }
    }

    /// Bilinear resampling to `w x h` (pixel centres aligned, as OpenCV's
    /// `INTER_LINEAR`).
    pub fn resize(&self, w: usize, h: usize) -> GrayImage {
        self.resize_part(0, 0, self.width, self.height, w, h)
    }

    /// [`GrayImage::resize`] of the part `[x0, x1) x [y0, y1)` (clamped),
    /// read in place: no copy of the part is made, so many large boxes on
    /// a large page cost their output size, not the page's.
    pub fn resize_part(
        &self,
        x0: usize,
        y0: usize,
        x1: usize,
        y1: usize,
        w: usize,
        h: usize,
    ) -> GrayImage {
        let (w, h) = (w.max(1), h.max(1));
        let (x1, y1) = (x1.min(self.width), y1.min(self.height));
        let (x0, y0) = (x0.min(x1), y0.min(y1));
        let (pw, ph) = (x1 - x0, y1 - y0);
        if pw == 0 || ph == 0 {
            return GrayImage::filled(w, h, 255);
        }
        let sx = pw as f32 / w as f32;
        let sy = ph as f32 / h as f32;
        let coord = |d: usize, s: f32, n: usize| {
            let f = ((d as f32 + 0.5) * s - 0.5).max(0.0);
            let i = (f as usize).min(n - 1);
            (i, (i + 1).min(n - 1), f - i as f32)
        };
        let xs: Vec<_> = (0..w).map(|x| coord(x, sx, pw)).collect();
        let mut pixels = Vec::with_capacity(w * h);
        for y in 0..h {
            let (ya, yb, fy) = coord(y, sy, ph);
            for &(xa, xb, fx) in &xs {
                let at = |x: usize, y: usize| self.at(x0 + x, y0 + y);
                let top = at(xa, ya) * (1.0 - fx) + at(xb, ya) * fx;
                let bottom = at(xa, yb) * (1.0 - fx) + at(xb, yb) * fx;
                pixels.push((top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8);
            }
        }
        GrayImage {
            width: w,
            height: h,
            pixels,
        }
    }

    /// This image at the top left of a white `w x h` canvas (cut if larger).
    fn on_canvas(&self, w: usize, h: usize) -> GrayImage {
        let mut c = GrayImage::filled(w, h, 255);
        for y in 0..self.height.min(h) {
            let n = self.width.min(w);
            c.pixels[y * w..y * w + n]
                .copy_from_slice(&self.pixels[y * self.width..y * self.width + n]);
        }
        c
    }
}

fn check_size(width: usize, height: usize) -> Result<(), OcrError> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(OcrError::Image(format!(
            "{width}x{height} pixels: each side must be 1 to {MAX_SIDE}"
        )));
    }
    if width * height > MAX_PIXELS {
        return Err(OcrError::Image(format!(
            "{width}x{height} pixels is more than {MAX_PIXELS}"
        )));
    }
    Ok(())
}

fn decode_pgm(bytes: &[u8]) -> Result<GrayImage, OcrError> {
    // Header: P5, width, height, maxval, separated by whitespace, with
    // `#` comments to the end of a line; one whitespace byte, then pixels.
    let mut fields = Vec::new();
    let mut i = 2;
    while fields.len() < 3 {
        match bytes.get(i) {
            None => return Err(OcrError::Image("PGM header ends early".into())),
            Some(b'#') => {
                while bytes.get(i).is_some_and(|b| *b != b'\n') {
                    i += 1;
                }
            }
            Some(b) if b.is_ascii_whitespace() => i += 1,
            Some(b) if b.is_ascii_digit() => {
                let start = i;
                while bytes.get(i).is_some_and(u8::is_ascii_digit) && i - start < 9 {
                    i += 1;
                }
                let n: usize = std::str::from_utf8(&bytes[start..i])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| OcrError::Image("PGM header: bad number".into()))?;
                fields.push(n);
            }
            Some(b) => {
                return Err(OcrError::Image(format!(
                    "PGM header: unexpected byte 0x{b:02x} at {i}"
                )))
            }
        }
    }
    if !bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        return Err(OcrError::Image(
            "PGM header: no whitespace after maxval".into(),
        ));
    }
    let (width, height, maxval) = (fields[0], fields[1], fields[2]);
    check_size(width, height)?;
    if !(1..=255).contains(&maxval) {
        return Err(OcrError::Image(format!(
            "PGM maxval {maxval}: only 8-bit images (1..=255) are read"
        )));
    }
    let data = &bytes[i + 1..];
    if data.len() < width * height {
        return Err(OcrError::Image(format!(
            "PGM of {width}x{height} needs {} pixel bytes, the file has {}",
            width * height,
            data.len()
        )));
    }
    let pixels = data[..width * height]
        .iter()
        .map(|&v| ((v.min(maxval as u8) as u32 * 255) / maxval as u32) as u8)
        .collect();
    Ok(GrayImage {
        width,
        height,
        pixels,
    })
}

fn decode_png(bytes: &[u8]) -> Result<GrayImage, OcrError> {
    let bad = |e: png::DecodingError| OcrError::Image(format!("PNG: {e}"));
    let mut dec = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        // The decoder's own allocation cap: 4 bytes (RGBA) per pixel allowed.
        png::Limits {
            bytes: MAX_PIXELS * 4,
        },
    );
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let header = dec.read_header_info().map_err(bad)?;
    check_size(header.width as usize, header.height as usize)?;
    let mut reader = dec.read_info().map_err(bad)?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).map_err(bad)?;
    let (width, height) = (frame.width as usize, frame.height as usize);
    let data = &buf[..frame.buffer_size()];
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(OcrError::Image("PNG: palette not expanded".into())),
    };
    if data.len() != width * height * channels || frame.bit_depth != png::BitDepth::Eight {
        return Err(OcrError::Image(format!(
            "PNG: {} bytes for {width}x{height} with {channels} channel(s) at {:?}",
            data.len(),
            frame.bit_depth
        )));
    }
    let pixels = data
        .chunks_exact(channels)
        .map(|p| {
            let (v, a) = match channels {
                1 => (p[0] as u32, 255),
                2 => (p[0] as u32, p[1] as u32),
                // ITU-R BT.601 luma, as PIL's convert("L")
                _ => (
                    (p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000,
                    if channels == 4 { p[3] as u32 } else { 255 },
                ),
            };
            // On white: transparent parts are paper.
            ((v * a + 255 * (255 - a) + 127) / 255) as u8
        })
        .collect();
    Ok(GrayImage {
        width,
        height,
        pixels,
    })
}

/// A text box in page pixels: `[x0, y0, x1, y1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextBox {
    pub x0: usize,
    pub y0: usize,
    pub x1: usize,
    pub y1: usize,
    /// The detector's mean probability inside the component.
    pub score: f32,
}

/// One box read.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub text: String,
    /// Mean probability of the kept CTC steps.
    pub confidence: f32,
    pub bbox: TextBox,
}

/// A page read: lines grouped into rows (indices into `lines`).
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub lines: Vec<Line>,
    pub rows: Vec<Vec<usize>>,
    pub det_ms: f64,
    pub rec_ms: f64,
}

impl Page {
    /// The rows as text: cells joined by " | ", rows by newlines.
    pub fn text(&self) -> String {
        self.rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&i| self.lines[i].text.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The detector and recognizer to use, by model name, and the characters
/// the recognizer may choose from.
#[derive(Debug, Clone)]
pub struct OcrModels {
    pub det: String,
    pub rec: String,
    pub charset: Charset,
}

impl Default for OcrModels {
    fn default() -> Self {
        OcrModels {
            det: "ocr_det".into(),
            rec: "ocr_rec".into(),
            charset: Charset::All,
        }
    }
}

/// The characters a line may be read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// The whole dictionary (PP-OCRv4's: Chinese, Latin, digits, symbols).
    All,
    /// Printable ASCII only: documents in Latin script.
    Ascii,
}

impl Charset {
    pub fn parse(s: &str) -> Option<Charset> {
        match s {
            "all" => Some(Charset::All),
            "ascii" => Some(Charset::Ascii),
            _ => None,
        }
    }

    /// Which dictionary entries may be chosen (`None`: all).
    fn mask(self, dictionary: &[String]) -> Option<Vec<bool>> {
        match self {
            Charset::All => None,
            Charset::Ascii => Some(
                dictionary
                    .iter()
                    .map(|c| !c.is_empty() && c.chars().all(|ch| (' '..='~').contains(&ch)))
                    .collect(),
            ),
        }
    }
}

/// `[1, 3, h, w]` of a model's first (pinned) input.
fn input_hw(engine: &Engine, model: &str) -> Result<(usize, usize), OcrError> {
    let m = engine.load(model)?;
    match m.input_shapes().first().map(Vec::as_slice) {
        Some([1, 3, h, w]) => Ok((*h, *w)),
        other => Err(OcrError::Model {
            model: model.into(),
            detail: format!("expected one input of shape [1, 3, h, w], found {other:?}"),
        }),
    }
}

/// Text boxes of `page` (in page pixels), top to bottom.
pub fn detect(
    engine: &Engine,
    model: &str,
    page: &GrayImage,
    stopped: &dyn Fn() -> bool,
) -> Result<Vec<TextBox>, OcrError> {
    let (h, w) = input_hw(engine, model)?;
    let s = (w as f32 / page.width as f32)
        .min(h as f32 / page.height as f32)
        .min(1.0);
    let scaled = if s < 1.0 {
        page.resize(
            ((page.width as f32 * s).round() as usize).clamp(1, w),
            ((page.height as f32 * s).round() as usize).clamp(1, h),
        )
    } else {
        page.clone()
    };
    let canvas = scaled.on_canvas(w, h);
    let out = engine.run(
        model,
        vec![NamedTensor::f32(
            "x",
            vec![1, 3, h, w],
            post::gray_to_nchw(&canvas.pixels, h, w),
        )],
    )?;
    if stopped() {
        return Err(OcrError::Stopped);
    }
    let map = out
        .first()
        .map(|t| t.to_f32_vec())
        .filter(|m| m.len() == h * w)
        .ok_or_else(|| OcrError::Model {
            model: model.into(),
            detail: format!("expected a {h}x{w} probability map"),
        })?;
    let boxes = components(&map, w, h, stopped)?;
    // Back to page pixels; only the part the page covered.
    let (pw, ph) = (scaled.width, scaled.height);
    let mut out: Vec<TextBox> = boxes
        .into_iter()
        .filter(|b| b.x0 < pw && b.y0 < ph)
        .map(|b| TextBox {
            x0: ((b.x0 as f32 / s).floor() as usize).min(page.width),
            y0: ((b.y0 as f32 / s).floor() as usize).min(page.height),
            x1: ((b.x1.min(pw) as f32 / s).ceil() as usize).min(page.width),
            y1: ((b.y1.min(ph) as f32 / s).ceil() as usize).min(page.height),
            score: b.score,
        })
        .filter(|b| b.x1 > b.x0 && b.y1 > b.y0)
        .collect();
    out.sort_by_key(|b| (b.y0, b.x0));
    Ok(out)
}

/// Boxes of the 4-connected components above [`BIN_THRESHOLD`], grown back.
fn components(
    map: &[f32],
    w: usize,
    h: usize,
    stopped: &dyn Fn() -> bool,
) -> Result<Vec<TextBox>, OcrError> {
    let mut seen = vec![false; w * h];
    let mut stack = Vec::new();
    let mut boxes = Vec::new();
    for start in 0..w * h {
        if seen[start] || map[start] <= BIN_THRESHOLD {
            continue;
        }
        if start % w == 0 && stopped() {
            return Err(OcrError::Stopped);
        }
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let (mut sum, mut n) = (0f64, 0usize);
        seen[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
            sum += map[i] as f64;
            n += 1;
            let mut visit = |j: usize| {
                if !seen[j] && map[j] > BIN_THRESHOLD {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
        let score = (sum / n as f64) as f32;
        if score < BOX_THRESHOLD || bw < 3.0 || bh < 3.0 {
            continue;
        }
        let d = bw * bh * UNCLIP_RATIO / (2.0 * (bw + bh));
        boxes.push(TextBox {
            x0: (x0 as f32 - d).max(0.0).floor() as usize,
            y0: (y0 as f32 - d).max(0.0).floor() as usize,
            x1: ((x1 as f32 + 1.0 + d).ceil() as usize).min(w),
            y1: ((y1 as f32 + 1.0 + d).ceil() as usize).min(h),
            score,
        });
        if boxes.len() > MAX_BOXES {
            return Err(OcrError::Image(format!(
                "more than {MAX_BOXES} text boxes on one page"
            )));
        }
    }
    Ok(boxes)
}

/// Reads one box of `page` with the recognizer: its text and confidence.
pub fn recognize(
    engine: &Engine,
    model: &str,
    dictionary: &[String],
    allowed: Option<&[bool]>,
    page: &GrayImage,
    b: &TextBox,
) -> Result<(String, f32), OcrError> {
    let (h, w) = input_hw(engine, model)?;
    // The box as `crop` would clamp it, resized in place (no copy of it).
    let (x1, y1) = (b.x1.min(page.width), b.y1.min(page.height));
    let (bw, bh) = (x1 - b.x0.min(x1), y1 - b.y0.min(y1));
    let rw = ((bw as f32 * h as f32 / bh.max(1) as f32).ceil() as usize).clamp(1, w);
    let line = page
        .resize_part(b.x0, b.y0, b.x1, b.y1, rw, h)
        .on_canvas(w, h);
    let out = engine.run(
        model,
        vec![NamedTensor::f32(
            "x",
            vec![1, 3, h, w],
            post::gray_to_nchw(&line.pixels, h, w),
        )],
    )?;
    let t = out.first().ok_or_else(|| OcrError::Model {
        model: model.into(),
        detail: "no output".into(),
    })?;
    Ok(post::ctc_greedy_in(t, dictionary, allowed))
}

/// Indices of `boxes` grouped into rows: a box joins the current row when
/// its vertical centre lies within the span of the row's first box.
pub fn group_rows(boxes: &[TextBox]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by_key(|&i| (boxes[i].y0 + boxes[i].y1, boxes[i].x0));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let c = (boxes[i].y0 + boxes[i].y1) / 2;
        match rows.last_mut() {
            Some(r) if (boxes[r[0]].y0..=boxes[r[0]].y1).contains(&c) => r.push(i),
            _ => rows.push(vec![i]),
        }
    }
    for r in &mut rows {
        r.sort_by_key(|&i| boxes[i].x0);
    }
    rows
}

/// A table found on a page: the first row of three or more cells is its
/// header (titles above it are one or two lines of text); every later row of two or more cells has each cell
/// placed in the header column its box overlaps most, so a cell left empty
/// on the page is an empty string here, not a shift of the cells after it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Header and rows, cells joined by " | ".
    pub fn text(&self) -> String {
        std::iter::once(&self.header)
            .chain(&self.rows)
            .map(|r| r.join(" | "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The table of `page`, if it has one (see [`Table`]).
pub fn table(page: &Page) -> Option<Table> {
    let h = page.rows.iter().position(|r| r.len() >= 3)?;
    let head: Vec<&Line> = page.rows[h].iter().map(|&i| &page.lines[i]).collect();
    // Column i spans from its header's left edge to the next header's.
    let spans: Vec<(usize, usize)> = (0..head.len())
        .map(|i| {
            let x0 = if i == 0 { 0 } else { head[i].bbox.x0 };
            let x1 = head.get(i + 1).map_or(usize::MAX, |n| n.bbox.x0);
            (x0, x1)
        })
        .collect();
    let mut rows = Vec::new();
    for r in &page.rows[h + 1..] {
        if r.len() < 2 {
            continue;
        }
        let mut cells = vec![String::new(); head.len()];
        for &i in r {
            let b = &page.lines[i].bbox;
            let col = spans
                .iter()
                .enumerate()
                .max_by_key(|(_, &(x0, x1))| b.x1.min(x1).saturating_sub(b.x0.max(x0)))
                .map_or(0, |(c, _)| c);
            if !cells[col].is_empty() {
                cells[col].push(' ');
            }
            cells[col].push_str(&page.lines[i].text);
        }
        rows.push(cells);
    }
    Some(Table {
        header: head.iter().map(|l| l.text.clone()).collect(),
        rows,
    })
}

/// Reads a whole page: detection, recognition of every box, rows.
/// `stopped` is asked between steps (a cancel or a deadline).
pub fn read_page(
    engine: &Engine,
    models: &OcrModels,
    page: &GrayImage,
    stopped: &dyn Fn() -> bool,
) -> Result<Page, OcrError> {
    let t = std::time::Instant::now();
    let boxes = detect(engine, &models.det, page, stopped)?;
    let det_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = std::time::Instant::now();
    let dictionary = post::labels(&*engine.load(&models.rec)?)?;
    let allowed = models.charset.mask(&dictionary);
    let mut lines = Vec::new();
    for b in &boxes {
        if stopped() {
            return Err(OcrError::Stopped);
        }
        let (text, confidence) = recognize(
            engine,
            &models.rec,
            &dictionary,
            allowed.as_deref(),
            page,
            b,
        )?;
        let text = text.trim().to_string();
        if !text.is_empty() {
            lines.push(Line {
                text,
                confidence,
                bbox: *b,
            });
        }
    }
    let kept: Vec<TextBox> = lines.iter().map(|l| l.bbox).collect();
    let rows = group_rows(&kept);
    // Lines in reading order, so `rows` index them in order too.
    let order: Vec<usize> = rows.iter().flatten().copied().collect();
    let mut slots: Vec<Option<Line>> = lines.into_iter().map(Some).collect();
    let lines: Vec<Line> = order.iter().map(|&i| slots[i].take().unwrap()).collect();
    let mut next = 0;
    let rows = rows
        .iter()
        .map(|r| {
            let v = (next..next + r.len()).collect();
            next += r.len();
            v
        })
        .collect();
    Ok(Page {
        lines,
        rows,
        det_ms,
        rec_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tb(x0: usize, y0: usize, x1: usize, y1: usize) -> TextBox {
        TextBox {
            x0,
            y0,
            x1,
            y1,
            score: 1.0,
        }
    }

    #[test]
    fn boxes_are_grouped_into_rows_left_to_right() {
        let boxes = [
            tb(300, 52, 360, 70),
            tb(10, 50, 90, 72),
            tb(10, 100, 80, 120),
            tb(150, 49, 200, 71),
        ];
        assert_eq!(group_rows(&boxes), vec![vec![1, 3, 0], vec![2]]);
    }

    #[test]
    fn table_cells_go_to_the_header_column_they_overlap() {
        let line = |t: &str, x0, x1, y| Line {
            text: t.into(),
            confidence: 1.0,
            bbox: tb(x0, y, x1, y + 20),
        };
        let lines = vec![
            line("BILL OF MATERIALS", 10, 200, 0),
            line("Part", 10, 60, 40),
            line("Qty", 200, 240, 40),
            line("Material", 300, 380, 40),
            line("P-1", 10, 50, 80),
            line("Steel", 300, 350, 80),
            line("P-2", 10, 50, 120),
            line("4", 205, 215, 120),
            line("Stainless", 300, 370, 120),
            line("304", 375, 400, 120),
        ];
        let boxes: Vec<TextBox> = lines.iter().map(|l| l.bbox).collect();
        let page = Page {
            rows: group_rows(&boxes),
            lines,
            ..Default::default()
        };
        let t = table(&page).unwrap();
        assert_eq!(t.header, vec!["Part", "Qty", "Material"]);
        assert_eq!(
            t.rows,
            vec![vec!["P-1", "", "Steel"], vec!["P-2", "4", "Stainless 304"]]
        );
        assert_eq!(t.text().lines().nth(1), Some("P-1 |  | Steel"));
    }

    #[test]
    fn components_find_a_block_and_grow_it_back() {
        let (w, h) = (40, 20);
        let mut map = vec![0f32; w * h];
        for y in 5..10 {
            for x in 10..30 {
                map[y * w + x] = 0.9;
            }
        }
        // a speck below the sides' minimum, and a faint block under the box score
        map[15 * w + 2] = 0.9;
        for y in 14..18 {
            for x in 32..38 {
                map[y * w + x] = 0.4;
            }
        }
        let b = components(&map, w, h, &|| false).unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
        // 20x5 grows by 20*5*1.5/50 = 3 on every side
        assert_eq!((b[0].x0, b[0].y0, b[0].x1, b[0].y1), (7, 2, 33, 13));
    }

    #[test]
    fn pgm_headers_are_checked() {
        let mut ok = b"P5\n# made by hand\n3 2\n255\n".to_vec();
        ok.extend_from_slice(&[0, 128, 255, 1, 2, 3]);
        let img = GrayImage::decode(&ok).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        assert_eq!(img.pixels, vec![0, 128, 255, 1, 2, 3]);
        for (bad, says) in [
            (&b"P5\n3 2\n255\n\0\0"[..], "needs 6 pixel bytes"),
            (b"P5\n3 2\n65535\n", "8-bit"),
            (b"P5\n99999 99999\n255\n", "each side"),
            (b"P5\n10000 10000\n255\n", "more than"),
            (b"P5\n0 2\n255\n", "each side"),
            (b"P5\n3", "ends early"),
            (b"P6\n3 2\n255\n", "not a binary PGM"),
            (b"P5\n3 x\n255\n", "unexpected byte"),
        ] {
            let e = GrayImage::decode(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn pngs_of_every_colour_type_become_gray_on_white() {
        let enc = |ct: png::ColorType, data: &[u8]| {
            let mut out = Vec::new();
            let mut e = png::Encoder::new(&mut out, 2, 1);
            e.set_color(ct);
            e.set_depth(png::BitDepth::Eight);
            e.write_header().unwrap().write_image_data(data).unwrap();
            out
        };
        let g = GrayImage::decode(&enc(png::ColorType::Grayscale, &[0, 200])).unwrap();
        assert_eq!(g.pixels, vec![0, 200]);
        let g = GrayImage::decode(&enc(png::ColorType::Rgb, &[255, 0, 0, 10, 10, 10])).unwrap();
        assert_eq!(g.pixels, vec![76, 10]);
        // fully transparent black is white paper
        let g = GrayImage::decode(&enc(png::ColorType::Rgba, &[0, 0, 0, 0, 0, 0, 0, 255])).unwrap();
        assert_eq!(g.pixels, vec![255, 0]);
        let mut cut = enc(png::ColorType::Grayscale, &[0, 200]);
        cut.truncate(cut.len() - 20);
        assert!(GrayImage::decode(&cut)
            .unwrap_err()
            .to_string()
            .contains("PNG"));
    }

    #[test]
    fn resizing_keeps_flat_images_flat_and_crops_clamp() {
        let img = GrayImage::filled(30, 20, 77);
        let r = img.resize(13, 7);
        assert!(r.pixels.iter().all(|&v| v == 77));
        let c = img.crop(25, 15, 99, 99);
        assert_eq!((c.width, c.height), (5, 5));
        // A part resized in place equals the part cut out, then resized.
        let mut grad = GrayImage::filled(40, 30, 0);
        for (i, p) in grad.pixels.iter_mut().enumerate() {
            *p = ((i % 40) * 6 + (i / 40) * 2) as u8;
        }
        assert_eq!(
            grad.resize_part(5, 7, 33, 21, 17, 9),
            grad.crop(5, 7, 33, 21).resize(17, 9)
        );
        assert_eq!(
            grad.resize_part(9, 9, 9, 20, 4, 4),
            GrayImage::filled(4, 4, 255)
        );
    }
}
