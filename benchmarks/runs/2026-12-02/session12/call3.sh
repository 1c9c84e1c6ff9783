#!/usr/bin/env bash
# Session 12, device call 3: the graphed-layer GPU test call 2 ran out of time for (20 varying-length steps with
# CUDA-graphed layers: several buckets, so the shared storage's capacity hint is exercised), on pinned versions.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-hf/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
timeout 330 python3 -m pytest -v -s -p no:logging -p no:cacheprovider --durations=0 tests/test_gpu.py \
  -k "varying_lengths and graphs" > $OUT/gpu_tests_varying.log 2>&1
echo "tests rc=$?" >> $OUT/times.txt
