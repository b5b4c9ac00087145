#!/bin/bash
# the demo's plan command, alone, then two copies at once (benchmarks: under load)
cd "$(dirname "$0")/.."
W=$(ls -d work/demo/sender-cache/world-clip-* | head -1)  # after make demo
FLAGS=$(.venv/bin/python -c "from benchmarks.demo import plan_flags; print(*plan_flags())")
P=".venv/bin/plada-send plan work/demo/sender --clip-model $W/plada-world-clip.json --clip-weights $W/weights.pt --train work/demo/task/train.npz $FLAGS --sender-id station-1 --quiet"
s=$(date +%s.%N); $P --out /tmp/pl-alone > /tmp/pl-alone.log 2>&1; e=$(date +%s.%N); echo "alone: $(echo "$e - $s" | bc) s"
s=$(date +%s.%N); $P --out /tmp/pl-a > /tmp/pl-a.log 2>&1 & $P --out /tmp/pl-b > /tmp/pl-b.log 2>&1; wait; e=$(date +%s.%N); echo "two at once: $(echo "$e - $s" | bc) s"
grep chosen: /tmp/pl-alone.log /tmp/pl-a.log /tmp/pl-b.log
