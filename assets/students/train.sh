#!/usr/bin/env bash
# Rebuild a shipped student of the built-in teacher: train (resuming if a run exists), then copy the finished
# student folder (manifest.json + one LoRA per phase) beside its config.
#   assets/students/train.sh phased        # or phased-sgts, dmd, dmd-sgts; THREADS=2 for a machine of its own
set -euo pipefail
method=${1:?usage: assets/students/train.sh phased|phased-sgts|dmd|dmd-sgts}
cd "$(dirname "$0")/../.."
python -m pdmd train --config "assets/students/$method/config.yaml" --resume latest --threads "${THREADS:-1}" --no-progress
cp -r "runs/students/$method/student/." "assets/students/$method/"
