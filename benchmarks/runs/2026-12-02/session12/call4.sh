#!/usr/bin/env bash
# Session 12, device call 4 (not yet run): the recipe with a forced small micro-batch (--batch-size 1 --grad-accum 8),
# with --cuda-graphs auto named outright, since the default is off (auto: on for <= 4096 tokens per micro-step on one
# GPU). Op by op at this shape the recipe ran 3.1K tokens/s (issue 11); device time left for one run only.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-hf/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
T0=$(date +%s)
python3 recipes/make_random_gemma2.py --size 2b --out /tmp/g2b > $OUT/make_model.log 2>&1
python3 -c "from pathlib import Path; from benchmarks.suite_scale import write_documents; write_documents(Path('/tmp/docs.jsonl'), 300, 200, 4000)"
small="--model /tmp/g2b --dataset /tmp/docs.jsonl --batch-size 1 --grad-accum 8 --max-steps 8 --cuda-graphs auto"
timeout 110 python3 recipes/sft_gemma2.py $small --output-dir /tmp/r_auto > $OUT/recipe_small_auto.log 2>&1
echo "auto rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/times.txt
