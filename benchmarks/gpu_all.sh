#!/usr/bin/env bash
# Everything that needs the GPU, by part (see benchmarks/README.md). Parts:
#   tests      the CUDA test groups (benchmarks/gpu_tests.sh), three lanes at once
#   backends   full_attention's backends against a float32 reference (benchmarks/check_backends.py)
#   attention  swa / swa_sink / full_attention: checks, tile sweep, op vs launchers, timings, decode
#   gdn        long-T and varlen checks, then the timings against fla
#   eviction   checks, training timings against FlexAttention, memory, decode, the cached prefill
#   nsa        checks, timings against fla and SDPA, decode, the selection forms (block- / token-major)
#   sweep      the attention kernels across the shape grid against FlexAttention and flash-attn 4, nine minutes
#   tune       the swa kernels' tile table (benchmarks/swa_tune.py, every cell, about five minutes; rewrites
#              mixerzoo/kernels/swa/tuned_configs.json, to commit with its log)
#   profile    Nsight Compute's counters for one forward+backward of swa at W4096 and base, mixerzoo against
#              FlexAttention and flash-attn 4 (benchmarks/profile_kernels.py): $OUT/profile-raw.csv, profile.txt
#   split      swa and the eviction kernels at head dims split in two tiles (96, 80, 40, 160, 192) against one wide
#              tile (benchmarks/swa_split_head.py), rows swa_split_head
# Usage (repo root): bash benchmarks/gpu_all.sh [PART...]   (default: all but tune, profile and split, in the order
# above)
# Needs a CUDA GPU (exit status 2 without one). Comparison packages carried as wheels in .whl/ (fla-core,
# xformers, the CUDA 12 runtime, flash-attn 4) go to /tmp/site first (benchmarks/install_wheels.sh). The
# benchmarks write benchmarks/results/<gpu>.json and, with $OUT set, $OUT/results-*.json to merge into another
# checkout with `python benchmarks/common.py FILE...`; logs go to $OUT (a new temporary folder when unset).
set -uo pipefail
usage() { sed -n '2,21s/^# \{0,1\}//p' "$0"; }
all=(tests backends attention gdn eviction nsa sweep)  # tune, profile and split run only when named
for arg in "$@"; do
    case $arg in
    -h | --help) usage && exit 0 ;;
    tests | backends | attention | gdn | eviction | nsa | sweep | tune | profile | split) ;;
    *) echo "gpu_all.sh: unknown part '$arg'; the parts are ${all[*]} tune profile split" >&2 && exit 2 ;;
    esac
done
parts=("$@")
((${#parts[@]})) || parts=("${all[@]}")
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_all.sh ${parts[*]}: needs a CUDA GPU (torch.cuda.is_available() is False); no part runs on the CPU" >&2
    exit 2
fi
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl .whl/fa4/small/*.whl >/dev/null 2>&1; then # fla-core, xformers, flash-attn 4: carried as wheels
    exports=$(bash benchmarks/install_wheels.sh /tmp/site) && eval "$exports"
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"
rc=0
for part in "${parts[@]}"; do
    case $part in
    tests)
        mkdir -p /tmp/gpu-tests
        bash benchmarks/gpu_tests.sh /tmp/gpu-tests -cuda >"$OUT/tests-conformance.txt" 2>&1 &
        bash benchmarks/gpu_tests.sh /tmp/gpu-tests kernels/ >"$OUT/tests-kernels.txt" 2>&1 &
        bash benchmarks/gpu_tests.sh /tmp/gpu-tests mixers/ baselines >"$OUT/tests-other.txt" 2>&1 &
        wait
        cat "$OUT"/tests-*.txt
        grep -q FAILED "$OUT"/tests-*.txt && rc=1
        ;;
    backends) python3 benchmarks/check_backends.py 2>&1 | tee "$OUT/backends.log" | tail -n 20 || rc=1 ;;
    attention)
        python3 benchmarks/attention.py --sections check,loops,swa,full,decode --adopt 2>&1 | tee "$OUT/attention.log" \
            | tail -n 60 || rc=1
        ;;
    gdn)
        python3 benchmarks/gdn.py --check --quick-check 2>&1 | tee "$OUT/gdn-check.log" | tail -n 20 || rc=1
        python3 benchmarks/gdn.py --bench 2>&1 | tee "$OUT/gdn.log" | tail -n 30 || rc=1
        ;;
    eviction)
        python3 benchmarks/eviction.py check train decode prefill 2>&1 | tee "$OUT/eviction.log" | tail -n 30 || rc=1
        ;;
    nsa)
        python3 benchmarks/nsa.py --sections check,bench,decode,major 2>&1 | tee "$OUT/nsa.log" | tail -n 40 || rc=1
        ;;
    sweep) python3 benchmarks/sweep.py --max-seconds 540 2>&1 | tee "$OUT/sweep.log" | tail -n 40 || rc=1 ;;
    tune)  # the log keeps every candidate; the terminal the cells' summaries and rules
        python3 benchmarks/swa_tune.py --max-seconds 540 2>&1 | tee "$OUT/swa-tune.log" \
            | grep -Ev '^  [a-z]+ +(default|candidate) ' || rc=1
        ;;
    split) python3 benchmarks/swa_split_head.py 2>&1 | tee "$OUT/split-head.log" | tail -n 30 || rc=1 ;;
    profile)  # the report stays in /tmp (tens of MB); the raw export and the summary go to $OUT
        ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
        if [[ -z $ncu ]]; then
            echo "gpu_all.sh profile: Nsight Compute (ncu) not found on PATH nor in /opt/nvidia/nsight-compute" >&2
            rc=1
            continue
        fi
        "$ncu" --profile-from-start off --clock-control none --set full -f -o /tmp/profile-swa \
            python3 benchmarks/profile_kernels.py --ops swa --points W4096 base >"$OUT/profile-ncu.log" 2>&1 || rc=1
        "$ncu" --import /tmp/profile-swa.ncu-rep --page raw --csv --print-units base >"$OUT/profile-raw.csv" || rc=1
        python3 benchmarks/profile_kernels.py --summarize "$OUT/profile-raw.csv" | tee "$OUT/profile.txt" || rc=1
        ;;
    esac
done
exit $rc
