#!/usr/bin/env python3
"""Reference checker for the bill-of-materials fixtures (examples/bom).

check(items, rules) -> anomalies, in exactly the format of truth.json:
  {"row": 1-based table row, "field": ..., "kind": ..., "value": ..., "suggestion": ...}

Kinds, in the order they are tested per row:
  missing        a field of rules["required"] is null/empty; value null, suggestion null.
  not_positive   quantity <= 0; field "quantity", value the quantity, suggestion null.
  unit_alias     the unit is a key of rules["unit_aliases"]; field "unit", value the
                 printed unit, suggestion the canonical unit.
  unit_mismatch  (a) the description names a countable thing (a word of
                 rules["countable_words"], plural "s"/"es" allowed) but the canonical
                 unit is not in rules["countable_units"]: field "unit", value the printed
                 unit, suggestion the first countable unit ("pcs");
                 (b) the canonical unit is countable but the quantity is not an integer:
                 field "quantity", value the quantity, suggestion null;
                 (c) the unit is neither canonical nor an alias: field "unit", value the
                 unit, suggestion null.
Anomalies come sorted by row, then field order of FIELDS, then kind order of KINDS.

Run with no arguments to self-check against examples/bom/truth.json and rules.json
(exit 1 on any difference).  `bom_rules.py TRUTH RULES` checks other files.
"""
import json
import os
import sys

FIELDS = ["part_number", "description", "quantity", "unit", "material", "dimensions"]
KINDS = ["missing", "not_positive", "unit_alias", "unit_mismatch"]


def _empty(v):
    return v is None or (isinstance(v, str) and v.strip() == "")


def _names_countable(description, words):
    for tok in description.lower().split():
        if tok in words:
            return True
        # plurals: "bolts", "washers", "bushes"
        if tok.endswith("s") and tok[:-1] in words:
            return True
        if tok.endswith("es") and tok[:-2] in words:
            return True
    return False


def sort_key(a):
    return (a["row"], FIELDS.index(a["field"]), KINDS.index(a["kind"]))


def check(items, rules):
    out = []
    units = set(rules["units"])
    aliases = rules["unit_aliases"]
    countable_units = rules["countable_units"]
    words = set(w.lower() for w in rules["countable_words"])
    for row, item in enumerate(items, start=1):
        def add(field, kind, value=None, suggestion=None):
            out.append({"row": row, "field": field, "kind": kind,
                        "value": value, "suggestion": suggestion})

        for field in rules["required"]:
            if _empty(item.get(field)):
                add(field, "missing")
        qty = item.get("quantity")
        unit = item.get("unit")
        if isinstance(qty, (int, float)) and qty <= 0:
            add("quantity", "not_positive", qty)
        canonical = None
        if not _empty(unit):
            if unit in aliases:
                canonical = aliases[unit]
                add("unit", "unit_alias", unit, canonical)
            elif unit in units:
                canonical = unit
            else:
                add("unit", "unit_mismatch", unit)
        if canonical is not None:
            desc = item.get("description") or ""
            if canonical not in countable_units and _names_countable(desc, words):
                add("unit", "unit_mismatch", unit, countable_units[0])
            if (canonical in countable_units and isinstance(qty, (int, float))
                    and float(qty) != int(qty)):
                add("quantity", "unit_mismatch", qty)
    out.sort(key=sort_key)
    return out


def self_check(truth_path, rules_path):
    with open(truth_path) as f:
        truth = json.load(f)
    with open(rules_path) as f:
        rules = json.load(f)
    bad = 0
    for doc in truth["documents"]:
        got = check(doc["items"], rules)
        if got != doc["anomalies"]:
            bad += 1
            print(f"{doc['file']}: expected {doc['anomalies']}\n  got {got}")
    n = len(truth["documents"])
    print(f"bom_rules: {n - bad}/{n} documents match their truth anomalies")
    return bad == 0


if __name__ == "__main__":
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "bom")
    args = sys.argv[1:]
    truth = args[0] if args else os.path.join(root, "truth.json")
    rules = args[1] if len(args) > 1 else os.path.join(root, "rules.json")
    sys.exit(0 if self_check(truth, rules) else 1)
