#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment with the pinned
# OpenMMLab 2.x stack. Safe to re-run: every step checks first and skips what
# is already in place, so a second run takes seconds.
#
#   VENV      where the environment lives            (default: .venv)
#   PYTHON    interpreter that creates it             (default: python3)
#   MMBIFORMER_CACHE  where the built mmcv wheel is kept between installs
#                     (default: ${XDG_CACHE_HOME:-~/.cache}/mmbiformer)
set -euo pipefail

cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE=${MMBIFORMER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmbiformer}

TORCH=2.14.1
TORCHVISION=0.29.1
MMCV=2.1.0
# The rest of the stack is pinned in setup.cfg ([options] install_requires and
# the `tests` extra) and installed with the package itself.

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

have() {  # have DIST VERSION -> 0 when DIST==VERSION is installed in the venv
    "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib import metadata
try:
    v = metadata.version(sys.argv[1])
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if v.split('+')[0] == sys.argv[2] else 1)
PYEOF
}

# 1. PyTorch (large: a few minutes the first time)
if have torch "$TORCH" && have torchvision "$TORCHVISION"; then
    say "torch $TORCH / torchvision $TORCHVISION already installed"
else
    say "installing torch==$TORCH torchvision==$TORCHVISION (first time: a few minutes)"
    "${PIP[@]}" install -q "torch==$TORCH" "torchvision==$TORCHVISION"
fi

# Build tools that mmcv's setup.py needs without build isolation: it imports
# pkg_resources (gone from setuptools >= 81) and our C++20 patch needs a
# setuptools recent enough for torch's extension builder (>= 77).
if ! "$PY" - <<'PYEOF' 2>/dev/null
import sys, setuptools, ninja, wheel
v = tuple(int(p) for p in setuptools.__version__.split('.')[:2])
sys.exit(0 if (77, 0) <= v < (81, 0) else 1)
PYEOF
then
    say "installing build tools (setuptools>=77,<81, wheel, ninja)"
    "${PIP[@]}" install -q "setuptools>=77,<81" wheel "ninja>=1.11"
fi

# 2. mmcv with compiled CPU ops, built once per (mmcv, torch, python, arch)
pytag=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
key="mmcv${MMCV}-torch${TORCH}-${pytag}-$(uname -m)"
wheel_dir="$CACHE/wheels/$key"
if have mmcv "$MMCV" && "$PY" -c "import mmcv.ops" 2>/dev/null; then
    say "mmcv $MMCV with compiled ops already installed"
else
    if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
        say "building mmcv $MMCV with CPU ops from source (about 20 minutes on 2 cores, once; cached in $wheel_dir)"
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        "${PIP[@]}" download -q --no-deps --no-binary :all: "mmcv==$MMCV" -d "$build"
        tar -xzf "$build"/mmcv-"$MMCV".tar.gz -C "$build"
        src="$build/mmcv-$MMCV"
        # Torch 2.14's headers need C++20; mmcv's setup.py hard-codes c++14/17.
        sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"
        mkdir -p "$wheel_dir"
        (cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
            "$OLDPWD/$PY" -m pip --disable-pip-version-check wheel --no-build-isolation --no-deps -v . -w "$wheel_dir" \
            > "$build/build.log" 2>&1) &
        builder=$!
        # progress: the compiler commands started so far, once a minute
        total=$(find "$src/mmcv/ops/csrc/pytorch" -name '*.cpp' | wc -l)
        started=$SECONDS
        while kill -0 "$builder" 2>/dev/null; do
            for _ in $(seq 60); do kill -0 "$builder" 2>/dev/null && sleep 1; done
            kill -0 "$builder" 2>/dev/null || break
            n=$(grep -c -- ' -c .*\.cpp -o ' "$build/build.log" || true)
            say "  mmcv: compiling source $n of about $total ($(( (SECONDS - started) / 60 )) min)"
        done
        wait "$builder" || { tail -n 40 "$build/build.log"; say "mmcv build failed (log above)"; exit 1; }
    else
        say "reusing cached mmcv wheel from $wheel_dir"
    fi
    "${PIP[@]}" install -q --no-deps "$wheel_dir"/mmcv-*.whl
fi

# 3. the rest of the stack and this package (editable), pinned in setup.cfg
if "$PY" -c "import mmbiformer" 2>/dev/null && "$PY" - <<'PYEOF'
import configparser
import sys
from importlib import metadata

from packaging.requirements import Requirement

# every pin of setup.cfg as it is now (install_requires and the extras)
# must hold; the installed package's own metadata may be older
cfg = configparser.ConfigParser()
cfg.read('setup.cfg')
lines = cfg['options']['install_requires'].splitlines()
for extra in ('openmmlab', 'tests', 'robustness'):
    lines += cfg['options.extras_require'][extra].splitlines()
for line in filter(None, (ln.strip() for ln in lines)):
    if line.startswith('#'):
        continue
    r = Requirement(line)
    try:
        v = metadata.version(r.name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if not r.specifier.contains(v.split('+')[0], prereleases=True):
        sys.exit(1)
PYEOF
then
    say "OpenMMLab stack and mmbiformer already installed"
else
    say "installing mmengine, mmdet, mmsegmentation, mmpretrain and mmbiformer (editable)"
    "${PIP[@]}" install -q --no-build-isolation -e ".[openmmlab,tests,robustness]"
fi
# 4. the project's C++ CPU kernels (mmbiformer/ops/csrc): torch builds and
# caches them on first use anyway; building here keeps that out of the first
# training step. A failure is not fatal: the pure-torch paths then run.
if "$PY" -m mmbiformer.ops.cpu_ext >/dev/null 2>&1; then
    say "mmbiformer C++ CPU kernels built"
else
    say "warning: the C++ CPU kernels could not be built; the slower pure-torch paths will run (see: $PY -m mmbiformer.ops.cpu_ext)"
fi
say "done: $("$PY" -c "import torch, mmcv, mmdet, mmseg, mmpretrain, mmengine; print(f'torch {torch.__version__}, mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}')")"
