#!/usr/bin/env bash
# Session 12, device call 1: issue 11's 4x4096 no-regression line, fastgemma against HF flex_attention on one
# machine in one call (two harness runs so a cut-off HF flex cannot lose the fastgemma row; merged with --from-json).
# HF flex's first step takes ~6 min and its second recompiles, hence --steps 6 --warmup 2.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-hf/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
T0=$(date +%s)
common="--suite trl --models 2b --trl-trainer lean --trl-batch 4 --trl-max-length 4096 --trl-grad-accum 1 --steps 6 --warmup 2"
timeout 150 python3 -m benchmarks.run $common --contenders fastgemma \
  --json $OUT/trl4096_fastgemma.json --results $OUT/RESULTS.md > $OUT/trl4096_fastgemma.log 2>&1
echo "fastgemma rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
left=$(( 580 - ($(date +%s) - T0) ))
timeout $left python3 -m benchmarks.run $common --contenders hf-flex \
  --json $OUT/trl4096_hfflex.json --results $OUT/RESULTS.md > $OUT/trl4096_hfflex.log 2>&1
echo "hf-flex rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
