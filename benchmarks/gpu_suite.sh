#!/usr/bin/env bash
# plada's GPU checks as one prepared run, with generated data (no downloads).
#
#   benchmarks/gpu_suite.sh            on a lent H100/H200: under 8 minutes
#   benchmarks/gpu_suite.sh --smoke    on the CPU in seconds: the same steps on tiny inputs (CI)
#   options: --out DIR (default $OUT, else work/gpu_suite)
#
# It measures embed_throughput for each decoder (PIL, torchcodec, torchvision),
# receiver_throughput decoding every epoch and with the decode-once cache (epoch 1 with
# the decode, later epochs), torch.compile off and on (full mode only), and the
# compute-only ceilings of both, the Ray embedding engine against the local one (full
# mode only), then writes one table naming the device to
# DIR/gpu_suite.md (paste it into benchmarks/RESULTS.md) and the raw numbers as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
mode=full
out="${OUT:-work/gpu_suite}"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) mode=smoke ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown option $1 (use --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
if [ "$mode" = smoke ]; then
  embed=(--images 24 --model benchmarks/smoke-clip.json --batch-size 8 --workers 2 --device cpu)
  receiver=(--images 48 --jpeg-size 48 --image-size 32 --batch-size 8 --steps 2 --warmup 1
            --threads 2 --device cpu)
else
  if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device here; run with --smoke on a CPU machine" >&2
    exit 2
  fi
  embed=(--images 8192 --model ViT-B-32 --batch-size 512 --device cuda)
  receiver=(--images 8192 --jpeg-size 256 --image-size 224 --batch-size 256 --steps 60
            --warmup 15 --device cuda)
fi
"$python" -m benchmarks.embed_throughput "${embed[@]}" --json "$out/embed.json"
"$python" -m benchmarks.receiver_throughput "${receiver[@]}" --json "$out/receiver.json"
if [ "$mode" = full ]; then  # compiling takes minutes on a CPU: measured on the GPU only
  "$python" -m benchmarks.receiver_throughput "${receiver[@]}" --compile \
    --json "$out/receiver-compiled.json"
  # the Ray engine against the local one, 1, 2 and 4 actors sharing the GPU(s); its CPU
  # numbers are in RESULTS.md and tests/test_embed_ray.py covers the engine itself
  "$python" -m benchmarks.embed_distributed --images 8192 --model ViT-B-32 --batch-size 512 \
    --device cuda --actors 1 2 4 --json "$out/embed-distributed.json"
fi
"$python" -m benchmarks.gpu_report "$out" --mode "$mode"
