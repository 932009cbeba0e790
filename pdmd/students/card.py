"""A student folder's ``README.md``: the Hub model card, made with huggingface_hub's ModelCard / ModelCardData.

Front matter: base_model (the teacher's Hub id), ``library_name: diffusers``, tags, license. Body: the method,
the phase schedule, the training budget and time, the sample grid, the eval figures (built-in teacher), and
copy-paste usage for diffusers -- which, run as written, reproduces ``python -m pdmd sample --student`` for the
same seed (tests/test_card.py) -- and for ComfyUI.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from pdmd.core.sampling import phase_sigmas
from pdmd.students.manifest import PUBLISHED, Manifest
from pdmd.students.roles import phase_adapter
from pdmd.teachers.style_loras import ADAPTER_PREFIX, SECOND_NETWORK

CARD = "README.md"
SAMPLE_GRID = "samples.png"  # the run's last sample grid, copied beside the LoRAs so the card can show it
EVAL_FILE = "eval.json"      # `python -m pdmd eval --student DIR --json > DIR/eval.json` (built-in teacher)
DEFAULT_LICENSE = "apache-2.0"  # this repository's; a diffusers teacher's own licence wins when it is known
METHODS = {"phased": "Phased DMD: one LoRA expert per SNR phase, each distilled with DMD",
           "phased-sgts": "Phased DMD with stochastic gradient truncation",
           "dmd": "DMD, one step", "dmd-sgts": "DMD with stochastic gradient truncation",
           PUBLISHED: "published LoRA files, one per phase, wrapped as a phased student"}
# the keyword that sets guidance in each family's pipeline __call__
CFG_KEYWORD = {"qwen-image": "true_cfg_scale", "qwen-image21": "true_cfg_scale"}
# that keyword's value for our CFG scale where they differ: ZImagePipeline mixes pos + s * (pos - neg), CFG 1 + s
CFG_VALUE = {"z-image": lambda cfg: cfg - 1.0}
# further __call__ keywords a family's snippet needs, by student CFG: QwenImage21Pipeline guides only when given a
# negative prompt (the teacher's " "), and its text-token KV cache, filled at the first step under the first phase's
# LoRA, would give the later phases that expert's text keys and values
CALL_KEYWORDS = {"qwen-image21": lambda cfg: ('negative_prompt=" ", ' if cfg > 1 else "") + "use_kv_cache=False, ",
                 "qwen-image": lambda cfg: 'negative_prompt=" ", ' if cfg > 1 else ""}
# families whose pipeline has no LoRA loader mixin and no callback_on_step_end (HunyuanVideo15Pipeline, diffusers
# 0.42): the LoRAs load into the transformer itself, and the scheduler's step switches the phase experts
ON_TRANSFORMER = {"hunyuan-video-1.5"}
# families whose guidance is a pipeline component (a ClassifierFreeGuidance ``guider``), not a __call__ keyword
GUIDER = {"hunyuan-video-1.5"}
# the pipeline of a family's student distilled on condition images (manifest ``conditions``), given ``image=``
IMAGE_PIPELINE = {"wan": "WanImageToVideoPipeline", "flux": "FluxKontextPipeline",
                  "qwen-image": "QwenImageEditPlusPipeline"}
# what the card's example image is to that pipeline, and what it does with one of another size than the student's
IMAGE_NOTE = {"wan": "the first frame, best at the student's size: the pipeline stretches an image of another aspect "
                     "where pdmd crops it",
              "flux": "the image to edit, best at the student's size: the pipeline encodes one of another size at "
                      "its own where pdmd covers and crops it to the student's",
              "qwen-image": "the image to edit, best at the student's size: the pipeline stretches one of another "
                            "aspect where pdmd covers and crops it"}
# further __call__ keywords of a pipeline class, from the teacher options and whether an image is given:
# FluxKontextPipeline rescales the output to max_area (1024^2 pixels), with an image or without, and the image to
# its nearest preferred resolution (_auto_resize)
PIPELINE_KEYWORDS = {"FluxKontextPipeline": lambda options, image: f"max_area={options['height'] * options['width']}, "
                     + ("_auto_resize=False, " if image else "")}
# lines the snippet runs before that pipeline's call: QwenImageEditPlusPipeline VAE-encodes the image at a fixed area
# (VAE_IMAGE_SIZE, a module constant, 1024^2) whatever the output size, where pdmd encodes it at the student's
IMAGE_SETUP = {"qwen-image": lambda options: [
    "from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus",
    "pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE = "
    f"{options['height']} * {options['width']}  # the image encoded at the student's size, as pdmd encodes it"]}
IMAGE_FILE = "first.png"  # the card's example condition image

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

A {{ nfe }}-step student of [{{ teacher }}]({{ teacher_link }}){{ style }} made with
Phased DMD Studio (`pdmd`): {{ method }}
([Phased DMD](https://arxiv.org/abs/2510.27684)). Each phase of the noise schedule has its own LoRA expert;
sampling switches experts at each phase boundary.

## Phase schedule

Shift {{ shift }}, student CFG {{ cfg }}, NFE {{ nfe }} (the teacher's default is many more).

| phase | t from | t to | steps | timesteps (shifted) | LoRA file(s) |
|---|---|---|---|---|---|
{% for row in phases -%}
| {{ row.phase }} | {{ row.start }} | {{ row.end }} | {{ row.steps }} | {{ row.times }} | {{ row.files }} |
{% endfor %}
Every LoRA file also carries the schedule in its safetensors metadata (`pdmd_schedule`, `pdmd_phase`).

## Training

{{ training }}
{% if sample_grid %}
![sample grid]({{ sample_grid }})
{% endif %}
{% if evaluation %}
## Evaluation (built-in teacher's metrics probe)

{{ evaluation }}
{% endif %}
## Use with diffusers
{% if style_usage %}
{{ style_usage }}
{% endif %}
```python
{{ diffusers_usage }}
```

## Use with ComfyUI

{{ comfyui_usage }}

## Reproduce with pdmd

```bash
python -m pdmd sample --student {{ name }}{{ image }} --prompt "{{ prompt }}" --seed 0 --out student.{{ suffix }}
```
"""


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def student_title(folder: Path) -> str:
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "student" else folder.name


