#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (CPU, Release) for the `llama-server` peers of `specframe bench`,
# from the llama.cpp that the INSTALLED llama-cpp-python vendors, so server and backend run the same code.
#
# Installs once into $SPECFRAME_CACHE (else $XDG_CACHE_HOME/specframe, else ~/.cache/specframe)
# /llama-server/<llama-cpp-python version>/llama-server, a self-contained binary (static llama/ggml
# libraries). When that binary exists and runs `--version`, exits at once. Builds in a temporary
# directory and moves the result into place, so an interrupted build leaves nothing half-installed.
#
# No step downloads anything but the source distribution (from pip's cache after the backend's install):
# no curl/OpenSSL, no prebuilt Web UI from Hugging Face (LLAMA_USE_PREBUILT_UI=OFF: the server runs
# without an embedded UI). LLAMA_CURL is not passed: this llama.cpp ignores it (deprecated).
# Parallelism: CMAKE_BUILD_PARALLEL_LEVEL (default: the number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

ver=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null) || {
  echo "build_llama_server: llama-cpp-python is not installed in $PY's environment (run scripts/setup.sh)" >&2
  exit 1
}
cache=${SPECFRAME_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/specframe}
dest=$cache/llama-server/$ver
if "$dest/llama-server" --version >/dev/null 2>&1; then
  echo "build_llama_server: $dest/llama-server is built"
  exit 0
fi

start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")
mkdir -p "$cache/llama-server"
stage=$(mktemp -d "$cache/llama-server/.stage-$ver.XXXXXX")  # on the cache's filesystem: `mv` is a rename
trap 'rm -rf "$work" "$stage"' EXIT

echo "build_llama_server: building llama-server from llama-cpp-python $ver's llama.cpp (a few minutes)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  "llama-cpp-python==$ver" -d "$work/sdist" 2> >(grep -v "^WARNING: Location" >&2)  # absent local indexes
tar -xzf "$work"/sdist/llama_cpp_python-"$ver".tar.gz -C "$work" --strip-components=1 \
  --wildcards "*/vendor/llama.cpp/*"
src=$work/vendor/llama.cpp

cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >"$work/configure.log" 2>&1 || {
  tail -n 30 "$work/configure.log" >&2
  exit 1
}
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
  cmake --build "$work/build" --target llama-server >"$work/build.log" 2>&1 || {
  tail -n 30 "$work/build.log" >&2
  exit 1
}

cp "$work/build/bin/llama-server" "$stage/llama-server"
"$stage/llama-server" --version >/dev/null 2>&1 || {
  echo "build_llama_server: the built llama-server does not run" >&2
  exit 1
}
chmod 755 "$stage"
rm -rf "$dest"
mv -T "$stage" "$dest" || "$dest/llama-server" --version >/dev/null 2>&1  # or a concurrent build won
secs=$(($(date +%s) - start))
echo "build_llama_server: built $dest/llama-server in $((secs / 60)) min $((secs % 60)) s" \
  "(CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)})"
