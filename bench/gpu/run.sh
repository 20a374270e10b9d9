#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: install the carried wheels (.whl/), keep any
# carried part of the DALI archive (.dali1/ .dali2/ .dali3/, made by bench/gpu/dali_parts.sh) in
# /tmp/dali (a carried folder that the next call does not name is removed there; /tmp stays
# while the machine is warm, 30 s between calls), install DALI once the three parts are there,
# then run bench/gpu_check.py with the arguments given; `run.sh stash` only keeps the part.
#   call 1, carry .whl .dali1: bash bench/gpu/run.sh --work /tmp/gpuwork --out $OUT/a.json
#   call 2, carry .dali2:      bash bench/gpu/run.sh stash
#   call 3, carry .dali3:      bash bench/gpu/run.sh --work /tmp/gpuwork --out $OUT/b.json \
#                                  --sections make_shards_dali,make_shards_dali_cpu,dali_loader_gpu
set -u
mkdir -p /tmp/dali
for part in .dali1/* .dali2/* .dali3/*; do
    [ -f "$part" ] && cp "$part" /tmp/dali/
done
[ "${1:-}" = stash ] && { ls /tmp/dali; exit 0; }
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
parts=(/tmp/dali/part.00 /tmp/dali/part.01 /tmp/dali/part.02)
if ls "${parts[@]}" >/dev/null 2>&1 && ! python3 -c 'import nvidia.dali' 2>/dev/null; then
    # into the interpreter's own site-packages: nvidia/ there is one package with DALI's parts
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ -w "$site" ] || site=/tmp/site
    cat "${parts[@]}" | xz -d -T4 | tar -x -C "$site" || exit 1
fi
python3 -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>/dev/null || echo "no DALI"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
python3 bench/gpu_check.py "$@"
