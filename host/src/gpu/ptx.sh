#!/usr/bin/env bash
# Regenerates the checked-in PTX from the CUDA sources and stamps each with its sources' digest,
# which host/build.rs checks (a `cuda` build fails on a stale PTX). Needs nvcc >= 12 (no GPU):
# see rows_dot.cu for the PyPI wheels that give nvcc 13.0.88. `--stamp` only stamps (for a PTX
# known to be current).
set -euo pipefail
cd "$(dirname "$0")"
digest() { # FNV-1a 64 over the source then its local includes, as build.rs computes it
  python3 - "$1" <<'PY'
import re, sys
src = open(sys.argv[1], 'rb').read()
data = src + b''.join(open(h.decode(), 'rb').read() for h in re.findall(rb'^#include "([^"]+)"$', src, re.M))
h = 0xcbf29ce484222325
for b in data:
    h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
print(f'{h:016x}')
PY
}
for name in rows_dot mla; do
  if [ "${1:-}" != "--stamp" ]; then
    nvcc -ptx -arch=compute_80 -o "$name.ptx" "$name.cu"
  fi
  grep -v '^// moehost-source-digest: ' "$name.ptx" > "$name.ptx.tmp"
  { echo "// moehost-source-digest: $(digest "$name.cu")"; cat "$name.ptx.tmp"; } > "$name.ptx"
  rm "$name.ptx.tmp"
done
