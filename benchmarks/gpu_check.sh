#!/usr/bin/env bash
# The GPU check in one run: every step of benchmarks/gpu_check.py, each in a process of its own
# with a time limit, one PASS/FAIL line per check, JSON per step under the output directory.
#
#   bash benchmarks/gpu_check.sh [--rehearse] [OUT_DIR]      (default OUT_DIR: $OUT, else gpu_check_out)
#
# Needs only what the GPU machines have (python3, torch, transformers, safetensors, accelerate):
# PYTHONPATH is the repository. Wheels in .whl/ (make gpu-wheels: ninja for the native build) are
# installed into a scratch directory first, offline. --rehearse runs every step on the CPU with
# the weights streamed by the staged backend, at small sizes. PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=()
DIR=${OUT:-gpu_check_out}
for arg in "$@"; do
  case $arg in
    --rehearse) MODE=(--rehearse) ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) DIR=$arg ;;
  esac
done
mkdir -p "$DIR"
if ! "$PY" -c "import torch, transformers" 2> /dev/null; then
  echo "FAIL setup: $PY cannot import torch and transformers (set PYTHON)"; exit 1
fi
WORK=${MOEGEN_CHECK_WORK:-/tmp/moegen-gpu-check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
       TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=$WORK/site
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || echo "note: .whl/ install failed"
  export PYTHONPATH="$PYTHONPATH:$SITE" PATH="$SITE/bin:$PATH"
fi

# step, variant, seconds allowed on the GPU (the rehearsal gets twice as long: 2 shared cores)
STEPS=("ops - 150" "exact - 90" "quantized - 60" "features - 60" "footprint bf16 90" "footprint fp8 90"
       "throughput mixtral 90" "throughput v2lite 150" "disk - 60")
start=$SECONDS
fails=0
for s in "${STEPS[@]}"; do
  read -r step variant limit <<< "$s"
  [ "$variant" = "-" ] && variant=""
  [ ${#MODE[@]} -gt 0 ] && limit=$((2 * limit))
  name=$step${variant:+-$variant}
  t0=$SECONDS
  timeout -k 10 "$limit" "$PY" benchmarks/gpu_check.py "$step" $variant --out "$DIR" --work "$WORK" "${MODE[@]}" \
    > "$DIR/$name.log" 2>&1
  rc=$?
  grep -E '^(PASS|FAIL) ' "$DIR/$name.log"
  if [ $rc -ne 0 ]; then
    fails=$((fails + 1))
    if ! grep -q '^FAIL ' "$DIR/$name.log"; then
      why=$([ $rc -eq 124 ] && echo "over its ${limit} s" || echo "exit $rc: $(tail -n 1 "$DIR/$name.log")")
      echo "FAIL $name: $why (log: $DIR/$name.log)"
    fi
  fi
  echo "     ($name: $((SECONDS - t0)) s)"
done
echo "gpu_check: $fails step(s) failed, $((SECONDS - start)) s in all; JSON and logs in $DIR"
[ $fails -eq 0 ]
