"""Tests of the SDK and the bom_extractor example: python3 -m unittest discover sdk/python"""

import io
import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "examples", "bom_extractor"))

from openclaw_plugin import BasePlugin, PluginError, run  # noqa: E402
import bom  # noqa: E402


def serve(cls, *msgs):
    out = io.StringIO()
    run(cls, stdin=io.StringIO("".join(json.dumps(m) + "\n" for m in msgs)), stdout=out)
    return [json.loads(l) for l in out.getvalue().splitlines()]


class Doubler(BasePlugin):
    def validate(self):
        return self.config.get("ok", True)

    def execute(self, task_data):
        if "boom" in task_data:
            raise PluginError("boom asked")
        if "crash" in task_data:
            return 1 / 0
        return task_data["x"] * 2


class SdkTest(unittest.TestCase):
    def test_protocol(self):
        got = serve(Doubler,
                    {"type": "validate", "id": "validate", "config": {}},
                    {"type": "execute", "id": "a", "input": {"x": 21}},
                    {"type": "execute", "id": "b", "input": {"boom": 1}},
                    {"type": "execute", "id": "c", "input": {"crash": 1}},
                    {"type": "frob", "id": "d"})
        self.assertEqual(got[0], {"type": "result", "id": "validate", "output": True})
        self.assertEqual(got[1], {"type": "result", "id": "a", "output": 42})
        self.assertEqual(got[2], {"type": "error", "id": "b", "message": "boom asked"})
        self.assertEqual(got[3]["type"], "error")
        self.assertIn("ZeroDivisionError", got[3]["message"])
        self.assertEqual(got[4]["type"], "error")

    def test_validate_false(self):
        got = serve(Doubler, {"type": "validate", "id": "validate", "config": {"ok": False}})
        self.assertEqual(got[0]["output"], False)

    def test_execute_must_be_implemented(self):
        got = serve(BasePlugin, {"type": "execute", "id": "a", "input": {}})
        self.assertIn("NotImplementedError", got[0]["message"])

    def test_bom(self):
        p = bom.BomExtractor({"prefixes": ["R", "C", "LED"]})
        p.validate()
        self.assertEqual(p.parse("R1 10k 0603 x4"),
                         {"ref": "R1", "refs": ["R1"], "value": "10k", "package": "0603", "qty": 4})
        self.assertEqual(p.parse("C3,C4 100nF O402")["qty"], 2)
        self.assertEqual(p.parse("C3,C4 100nF O402")["package"], "0402")
        self.assertEqual(p.parse("LED1 red 0805 xl")["qty"], 1)
        self.assertIsNone(p.parse("Total: 12 parts"))


if __name__ == "__main__":
    unittest.main()