def teacher_license(teacher: str) -> str:
    """The licence on the teacher's own Hub card when it is in the local cache (no download), else ours."""
    if not is_hub_id(teacher):
        return DEFAULT_LICENSE
    try:
        from huggingface_hub import hf_hub_download
        card = ModelCard.load(hf_hub_download(teacher, CARD, local_files_only=True))
        return card.data.license or "other"
    except Exception:  # not cached, or a card without front matter: say nothing we do not know
        return "other"


def schedule_rows(manifest: Manifest) -> list[dict]:
    rows = []
    for k in range(manifest.schedule.num_phases):
        times = phase_sigmas(manifest.schedule, k)
        files = manifest.phase_files(k)
        rows.append({"phase": k + 1, "start": f"{times[0]:.4g}", "end": f"{times[-1]:.4g}",
                     "steps": manifest.schedule.steps[k], "times": ", ".join(f"{t:.4g}" for t in times[:-1]),
                     "files": ", ".join(f"`{f}`" + (f" ({n})" if n else "") for n, f in files.items())})
    return rows


def training_text(manifest: Manifest, seconds: float | None) -> str:
    if manifest.is_published:
        published = manifest.published
        return (f"Not trained here: published file(s) {', '.join(published.get('files', []))} at strength(s) "
                f"{', '.join(f'{s:g}' for s in published.get('strengths', []))}.")
    parts = [f"{manifest.updates_trained or 0} generator updates"]
    if manifest.updates_per_phase:
        parts.append(f"per phase {list(manifest.updates_per_phase)}")
    if manifest.teacher_cfg is not None:
        parts.append(f"teacher CFG {manifest.teacher_cfg:g}")
    if manifest.ema_decay:
        parts.append(f"EMA {manifest.ema_decay:g}")
    text = "Budget: " + ", ".join(parts) + "."
    if manifest.condition_images:
        text += (f" Conditions: {manifest.condition_images} image(s) with their prompts"
                 + (f" ({manifest.condition_source})" if manifest.condition_source else "") + ".")
    if seconds:
        text += f" Time: {seconds / 60:.1f} min of updates (sum of the step times in `metrics.jsonl`)."
    return text


