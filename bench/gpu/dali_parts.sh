#!/usr/bin/env bash
# Here (a machine with pip's index), from the repository root: DALI 2.4.0 for CUDA 13 and what it
# needs at run time, for Python 3.12 on x86_64, as an xz tar of the installed files (the other
# Python versions' extension modules, nvcomp, nvJPEG2000 and nvTIFF left out: about 146 MiB),
# split into .dali1/ .dali2/ .dali3/ (ignored by git), one part per call's carry (64 MiB).
set -euo pipefail
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work/wheels" \
    nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 \
    astunparse gast libcst makefun nvtx optree
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do
    unzip -q -o "$wheel" -d "$work/site" -x '*cpython-39*' '*cpython-310*' '*cpython-311*' \
        '*cpython-313*' '*cpython-314*' '*cpython-315*'
done
rm -f "$work"/site/nvidia/nvimgcodec/extensions/lib{nvjpeg2k,nvtiff}_ext*
tar -C "$work/site" -cf - . | xz -6 -T0 > "$work/dali.tar.xz"
rm -rf .dali1 .dali2 .dali3 && mkdir .dali1 .dali2 .dali3
split -n 3 -d "$work/dali.tar.xz" "$work/part."
mv "$work/part.00" .dali1/ && mv "$work/part.01" .dali2/ && mv "$work/part.02" .dali3/
grep -qs '^/.dali\*/$' .git/info/exclude || echo '/.dali*/' >> .git/info/exclude
du -sh .dali1 .dali2 .dali3
