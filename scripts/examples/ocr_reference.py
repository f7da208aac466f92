#!/usr/bin/env python3
"""Reference OCR pipeline (PP-OCRv4 det + rec, ONNX) for the BOM fixtures.

  ocr_reference.py [--models DIR] [--truth examples/bom/truth.json] IMAGE...

The Rust OCR plugin implements exactly these steps; keep both in step.

1. Load as 8-bit gray (H x W).  s = min(640/W, 480/H, 1) (downscale only).
   Bilinear resize to (round(W*s), round(H*s)) (Pillow BILINEAR), paste
   top-left on a white (255) 640x480 canvas.
2. Normalize v -> (v/255 - 0.5)/0.5, same value in 3 channels, NCHW
   [1,3,480,640] float32; det output [1,1,480,640] = text probability.
3. Binarize prob > 0.3; 4-connected components.  Per component: axis-aligned
   bounding box (x0,y0,x1,y1 inclusive, w=x1-x0+1, h=y1-y0+1), score = mean
   probability over the component's pixels; drop score < 0.6 or min(w,h) < 3.
   Unclip: d = w*h*1.5 / (2*(w+h)); expand every side by d; clamp to
   [0,640]x[0,480]; divide by s to get original-image coordinates.
4. Per box: crop the ORIGINAL gray image (x0..x1, y0..y1, floor/ceil to whole
   pixels), resize bilinear to height 48, width min(320, ceil(w*48/h)); paste
   left on a 48x320 canvas filled with 255; normalize as in 2; rec
   [1,3,48,320] -> [1,T,6625].  Greedy CTC: argmax per step, merge repeats,
   drop class 0 (blank); classes 1..6623 are the lines of the model's metadata
   key "character", class 6624 is a space.  confidence = mean of the max
   probability over the kept steps.  Drop lines whose text is empty.
5. Rows: sort boxes by center y; a box joins the current row if its center y
   lies within [top, bottom] of the row's first box, else starts a new row;
   within a row sort by x0.  Print cells joined by " | ", one row per line.

With --truth, each document's table cells (truth item values, non-null) are
looked up as exact (stripped) texts among the recognized boxes; the match
fraction per document and overall, and det/rec times, are printed; exit 1
if overall < 95% or any document < 85%.  Measured on examples/bom (24 docs,
622 cells) with the pipeline exactly as above, no change needed: 99.0%
overall, worst document 94.4%.  The misses: 'x' in dimensions read as the
multiplication sign (D8x40, M12x20, M5x20) and one- or two-digit quantity
crops getting a stray CJK character ("12" -> "12<CJK>", "0" -> an ideographic
full stop); a consumer may map those back, this file does not.

Models: --models DIR or $OPENCLAW_OCR_MODELS, holding ch_PP-OCRv4_det_infer.onnx
and ch_PP-OCRv4_rec_infer.onnx (from the rapidocr-onnxruntime 1.4.4 wheel).
"""
import argparse
import json
import math
import os
import sys
import time
from collections import deque

import numpy as np
import onnxruntime as ort
from PIL import Image

DET_W, DET_H = 640, 480
REC_W, REC_H = 320, 48
BIN_T, BOX_T, MIN_SIDE, UNCLIP = 0.3, 0.6, 3, 1.5


