#!/usr/bin/env bash
# Rebuilds the hostile test components from their WAT with wasm-tools, through jco's npm build
# (`parse`, `component embed` of the prefetch world of wit/policy.wit, `component new`).
# The .wasm files are committed; tests do not run this. Needs node and npm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tools=${JCO_DIR:-$(mktemp -d)}
[ -d "$tools/node_modules/@bytecodealliance/jco-transpile" ] ||
  npm install --prefix "$tools" --silent @bytecodealliance/jco
cp "$here/embed.mjs" "$tools/"
for f in multi-memory table-grow; do
  node "$tools/embed.mjs" "$here/$f.wat" "$here/../../../wit/policy.wit" prefetch-policy "$here/$f.wasm"
done
