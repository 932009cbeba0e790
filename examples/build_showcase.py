"""Build what examples/showcase.yaml points at: two tiny real-architecture pipelines (SD3 and Wan 2.2, random
weights, pdmd/teachers/tiny.py) and students of each, in examples/showcase-models/ (gitignored). Seconds on a CPU.

    python examples/build_showcase.py [--out examples/showcase-models]
    PDMD_SHOWCASE=examples/showcase.yaml python app.py

The SD3 student and the Wan 2.2 student are distilled for two updates (a real, if useless, training run: each
folder gets its model card); the Wan 2.2 student is also exported as ComfyUI files named high_noise / low_noise,
which the showcase offers as a published LoRA pair with per-phase strengths, as it would Wan2.2-Lightning.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdmd.students.lora_formats import export_student
from pdmd.teachers import tiny
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

SIZES = {"sd3": dict(height=16, width=16), "wan2.2": dict(height=16, width=16, num_frames=5)}
PROMPTS = ["a red cat on a sofa", "two blue dogs", "a green tree"]
# one step per phase at t = 1 and 0.8: on Wan 2.2 (network switch at 0.875) one network per phase
SCHEDULE = {"boundaries": [0.8], "steps": [2, 2]}


def distil(teacher: Path, run: Path, family: str) -> Path:
    config = TrainConfig.from_dict(dict(
        teacher=str(teacher), method="phased", schedule=SCHEDULE, updates_per_phase=1, batch_size=2, fake_ratio=1,
        lora={"rank": 2, "alpha": 2}, prompts=PROMPTS, sample_prompts=PROMPTS[:1], sample_every=2,
        checkpoint_every=100, lr_generator=1e-2, output_dir=str(run), **SIZES[family]))
    return Path(Trainer(config).fit(progress=False)["student"])


def build(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    for family, name in (("sd3", "sd3"), ("wan2.2", "wan22")):
        teacher = tiny.build(family, out / name)
        student = distil(teacher, out / f"{name}-run", family)
        print(f"{family}: teacher {teacher.name}, student {student.parent.name}/{student.name}")
    written = export_student(out / "wan22-run" / "student", out / "wan22-lightning-style", "comfyui")
    print("published-style LoRA files:", ", ".join(p.name for p in written))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "examples" / "showcase-models"))
    build(Path(parser.parse_args().out).resolve())