def evaluation_text(folder: Path) -> str:
    path = folder / EVAL_FILE
    if not path.is_file():
        return ""
    try:
        figures = json.loads(path.read_text())
    except ValueError:
        return ""
    rows = [(k, v) for k, v in figures.items() if isinstance(v, (int, float))] if isinstance(figures, dict) else []
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in rows)]) if rows else ""


def phase_starts(manifest: Manifest) -> dict[int, str]:
    """Step index -> the adapter that runs from that step on (every boundary but the first phase's start)."""
    ends = (0, *manifest.schedule.boundary_step_indices[:-1])
    return {step: phase_adapter(k) for k, step in enumerate(ends) if k > 0}


def styles_text(manifest: Manifest) -> str:
    """The teacher's style LoRAs as 'name × strength', or ''."""
    return ", ".join(f"`{lora.describe()}`" for lora in manifest.teacher_loras)


def style_usage(manifest: Manifest) -> str:
    if not manifest.teacher_loras:
        return ""
    networks = (" (a low-noise one, `on transformer_2`, into `pipe.transformer_2` with "
                "`load_into_transformer_2=True`)" if any(lora.network == SECOND_NETWORK for lora in
                                                         manifest.teacher_loras) else "")
    return (f"The phase LoRAs go on top of the teacher's style LoRA(s) {styles_text(manifest)} (copies in "
            f"`teacher_loras/` of this repository): the snippet loads the style first{networks}, then the phase "
            "LoRAs, and keeps the style active at its strength beside each phase's expert. `python -m pdmd lora "
            "export --with-style` writes phase LoRAs that already contain the style of their network, each loaded "
            "alone.")


