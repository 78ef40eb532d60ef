#!/usr/bin/env bash
# One lent-GPU session's checks in one call, under one deadline (device time is scarce).
#
#   [SKIP="pp_hop ..."] bash benchmarks/gpu_session.sh [SECONDS]   (default 520; logs in $OUT)
#
# The device image has its own torch (2.11 when last seen) and no Ray: wheels for the packages
# the code imports that it lacks travel in .whl/ (git-ignored through .git/info/exclude; name it
# in the run's `carry`). Made here with, for each of pydantic==2.14.4 pydantic_core==2.50.5
# annotated_types typing_inspection typing_extensions xgrammar==0.2.9 apache-tvm-ffi decord==0.6.0:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 -d .whl NAME
# (21 MB in all; Ray's 79 MB wheel is over the 64 MiB a call may carry, so without Ray
# gpu_check's pp_hop section measures the in-process host round trip instead.)
# Order: what matters most first; every step is bounded by what is left of the deadline, so a
# slow compile at the end cannot cost the earlier numbers.
set -u
DEADLINE=$(($(date +%s) + ${1:-520}))
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || echo "wheel install failed"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

step() {  # step NAME CAP_SECONDS COMMAND...: run with timeout min(CAP, time left), log to $OUT
    local name=$1 cap=$2
    shift 2
    case " ${SKIP:-} " in *" $name "*)
        echo "== $name: skipped (SKIP)"
        return
        ;;
    esac
    local left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -le 5 ]; then
        echo "== $name: skipped (deadline)"
        return
    fi
    local start=$(date +%s)
    timeout "$cap" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: rc=$? in $(($(date +%s) - start)) s (cap $cap s)"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import sys, torch, inspect; from torch.nn.attention import varlen; \
print(sys.version.split()[0], torch.__version__, torch.version.cuda); \
print(inspect.signature(varlen.varlen_attn))"
} >"$OUT/probe.out" 2>&1
cat "$OUT/probe.out"
step attention 110 python3 benchmarks/gpu_check.py --sections attention
step eager 150 python3 benchmarks/gpu_check.py --sections decoder,kv --decode-modes eager
step pp_hop 40 python3 benchmarks/gpu_check.py --sections pp_hop
step pytest_gpu 170 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    tests/test_model_varlen_attention.py tests/test_engine_memory_plan.py \
    tests/test_engine_compiled_decode.py tests/test_vision_encoder.py tests/test_testing_tiny.py \
    tests/test_engine_stage_transport.py tests/test_model_triton_decode.py
step pytest_triton 90 python3 -m pytest -q -p no:cacheprovider tests/test_model_triton_decode.py
step graphs 400 python3 benchmarks/gpu_check.py --sections decoder --decode-modes graphs
tail -n 15 "$OUT/pytest_gpu.log" "$OUT/pytest_triton.log"
for f in attention eager pp_hop graphs; do  # the JSON line, then the distinct warnings
    echo "== $f"
    grep '^{' "$OUT/$f.log" | tail -c 3000
    grep -iE "error|warn" "$OUT/$f.log" | sort | uniq -c | head -5
done