def normalize(gray_u8):
    x = (gray_u8.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(np.broadcast_to(x, (1, 3) + x.shape), dtype=np.float32)


def components(mask, prob):
    """4-connected components of mask: list of (x0, y0, x1, y1, mean prob)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    ys, xs = np.nonzero(mask)
    for sy, sx in zip(ys.tolist(), xs.tolist()):
        if seen[sy, sx]:
            continue
        seen[sy, sx] = True
        q = deque([(sy, sx)])
        x0 = x1 = sx
        y0 = y1 = sy
        total, n = 0.0, 0
        while q:
            y, x = q.popleft()
            total += float(prob[y, x])
            n += 1
            x0, x1, y0, y1 = min(x0, x), max(x1, x), min(y0, y), max(y1, y)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        out.append((x0, y0, x1, y1, total / n))
    return out


class Ocr:
    def __init__(self, models):
        opts = ort.SessionOptions()
        self.det = ort.InferenceSession(os.path.join(models, "ch_PP-OCRv4_det_infer.onnx"), opts,
                                        providers=["CPUExecutionProvider"])
        self.rec = ort.InferenceSession(os.path.join(models, "ch_PP-OCRv4_rec_infer.onnx"), opts,
                                        providers=["CPUExecutionProvider"])
        meta = self.rec.get_modelmeta().custom_metadata_map
        self.chars = [""] + meta["character"].splitlines() + [" "]

    def detect(self, gray):
        H, W = gray.shape
        s = min(DET_W / W, DET_H / H, 1.0)
        nw, nh = round(W * s), round(H * s)
        small = Image.fromarray(gray).resize((nw, nh), Image.BILINEAR)
        canvas = Image.new("L", (DET_W, DET_H), 255)
        canvas.paste(small, (0, 0))
        prob = self.det.run(None, {self.det.get_inputs()[0].name: normalize(np.asarray(canvas))})[0][0, 0]
        boxes = []
        for x0, y0, x1, y1, score in components(prob > BIN_T, prob):
            w, h = x1 - x0 + 1, y1 - y0 + 1
            if score < BOX_T or min(w, h) < MIN_SIDE:
                continue
            d = w * h * UNCLIP / (2 * (w + h))
            bx0, by0 = max(0.0, x0 - d), max(0.0, y0 - d)
            bx1, by1 = min(float(DET_W), x1 + 1 + d), min(float(DET_H), y1 + 1 + d)
            boxes.append((bx0 / s, by0 / s, bx1 / s, by1 / s))
        return boxes

    def recognize(self, gray, box):
        H, W = gray.shape
        x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        x1, y1 = min(W, math.ceil(box[2])), min(H, math.ceil(box[3]))
        crop = Image.fromarray(gray[y0:y1, x0:x1])
        w, h = crop.size
        rw = max(1, min(REC_W, math.ceil(w * REC_H / h)))
        canvas = Image.new("L", (REC_W, REC_H), 255)
        canvas.paste(crop.resize((rw, REC_H), Image.BILINEAR), (0, 0))
        out = self.rec.run(None, {self.rec.get_inputs()[0].name: normalize(np.asarray(canvas))})[0][0]
        idx = out.argmax(axis=1)
        text, confs, prev = [], [], -1
        for t, k in enumerate(idx.tolist()):
            if k != prev and k != 0:
                text.append(self.chars[k])
                confs.append(float(out[t, k]))
            prev = k
        return "".join(text), (sum(confs) / len(confs) if confs else 0.0)

    def run(self, path):
        gray = np.asarray(Image.open(path).convert("L"))
        t0 = time.perf_counter()
        boxes = self.detect(gray)
        t1 = time.perf_counter()
        lines = []
        for b in boxes:
            text, conf = self.recognize(gray, b)
            if text.strip():
                lines.append((b, text, conf))
        t2 = time.perf_counter()
        return lines, (t1 - t0) * 1000, (t2 - t1) * 1000


def rows_of(lines):
    lines = sorted(lines, key=lambda l: (l[0][1] + l[0][3]) / 2)
    rows = []
    for l in lines:
        cy = (l[0][1] + l[0][3]) / 2
        if rows and rows[-1][0][0][1] <= cy <= rows[-1][0][0][3]:
            rows[-1].append(l)
        else:
            rows.append([l])
    return [sorted(r, key=lambda l: l[0][0]) for r in rows]


def truth_cells(doc):
    out = []
    for it in doc["items"]:
        for k in ("part_number", "description", "quantity", "unit", "material", "dimensions"):
            v = it[k]
            if v is None:
                continue
            out.append((str(v) if not isinstance(v, float) else f"{v:g}").strip())
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=os.environ.get("OPENCLAW_OCR_MODELS", "/tmp/w/rapidocr_onnxruntime/models"))
    ap.add_argument("--truth")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()
    ocr = Ocr(a.models)
    truth = {}
    if a.truth:
        with open(a.truth) as f:
            t = json.load(f)
        base = os.path.dirname(os.path.abspath(a.truth))
        truth = {os.path.abspath(os.path.join(base, d["file"])): d for d in t["documents"]}
    found_all = total_all = 0
    worst = 1.0
    dets, recs = [], []
    for path in a.images:
        lines, det_ms, rec_ms = ocr.run(path)
        dets.append(det_ms)
        recs.append(rec_ms)
        print(f"== {path}  ({len(lines)} boxes, det {det_ms:.0f} ms, rec {rec_ms:.0f} ms)")
        if not a.quiet:
            for r in rows_of(lines):
                print(" | ".join(l[1] for l in r))
        doc = truth.get(os.path.abspath(path))
        if doc:
            texts = {l[1].strip() for l in lines}
            want = truth_cells(doc)
            miss = [c for c in want if c not in texts]
            frac = 1 - len(miss) / len(want)
            worst = min(worst, frac)
            found_all += len(want) - len(miss)
            total_all += len(want)
            print(f"-- cells {len(want) - len(miss)}/{len(want)} = {frac:.1%}" + (f"  missed {miss}" if miss else ""))
    if total_all:
        print(f"OVERALL cells {found_all}/{total_all} = {found_all / total_all:.1%}; worst document {worst:.1%}; "
              f"det mean {sum(dets) / len(dets):.0f} ms, rec mean {sum(recs) / len(recs):.0f} ms per document")
        return 0 if found_all / total_all >= 0.95 and worst >= 0.85 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
