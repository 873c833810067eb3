#!/usr/bin/env bash
# The GPU check (issue 35): one command, at most 8.5 minutes (--budget 510) on one H100/H200, everything in one
# folder.
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--size paper|tiny] [--out DIR] [--bundle DIR]
#                             [--from-workspace PATH] [--budget SECONDS]
#   make gpu-check GPU_CHECK_ARGS="--device cpu --size tiny"   # the same through make
#
# Parts, each time-boxed (`timeout`), each run even when an earlier one failed; the exit status is 1
# when any part failed (or timed out), with a one-line reason per part in summary.md:
#   env        the device, torch, CUDA and the packages the stages need (env.json)
#   bench      jem-bench --compare for sadajem_k5, jempp_m10, jem_k20 at WRN-28-10 with the papers'
#              batches (128/64, 64/64, 64/64): the reference loop, our baseline and the fast paths
#              side by side in one process (bench.json, bench.md, bench.log)
#   fid        jem-bench --skip-train --fid 50000: the Inception pass, mean/covariance/IS and the
#              Frechet distance of 50,000 samples, each timed (random Inception weights; fid.json)
#   smoke      a copy of this tree (smoke-ws/) at scale: paper on procedural CIFAR-10-shaped data
#              (no download; counts cut down: 12,800 training images, 3 epochs = 300 iterations of
#              128/64, lr decayed at 80/90 %), `dvc repro` of train/sample/evaluate/fid/robustness
#              @sadajem_k5-1. The training is SIGKILLed once its checkpoint of step 150 is written
#              and `dvc repro` resumes it: bf16 autocast, channels_last, fused optimizer, buffer on
#              the device, checkpoint resume and weights_only loads of CUDA tensors (smoke.json,
#              smoke/ holds the metrics, smoke.log the dvc output)
#   smoke-fid  the fid stage's own reference() and score() on the smoke run's data and samples with
#              random Inception weights (no weights file can be had offline: `dvc repro` records
#              IS/FID as unavailable) (smoke-fid.json)
#   bn         test accuracy in eval mode against accuracy with re-estimated batch-norm statistics
#              (the evaluate stage's accuracy / accuracy_bn_reestimated): within 1 point (bn.json)
#   profile    only when a speed target is missed: torch.profiler over fast-path iterations of each
#              missed variant, where the time goes (profile-<variant>.txt, profile.json)
# then summary.md (targets, pass/miss per target, parts, device name) and performance.md (the
# jem-bench Markdown of bench + fid: `python scripts/gpu_check.py merge-report DIR/performance.md
# reports/performance.md` puts it into reports/performance.md's "On a GPU" section).
# Targets (measured, not assumed): SADA-JEM K=5 fast >= 3x the reference loop, ideally <= 80 ms/it on an
# H100; JEM++ M=10 >= 3x; JEM K=20 >= 2.5x; FID of 50k <= 12 s; eval vs re-estimated BN within 1 point.
#
# --size tiny is the CPU rehearsal (tests/test_gpu_check.py): sadajem_k5 alone as WRN-10-1 on 16x16, one
# timed iteration, FID of 2 samples, the profile forced, the smoke run at the tiny scale (--from-workspace:
# start from a copy of a built tiny workspace, so that only the killed and resumed training runs).
# --out: default logs/gpu-check (ignored by git). --bundle DIR: after every part, copy summary.md,
# performance.md and gpu-check.tar.gz (all of --out but the smoke workspace) there: 3 files, what the
# device tool brings back from $OUT (8 at most). `set -e` is off on purpose: a failed part must not stop
# the others; each part's exit status is recorded instead.
#
# On the device machine (tool `run`; no network there: dvc, mlflow, foolbox and pytorch-fid travel as
# wheels). Once, here, in the repository root (the wheels: ~47 MB, the tree ~7 MB; 64 MiB travel at most):
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python scripts/gpu_check.py wheels --dest .whl   # pip download --no-deps of each missing package
# then run, with carry [".whl"] and timeout_s 600 (the machine's own python3 and torch 2.11):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#   .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh
#   --device cuda --size paper --out /tmp/gc --bundle $OUT
# (one line). scipy is not carried: the check does not call pytorch-fid's sqrtm, the one reason for the
# project's scipy<1.18 pin, and its 34 MB wheel does not fit beside the others.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda SIZE=paper OUT=logs/gpu-check BUNDLE="" FROM_WS="" BUDGET=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --bundle) BUNDLE="$2"; shift 2 ;;
    --from-workspace) FROM_WS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cuda:*|cpu) ;; *) echo "error: --device $DEVICE: cuda or cpu" >&2; exit 2 ;; esac
case "$SIZE" in paper|tiny) ;; *) echo "error: --size $SIZE: paper or tiny" >&2; exit 2 ;; esac

