#!/usr/bin/env bash
# Session 11, device call 2: Unsloth (its per-layer compile on and off) against HF eager and the graphed layers,
# all under TRL's trainer, at 1x2048x8; then at 4x4096 beside fastgemma op by op, as far as the time allows.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-hf/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth \
       .wu/whl/*.whl $(ls .whl/*.whl | grep -v -e /trl- -e /datasets-) \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && export PYTHONPATH=/tmp/site:$PWD FASTGEMMA_UNSLOTH_PATH=/tmp/site-unsloth:$PWD/.wu/pkgs PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
T0=$(date +%s)
timeout 400 python3 -m benchmarks.run --suite trl --models 2b --contenders hf-eager,fastgemma-graphs,unsloth-nocompile,unsloth \
  --trl-trainer trl --trl-batch 1 --trl-max-length 2048 --trl-grad-accum 8 --steps 5 --warmup 2 \
  --unsloth-timeout-s 130 --budget-s 300 --json $OUT/trl_unsloth_small.json --results $OUT/RESULTS.md > $OUT/trl_unsloth_small.log 2>&1
echo "small rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
left=$(( 570 - ($(date +%s) - T0) ))
timeout $left python3 -m benchmarks.run --suite trl --models 2b --contenders fastgemma,unsloth-nocompile,unsloth \
  --trl-trainer trl --trl-batch 4 --trl-max-length 4096 --trl-grad-accum 1 --steps 4 --warmup 1 \
  --unsloth-timeout-s 130 --budget-s $(( left - 140 )) --json $OUT/trl_unsloth_4096.json --results $OUT/RESULTS.md > $OUT/trl_unsloth_4096.log 2>&1
echo "4096 rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
