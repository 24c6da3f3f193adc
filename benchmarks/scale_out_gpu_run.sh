#!/usr/bin/env bash
# Issue 22's GPU runs on 2 x H200 in one call of at most 540 s (timeouts: 45 + 80 + 265 + 140 + 2 x 5).
# Run from the repository root with $OUT set, Ray importable (pip or PYTHONPATH), CUDA_VISIBLE_DEVICES unset:
#     bash benchmarks/scale_out_gpu_run.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-data/benchmarks}
export OUT
mkdir -p "$OUT"
# 1. Tensor parallelism through NCCL on 2 GPUs: TP 2 = TP 1, CUDA graphs, a same-degree reconfigure (~30 s)
timeout 45 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_tensor_parallel_gpu.py 2>&1 \
  | tee "$OUT/gpu_tensor_parallel_test.log" | tail -n 4
# 2. A Ray sweep with a tp=1 point (one 1-GPU actor) and a tp=2 point (one 2-GPU actor) (~60 s)
timeout 80 python3 -m workbench sweep --model llama-3.1-8b --workload fixed --num-requests 64 \
  --workload-arg prompt_len=128 --workload-arg output_len=128 --grid tensor_parallel_size=1,2 --repeats 1 \
  --executor ray --no-progress --set max_model_len=1024 --out "$OUT/ray_tp_sweep_h200x2.jsonl" 2>&1 \
  | tee "$OUT/ray_tp_sweep_h200x2.log" | tail -n 5
timeout 5 nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
# 3. Ray executor (2 actors, 2 GPUs) against the sequential one (1 GPU): an 8-point llama-3.1-8b sweep (~250 s)
timeout 265 python3 benchmarks/ray_sweep_bench.py --budget-s 252 --out "$OUT/ray_sweep_llama-3.1-8b_h200x2.json" 2>&1 \
  | tee "$OUT/ray_sweep_llama-3.1-8b_h200x2.log" | tail -n 16
timeout 5 nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
# 4. llama-3.1-70b bf16 at TP 2: load, TPOT at batch 1 and 64 with the all-reduce share, the first 250
#    requests of the 1000-request ShareGPT-like trace (~110 s)
timeout 140 python3 benchmarks/tp_bench.py --model llama-3.1-70b --degrees 2 --workload sharegpt-like \
  --num-requests 1000 --trace-head 250 --profile-repeats 1 --tag h200x2 2>&1 \
  | tee "$OUT/tp_llama-3.1-70b_h200x2.log" | tail -n 4
