#!/usr/bin/env bash
# Session 11, device call 1: the H100 targets of the small-batch issue (2B 1x2048x8 under the lean trainer
# against HF eager, the recipe's GPU defaults) and Unsloth, its per-layer compile on and off, in the same run.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-hf/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth \
       .wu/whl/*.whl $(ls .whl/*.whl | grep -v -e /trl- -e /datasets-) \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && export PYTHONPATH=/tmp/site:$PWD FASTGEMMA_UNSLOTH_PATH=/tmp/site-unsloth:$PWD/.wu/pkgs PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
T0=$(date +%s)
# The recipe's own GPU defaults on 200-4000-token documents.
python3 recipes/make_random_gemma2.py --size 2b --out /tmp/g2b > $OUT/make_model.log 2>&1
python3 -c "from pathlib import Path; from benchmarks.suite_scale import write_documents; write_documents(Path('/tmp/docs.jsonl'), 300, 200, 4000)"
timeout 150 python3 recipes/sft_gemma2.py --model /tmp/g2b --dataset /tmp/docs.jsonl --max-steps 10 --output-dir /tmp/r > $OUT/recipe_default.log 2>&1
echo "recipe rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
# 2B, 1 packed row x 2048 x 8: graphed layers and HF eager under the lean trainer, then Unsloth (its own process, image's transformers).
left=$(( 560 - ($(date +%s) - T0) ))
timeout $left python3 -m benchmarks.run --suite trl --models 2b --contenders fastgemma-graphs,hf-eager,unsloth-nocompile,unsloth \
  --trl-trainer lean --trl-batch 1 --trl-max-length 2048 --trl-grad-accum 8 --steps 5 --warmup 2 \
  --unsloth-timeout-s 140 --budget-s $(( left - 150 )) --json $OUT/trl_small.json --results $OUT/RESULTS.md > $OUT/trl_small.log 2>&1
echo "trl rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
