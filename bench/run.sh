#!/usr/bin/env bash
# Benchmarks our node-agent against llama.cpp's server (llama-cpp-python, built from source) on
# the same GGUF files, and writes docs/benchmarks.md. Not part of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${LOCALMODEL_CACHE:-$HOME/.cache/localmodel}"
VENV="$CACHE/bench-venv"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
  python3 -m venv "$VENV"
  # Built from source for this CPU (GGML_NATIVE), as our own build uses target-cpu=x86-64-v3.
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install --no-binary llama-cpp-python \
    "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/localmodel/target}"
cargo build --release -p node-agent
"$VENV/bin/python" bench/bench.py --agent "$CARGO_TARGET_DIR/release/node-agent" \
  --python "$VENV/bin/python" --models "$CACHE/bench-models" "$@"
