#!/usr/bin/env bash
# Build llama.cpp (as vendored by the llama-cpp-python 0.3.36 sdist) as a test oracle for qconvert.
#
# One cmake build of vendor/llama.cpp with BUILD_SHARED_LIBS=ON gives both
#   - the tools llama-quantize, llama-perplexity, llama-imatrix (linked against the shared libs), and
#   - libllama.so, libggml.so, libggml-base.so, libggml-cpu.so (all in $CACHE/build/bin).
# The llama-cpp-python bindings are then pip-installed from the same sdist with
# CMAKE_ARGS=-DLLAMA_BUILD=OFF (its CMakeLists.txt then builds and installs no library at all, so there
# is no second compile); at import time llama_cpp/llama_cpp.py loads libllama.so from the directory
# in $LLAMA_CPP_LIB_PATH, which env.sh exports.
#
# Byte-exactness: ggml's quantizers (ggml/src/ggml-quants.c) are part of ggml-base, which gets no -march
# flag even with GGML_NATIVE=ON (that adds -march=native to ggml-cpu only). Measured in
# build/compile_commands.json (gcc 12.2, x86-64), ggml-quants.c is compiled with
#   cc -DGGML_BUILD -DGGML_SCHED_MAX_COPIES=4 -DGGML_SHARED -DGGML_USE_OPENMP -D_GNU_SOURCE -D_XOPEN_SOURCE=600
#      -Dggml_base_EXPORTS -I... -ffp-contract=off -O3 -DNDEBUG -fPIC -Wshadow ... -Wdouble-promotion
#      -fopenmp -std=gnu11
# i.e. baseline x86-64 (SSE2; no FMA instruction exists there, so no contraction is possible) and no
# -ffast-math; `objdump -d ggml-quants.c.o | grep vfmadd` finds nothing. The -ffp-contract=off is ours:
# CMAKE_C_FLAGS/CMAKE_CXX_FLAGS below (with CFLAGS/CXXFLAGS from the environment dropped), so that targets
# whose baseline has FMA (aarch64, where gcc contracts by default) do not fuse either. It changes nothing
# in ggml-base on x86-64, and ggml-cpu's explicit FMA intrinsics are unaffected.
#
# Usage: bash scripts/build_llama_cpp.sh      (idempotent; a second run only checks and prints)
# Cache: ${QCONVERT_LLAMA_CPP:-$HOME/.cache/qconvert/llama.cpp-0.3.36}; `. $CACHE/env.sh` exports
#        LLAMA_CPP_DIR (source tree with convert_hf_to_gguf.py, gguf-py), LLAMA_CPP_BIN (tools),
#        LLAMA_CPP_LIB (shared libraries) and LLAMA_CPP_LIB_PATH (read by llama-cpp-python).
# Env:   PYTHON (default python3) is the interpreter the bindings are installed into;
#        JOBS (default: nproc) is the build parallelism.
set -euo pipefail

VERSION=0.3.36
CACHE="${QCONVERT_LLAMA_CPP:-$HOME/.cache/qconvert/llama.cpp-$VERSION}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
SDIST_DIR="$CACHE/llama_cpp_python-$VERSION"
SRC="$SDIST_DIR/vendor/llama.cpp"
BUILD="$CACHE/build"
BIN="$BUILD/bin"
TOOLS=(llama-quantize llama-perplexity llama-imatrix)
LIBS=(libllama.so libggml.so libggml-base.so libggml-cpu.so libllama-common.so libllama-perplexity-impl.so)
FLAGS="-ffp-contract=off"

mkdir -p "$CACHE"
start=$(date +%s)

# 1. source: the sdist from PyPI, unpacked once
if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
    echo "== downloading llama-cpp-python==$VERSION sdist"
    mkdir -p "$CACHE/download"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$CACHE/download" "llama-cpp-python==$VERSION"
    rm -rf "$SDIST_DIR"
    tar -xzf "$CACHE/download/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi

# 2. one shared-library build of llama.cpp: tools + libs
built=1
for f in "${TOOLS[@]}" "${LIBS[@]}"; do [ -e "$BIN/$f" ] || built=0; done
if [ "$built" = 0 ]; then
    echo "== building llama.cpp in $BUILD (-j $JOBS)"
    env -u CFLAGS -u CXXFLAGS -u CPPFLAGS cmake -S "$SRC" -B "$BUILD" \
        -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
        -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
        -DBUILD_SHARED_LIBS=ON \
        -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >"$CACHE/cmake-configure.log"
    cmake --build "$BUILD" --target "${TOOLS[@]}" llama ggml -j "$JOBS" >"$CACHE/cmake-build.log"
    for f in "${TOOLS[@]}" "${LIBS[@]}"; do
        [ -e "$BIN/$f" ] || { echo "build_llama_cpp.sh: $BIN/$f missing after build (see $CACHE/cmake-build.log)" >&2; exit 1; }
    done
fi

# 3. Python bindings without compiling llama.cpp again (they load libllama.so from LLAMA_CPP_LIB_PATH).
# Installed from the local source directory (not from PyPI by name) so pip's wheel cache never stores
# a library-less wheel under the name llama-cpp-python==$VERSION.
if ! LLAMA_CPP_LIB_PATH="$BIN" "$PYTHON" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "== installing llama-cpp-python $VERSION bindings into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$PYTHON" -m pip install -q "$SDIST_DIR"
    LLAMA_CPP_LIB_PATH="$BIN" "$PYTHON" -c "import llama_cpp; llama_cpp.llama_backend_init()"
fi

cat >"$CACHE/env.sh" <<EOF
# written by qconvert scripts/build_llama_cpp.sh
export LLAMA_CPP_DIR="$SRC"
export LLAMA_CPP_BIN="$BIN"
export LLAMA_CPP_LIB="$BIN"
export LLAMA_CPP_LIB_PATH="$BIN"
EOF

echo "LLAMA_CPP_DIR=$SRC"
echo "LLAMA_CPP_BIN=$BIN"
echo "LLAMA_CPP_LIB=$BIN"
echo "env file: $CACHE/env.sh ($(( $(date +%s) - start )) s)"
