#!/usr/bin/env bash
# The accelerator figures of BENCHMARKS.md in one call: bgjax's train step in bf16 next to timm
# under PyTorch AMP on the same GPU, ViT-B/16 and ConvNeXt-B, each at the largest batch of
# BATCHES that fits (one process each: JAX takes most of the GPU's memory when it starts).
#
#   bash benchmarks/gpu_check.sh wheels   # here, with a package registry: the packages the
#                                         # GPU image lacks, as wheels in .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh [OUTDIR] # on the GPU machine, from the repository root
#
# The GPU image brings JAX (with its CUDA plugin), PyTorch and timm; the wheels add what bgjax's
# train step imports besides (grain, ml_collections, ...) and pin flax / orbax to ours. Results:
# OUTDIR/{timm,ours}_<arch>.json and gpu_check.log (OUTDIR defaults to $OUT, else gpu_check/).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker==1.6.0
        flax==0.12.8 orbax-checkpoint==0.12.8)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64)
if [ "${1:-}" = wheels ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
  exit
fi

OUTDIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
WHEEL_DIR=${GPU_CHECK_WHEELS:-.whl}  # the tests point it elsewhere: the wheels are for the GPU
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEEL_DIR"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(),
  '| flax', flax.__version__, '| torch', torch.__version__)" || exit 1

# Each case: an arch, then the batches to try, largest first; EXTRA: more flags for both sides
# (the test suite runs this script on tiny models with GPU_CHECK_CASES / GPU_CHECK_EXTRA).
IFS=';' read -r -a CASES <<< "${GPU_CHECK_CASES:-vit_base_patch16_224 256 128;convnext_base 256 128 64}"
read -r -a EXTRA <<< "${GPU_CHECK_EXTRA:-}"
for case in "${CASES[@]}"; do
  read -r arch batches <<< "$case"
  done_=0
  for batch in $batches; do
    echo "== $arch, batch $batch"
    timeout 300 python3 benchmarks/timm_amp.py --arch "$arch" --batch "$batch" "${EXTRA[@]}" \
      --json "$OUTDIR/timm_$arch.json" || continue
    timeout 420 python3 benchmarks/train_throughput.py --arch "$arch" --batch "$batch" \
      "${EXTRA[@]}" --dtype bfloat16 --reference "$OUTDIR/timm_$arch.json" \
      --json "$OUTDIR/ours_$arch.json" && done_=1 && break
  done
  [ "$done_" = 1 ] || { echo "== $arch: no batch of $batches ran"; status=1; }
done
exit "${status:-0}"
