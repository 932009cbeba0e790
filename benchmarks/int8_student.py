"""A short phased run distilled on the int8 base vs the same run on the fp32 base (built-in teacher).

Both runs use the shipped phased config (assets/students/phased/config.yaml) with fewer updates per phase and
``quantize`` set; each student is then evaluated on its own base with ``python -m pdmd eval --student``.

    python benchmarks/int8_student.py --updates 30 40 --output-dir runs/int8-student
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from pdmd.paths import ROOT, SHIPPED_STUDENTS

SHIPPED = SHIPPED_STUDENTS / "phased" / "config.yaml"


def pdmd(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pdmd", *args, "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"python -m pdmd {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", nargs=2, type=int, default=[30, 40], metavar=("PHASE1", "PHASE2"))
    parser.add_argument("--output-dir", default="runs/int8-student")
    args = parser.parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for quantize in ("none", "int8"):
        config = yaml.safe_load(SHIPPED.read_text())
        config.update(updates_per_phase=args.updates, quantize=quantize, output_dir=str(out / quantize),
                      sample_every=10**6)
        path = out / f"{quantize}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        pdmd("train", "--config", str(path), "--no-progress")
        result = json.loads(pdmd("eval", "--student", str(out / quantize / "student"), "--json").splitlines()[-1])
        rows.append({"base": "fp32" if quantize == "none" else "int8", **{k: result[k] for k in
                                                                          ("adherence", "fd", "diversity")}})
    print("| base | adherence | FD | diversity |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['base']} | {row['adherence']:.3f} | {row['fd']:.3f} | {row['diversity']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
