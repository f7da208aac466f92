"""bom_extractor: OCR'd bill-of-materials lines -> a parts table.

Input:  {"lines": ["R1 10k 0603 x4", "C3,C4 100nF 0402 x2", ...]}
Output: {"parts": [{"ref": "R1", "refs": ["R1"], "value": "10k",
                    "package": "0603", "qty": 4, "line": 0}, ...],
         "unparsed": [{"line": 2, "text": "..."}],
         "total_qty": 6}
"""

import os
import re
import sys

# Keep the SDK folder free of __pycache__ written by the agent's runs.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from openclaw_plugin import BasePlugin, PluginError, run  # noqa: E402

# Common OCR confusions in quantities and packages: O->0, l/I->1, S->5.
_DIGITS = str.maketrans({"O": "0", "o": "0", "l": "1", "I": "1", "S": "5"})
_PACKAGE = re.compile(r"^(0201|0402|0603|0805|1206|1210|2010|2512|SOT-?23(-\d)?|SOIC-?\d+|"
                      r"QFN-?\d+|TQFP-?\d+|SOD-?\d+|TO-?\d+|DIP-?\d+|THT)$", re.I)
_QTY = re.compile(r"^[xX×*]\s*([0-9OolIS]+)$|^([0-9OolIS]+)\s*(pcs|pc|x)$", re.I)


class BomExtractor(BasePlugin):
    def validate(self):
        prefixes = self.config.get("prefixes", [])
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise PluginError("config `prefixes`: expected a list of strings")
        # Longest first so "LED1" is not read as "L" + "ED1".
        self.prefixes = sorted(prefixes, key=len, reverse=True)
        return True

    def _ref_ok(self, ref):
        for p in self.prefixes:
            if ref.upper().startswith(p) and ref[len(p):].isdigit():
                return True
        return False

    def parse(self, text):
        tokens = text.replace(";", " ").split()
        if not tokens:
            return None
        refs = [r for r in tokens[0].split(",") if r]
        if not refs or not all(self._ref_ok(r) for r in refs):
            return None
        qty = None
        package = None
        value_parts = []
        for tok in tokens[1:]:
            m = _QTY.match(tok)
            if m and qty is None:
                qty = int((m.group(1) or m.group(2)).translate(_DIGITS))
            elif package is None and (_PACKAGE.match(tok) or _PACKAGE.match(tok.translate(_DIGITS))):
                package = (tok if _PACKAGE.match(tok) else tok.translate(_DIGITS)).upper()
            else:
                value_parts.append(tok)
        if qty is None:
            qty = len(refs)
        return {
            "ref": refs[0].upper(),
            "refs": [r.upper() for r in refs],
            "value": " ".join(value_parts),
            "package": package,
            "qty": qty,
        }

    def execute(self, task_data):
        lines = task_data.get("lines")
        if not isinstance(lines, list):
            raise PluginError("`lines`: expected a list of strings")
        if not hasattr(self, "prefixes"):
            self.validate()
        parts, unparsed = [], []
        for i, text in enumerate(lines):
            if not isinstance(text, str):
                raise PluginError("`lines[%d]`: expected a string" % i)
            row = self.parse(text)
            if row is None:
                if text.strip():
                    unparsed.append({"line": i, "text": text})
                continue
            row["line"] = i
            parts.append(row)
        self.log("parsed %d of %d lines" % (len(parts), len(lines)))
        return {"parts": parts, "unparsed": unparsed,
                "total_qty": sum(p["qty"] for p in parts)}


if __name__ == "__main__":
    run(BomExtractor)
