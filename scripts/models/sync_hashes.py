#!/usr/bin/env python3
"""Write the sha256 of each committed model file into its manifest.

`--check` only reports mismatches (exit 1), e.g. after rerunning train_sensor.py
or quantize.py to confirm they rebuilt the files bit for bit.
PyPI-sourced manifests are never rewritten: their hashes pin upstream files.
"""
import hashlib
import pathlib
import re
import sys
import tomllib

MODELS = pathlib.Path(__file__).resolve().parents[2] / "models"


def main() -> int:
    check = "--check" in sys.argv
    bad = 0
    for manifest in sorted(MODELS.glob("*.toml")):
        text = manifest.read_text()
        m = tomllib.loads(text)
        if m["source"]["kind"] != "committed":
            continue
        actual = hashlib.sha256((MODELS / m["path"]).read_bytes()).hexdigest()
        if actual == m["sha256"]:
            print(f"same    {m['name']}")
            continue
        bad += 1
        if check:
            print(f"DIFFERS {m['name']}: file {actual}, manifest {m['sha256']}")
        else:
            manifest.write_text(re.sub(r'(?m)^sha256 = "[0-9a-f]*"', f'sha256 = "{actual}"', text, count=1))
            print(f"updated {m['name']}: {actual}")
    return 1 if (check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
