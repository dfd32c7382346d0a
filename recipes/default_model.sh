#!/usr/bin/env bash
# Reproduce caster's built-in model (caster/models/caster-demo-40) from nothing but registry
# packages: build the corpus, train recipes/default_model.yaml, export, evaluate.
#
#   bash recipes/default_model.sh [WORK_DIR] [caster train options...]   # WORK_DIR: ./work-demo-40
#
# On 2 CPU cores (the machine the shipped model was made on): the corpus takes about 20
# minutes, a CTC-only step about 0.15 s, a transducer step more (MODEL_CARD.md has the run's
# figures). On a GPU add --run.device=cuda. Interrupted? Run it again: the corpus build and
# the training resume where they stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="$(realpath -m "${1:-work-demo-40}")"
shift || true

bash scripts/install_corpus_tools.sh
.venv/bin/caster data build --out "$WORK/corpus" --max-per-split 1200 --seed 0 --workers "$(nproc)"

# One training manifest of all locales, and a validation subset (5 dev utterances per locale)
# so that validation takes seconds. Paths become relative to $WORK/corpus.
cat "$WORK"/corpus/train/*.jsonl | sed 's|"\.\./audio/|"audio/|' > "$WORK/corpus/train.jsonl"
for manifest in "$WORK"/corpus/dev/*.jsonl; do head -n 5 "$manifest"; done |
    sed 's|"\.\./audio/|"audio/|' > "$WORK/corpus/dev-tiny.jsonl"

.venv/bin/caster train recipes/default_model.yaml --output_dir="$WORK/run" \
    --data.train="[$WORK/corpus/train.jsonl]" --data.validation="[$WORK/corpus/dev-tiny.jsonl]" "$@"

cp "$WORK/run/model/"{caster.json,model.safetensors,tokenizer.model} caster/models/caster-demo-40/
PYTHONPATH=. .venv/bin/python bench/eval_corpus.py --model caster/models/caster-demo-40 \
    --corpus "$WORK/corpus" --out bench/results/default_model_eval
