#!/usr/bin/env bash
# Set up coverwatch on a fresh Debian machine and run the daemon's main job on the bundled
# default: the shipped model, a rendered demo catalog, and a demo stream with covers in it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# fluidsynth + MuseScore General render the demo; libsndfile decodes audio; libportaudio2 is for mic capture;
# espeak-ng + three game-music packages (none of them reserved for evaluation) make the
# non-catalog broadcast audio that the demo index is calibrated on (once).
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends fluidsynth musescore-general-soundfont libsndfile1 libportaudio2 \
    espeak-ng asc-music hyperrogue-music drascula-music >/dev/null

# A virtual environment (VENV, default .venv in the checkout): works where pip refuses
# system-wide installs (PEP 668). Debian's python3-venv provides venv for the system Python.
VENV="${VENV:-.venv}"
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# The daemon itself needs no torch; the data extra adds music21 + pretty_midi for rendering the demo.
"$VENV/bin/python" -m pip install -q -e '.[data]'

"$VENV/bin/coverwatch" --config config.toml demo "$@"
