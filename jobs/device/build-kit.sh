#!/usr/bin/env bash
# Build the device kit, run HERE (a machine with network and the project's .venv):
#   .kit/kit.tar.xz  (at most 50 MiB): one site-packages folder holding
#     - Ray, this venv's version, cp312 wheel, without ray/jars, ray/rllib, ray/serve, ray/llm;
#     - diffusers, this venv's version;
#     - what the GPU image lacks for them: importlib_metadata, jsonschema and its three helpers;
#     - the project itself (a wheel of the working tree).
# The GPU image already has Python 3.12, torch, numpy, pyarrow, pandas, safetensors, Pillow, scipy,
# pytest, huggingface-hub, regex, requests, click, msgpack, protobuf, pyyaml (jobs/device/README.md).
# jobs/device/run-kit.sh unpacks it there. Wheels are cached in .kit/wheels; .kit/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
KIT=${KIT:-.kit}
MAX_MIB=${MAX_MIB:-50}
# The GPU image's Python and platform (manylinux tags pip must match exactly).
PIP_TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
RAY_VERSION=$($PY -c 'import ray; print(ray.__version__)')
DIFFUSERS_VERSION=$($PY -c 'import diffusers; print(diffusers.__version__)')
EXTRA=(importlib_metadata jsonschema jsonschema-specifications referencing rpds-py)

mkdir -p "$KIT/wheels"
$PY -m pip download -q --no-deps "${PIP_TARGET[@]}" -d "$KIT/wheels" \
    "ray==$RAY_VERSION" "diffusers==$DIFFUSERS_VERSION" "${EXTRA[@]}"
rm -f "$KIT"/wheels/d3hr_ray-*.whl
$PY -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" .

rm -rf "$KIT/build" && mkdir -p "$KIT/build/site"
for w in "$KIT"/wheels/*.whl; do
    unzip -q -o "$w" -d "$KIT/build/site"   # a wheel is a zip of its site-packages files (modes kept)
done
rm -rf "$KIT"/build/site/ray/{jars,rllib,serve,llm}
find "$KIT/build/site" -name __pycache__ -type d -prune -exec rm -rf {} +
(cd "$KIT/build/site" && ls -d *.dist-info | sed 's/\.dist-info$//') > "$KIT/build/site/KIT-CONTENTS.txt"

rm -f "$KIT/kit.tar.xz"
XZ_OPT="-6 -T2" tar -C "$KIT/build" -cJf "$KIT/kit.tar.xz" site
size=$(stat -c %s "$KIT/kit.tar.xz")
echo "kit: $KIT/kit.tar.xz $((size / 1024 / 1024)) MiB ($size bytes):"
sed 's/^/  /' "$KIT/build/site/KIT-CONTENTS.txt"
if (( size > MAX_MIB * 1024 * 1024 )); then
    echo "kit is over $MAX_MIB MiB: trim more" >&2
    exit 1
fi
rm -rf "$KIT/build"
