#!/usr/bin/env python3
"""Renders synthetic bill-of-materials documents and their true BOMs.

  python3 scripts/examples/make_bom_docs.py [OUT_DIR] [--truth PATH] [--rules PATH]

OUT_DIR (default examples/bom/docs) gets bom-01.png ... (960x720, 8-bit gray);
truth.json and rules.json go beside OUT_DIR (OUT_DIR/..) unless given.
Deterministic: one random.Random(2026) drives everything, Pillow writes the
PNGs without metadata, so every run gives the same bytes (Pillow 13.0.0,
Raqm layout through Debian's libfribidi0, Debian's fonts-dejavu-core).

Layout choices are for PP-OCRv4 at a 640x480 detector input (scale 2/3):
20 px DejaVu Sans, columns separated by >= 40 px of white (no vertical rules,
which the detector would merge into the text), short cells (<= 22 chars) so a
line crop stays within the recognizer's 48x320 input, only ASCII letters,
digits, '-', '.', '/', 'x' and space in the table.
"""
import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFont, features

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bom_rules  # noqa: E402

N_DOCS = 24
W, H = 960, 720
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
FONT_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
TEXT_PX = 20
TITLE_PX = 30
MARGIN = 56
COL_GAP = 44
ROW_PITCH = 46

HEADER = ["Part No", "Description", "Qty", "Unit", "Material", "Dimensions"]
FIELDS = bom_rules.FIELDS

RULES = {
    "required": ["part_number", "description", "quantity", "unit", "material"],
    "units": ["pcs", "m", "kg", "set"],
    "unit_aliases": {"pc": "pcs", "PCS": "pcs", "Pcs": "pcs", "Stk": "pcs", "pce": "pcs",
                     "ea": "pcs", "M": "m", "mtr": "m", "KG": "kg", "Kg": "kg",
                     "sets": "set", "SET": "set"},
    "countable_units": ["pcs", "set"],
    "countable_words": ["bolt", "nut", "screw", "washer", "bearing", "seal", "pin",
                        "gasket", "o-ring", "spring", "bushing", "key", "rivet",
                        "clip", "stud", "valve", "coupling", "flange"],
}

ASSEMBLIES = ["Pump housing", "Gearbox cover", "Conveyor roller", "Valve body",
              "Fan bracket", "Motor mount", "Spindle unit", "Hydraulic block",
              "Bearing carrier", "Tank lid", "Idler pulley", "Filter housing"]


def pn(rng, prefix="P"):
    return f"{prefix}-{rng.randint(10000, 99999)}"


def m_size(rng):
    return rng.choice([6, 8, 10, 12])


# Each maker returns (part_number, description, unit, material, dimensions, qty).
# Units and quantities here always satisfy RULES; anomalies are planted later.
def hex_bolt(rng):
    return (pn(rng), "Hex bolt", "pcs", rng.choice(["Steel", "Stainless 304"]),
            f"M{m_size(rng)}x{rng.choice([20, 25, 30, 40, 50])}", rng.choice([4, 6, 8, 12, 16, 24]))


def hex_nut(rng):
    return (pn(rng), "Hex nut", "pcs", rng.choice(["Steel", "Stainless 304", "Brass"]),
            f"M{m_size(rng)}", rng.choice([4, 6, 8, 12, 16, 24]))


def washer(rng):
    d = m_size(rng)
    return (pn(rng), "Flat washer", "pcs", rng.choice(["Steel", "Stainless 304"]),
            f"M{d}", rng.choice([4, 8, 12, 16]))


def socket_screw(rng):
    return (pn(rng), "Socket screw", "pcs", "Steel",
            f"M{rng.choice([4, 5, 6])}x{rng.choice([12, 16, 20])}", rng.choice([4, 6, 8, 10]))


BEARINGS = {"6204": "20x47x14", "6205": "25x52x15", "6206": "30x62x16", "6302": "15x42x13"}


def bearing(rng):
    k = rng.choice(sorted(BEARINGS))
    return (f"BRG-{k}", "Ball bearing", "pcs", "Steel", BEARINGS[k], rng.choice([1, 2, 2, 4]))


