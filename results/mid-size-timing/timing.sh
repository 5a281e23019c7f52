#!/bin/bash
# One 10,000-image epoch per candidate, one at a time on the idle machine; img/s from metrics.csv.
cd "$(dirname "$0")/../.."
run() { name=$1; shift
  .venv/bin/python mobilenetv4_enhanced.py "$@" --epochs 1 --max-train-samples 10000 --max-test-samples 1000 \
    --tta none --no-tta-table --output-dir runs/timing/$name --overwrite > runs/timing/$name.log 2>&1
  echo "$name $(tail -1 runs/timing/$name/metrics.csv | cut -d, -f7,8)"; }
mkdir -p runs/timing
for pass in 1 2; do
run default-p$pass --width-mult 1.2  # v3, the reference of the ratios
run w1.4-p$pass --width-mult 1.4
run w1.5-p$pass --width-mult 1.5
run w1.6-p$pass --width-mult 1.6
run w0.8-8x8-p$pass --width-mult 0.8 --output-stride 4
run w0.9-8x8-p$pass --width-mult 0.9 --output-stride 4
run w1.0-8x8-p$pass --width-mult 1.0 --output-stride 4
done
