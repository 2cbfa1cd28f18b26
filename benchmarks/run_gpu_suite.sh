#!/usr/bin/env bash
# Everything that needs GPUs, in one call on a 2-GPU H200 machine (device tool,
# kind nvidia-h200-x2). Logs go to $OUT (the device tool brings them back).
#   bash benchmarks/run_gpu_suite.sh [parts...]   parts: tests transfer rearrange rearrange-hp rearrange-kept rearrange-slots rearrange-ahead rearrange-ahead-slots example serving serving1 serving-graph serving1-graph serving1-service placement placement-steps guard staged-fault
# (serving: bench_serving.py on 2 ranks; serving1: on 1 GPU, for a single-GPU machine;
#  serving-graph, serving1-graph: the same with the forward pass replayed from a CUDA graph
#  (serving-graph also with the migration-aware placement); serving1-service: apply_delay 2, so
#  that the placement runs in the placement service, eager forward;
#  placement: the placement cores on the host CPU, one thread, with bench_compiled_steps.py;
#  placement-steps: bench_compiled_steps.py alone (default allocator and forced mmap);
#  guard: group_guard's CUDA checks, and with 2 GPUs a NCCL weight move in which one rank raises, then freezes;
#  staged-fault: with 2 GPUs, a staged apply over NCCL in which rank 1 freezes or dies mid-chunk)
# The real loads travel in .data/ (an ignored copy made by the caller).
# BENCH_FLAGS: extra flags for every bench_rearrange.py run (e.g. "--repeats 5").
set -uo pipefail
OUT=${OUT:-/tmp/eplb-gpu}
mkdir -p "$OUT"
export EPLB_DATA_DIR=${EPLB_DATA_DIR:-$PWD/.data/deepseek-r1-expert-load}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
parts=${*:-tests transfer rearrange rearrange-hp rearrange-kept rearrange-slots rearrange-ahead rearrange-ahead-slots example serving serving-graph}

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version())"
} 2>&1 | tee "$OUT/machine.txt"
status=0
for part in $parts; do
  echo "=== $part ($(date +%T))"
  case $part in
    tests) python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests_gpu.log" ;;
    transfer) python3 benchmarks/check_transfer.py --data-dir "$EPLB_DATA_DIR" 2>&1 | tee "$OUT/check_transfer.log" ;;
    rearrange) python3 benchmarks/bench_rearrange.py --data-dir "$EPLB_DATA_DIR" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/bench_rearrange.log" ;;
    rearrange-hp) python3 benchmarks/bench_rearrange.py --data-dir "$EPLB_DATA_DIR" ${BENCH_FLAGS:-} --skip-naive --high-priority-nccl 2>&1 | tee "$OUT/bench_rearrange_hp.log" ;;
    rearrange-kept) python3 benchmarks/bench_rearrange.py --data-dir "$EPLB_DATA_DIR" ${BENCH_FLAGS:-} --skip-naive --high-priority-nccl --kept-buffers 2>&1 | tee "$OUT/bench_rearrange_kept.log" ;;
    rearrange-slots) python3 benchmarks/bench_rearrange.py --data-dir "$EPLB_DATA_DIR" ${BENCH_FLAGS:-} --skip-naive --high-priority-nccl --kept-buffers --keep-slots 2>&1 | tee "$OUT/bench_rearrange_slots.log" ;;
    rearrange-ahead) python3 benchmarks/bench_rearrange.py --data-dir "$EPLB_DATA_DIR" ${BENCH_FLAGS:-} --skip-naive --high-priority-nccl --kept-buffers --plan-ahead 2>&1 | tee "$OUT/bench_rearrange_ahead.log" ;;
    rearrange-ahead-slots) python3 benchmarks/bench_rearrange.py --data-dir "$EPLB_DATA_DIR" ${BENCH_FLAGS:-} --skip-naive --high-priority-nccl --kept-buffers --plan-ahead --keep-slots 2>&1 | tee "$OUT/bench_rearrange_ahead_slots.log" ;;
    serving) python3 benchmarks/bench_serving.py --world-size 2 --plot "$OUT/serving.png" 2>&1 | tee "$OUT/bench_serving.log" ;;
    serving1) python3 benchmarks/bench_serving.py --world-size 1 --plot "$OUT/serving_1gpu.png" 2>&1 | tee "$OUT/bench_serving_1gpu.log" ;;
    serving-graph) python3 benchmarks/bench_serving.py --world-size 2 --cuda-graph --plot "$OUT/serving_graph.png" 2>&1 | tee "$OUT/bench_serving_graph.log"
                   python3 benchmarks/bench_serving.py --world-size 2 --cuda-graph --migration-tolerance 0.01 --modes none,blocking,all,staged1 2>&1 | tee "$OUT/bench_serving_graph_migration.log" ;;
    serving1-graph) python3 benchmarks/bench_serving.py --world-size 1 --cuda-graph --plot "$OUT/serving_1gpu_graph.png" 2>&1 | tee "$OUT/bench_serving_1gpu_graph.log" ;;
    serving1-service) python3 benchmarks/bench_serving.py --world-size 1 --apply-delay 2 --modes none,all,staged1 2>&1 | tee "$OUT/bench_serving_1gpu_service.log" ;;
    example) python3 examples/moe_ep_example.py --device cuda --data-dir "$EPLB_DATA_DIR" --tokens 4096 2>&1 | tee "$OUT/example_cuda.log"
             python3 examples/moe_ep_example.py --device cuda --inject-fault 2>&1 | tee "$OUT/example_cuda_fault.log" ;;
    placement) { python3 benchmarks/bench_warm_up.py && python3 benchmarks/bench_rebalance.py --slow-repeats 1 && python3 benchmarks/bench_gil.py --busy python,torch --shapes "DeepSeek-V3 R=288,Kimi-K2 R=448" && python3 benchmarks/bench_compiled_steps.py && python3 benchmarks/bench_compiled_steps.py --mmap-threshold 4096; } 2>&1 | tee "$OUT/placement.log" ;;
    placement-steps) { python3 benchmarks/bench_compiled_steps.py && python3 benchmarks/bench_compiled_steps.py --mmap-threshold 4096; } 2>&1 | tee "$OUT/placement_steps.log" ;;
    guard) python3 benchmarks/check_group_guard.py 2>&1 | tee "$OUT/guard.log" ;;
    staged-fault) python3 benchmarks/check_staged_faults.py 2>&1 | tee "$OUT/staged_fault.log" ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
