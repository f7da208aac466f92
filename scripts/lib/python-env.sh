# Sourced by scripts/test.sh: a Python virtual environment for what the
# tests run in Python (the real Modbus TCP and RTU servers: pymodbus and
# pyserial; the official OpenAI client, for the gateway tests; the official
# MCP SDK, for tests/mcp.rs; Pillow, to regenerate examples/bom), under $HOME/.cache/openclaw/venv, and its bin/ first on PATH so
# the tests' `python3` is that one. Debian 12 marks its system Python
# "externally managed" (PEP 668): `pip install` there fails with
# externally-managed-environment, which is what a fresh machine hit. A venv
# is the way Debian documents (python3-venv provides ensurepip for it).
# Re-used while it has the pinned versions; rebuilt when it does not.
openclaw_venv="${OPENCLAW_VENV:-$HOME/.cache/openclaw/venv}"
openclaw_py_pins=(pymodbus==3.16.1 pyserial==3.5 openai==3.57.0 mcp==2.3.0 pillow==13.0.0)
if ! "$openclaw_venv/bin/python3" - "${openclaw_py_pins[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
PY
then
  rm -rf "$openclaw_venv"
  python3 -m venv "$openclaw_venv"
  "$openclaw_venv/bin/python3" -m pip install --quiet "${openclaw_py_pins[@]}"
fi
export PATH="$openclaw_venv/bin:$PATH"