def shaft_seal(rng):
    d = rng.choice([20, 25, 30])
    return (f"SL-{d}{d + 15}", "Shaft seal", "pcs", rng.choice(["NBR", "PTFE"]),
            f"{d}x{d + 15}x7", rng.choice([1, 2]))


def o_ring(rng):
    return (pn(rng, "OR"), "O-ring", "pcs", rng.choice(["NBR", "PTFE"]),
            f"{rng.choice([30, 45, 60])}x{rng.choice(['2', '2.5', '3'])}", rng.choice([2, 4, 6]))


def dowel_pin(rng):
    return (pn(rng), "Dowel pin", "pcs", "Steel",
            f"D{rng.choice([4, 6, 8])}x{rng.choice([16, 20, 24])}", rng.choice([2, 4]))


def drive_shaft(rng):
    return (pn(rng), "Drive shaft", "pcs", rng.choice(["Steel", "Stainless 304"]),
            f"D{rng.choice([20, 25, 30])}x{rng.choice([150, 200, 240])}", 1)


def cover_plate(rng):
    return (pn(rng), "Cover plate", "pcs", rng.choice(["Aluminium 6061", "Steel"]),
            f"{rng.choice([200, 300])}x{rng.choice([150, 200])}x{rng.choice([3, 5, 8])}", rng.choice([1, 2]))


def gasket(rng):
    return (pn(rng), "Flange gasket", "pcs", rng.choice(["PTFE", "NBR"]),
            f"{rng.choice([80, 120, 160])}x{rng.choice([60, 80])}x2", rng.choice([1, 2]))


def housing(rng):
    return (pn(rng), "Housing", "pcs", rng.choice(["Aluminium 6061", "Cast iron"]),
            f"{rng.choice([180, 240])}x{rng.choice([120, 160])}x{rng.choice([60, 80])}", 1)


def bushing(rng):
    d = rng.choice([16, 20, 25])
    return (pn(rng), "Bushing", "pcs", rng.choice(["Brass", "PTFE"]),
            f"{d}x{d + 5}x{rng.choice([15, 20])}", rng.choice([2, 4]))


def spring(rng):
    return (pn(rng), "Coil spring", "pcs", "Steel",
            f"D{rng.choice([8, 10, 12])}x{rng.choice([30, 40, 50])}", rng.choice([2, 4, 6]))


def hose(rng):
    return (pn(rng), "Hydraulic hose", "m", "NBR", f"D{rng.choice([10, 12, 16])}",
            rng.choice([1.5, 2.5, 3.2, 4]))


def pipe(rng):
    return (pn(rng), "Copper pipe", "m", "Copper", f"D{rng.choice([12, 15, 18])}x1",
            rng.choice([0.8, 1.2, 2.5, 3]))


def cable(rng):
    return (pn(rng), "Power cable", "m", "Copper", f"3x{rng.choice(['1.5', '2.5'])}",
            rng.choice([2.5, 5, 7.5, 10]))


def round_bar(rng):
    return (pn(rng), "Round bar", "kg", rng.choice(["Steel", "Brass", "Aluminium 6061"]),
            f"D{rng.choice([20, 30, 40])}", rng.choice([1.2, 2.5, 3, 4.8]))


def grease(rng):
    return (pn(rng), "Grease", "kg", "Lithium soap", None, rng.choice([0.5, 1, 1.5]))


def fastener_kit(rng):
    return (pn(rng, "KIT"), "Fastener kit", "set", "Stainless 304", None, rng.choice([1, 2]))


def sheet(rng):
    return (pn(rng), "Steel sheet", "kg", "Steel", f"{rng.choice([500, 1000])}x{rng.choice([250, 500])}x2",
            rng.choice([3.5, 6, 8.2]))


MAKERS = [hex_bolt, hex_nut, washer, socket_screw, bearing, shaft_seal, o_ring,
          dowel_pin, drive_shaft, cover_plate, gasket, housing, bushing, spring,
          hose, pipe, cable, round_bar, grease, fastener_kit, sheet]
