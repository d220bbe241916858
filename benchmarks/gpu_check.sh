#!/usr/bin/env bash
# Everything a GPU machine should measure, in one call from the repository root:
#
#   benchmarks/gpu_check.sh --fetch-wheels   # here, with the package index: fill .whl/ (git-ignored)
#   benchmarks/gpu_check.sh                  # there: GPU if there is one, else --device cpu on demo-tiny
#   benchmarks/gpu_check.sh --cpu            # the CPU path on any machine
#
# Steps, each under its own time limit, so that one slow or failing step leaves the others' figures:
#   1. the CUDA tests (pytest -m cuda; on the CPU the fast test subset that covers the same code);
#   2. benchmarks/train_step.py at 100 and 1000 classes (CPU: 10 and 100), eager, every variant;
#   3. benchmarks/augment.py;
#   4. `blocklora profile` of lora and blocklora (ViT-B/16 at 1000 classes; CPU: demo-tiny at 100);
#   5. benchmarks/job_cost.py: backbone load, test-set decoding, eval-cache reads, eval forward;
#   6. train_step.py again with --compile reduce-overhead (CPU: the default mode), for
#      reference, lora and blocklora: last, as compiling is the slowest step.
# Results: benchmarks/results/<cuda|cpu>/*.json (device and versions inside) and steps.tsv (each
# step's exit status and seconds); copied to $OUT when that is set. Missing Python packages are
# installed from .whl/ with `pip install --no-deps --no-index` and nothing else is touched.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PY=${PYTHON:-python3}

fetch_wheels() {
    # Everything blocklora's GPU paths and pytest import, at the pins of envs/requirements.lock,
    # except what a PyTorch installation brings (torch, torchvision, CUDA libraries, numpy, pillow).
    mkdir -p "$WHEELS"
    local report
    report=$(mktemp)
    "$PY" -m pip install --quiet --dry-run --ignore-installed --report "$report" \
        -c envs/requirements.lock open_clip_torch ftfy safetensors pyyaml pytest 2> >(grep -v "is ignored" >&2) || return 1
    "$PY" - "$report" > "$WHEELS/needed.txt" <<'EOF'
import json, re, sys
bundled = re.compile(r"^(torch|torchvision|triton|numpy|pillow|sympy|mpmath|networkx|jinja2|markupsafe"
                     r"|setuptools|nvidia-.*|cuda-.*)$")
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if not bundled.match(meta["name"].lower()):
        print(f"{meta['name']}=={meta['version']}")
EOF
    # Pure-Python wheels once; compiled ones for each CPython a GPU image may carry.
    while read -r pin; do
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "$pin" 2>/dev/null &&
            ls "$WHEELS" | grep -qi "$(echo "${pin%%==*}" | tr - _).*none-any" && continue
        for version in 3.10 3.11 3.12 3.13; do
            "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
                --python-version "$version" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
                "$pin" 2>/dev/null || true
        done
    done < "$WHEELS/needed.txt"
    du -sh "$WHEELS"
}

install_missing() {
    [ -f "$WHEELS/needed.txt" ] || { echo "no $WHEELS/needed.txt: run $0 --fetch-wheels where pip can reach an index"; return 0; }
    local missing
    missing=$("$PY" - "$WHEELS/needed.txt" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for line in open(sys.argv[1]):
    name = line.split("==")[0].strip()
    try:
        version(name)
    except PackageNotFoundError:
        print(name)
EOF
)
    [ -z "$missing" ] && return 0
    echo "installing from $WHEELS: $missing"
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-deps --no-index --find-links "$WHEELS" $missing
}

case "${1:-}" in
    --fetch-wheels) fetch_wheels; exit $? ;;
    --cpu) DEVICE=cpu ;;
    "") DEVICE=auto ;;
    *) echo "usage: $0 [--fetch-wheels | --cpu]" >&2; exit 2 ;;
esac

install_missing || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} BLOCKLORA_PRELOAD=0
if [ "$DEVICE" = auto ]; then
    DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')") || exit 1
fi
RESULTS=benchmarks/results/$DEVICE
mkdir -p "$RESULTS"
printf 'step\texit\tseconds\n' > "$RESULTS/steps.tsv"

step() {  # step NAME LIMIT_S COMMAND...: run, log, record exit status and wall time
    local name=$1 limit=$2 started rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    started=$(date +%s)
    timeout "$limit" "$@" > >(tee "$RESULTS/$name.log") 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - started))" >> "$RESULTS/steps.tsv"
    [ "$rc" = 0 ] || echo "!! $name exited with $rc"
}

"$PY" -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" |
    tee "$RESULTS/versions.txt"

if [ "$DEVICE" = cuda ]; then
    BACKBONE=(); CLASSES=(100 1000); PROFILE=(--backbone ViT-B-16 --classes 1000)
    TESTS=(tests/test_cuda.py); COST=(--backbones ViT-B-16 demo-tiny --images 256 --batch-size 128)
    AUGMENT=(); COMPILE_MODE=reduce-overhead; THREADS=()
else
    BACKBONE=(--small); CLASSES=(10 100); PROFILE=(--backbone demo-tiny --classes 100 --steps 5 --warmup 2)
    TESTS=(tests/test_adapters.py tests/test_inject.py tests/test_train.py tests/data/test_loading.py
           tests/data/test_eval_images.py -m "not slow")
    COST=(--backbones demo-tiny); AUGMENT=(--size 32 --images 64 --steps 5 --warmup 2)
    COMPILE_MODE=default; THREADS=(--threads "$(nproc)")
fi

step tests 240 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step train_step 180 "$PY" benchmarks/train_step.py "${BACKBONE[@]}" --device "$DEVICE" --classes "${CLASSES[@]}" \
    "${THREADS[@]}" --out "$RESULTS/train_step.json"
step augment 60 "$PY" benchmarks/augment.py --device "$DEVICE" "${AUGMENT[@]}" "${THREADS[@]}" \
    --out "$RESULTS/augment.json"
for method in lora blocklora; do
    step "profile_$method" 90 "$PY" -m blocklora.cli profile --method "$method" "${PROFILE[@]}" --device "$DEVICE" \
        --pretrained none "${THREADS[@]}" --out "$RESULTS/profile_$method.json"
done
step job_cost 120 "$PY" benchmarks/job_cost.py --device "$DEVICE" "${COST[@]}" "${THREADS[@]}" \
    --out "$RESULTS/job_cost.json"
COMPILE=(--compile); [ "$COMPILE_MODE" = default ] || COMPILE=(--compile "$COMPILE_MODE")
step train_step_compiled 300 "$PY" benchmarks/train_step.py "${BACKBONE[@]}" --device "$DEVICE" \
    --classes "${CLASSES[@]}" --variants reference lora blocklora "${COMPILE[@]}" "${THREADS[@]}" \
    --out "$RESULTS/train_step_compiled.json"

cat "$RESULTS/steps.tsv"
[ -n "${OUT:-}" ] && cp -r "$RESULTS" "$OUT/"
! grep -qP '\t[1-9][0-9]*\t' "$RESULTS/steps.tsv"
