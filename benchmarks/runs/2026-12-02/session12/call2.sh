#!/usr/bin/env bash
# Session 12, device call 2: Unsloth at 4x4096 (its per-layer compile off and on; documents cut to max_length since
# session 11) beside fastgemma under TRL's own trainer, then the graphed-layer GPU tests with the time left.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-hf/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth \
       .wu/whl/*.whl $(ls .whl/*.whl | grep -v -e /trl- -e /datasets-) \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && export PYTHONPATH=/tmp/site:$PWD FASTGEMMA_UNSLOTH_PATH=/tmp/site-unsloth:$PWD/.wu/pkgs PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
T0=$(date +%s)
timeout 480 python3 -m benchmarks.run --suite trl --models 2b --contenders unsloth-nocompile,unsloth,fastgemma \
  --trl-trainer trl --trl-batch 4 --trl-max-length 4096 --trl-grad-accum 1 --steps 4 --warmup 1 \
  --unsloth-timeout-s 250 --json $OUT/trl4096_unsloth.json --results $OUT/RESULTS.md > $OUT/trl4096_unsloth.log 2>&1
echo "unsloth rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
left=$(( 570 - ($(date +%s) - T0) ))
[ $left -gt 30 ] && timeout $left python3 -m pytest -v -p no:logging -p no:cacheprovider --durations=0 tests/test_gpu.py \
  -k graph > $OUT/gpu_tests_graph.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
