#!/usr/bin/env bash
# Builds models/golden/vad_speech_16k.wav: 16 kHz mono PCM16, silence / speech /
# silence / speech / silence, so VAD segments are known by construction.
# Needs Debian's espeak-ng and sox. The output is committed; rerun only to change it.
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/err-trap.sh"
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
espeak-ng -v en-us -s 150 -w "$tmp/a.wav" "Hello, this is open claw, running on the edge."
espeak-ng -v en-us -s 150 -w "$tmp/b.wav" "Second sentence after a pause."
for x in a b; do sox "$tmp/$x.wav" -r 16000 -c 1 -b 16 -e signed-integer "$tmp/${x}16.wav"; done
sox -n -r 16000 -c 1 -b 16 -e signed-integer "$tmp/s1.wav" trim 0 1.0
sox -n -r 16000 -c 1 -b 16 -e signed-integer "$tmp/s2.wav" trim 0 1.5
sox "$tmp/s1.wav" "$tmp/a16.wav" "$tmp/s2.wav" "$tmp/b16.wav" "$tmp/s1.wav" models/golden/vad_speech_16k.wav
# Print where speech lies (for the test's expectations).
for x in a16 b16; do soxi -D "$tmp/$x.wav"; done
