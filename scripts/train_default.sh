#!/usr/bin/env bash
# Reproduce the shipped default model (streamer/default_model) and its evaluation reports.
# Needs the train and data extras and Debian's fluidsynth, musescore-general-soundfont,
# csound-soundfont and opl3-soundfont.
# Five stages on 2 CPU cores:
#   1. the full recipe from scratch on 2000 rendered cover groups (~35 min rendering,
#      ~6 min CQT features, ~45 min training: 7000 steps);
#   2. fine-tuning of that encoder on the same groups with 30 % of the versions degraded
#      (reverb, EQ, compression, noise, lossy codec) plus the training half of the real
#      tune-variant groups (~27 min rendering, ~6 min features, ~12 min: 2500 steps);
#   3. a longer run on stage 2's data from stage 2's encoder, crops up to 30 s
#      (~50 min: 6000 steps);
#   4. another on the same data from stage 3's encoder, crops up to 40 s (the daemon's
#      longest window), lr 3e-4 restart (~50 min: 5000 steps);
#   5. a fine-tune of stage 4's encoder on 1500 cover groups whose versions are synthesised
#      with three soundfonts (TimGM6mb, csound's sf_GMbank, the OPL3 FM bank; Debian's
#      csound-soundfont and opl3-soundfont) instead of one (~15 min rendering, ~3 min
#      features, ~18 min: 2500 steps; bench/EXPERIMENT_multisynth.md).
# The held-out variant families never enter any stage (--hold-out-variants; stage 1's
# families are excluded from the held-out evaluation set by --exclude-trained).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${COVERWATCH_CACHE:-$HOME/.cache/coverwatch}"
RUN="${RUN_DIR:-runs/default}"

# Stage 1
coverwatch data build --out "$CACHE/covers" --groups 2000 --max-seconds 40 --seed 0
coverwatch --config config.toml train --manifest "$CACHE/covers/manifest.csv" --out "$RUN/stage1" --cache "$CACHE/features"

# Stage 2: clean versions are the same files as stage 1's (hard links save re-rendering them)
mkdir -p "$CACHE/covers_degraded"
[ -d "$CACHE/covers_degraded/audio" ] || cp -al "$CACHE/covers/audio" "$CACHE/covers_degraded/audio"
coverwatch data build --out "$CACHE/covers_degraded" --groups 2000 --max-seconds 40 --seed 0 --degrade-fraction 0.3 --hold-out-variants
coverwatch data variants --which train --out "$CACHE/variants/train" --seed 0
coverwatch data merge --covers "$CACHE/covers_degraded/manifest.csv" --variants "$CACHE/variants/train/manifest.csv" --out "$CACHE/train_merged/manifest.csv"
coverwatch --config scripts/finetune.toml train --manifest "$CACHE/train_merged/manifest.csv" --out "$RUN/stage2" --cache "$CACHE/features" --init "$RUN/stage1/best.pt"
coverwatch --config scripts/finetune_long.toml train --manifest "$CACHE/train_merged/manifest.csv" --out "$RUN/stage3" --cache "$CACHE/features" --init "$RUN/stage2/best.pt"
coverwatch --config scripts/finetune_stage4.toml train --manifest "$CACHE/train_merged/manifest.csv" --out "$RUN/stage4" --cache "$CACHE/features" --init "$RUN/stage3/best.pt"

# Stage 5: the same tunes and arrangements as stage 1's first 1500 groups, each version
# synthesised with one of three soundfonts (a group's versions with different ones)
TIMGM6MB="$(python -c 'from coverwatch.model.render import TRAIN_SOUNDFONT; print(TRAIN_SOUNDFONT)')"
coverwatch data build --out "$CACHE/covers_multisynth" --groups 1500 --max-seconds 40 --seed 0 --degrade-fraction 0.3 --hold-out-variants \
    --train-soundfont "$TIMGM6MB" --train-soundfont /usr/share/sounds/sf2/sf_GMbank.sf2 --train-soundfont /usr/share/sounds/sf2/OPL-3_FM_128M.sf2
coverwatch data merge --covers "$CACHE/covers_multisynth/manifest.csv" --variants "$CACHE/variants/train/manifest.csv" --out "$CACHE/train_multisynth/manifest.csv"
coverwatch --config scripts/finetune_multisynth.toml train --manifest "$CACHE/train_multisynth/manifest.csv" --out "$RUN/stage5" --cache "$CACHE/features" --init "$RUN/stage4/best.pt"
coverwatch export --checkpoint "$RUN/stage5/best.pt" --out streamer/default_model

# Evaluation: rendered covers never trained on, and real tune variants never trained on
coverwatch evaluate --manifest "$CACHE/covers/manifest.csv" --split val --report bench/MODEL_RESULTS.md
coverwatch data variants --which heldout --out "$CACHE/variants/heldout" --groups 150 --exclude-trained "$CACHE/covers/manifest.csv"
coverwatch evaluate --manifest "$CACHE/variants/heldout/manifest.csv" --split val --report bench/MODEL_RESULTS_variants.md
