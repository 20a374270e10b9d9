#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: install the carried wheels (.whl/) and, once
# the three parts of the DALI archive are there (.dali1/ .dali2/ .dali3/, carried over three
# calls while the machine stays warm; docs/benchmarks.md), DALI; then bench/gpu_check.py with
# the arguments given.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
if ls .dali1/* .dali2/* .dali3/* >/dev/null 2>&1 && ! python3 -c 'import nvidia.dali' 2>/dev/null; then
    # into the interpreter's own site-packages: nvidia/ there is one package with DALI's parts
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ -w "$site" ] || site=/tmp/site
    cat .dali1/* .dali2/* .dali3/* | xz -d | tar -x -C "$site" || exit 1
fi
python3 -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
python3 bench/gpu_check.py "$@"
