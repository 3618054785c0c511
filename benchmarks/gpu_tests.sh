#!/usr/bin/env bash
# The test suite on a CUDA machine, one process per group: a CUDA fault (an illegal address) poisons
# the whole process, so in one process a single bad kernel fails every later test. The CPU-only
# groups (registry, pattern grammar, README, the catch-a-bug toys) are left to CI.
# Usage (repo root): bash benchmarks/gpu_tests.sh [LOGDIR [WORD...]]   exit status 1 if any group failed
#   WORDs: run only the groups whose line contains one of them (several runs can then share the GPU);
#   the output goes to LOGDIR/tests.log, or LOGDIR/tests-WORD.log for the first WORD.
#   Every test of a group runs, the slow ones too. Needs a CUDA GPU (exit status 2 without one); without one,
#   `python -m pytest` runs the CPU tests.
set -uo pipefail
case ${1:-} in
-h | --help) sed -n '2,9s/^# \{0,1\}//p' "$0" && exit 0 ;;
esac
log=${1:-${OUT:-/tmp}}
shift || true
words=("$@")
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_tests.sh: needs a CUDA GPU (torch.cuda.is_available() is False); on the CPU run python -m pytest" >&2
    exit 2
fi
logfile=$log/tests${words[0]:+-${words[0]//\//_}}.log
reg=tests/conformance/test_registered.py
groups=(
    "$reg -k full_attention-cuda"
    "$reg -k swa-cuda and not eviction_swa"
    "$reg -k swa_sink-cuda"
    "$reg -k gdn-cuda"
    "$reg -k eviction_swa-cuda"
    "$reg -k nsa-cuda"
    "tests/kernels/test_swa.py"
    "tests/kernels/test_gdn.py"
    "tests/kernels/test_eviction.py"
    "tests/kernels/test_nsa_reference.py tests/kernels/test_nsa_triton.py tests/kernels/test_nsa_decode.py"
    "tests/kernels/test_attn_step.py tests/kernels/test_eviction_step.py"
    "tests/kernels/test_rope.py tests/kernels/test_gdn_decode_step.py"
    "tests/kernels/test_router_step.py tests/kernels/test_nsa_step.py"
    "tests/kernels/test_launch.py tests/kernels/test_grid_limits.py tests/kernels/test_state_fill.py"
    "tests/kernels/test_value_gate.py tests/kernels/test_router_conv.py tests/kernels/test_eviction_prompt_state.py"
    "tests/kernels/test_tile_tables.py"
    "tests/mixers/test_swa.py"
    "tests/mixers/test_gdn.py"
    "tests/mixers/test_eviction_swa.py tests/mixers/test_eviction_prefill.py tests/mixers/test_capacity_check.py"
    "tests/mixers/test_nsa.py tests/mixers/test_eviction_paper.py tests/mixers/test_reliability.py"
    "tests/baselines tests/models tests/training tests/test_cli.py"
)
rc=0
for g in "${groups[@]}"; do
    if ((${#words[@]})); then
        hit=0
        for w in "${words[@]}"; do [[ $g == *"$w"* ]] && hit=1; done
        ((hit)) || continue
    fi
    files=${g%% -k *}
    if [[ $g == *" -k "* ]]; then sel=(-k "${g#* -k }"); else sel=(); fi
    # shellcheck disable=SC2086
    out=$(python3 -m pytest -q -p no:cacheprovider -m "" $files "${sel[@]}" 2>&1)  # -m "": the slow tests too
    status=$?
    echo "$out" >>"$logfile"
    printf '%-70s %s\n' "$g" "$(echo "$out" | tail -n 1)"
    if [[ $status != 0 ]]; then
        rc=1
        echo "$out" | grep -E '^(FAILED|ERROR)' | head -n 15
    fi
done
exit $rc
