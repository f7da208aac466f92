# Sourced by every install and test script right after `set -euo pipefail`:
# a failing command prints itself, its exit code and where it was (file and
# line, plus the calling function), so a break in a set-up step is one line to
# read instead of a silent exit. `set -E` carries the trap into functions and
# command substitutions, where a silent death is most likely.
set -E
openclaw_err_trap() {
  local rc=$1 line=$2 cmd=$3 src=${BASH_SOURCE[1]:-$0} fn=${FUNCNAME[1]:-main}
  printf 'ERROR: %s:%s (in %s): command failed with exit code %s: %s\n' \
    "$src" "$line" "$fn" "$rc" "$cmd" >&2
}
trap 'openclaw_err_trap $? $LINENO "$BASH_COMMAND"' ERR