def diffusers_usage(manifest: Manifest, student: str, prompt: str) -> str:
    """The diffusers snippet: the teacher's pipeline, Euler on exactly the student's timesteps, one LoRA adapter
    per phase (Wan 2.2's low-noise network's with load_into_transformer_2) and the switch at each boundary. A
    teacher with style LoRAs: those load first, each into its network, and stay active at their strengths under
    every phase's expert.
    HunyuanVideo 1.5: adapters on ``pipe.transformer``, switched by the scheduler's step, CFG set on its guider."""
    styles = {f"{ADAPTER_PREFIX}_{k + 1}": lora for k, lora in enumerate(manifest.teacher_loras)}
    on_transformer = manifest.family in ON_TRANSFORMER
    load, owner = ("pipe.transformer.load_lora_adapter", "pipe.transformer") if on_transformer else \
        ("pipe.load_lora_weights", "pipe")
    def into(network) -> str:
        return ", load_into_transformer_2=True" if network == SECOND_NETWORK else ""

    loads = [f'{load}(STUDENT, weight_name="{lora.file}", adapter_name="{name}"{into(lora.network)})'
             for name, lora in styles.items()]

    def activate(expert: str) -> str:
        if not styles:
            return f"{owner}.set_adapters({expert})"
        weights = "weights" if on_transformer else "adapter_weights"  # the model's set_adapters names it so
        return f"{owner}.set_adapters([*STYLE, {expert}], {weights}=[*STYLE.values(), 1.0])"

    for k in range(manifest.schedule.num_phases):
        for network, relative in manifest.phase_files(k).items():
            loads.append(f'{load}(STUDENT, weight_name="{relative}", '
                         f'adapter_name="{phase_adapter(k)}"{into(network)})')
    options = manifest.teacher_options
    size = ", ".join(f"{k}={options[k]}" for k in ("height", "width", "num_frames") if k in options)
    cfg_keyword = CFG_KEYWORD.get(manifest.family or "", "guidance_scale")
    cfg_value = CFG_VALUE.get(manifest.family or "", float)(manifest.student_cfg)
    guider = manifest.family in GUIDER
    video = "num_frames" in options
    output = ('video = result.frames[0]\nexport_to_video(video, "student.mp4", fps=16)' if video
              else 'image = result.images[0]\nimage.save("student.png")')
    sigmas = ", ".join(repr(round(t, 8)) for t in manifest.schedule.timesteps[:-1])
    conditioned = "image" in manifest.conditions  # Wan 2.2 TI2V-5B from a first frame
    pipeline = IMAGE_PIPELINE[manifest.family] if conditioned else "DiffusionPipeline"
    # the teacher's own class (an older manifest records none: then the family's image pipeline, given an image)
    keywords = PIPELINE_KEYWORDS.get(manifest.pipeline or (pipeline if conditioned else ""), lambda options, image: "")
    return "\n".join([
        "import torch",
        f"from diffusers import {pipeline}, FlowMatchEulerDiscreteScheduler",
        *(["from diffusers.utils import export_to_video"] if video else []),
        *(["from diffusers.utils import load_image"] if conditioned else []),
        "",
        f'TEACHER = "{manifest.teacher}"',
        f'STUDENT = "{student}"  # this repository, or a local copy of it',
        f"SIGMAS = [{sigmas}]  # the student's timesteps, already shifted (shift {manifest.schedule.shift:g})",
        f"PHASE_STARTS = {phase_starts(manifest)!r}  # the phase switch: step index -> the expert from there on",
        *([f'IMAGE = "{IMAGE_FILE}"  # {IMAGE_NOTE[manifest.family]}'] if conditioned else []),
        *([f"STYLE = {({n: lora.strength for n, lora in styles.items()})!r}  # the teacher's style LoRA(s) -> "
           "strength, under every phase"] if styles else []),
        "DEVICE = \"cuda\" if torch.cuda.is_available() else \"cpu\"",
        "DTYPE = torch.bfloat16 if DEVICE == \"cuda\" else torch.float32",
        "",
        "",
        "class StudentScheduler(FlowMatchEulerDiscreteScheduler):",
        "    \"\"\"Euler on exactly the student's timesteps, whatever the pipeline asks for.\"\"\"",
        "    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):",
        "        super().set_timesteps(sigmas=SIGMAS, device=device)",
        *(["",  # the pipeline takes no step callback: the scheduler switches the experts after each step
           "    def step(self, *args, **kwargs):",
           "        out = super().step(*args, **kwargs)",
           "        if self.step_index in PHASE_STARTS:  # the next step opens a new phase: its own LoRA expert",
           f"            {activate('PHASE_STARTS[self.step_index]')}",
           "        return out"] if on_transformer else
          ["",
           "",
           "def switch_phase(pipe, step, timestep, callback_kwargs):",
           "    if step + 1 in PHASE_STARTS:  # the next step opens a new phase: its own LoRA expert",
           f"        {activate('PHASE_STARTS[step + 1]')}",
           "    return callback_kwargs"]),
        "",
        "",
        f"pipe = {pipeline}.from_pretrained(TEACHER, dtype=DTYPE)",
        "pipe.scheduler = StudentScheduler(shift=1.0)",
        *loads,
        activate(f'"{phase_adapter(0)}"'),
        *([f"pipe.guider = pipe.guider.new(guidance_scale={cfg_value:g})"] if guider else []),
        "pipe.to(DEVICE)",
        *(IMAGE_SETUP.get(manifest.family, lambda options: [])(options) if conditioned else []),
        # prompt by keyword: the first parameter of the FLUX.2 pipelines is a conditioning image
        "result = pipe(" + ("image=load_image(IMAGE), " if conditioned else "")
        + f'prompt="{prompt}", num_inference_steps=len(SIGMAS), '
        + ("" if guider else f"{cfg_keyword}={cfg_value:g}, ")
        + CALL_KEYWORDS.get(manifest.family or "", lambda cfg: "")(manifest.student_cfg)
        + (f"{size}, " if size else "")
        + keywords(options, conditioned)
        + "generator=torch.Generator().manual_seed(0)"
        + (")" if on_transformer else ", callback_on_step_end=switch_phase)"),
        output,
    ])


