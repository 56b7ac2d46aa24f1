#!/usr/bin/env bash
# One row of the README's results table: a recipe as written (or with --set overrides), its abq-packed
# export evaluated on the first 16 windows x 2048 of wiki.test.raw (DESIGN §7); nothing else should run.
# Usage: bash benchmarks/recipe_row.sh RECIPE NAME [--set key=value ...]
# Writes benchmarks/results/recipes-16x2048/NAME/{recipe.yaml,quant_log.json,eval.json,seconds.txt}.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=$1 name=$2
shift 2
DATA_DIR=${DATA_DIR:-../shared/data}
dest=benchmarks/results/recipes-16x2048/$name
out=out/row-$name
mkdir -p "$dest"
start=$(date +%s)
.venv/bin/abq quantize "$recipe" --data-dir "$DATA_DIR" --output "$out" --overwrite \
  --set 'output.formats=[abq-packed]' "$@" > "$dest/quantize.txt" 2>&1
echo "$(( $(date +%s) - start ))" > "$dest/seconds.txt"
cp "$out/recipe.yaml" "$out/quant_log.json" "$dest/"
.venv/bin/abq eval --model "$out/abq-packed" --data-dir "$DATA_DIR" --seqlen 2048 --limit 16 \
  --json "$dest/eval.json" > "$dest/eval.txt" 2>&1
python3 -c "import json,sys; print(sys.argv[1], json.load(open(sys.argv[2]))['ppl'], open(sys.argv[3]).read().strip(), 's')" \
  "$name" "$dest/eval.json" "$dest/seconds.txt"
