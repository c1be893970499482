#!/usr/bin/env bash
# Downloads, here (where PyPI is reachable), the optional GPU packages that the lent machine
# lacks and cannot fetch: xformers (the `xformers` attention backend) and torchao (the `torchao`
# FP8 backend), built for its Python 3.12 and x86-64. They go to .whl/ (in .gitignore, so only a
# carry sends them); carry [".whl"] in the device call and benches/gpu_check.sh installs them
# into /tmp/site first.
#   bash benches/fetch_gpu_wheels.sh            # then: device run, carry [".whl"]
# Versions: xformers 0.0.35 needs torch >= 2.10 (the machine has 2.11); torchao 0.18.0's float8
# training is Python over torch._scaled_mm. Flash-attn and Transformer Engine have no wheel that
# fits the 64 MiB a call carries (and are built per CUDA/torch pair), so they stay unavailable
# there and their rows say so. Override with XFORMERS= / TORCHAO= (version) or WHEELS="name==v ...".
set -eu
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-"xformers==${XFORMERS:-0.0.35} torchao==${TORCHAO:-0.18.0}"}
mkdir -p .whl
PY=${PYTHON:-$(command -v python3 || command -v python)}
for w in $WHEELS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
done
ls -l .whl
du -sh .whl