def comfyui_usage(manifest: Manifest, name: str) -> str:
    ends = (0, *manifest.schedule.boundary_step_indices)
    steps = "; ".join(f"phase {k + 1}: steps {ends[k]}–{ends[k + 1]}" for k in range(manifest.schedule.num_phases))
    networks = (" For Wan 2.2 the `high_noise` file goes on the high-noise model and the `low_noise` file on the "
                "low-noise model." if manifest.networks else "")
    style = (f" The phase files go on top of the teacher's style LoRA(s) {styles_text(manifest)}, copied beside "
             "them: chain its *LoraLoaderModelOnly* at that strength first"
             + (" (on the high-noise model; a style `on transformer_2` on the low-noise one)" if manifest.networks
                else "")
             + ", or export with `--with-style` for phase files that contain it." if manifest.teacher_loras else "")
    return (f"Export the experts in ComfyUI's key layout: `python -m pdmd lora export --student {name} --layout "
            f"comfyui --out comfyui/` (one file per phase, `export.json` says which is which).{networks}{style} Load "
            f"each with *LoraLoaderModelOnly* on its own copy of the model, set *ModelSamplingSD3* shift to "
            f"{manifest.schedule.shift:g}, and chain one *KSamplerAdvanced* per phase over {manifest.schedule.nfe} "
            f"steps in total, sampler `euler`, CFG {manifest.student_cfg:g}: {steps}. ComfyUI's `simple` scheduler "
            f"spaces the steps evenly in its own way, so images are close to, not identical with, this student's.")


def render_card(folder: str | Path, repo_id: str | None = None, seconds: float | None = None) -> ModelCard:
    """The card of the student in ``folder``; ``repo_id`` names where it is published (default: a
    placeholder), ``seconds`` the time its updates took (the run folder's ``training_seconds``)."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    name = student_title(folder)
    teacher = manifest.teacher
    hub_teacher = is_hub_id(teacher)
    prompt = "a cat sitting on a windowsill" if manifest.family else "a red star on a dark background"
    data = ModelCardData(
        base_model=teacher if hub_teacher else None, library_name="diffusers",
        license=teacher_license(teacher),
        tags=["pdmd", "phased-dmd", "lora", "few-step", "distillation",
              *([manifest.task] if manifest.family else []), *([manifest.family] if manifest.family else [])])
    return ModelCard.from_template(
        data, template_str=TEMPLATE, name=name, teacher=teacher,
        teacher_link=f"https://huggingface.co/{teacher}" if hub_teacher else "#",
        style=f" with its style LoRA(s) {styles_text(manifest)} fused in" if manifest.teacher_loras else "",
        style_usage=style_usage(manifest),
        method=METHODS.get(manifest.method, manifest.method), nfe=manifest.schedule.nfe,
        shift=f"{manifest.schedule.shift:g}", cfg=f"{manifest.student_cfg:g}", phases=schedule_rows(manifest),
        training=training_text(manifest, seconds), sample_grid=SAMPLE_GRID if (folder / SAMPLE_GRID).is_file() else "",
        evaluation=evaluation_text(folder), prompt=prompt,
        diffusers_usage=diffusers_usage(manifest, repo_id or f"YOUR-NAME/{name}", prompt) if manifest.family else
        "# the built-in 32x32 teacher is not a diffusers pipeline: use `python -m pdmd sample --student`",
        comfyui_usage=comfyui_usage(manifest, name) if manifest.family else
        "Not available: the built-in teacher has no ComfyUI counterpart.",
        suffix="mp4" if "num_frames" in manifest.teacher_options else "png",
        image=f" --image {IMAGE_FILE}" if "image" in manifest.conditions else "")


def write_card(folder: str | Path, repo_id: str | None = None, seconds: float | None = None,
               sample_grid: Path | None = None) -> Path:
    """README.md in ``folder``, with ``sample_grid`` (the run's latest) copied beside it when there is one."""
    folder = Path(folder)
    if sample_grid is not None and Path(sample_grid).is_file():
        shutil.copyfile(sample_grid, folder / SAMPLE_GRID)
    path = folder / CARD
    render_card(folder, repo_id, seconds).save(path)
    return path