COUNTABLE_MAKERS = [hex_bolt, hex_nut, washer, socket_screw, bearing, shaft_seal,
                    o_ring, dowel_pin, gasket, bushing, spring]


def item(t):
    return dict(zip(FIELDS, [t[0], t[1], t[5], t[2], t[3], t[4]]))


def fmt_qty(q):
    return str(q) if isinstance(q, int) else f"{q:g}"


def plant(rng, items, kind):
    """Changes one row of items to carry an anomaly of `kind`; returns the anomaly."""
    free = [i for i, it in enumerate(items) if not it.get("_planted")]
    if kind in ("unit_alias", "countable_unit", "fraction_pcs", "not_positive"):
        free = [i for i in free if items[i]["unit"] == "pcs"] or free
    i = rng.choice(free)
    it = items[i]
    it["_planted"] = True
    row = i + 1
    if kind == "missing":
        it["material"] = None
        return {"row": row, "field": "material", "kind": "missing", "value": None, "suggestion": None}
    if kind == "not_positive":
        it["quantity"] = rng.choice([0, -2, -1])
        return {"row": row, "field": "quantity", "kind": "not_positive",
                "value": it["quantity"], "suggestion": None}
    if kind == "unit_alias":
        it["unit"] = rng.choice(["pc", "PCS", "Stk"])
        return {"row": row, "field": "unit", "kind": "unit_alias", "value": it["unit"], "suggestion": "pcs"}
    if kind == "countable_unit":
        # a countable item measured in m or kg
        items[i] = it = item(rng.choice(COUNTABLE_MAKERS)(rng)) | {"_planted": True}
        it["unit"] = rng.choice(["m", "kg"])
        return {"row": row, "field": "unit", "kind": "unit_mismatch", "value": it["unit"], "suggestion": "pcs"}
    if kind == "fraction_pcs":
        it["quantity"] = rng.choice([1.5, 2.5, 0.5])
        return {"row": row, "field": "quantity", "kind": "unit_mismatch",
                "value": it["quantity"], "suggestion": None}
    raise ValueError(kind)


def make_documents(rng):
    # Which documents carry anomalies, and what: 9 of 24 (about a third),
    # covering every kind, two of them with two anomalies.
    plan = {3: ["not_positive"], 5: ["unit_alias"], 8: ["missing"], 10: ["countable_unit"],
            13: ["fraction_pcs", "unit_alias"], 16: ["missing"], 19: ["not_positive", "missing"],
            21: ["unit_alias"], 23: ["countable_unit"]}
    drawings = rng.sample(range(1000, 9999), N_DOCS)
    docs = []
    for n in range(1, N_DOCS + 1):
        nrows = rng.randint(3, 6)
        makers = rng.sample(MAKERS, nrows)
        items = [item(m(rng)) for m in makers]
        anomalies = [plant(rng, items, k) for k in plan.get(n, [])]
        for it in items:
            it.pop("_planted", None)
        anomalies.sort(key=bom_rules.sort_key)
        got = bom_rules.check(items, RULES)
        if got != anomalies:
            raise SystemExit(f"bom-{n:02d}: planted {anomalies} but the rules find {got}")
        docs.append({"n": n, "drawing": f"DWG-{drawings[n - 1]}",
                     "revision": rng.choice("ABCDE"), "assembly": rng.choice(ASSEMBLIES),
                     "sheet": f"Sheet 1/{rng.choice([1, 1, 2, 3])}",
                     "items": items, "anomalies": anomalies})
    return docs


def cells(it):
    return [it["part_number"], it["description"], fmt_qty(it["quantity"]), it["unit"],
            it["material"] or "", it["dimensions"] or ""]


def fonts():
    # Pillow lays text out with Raqm when it can load libfribidi (Debian's
    # libfribidi0) and falls back to its basic layout when it cannot; the two
    # place glyphs differently, so the committed PNGs (made with Raqm) come
    # out byte for byte only with it. A fresh machine without libfribidi0
    # made different files; say so instead.
    if not features.check("raqm"):
        sys.exit("make_bom_docs.py: Pillow cannot use Raqm text layout "
                 "(install Debian's libfribidi0); the committed documents "
                 "were laid out with it")
    raqm = ImageFont.Layout.RAQM
    return (ImageFont.truetype(FONT, TEXT_PX, layout_engine=raqm),
            ImageFont.truetype(FONT_BOLD, TEXT_PX, layout_engine=raqm),
            ImageFont.truetype(FONT_BOLD, TITLE_PX, layout_engine=raqm))


