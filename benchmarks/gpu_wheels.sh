#!/bin/sh
# Wheels of the OpenMMLab packages the whole-model GPU benchmarks import, for
# a GPU machine whose Python has torch, triton, einops, numpy, opencv, rich,
# pyyaml, click, markdown and zipp but no OpenMMLab stack (and cannot
# download). Run on any machine with pip and
# network access; it writes .whl/ (keep it out of git, e.g. in
# .git/info/exclude).
#
#   sh benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12
#
# On the GPU machine, with .whl/ copied next to the checkout:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   cp benchmarks/mmcv_ext_torchvision.py /tmp/site/mmcv/_ext.py
#   python3 benchmarks/gpu_check.py
#
# mmcv is built without its compiled ops (mmcv-lite: its Python part, which
# mmpretrain's models and BiFormer's backbone need). mmdet's Mask R-CNN calls
# two of those ops, NMS and RoIAlign: benchmarks/mmcv_ext_torchvision.py,
# copied in as mmcv/_ext.py, runs them on torchvision's kernels.
set -eu
PY=${1:-3.12}
PYTHON=${PYTHON:-python3}
OUT=$(pwd)/.whl
MMCV=2.1.0
mkdir -p "$OUT"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PY" --implementation cp --platform any \
    -d "$OUT" mmengine==0.10.7 mmpretrain==1.2.0 addict==2.4.0 \
    yapf==0.43.0 termcolor==3.3.0 platformdirs==4.14.9 \
    importlib-metadata==10.2.0 model-index==0.1.11 ordered-set==4.1.0 \
    mat4py==0.6.0 mmdet==3.3.0 terminaltables==3.1.10
# compiled ones (Mask R-CNN's masks): for CPython $PY on x86-64 Linux
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PY" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" pycocotools==2.0.11 shapely==2.1.2
TMP=$(mktemp -d)
"$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$TMP" \
    mmcv==$MMCV
tar xzf "$TMP/mmcv-$MMCV.tar.gz" -C "$TMP"
(cd "$TMP/mmcv-$MMCV" && MMCV_WITH_OPS=0 "$PYTHON" -m pip wheel -q \
    --no-deps --no-build-isolation -w "$OUT" .)
rm -rf "$TMP"
ls -l "$OUT"