PY="${PYTHON:-python3}"
PY="$(command -v "$PY")" || { echo "error: no python interpreter ${PYTHON:-python3}" >&2; exit 2; }
[[ "$PY" == /* ]] || PY="$PWD/$PY"  # not resolved further: a virtualenv's python is a link
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || { echo "error: cannot create --out $OUT" >&2; exit 2; }
if [[ -n "$BUNDLE" ]]; then mkdir -p "$BUNDLE" && BUNDLE="$(cd "$BUNDLE" && pwd)" || exit 2; fi
rm -f "$OUT/parts.tsv" "$OUT"/*.log "$OUT"/*.json "$OUT"/*.md "$OUT"/profile-*.txt

# The stages' `python` (dvc.yaml's commands) is this interpreter; jem, pipeline and stages import from
# the tree they run in (the smoke workspace), the jem-bench parts from this one.
mkdir -p "$OUT/bin"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$OUT/bin/python"
chmod +x "$OUT/bin/python"
export PATH="$OUT/bin:$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
unset DVC_ROOT MLFLOW_TRACKING_URI  # the smoke workspace logs to its own mlflow.db
HELPER=("$PY" "$ROOT/scripts/gpu_check.py")

if [[ "$SIZE" == paper ]]; then
  : "${BUDGET:=510}"  # 8.5 min: with the wheels' install (~30 s) and the machine's start, <= 12 min of device time
  BENCH=(--scale paper --steps 10 --warmup 3 --variant sadajem_k5 --variant jempp_m10 --variant jem_k20)
  FID=(--fid 50000 --fid-batch 500)
  BOX_ENV=60 BOX_BENCH=200 BOX_FID=90 BOX_SMOKE=300 BOX_SMOKE_FID=90 BOX_BN=30 BOX_PROFILE=90
  PROFILE=()  # the variants that missed a speed target, if any
else
  : "${BUDGET:=600}"
  BENCH=(--scale demo --depth 10 --width 1 --image-size 16 --batch 8 --steps 1 --warmup 1 --variant sadajem_k5)
  FID=(--fid 2 --fid-batch 2)
  BOX_ENV=60 BOX_BENCH=120 BOX_FID=120 BOX_SMOKE=300 BOX_SMOKE_FID=120 BOX_BN=30 BOX_PROFILE=120
  PROFILE=(--variant sadajem_k5)  # rehearsed whatever the (CPU) timings
fi
START=$SECONDS
FAILED=0

bundle() {
  "${HELPER[@]}" summary --device "$DEVICE" --size "$SIZE" --out "$OUT" "$@" >/dev/null 2>"$OUT/summary.err" \
    || echo "[gpu-check] summary failed: $(tail -1 "$OUT/summary.err")"
  [[ -n "$BUNDLE" ]] || return 0
  cp -f "$OUT/summary.md" "$BUNDLE/" 2>/dev/null
  [[ -f "$OUT/performance.md" ]] && cp -f "$OUT/performance.md" "$BUNDLE/"
  tar -czf "$BUNDLE/gpu-check.tar.gz" -C "$(dirname "$OUT")" --exclude="$(basename "$OUT")/smoke-ws" \
    --exclude="$(basename "$OUT")/bin" "$(basename "$OUT")" 2>/dev/null
  return 0
}

# part NAME BOX COMMAND...: runs COMMAND with its output in $OUT/NAME.log under `timeout` (the smaller of
# BOX and what is left of the budget), and records "NAME<TAB>rc<TAB>seconds<TAB>box" in parts.tsv.
part() {
  local name="$1" box="$2"; shift 2
  local left=$((BUDGET - (SECONDS - START) - 10))
  ((box > left)) && box=$left
  if ((box < 15)); then
    printf '%s\tskipped\t0\t%s\n' "$name" "$BUDGET" >>"$OUT/parts.tsv"
    echo "[gpu-check] $name: skipped, the ${BUDGET} s budget is spent"
    FAILED=1; bundle; return 0
  fi
  echo "[gpu-check] $name (at most ${box} s) ..."
  local t0=$SECONDS rc=0
  timeout -k 15 "$box" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0))
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$box" >>"$OUT/parts.tsv"
  if ((rc == 0)); then echo "[gpu-check] $name: ok (${dt} s)"; else
    FAILED=1; echo "[gpu-check] $name: FAILED (exit $rc, ${dt} s): $(grep -v '^\s*$' "$OUT/$name.log" | tail -1)"
  fi
  bundle
}

SMOKE=(--device "$DEVICE" --size "$SIZE" --out "$OUT")
[[ -n "$FROM_WS" ]] && SMOKE+=(--from-workspace "$FROM_WS")

part env "$BOX_ENV" "${HELPER[@]}" env --device "$DEVICE" --out "$OUT"
part bench "$BOX_BENCH" "$PY" -m jem.bench.cli --device "$DEVICE" --compare "${BENCH[@]}" --params "$ROOT/params.yaml" \
  --json "$OUT/bench.json" --report "$OUT/bench.md"
part fid "$BOX_FID" "$PY" -m jem.bench.cli --device "$DEVICE" --skip-train "${FID[@]}" --params "$ROOT/params.yaml" \
  --json "$OUT/fid.json" --report "$OUT/fid.md"
part smoke "$BOX_SMOKE" "${HELPER[@]}" smoke "${SMOKE[@]}"
part smoke-fid "$BOX_SMOKE_FID" "${HELPER[@]}" smoke-fid --device "$DEVICE" --size "$SIZE" --out "$OUT"
part bn "$BOX_BN" "${HELPER[@]}" bn --size "$SIZE" --out "$OUT"
part profile "$BOX_PROFILE" "${HELPER[@]}" profile --device "$DEVICE" --size "$SIZE" --out "$OUT" \
  --params "$ROOT/params.yaml" ${PROFILE[@]+"${PROFILE[@]}"}

bundle --final
cat "$OUT/summary.md" 2>/dev/null || echo "error: no summary.md ($(tail -1 "$OUT/summary.err" 2>/dev/null))"
echo "[gpu-check] $((SECONDS - START)) s; everything is in $OUT${BUNDLE:+ (and $BUNDLE)}"
exit $FAILED
