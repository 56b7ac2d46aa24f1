#!/usr/bin/env bash
# The issue acceptance runs on SmolLM2, as a newcomer would type them; logs go to benchmarks/results/.
# Usage: bash benchmarks/acceptance_runs.sh [eval|packed|all]   (DATA_DIR defaults to ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-../shared/data}
R=benchmarks/results
mkdir -p "$R"
what=${1:-all}
abq() { .venv/bin/abq "$@"; }

if [[ $what == eval || $what == all ]]; then
  # issue 2: FP and RTN perplexity, 16 windows x 2048 tokens of wiki.test.raw
  abq eval --model smollm2-135m --dataset wikitext2 --data-dir "$DATA_DIR" --seqlen 2048 --limit 16 --json $R/eval-fp.json
  abq eval --data-dir "$DATA_DIR" --limit 16 --scheme w4a16 --group-size 128 --json $R/eval-rtn-w4a16g128.json
  abq eval --data-dir "$DATA_DIR" --limit 16 --scheme w3a16 --group-size 128 --json $R/eval-rtn-w3a16g128.json
  abq eval --data-dir "$DATA_DIR" --limit 16 --scheme w4a4 --json $R/eval-rtn-w4a4.json
fi

if [[ $what == packed || $what == all ]]; then
  # issue 4: RTN exports at W4A4, W2*A8, W3A16g128; verify; packed vs fake-quant perplexity; inspect
  for cfg in w4a4 w2star-a8 w3a16-g128; do
    out=out/accept-rtn-$cfg
    abq quantize configs/smollm2-$cfg.yaml --data-dir "$DATA_DIR" --output $out --overwrite \
      --set calibration.method=rtn --json $R/quantize-rtn-$cfg.json
    abq verify $out/abq-packed --data-dir "$DATA_DIR" --json $R/verify-rtn-$cfg.json
    abq inspect $out/abq-packed --json $R/inspect-rtn-$cfg.json > /dev/null
    abq eval --model $out/abq-packed --data-dir "$DATA_DIR" --seqlen 2048 --limit 2 --json $R/eval-packed-rtn-$cfg.json
    abq eval --model $out/hf-fakequant --data-dir "$DATA_DIR" --seqlen 2048 --limit 2 --json $R/eval-fakequant-rtn-$cfg.json
  done
fi