def render(doc):
    font, bold, title = fonts()
    img = Image.new("L", (W, H), 255)
    d = ImageDraw.Draw(img)
    d.text((MARGIN, 40), "BILL OF MATERIALS", font=title, fill=0)
    d.text((MARGIN, 96), f"Drawing {doc['drawing']} Rev {doc['revision']}", font=font, fill=0)
    d.text((MARGIN + 420, 96), doc["sheet"], font=font, fill=0)
    d.text((MARGIN, 132), f"Assembly: {doc['assembly']}", font=font, fill=0)
    rows = [cells(it) for it in doc["items"]]
    widths = [max(d.textlength(s, font=bold if r == 0 else font) for r, s in
                  enumerate([HEADER[c]] + [row[c] for row in rows])) for c in range(6)]
    xs = [MARGIN]
    for w in widths[:-1]:
        xs.append(xs[-1] + int(w + 0.999) + COL_GAP)
    assert xs[-1] + widths[-1] <= W - MARGIN, f"bom-{doc['n']:02d} too wide"
    top = 200
    right = xs[-1] + int(widths[-1]) + 8
    d.line([(MARGIN - 8, top), (right, top)], fill=0, width=2)
    for c, s in enumerate(HEADER):
        d.text((xs[c], top + 12), s, font=bold, fill=0)
    d.line([(MARGIN - 8, top + 46), (right, top + 46)], fill=0, width=1)
    for r, row in enumerate(rows):
        y = top + 62 + r * ROW_PITCH
        for c, s in enumerate(row):
            if s:
                assert len(s) <= 22, s
                d.text((xs[c], y), s, font=font, fill=0)
    return img


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", nargs="?", default="examples/bom/docs")
    ap.add_argument("--truth")
    ap.add_argument("--rules")
    a = ap.parse_args()
    out_dir = a.out_dir
    base = os.path.dirname(os.path.abspath(out_dir.rstrip("/")))
    truth_path = a.truth or os.path.join(base, "truth.json")
    rules_path = a.rules or os.path.join(base, "rules.json")
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(2026)
    docs = make_documents(rng)
    truth_dir = os.path.dirname(os.path.abspath(truth_path))
    out_docs = []
    for doc in docs:
        path = os.path.join(out_dir, f"bom-{doc['n']:02d}.png")
        render(doc).save(path, format="PNG", optimize=True)
        out_docs.append({"file": os.path.relpath(os.path.abspath(path), truth_dir),
                         "drawing": doc["drawing"], "revision": doc["revision"],
                         "assembly": doc["assembly"], "items": doc["items"],
                         "anomalies": doc["anomalies"]})
    truth = {"schema": SCHEMA, "documents": out_docs}
    with open(truth_path, "w") as f:
        json.dump(truth, f, indent=1)
        f.write("\n")
    with open(rules_path, "w") as f:
        json.dump(RULES, f, indent=1)
        f.write("\n")
    kinds = {}
    for doc in docs:
        for an in doc["anomalies"]:
            kinds[an["kind"]] = kinds.get(an["kind"], 0) + 1
    print(f"{len(docs)} documents in {out_dir}, truth {os.path.relpath(truth_path)}, rules {os.path.relpath(rules_path)}; anomalies {kinds}")


SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Bill of materials extraction (one document)",
    "type": "object",
    "additionalProperties": False,
    "required": ["items"],
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["part_number", "description", "quantity", "unit", "material", "dimensions"],
                "properties": {
                    "part_number": {"type": "string"},
                    "description": {"type": "string"},
                    "quantity": {"type": "number"},
                    "unit": {"type": "string"},
                    "material": {"type": ["string", "null"]},
                    "dimensions": {"type": ["string", "null"]},
                },
            },
        }
    },
}

if __name__ == "__main__":
    main()
