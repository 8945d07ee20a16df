#!/usr/bin/env bash
# moehost against llama.cpp on the same synthetic DeepSeek-V3-architecture model, same threads,
# alternating rounds: prefill (256) and decode (32) tokens/s and peak RSS per format.
# Needs torch + transformers, a C++ toolchain and cmake; llama.cpp comes from its PyPI source
# package (llama-cpp-python's vendored tree). Usage: run.sh WORK_DIR [THREADS]
set -euo pipefail
W=$1; T=${2:-2}; HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$HERE/../..
mkdir -p "$W" && cd "$W"
[ -d model-bf16 ] || python3 "$HERE/make_model.py" model-bf16
MOEHOST=$ROOT/target/release/moehost
for q in int8 int4; do [ -d model-$q ] || "$MOEHOST" quantize --model model-bf16 --out model-$q --experts $q; done
if [ ! -d llama ]; then
  pip install scikit-build-core >/dev/null
  pip download llama-cpp-python --no-binary :all: --no-deps --no-build-isolation -d .
  mkdir llama && tar xzf llama_cpp_python-*.tar.gz -C llama --strip-components=1
  (cd llama/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
     -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
   && cmake --build build -j"$T" --target llama-bench llama-quantize)
fi
L=$W/llama/vendor/llama.cpp
[ -f bf16.gguf ] || python3 "$HERE/convert.py" "$L" model-bf16 --outfile bf16.gguf --outtype bf16
for q in Q8_0 Q4_0; do [ -f $q.gguf ] || "$L/build/bin/llama-quantize" bf16.gguf $q.gguf $q "$T"; done
for round in 1 2; do
  for pair in "bf16 bf16" "int8 Q8_0" "int4 Q4_0"; do
    set -- $pair
    /usr/bin/time -f "  peak RSS %M KB" "$MOEHOST" bench --model model-$1 --threads "$T" \
      --prompt-tokens 256 --decode-tokens 32 --repeats 1 2>&1 | sed "s/^/moehost $1: /"
    /usr/bin/time -f "  peak RSS %M KB" "$L/build/bin/llama-bench" -m $2.gguf -t "$T" \
      -p 256 -n 32 -r 1 2>&1 | grep -E "pp256|tg32|RSS" | sed "s/^/llama.cpp $2: /"
  done
done
