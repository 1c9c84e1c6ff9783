#!/usr/bin/env bash
# Session 11, device call 3: the graphed layers' shared static buffers (GPU tests, 4x4096 peak memory against
# op by op), and Unsloth at 1x2048x8 (documents now cut to max_length), its per-layer compile on and off.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-hf/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth \
       .wu/whl/*.whl $(ls .whl/*.whl | grep -v -e /trl- -e /datasets-) \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && export PYTHONPATH=/tmp/site:$PWD FASTGEMMA_UNSLOTH_PATH=/tmp/site-unsloth:$PWD/.wu/pkgs PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
T0=$(date +%s)
timeout 130 python3 -m pytest -v -p no:logging -p no:cacheprovider --durations=0 tests/test_gpu.py \
  -k "accumulate_gradients_like_the_op_by_op or (training_step_bf16_matches_hf_eager and graphs)" > $OUT/gpu_tests.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
timeout 330 python3 -m benchmarks.run --suite trl --models 2b --contenders hf-eager,unsloth-nocompile,unsloth \
  --trl-trainer trl --trl-batch 1 --trl-max-length 2048 --trl-grad-accum 8 --steps 5 --warmup 2 \
  --unsloth-timeout-s 120 --budget-s 200 --json $OUT/trl_unsloth_small.json --results $OUT/RESULTS.md > $OUT/trl_unsloth_small.log 2>&1
echo "unsloth rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
left=$(( 575 - ($(date +%s) - T0) ))
timeout $left python3 -m benchmarks.run --suite trl --models 2b --contenders fastgemma-graphs,fastgemma \
  --trl-trainer lean --trl-batch 4 --trl-max-length 4096 --trl-grad-accum 1 --steps 4 --warmup 1 \
  --budget-s $(( left - 75 )) --json $OUT/trl4096.json --results $OUT/RESULTS.md > $OUT/trl4096.log 2>&1
echo "4096 rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
