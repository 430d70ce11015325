#!/usr/bin/env bash
# Reproduce the shipped default model (streamer/default_model) and its evaluation report.
# Needs the train and data extras and Debian's fluidsynth + musescore-general-soundfont.
# On 2 CPU cores: ~35 min rendering, ~12 min CQT features, ~45 min training.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${COVERWATCH_CACHE:-$HOME/.cache/coverwatch}/covers"
RUN="${RUN_DIR:-runs/default}"

coverwatch data build --out "$DATA" --groups 2000 --max-seconds 40 --seed 0
coverwatch --config config.toml train --manifest "$DATA/manifest.csv" --out "$RUN"
coverwatch export --checkpoint "$RUN/best.pt" --out streamer/default_model
coverwatch evaluate --manifest "$DATA/manifest.csv" --split val --report bench/MODEL_RESULTS.md
