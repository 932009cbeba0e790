"""Build what examples/showcase.yaml points at: three tiny real-architecture pipelines (SD3, Wan 2.2 and
Z-Image, random weights, pdmd/teachers/tiny.py) and students of each, in examples/showcase-models/ (gitignored).
Seconds on a CPU.

    python examples/build_showcase.py [--out examples/showcase-models]
    PDMD_SHOWCASE=examples/showcase.yaml python app.py

Each student is distilled for two updates (a real, if useless, training run: each folder gets its model card).
The Wan 2.2 student is also exported as ComfyUI files named high_noise / low_noise, which the showcase offers as
a published LoRA pair with per-phase strengths, as it would Wan2.2-Lightning. The Z-Image teacher carries a style
LoRA (drawn with PEFT and saved by the pipeline's save_lora_weights, as a user's own trained one would be): its
student is distilled from base + style, the "distil my model" case.
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

SIZES = {"sd3": dict(height=16, width=16), "wan2.2": dict(height=16, width=16, num_frames=5),
         "z-image": dict(height=16, width=16)}
STYLE_STRENGTH = 0.8
PROMPTS = ["a red cat on a sofa", "two blue dogs", "a green tree"]
# one step per phase at t = 1 and 0.8: on Wan 2.2 (network switch at 0.875) one network per phase
SCHEDULE = {"boundaries": [0.8], "steps": [2, 2]}


def distil(teacher: Path, run: Path, family: str, **overrides) -> Path:
    config = TrainConfig.from_dict(dict(
        teacher=str(teacher), method="phased", schedule=SCHEDULE, updates_per_phase=1, batch_size=2, fake_ratio=1,
        lora={"rank": 2, "alpha": 2}, prompts=PROMPTS, sample_prompts=PROMPTS[:1], sample_every=2,
        checkpoint_every=100, lr_generator=1e-2, output_dir=str(run), **SIZES[family], **overrides))
    return Path(Trainer(config).fit(progress=False)["student"])


def style_lora(teacher: Path, out: Path) -> Path:
    """A random rank-4 LoRA on the teacher's attention, saved as diffusers' training scripts save one."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(teacher))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    pipe.transformer.add_adapter(lora, adapter_name="style")
    type(pipe).save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(
        pipe.transformer, adapter_name="style"), transformer_lora_adapter_metadata=lora.to_dict())
    return out / "pytorch_lora_weights.safetensors"


def build(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    for family, name in (("sd3", "sd3"), ("wan2.2", "wan22")):
        teacher = tiny.build(family, out / name)
        student = distil(teacher, out / f"{name}-run", family)
        print(f"{family}: teacher {teacher.name}, student {student.parent.name}/{student.name}")
    written = export_student(out / "wan22-run" / "student", out / "wan22-lightning-style", "comfyui")
    print("published-style LoRA files:", ", ".join(p.name for p in written))
    teacher = tiny.build("z-image", out / "zimage")
    style = style_lora(teacher, out / "zimage-style")
    student = distil(teacher, out / "zimage-run", "z-image",
                     teacher_loras=[{"file": str(style), "strength": STYLE_STRENGTH}])
    print(f"z-image + style LoRA: teacher {teacher.name}, style {style.parent.name}, student {student.parent.name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "examples" / "showcase-models"))
    build(Path(parser.parse_args().out).resolve())
