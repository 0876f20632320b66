#!/usr/bin/env bash
# The llama.cpp peer for `bench --peer-llama-server`: builds llama.cpp's `llama-server` (and
# `llama-bench`) from the source that the `llama-cpp-python` source distribution on PyPI
# vendors, and converts the bench's GPT-2-medium-shaped random checkpoint, exits stripped, to
# GGUF with llama.cpp's own converter at f32, bf16 and q8_0. Everything is cached under
# bench-data/llama.cpp/ (delete it to rebuild).
#
#   bash bench/peer/llama_cpp.sh [CHECKPOINT]   (default bench-data/gpt2-medium-multiexit-random,
#                                               written by `bench --arch gpt2` on its first run)
#
# Needs cmake and a C++ compiler (apt-get install cmake g++), PyPI, and a Python with numpy,
# torch, transformers and safetensors for the converter: $PYTHON, default the reference venv
# (../shared/bench/setup_ref.sh) when it exists, else python3.
# Prints the paths `bench` takes: --peer-llama-server BIN --peer-gguf DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=0.3.36 # llama-cpp-python; it vendors a llama.cpp of its release
CKPT=${1:-bench-data/gpt2-medium-multiexit-random}
OUT=bench-data/llama.cpp
PYTHON=${PYTHON:-$HOME/.cache/exitserve-ref/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
[ -f "$CKPT/model.safetensors" ] || {
    echo "no $CKPT/model.safetensors: run \`bench --arch gpt2\` once first" >&2
    exit 2
}
mkdir -p "$OUT"

SRC=$OUT/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$OUT"
    tar -xzf "$OUT/llama_cpp_python-$VERSION.tar.gz" -C "$OUT"
fi

BIN=$OUT/build/bin
if [ ! -x "$BIN/llama-server" ]; then
    # Native CPU code (what a user serving on this machine builds), no GPU, no curl.
    cmake -S "$SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON > "$OUT/cmake.log"
    cmake --build "$OUT/build" --config Release -j "$(nproc)" \
        --target llama-server llama-bench > "$OUT/build.log"
fi

# The plain GPT-2 checkpoint: the same tensors without the exit heads (the original head is
# the tied embedding), under the architecture name the converter knows.
PLAIN=$OUT/gpt2-medium-plain
if [ ! -f "$PLAIN/.complete" ]; then
    mkdir -p "$PLAIN"
    cp "$CKPT"/{vocab.json,merges.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$PLAIN"/
    "$PYTHON" - "$CKPT" "$PLAIN" <<'PY'
import json, sys
from safetensors.numpy import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
tensors = {k: v for k, v in load_file(f"{src}/model.safetensors").items()
           if not k.startswith("name_to_lm_exit_head.")}
save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
cfg = json.load(open(f"{src}/config.json"))
cfg["architectures"] = ["GPT2LMHeadModel"]
cfg.pop("lm_head_layer_indices", None)
cfg["n_ctx"] = cfg["n_positions"]  # the converter reads the context length under its old name
json.dump(cfg, open(f"{dst}/config.json", "w"), indent=1)
PY
    touch "$PLAIN/.complete"
fi

for t in f32 bf16 q8_0; do
    GGUF=$OUT/gpt2-medium-$t.gguf
    if [ ! -f "$GGUF" ]; then
        "$PYTHON" "$SRC/convert_hf_to_gguf.py" "$PLAIN" --outtype "$t" --outfile "$GGUF.part" \
            > "$OUT/convert-$t.log" 2>&1
        mv "$GGUF.part" "$GGUF"
    fi
done
echo "--peer-llama-server $BIN/llama-server --peer-gguf $OUT"
