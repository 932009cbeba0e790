"""A teacher that carries its owner's style LoRA ("distil my model") on the tiny FLUX.1-dev pipeline
(pdmd/teachers/tiny.py; guidance is a network input there, so one evaluation a step): base + style samples what
the stock pipeline with the LoRA loaded samples; a phased run on it records the LoRA in its student, which rebuilds
base + style from its own copy; both exports reproduce the student in stock diffusers; a bad style LoRA is one line
with nothing written, in a config, on the command line, in the showcase file and in the Compare tab's handler. The
same on the tiny two-network Wan 2.2 A14B pipeline, with a style file per network (high-noise ``transformer``,
low-noise ``transformer_2``)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_card import run_snippet, snippet, snippet_latents
from test_diffusers_teachers import EXPERT_SPLIT, SIZES, fresh_accelerator_state, random_student  # noqa: F401  (autouse)

from pdmd.cli import main
from pdmd.commands.arguments import teacher_lora
from pdmd.core.schedule import PhaseSchedule
from pdmd.media import save_media
from pdmd.showcase import Showcase, ShowcaseError
from pdmd.students import StudentError
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import Manifest
from pdmd.students.roles import phase_adapter
from pdmd.teachers import TeacherError, load_teacher, teacher_key
from pdmd.teachers.diffusers_base import pack_2x2, unpack_2x2
from pdmd.teachers.style_loras import check_takes_style_loras, style_lora
from pdmd.training.config import ConfigError, TrainConfig
from pdmd.training.from_student import check_student_fits
from pdmd.training.trainer import Trainer

SIZE = dict(height=16, width=16)
PROMPTS = ["a red cat on a sofa", "two blue dogs"]
PROMPT = "a cat sitting on a windowsill"  # the card's example prompt
STRENGTH = 0.7
STYLE_MODULES = ["to_q", "to_v", "ff.net.2", "proj_out"]  # to_k and to_out.0 are the student's alone, ff the style's
TWO_PHASES = PhaseSchedule((0.6,), (2, 2), 3.0)


# --- the tiny pipeline and LoRA files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("flux-dev")


def stock_pipeline(folder: Path):
    from diffusers import FluxPipeline
    return FluxPipeline.from_pretrained(str(folder))


def peft_lora_file(transformer, pipeline_class, out: Path, seed: int, **config) -> Path:
    """A LoRA trained (here: drawn) with PEFT on ``transformer`` and saved by its pipeline's save_lora_weights, its
    LoraConfig (alpha / r = 2 unless told) in the file's metadata, as diffusers' training scripts write one."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    lora = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": STYLE_MODULES, "init_lora_weights": False,
                         **config})
    transformer.add_adapter(lora, adapter_name="made")
    pipeline_class.save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(
        transformer, adapter_name="made"), transformer_lora_adapter_metadata=lora.to_dict())
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def style_file(folder, tmp_path_factory) -> Path:
    from diffusers import FluxPipeline
    return peft_lora_file(stock_pipeline(folder).transformer, FluxPipeline, tmp_path_factory.mktemp("style"), seed=3)


@pytest.fixture(scope="module")
def style(style_file):
    return style_lora(style_file, STRENGTH)


@pytest.fixture(scope="module")
def student(folder, style, tmp_path_factory) -> Path:
    """Two random phase LoRAs (rank 2, alpha / rank 2: a scale to fold) on base + style, as if trained."""
    teacher = load_teacher(str(folder), **SIZE, teacher_loras=(style,))
    where = tmp_path_factory.mktemp("styled") / "student"
    random_student(teacher, TWO_PHASES, where)
    return where


def phase_switch(schedule: PhaseSchedule, activate=None):
    """A pipeline's step callback that calls ``activate(k)`` -- the adapters of phase k -- at each phase boundary,
    after calling it for the first phase."""
    starts = {step: k + 1 for k, step in enumerate(schedule.boundary_step_indices[:-1])}
    if activate:
        activate(0)

    def switch(pipe, step, timestep, callback_kwargs):
        if activate and step + 1 in starts:
            activate(starts[step + 1])
        return callback_kwargs
    return switch


def stock_latents(pipe, prompts, schedule: PhaseSchedule, noise, guidance: float, activate=None) -> torch.Tensor:
    """The stock pipeline's Euler over ``schedule``'s timesteps from ``noise``; ``activate(k)``: the adapters of
    phase k, switched in at each phase boundary."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the timesteps are already shifted
    latents = pipe(prompts, sigmas=list(schedule.timesteps[:-1]),
                   num_inference_steps=schedule.nfe, guidance_scale=guidance, latents=pack_2x2(noise),
                   output_type="latent", callback_on_step_end=phase_switch(schedule, activate), **SIZE).images
    return unpack_2x2(latents, *noise.shape[2:])


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message.strip()


def error_line(stderr: str) -> str:
    """A command's one error line (diffusers' loading progress bars share its stderr)."""
    (line,) = [line for line in stderr.splitlines() if ": error: " in line]
    return line


# --- the teacher is base + style -----------------------------------------------------------------------------------
def test_teacher_with_a_style_lora_samples_what_the_stock_pipeline_with_it_loaded_samples(folder, style, style_file,
                                                                                          tmp_path, capsys):
    """Fused at strength 0.7 (its LoRA scale alpha / r = 2 from the file's metadata) against the stock pipeline
    with load_lora_weights + set_adapters at 0.7: latents to 1e-4. The teacher key tells base from base + style,
    and a copy of the file from its original not; `pdmd sample --teacher-lora FILE:0.7` draws the same image."""
    teacher = load_teacher(str(folder), **SIZE, teacher_loras=(style,))
    assert teacher.style_loras == (style,) and not any("lora" in name for name, _ in teacher.model.named_modules())
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    ours = teacher.sample(PROMPTS, 0, schedule, teacher.default_cfg).sample
    pipe = stock_pipeline(folder)
    pipe.load_lora_weights(str(style_file), adapter_name="style")
    pipe.set_adapters("style", adapter_weights=STRENGTH)
    theirs = stock_latents(pipe, PROMPTS, schedule, teacher.noise(len(PROMPTS), 0), teacher.default_cfg)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    plain = load_teacher(str(folder), **SIZE)
    assert (ours - plain.sample(PROMPTS, 0, schedule, teacher.default_cfg).sample).abs().max() > 0.1

    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(style_file, copy)
    key = teacher_key(str(folder), teacher.options())
    assert key != teacher_key(str(folder), plain.options())
    assert key == teacher_key(str(folder), {**SIZE, "teacher_loras": (style_lora(copy, STRENGTH),)})
    assert key != teacher_key(str(folder), {**SIZE, "teacher_loras": (style_lora(copy, 0.5),)})

    out = tmp_path / "teacher.png"
    assert main(["sample", "--teacher", str(folder), "--teacher-lora", f"{style_file}:{STRENGTH}", "--steps", "2",
                 "--height", "16", "--width", "16", "--prompt", PROMPT, "--out", str(out)]) == 0
    capsys.readouterr()
    expected = teacher.decode(teacher.sample([PROMPT], 0, PhaseSchedule.uniform(2, teacher.default_shift)).sample)
    save_media(expected, tmp_path / "expected.png")
    cli, direct = (np.asarray(Image.open(p)).astype(int) for p in (out, tmp_path / "expected.png"))
    assert np.abs(cli - direct).max() <= 1 and cli.std() > 5


def test_an_int8_base_is_fused_first_then_quantized(folder, style):
    fused = load_teacher(str(folder), **SIZE, teacher_loras=(style,)).model.transformer_blocks[0].attn.to_q.weight
    plain = load_teacher(str(folder), **SIZE).model.transformer_blocks[0].attn.to_q.weight
    quantized = load_teacher(str(folder), **SIZE, teacher_loras=(style,), quantize="int8")
    weight = quantized.model.transformer_blocks[0].attn.to_q.weight
    assert type(weight) is not torch.nn.Parameter  # a torchao int8 tensor
    assert (weight.dequantize() - fused).abs().max() < (fused - plain).abs().max() / 20  # int8 of W + style


# --- a phased run on base + style ----------------------------------------------------------------------------------
def test_a_phased_run_on_base_plus_style_records_the_lora_and_its_student_rebuilds_it(folder, style_file, tmp_path,
                                                                                      capsys):
    """Two phases x one update at batch 1. The manifest names the copy of the style file inside the student
    folder, its sha256 and strength; the student, moved elsewhere, rebuilds base + style from that copy (`pdmd
    sample --student` included) and samples as the trainer's experts did; a changed copy is refused in one line."""
    config = TrainConfig.from_dict(dict(
        teacher=str(folder), method="phased", schedule={"boundaries": [0.8], "steps": [1, 1]}, updates_per_phase=1,
        batch_size=1, fake_ratio=1, lora={"rank": 2, "alpha": 2}, prompts=PROMPTS, sample_prompts=PROMPTS[:1],
        sample_every=100, checkpoint_every=100, lr_generator=1e-2, output_dir=str(tmp_path / "run"),
        teacher_loras=[{"file": str(style_file), "strength": STRENGTH}], **SIZE))
    trainer = Trainer(config)
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_dict(written).teacher_loras == config.teacher_loras  # the run's config reads back
    folder_ = Path(result["student"])
    manifest = Manifest.read(folder_)
    (lora,) = manifest.teacher_loras
    assert (lora.file, lora.strength) == ("teacher_loras/pytorch_lora_weights.safetensors", STRENGTH)
    assert lora.sha256 == hashlib.sha256(style_file.read_bytes()).hexdigest()
    assert (folder_ / lora.file).read_bytes() == style_file.read_bytes()
    assert "teacher_loras" not in manifest.teacher_options
    with pytest.raises(StudentError, match=r"style LoRAs pytorch_lora_weights.safetensors × 0.7, this config's "
                                           r"teacher_loras are none"):  # retraining from it needs the same teacher
        check_student_fits(manifest, TrainConfig.from_dict({**written, "teacher_loras": []}), 2, "run")
    expected = trainer.teacher.sample(PROMPTS[:1], 3, config.schedule, config.student_cfg, trainer.experts).sample

    moved = Path(shutil.copytree(folder_, tmp_path / "elsewhere"))
    rebuilt = load_student(moved)
    assert rebuilt.roles.teacher.style_loras == config.teacher_loras
    assert rebuilt.roles.teacher.style_loras[0].file == (moved / lora.file).resolve()
    torch.testing.assert_close(rebuilt.sample(PROMPTS[:1], seed=3).sample, expected, rtol=1e-4, atol=1e-5)
    assert main(["sample", "--student", str(moved), "--prompt", PROMPTS[0], "--seed", "3",
                 "--out", str(tmp_path / "student.png")]) == 0
    capsys.readouterr()
    save_media(trainer.teacher.decode(expected), tmp_path / "expected.png")
    cli, direct = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("student.png", "expected.png"))
    assert np.abs(cli - direct).max() <= 1

    (moved / lora.file).write_bytes((moved / lora.file).read_bytes()[:-4] + b"    ")
    assert main(["sample", "--student", str(moved), "--prompt", PROMPTS[0], "--out", str(tmp_path / "x.png")]) == 2
    assert "has changed" in error_line(capsys.readouterr().err) and not (tmp_path / "x.png").exists()


# --- export, both ways -------------------------------------------------------------------------------------------
def test_both_exports_reproduce_the_student_in_stock_diffusers(folder, student, style, tmp_path, capsys):
    """(a) `lora export`: phase files on top of the style LoRA, copied beside them; stock diffusers loads the
    style, then the phases, with set_adapters([style, phase_k], [0.7, 1]). (b) `--with-style`: each phase file
    alone is the exact sum -- rank 4 + 2 where both adapt a module, the style's 4 or the phase's 2 where one does.
    Both give the latents of `pdmd sample --student` to 1e-4; the card's snippet, run as written, its image."""
    ours = load_student(student).sample([PROMPT], seed=0).sample
    noise = load_teacher(str(folder), **SIZE).noise(1, 0)

    assert main(["lora", "export", "--student", str(student), "--layout", "diffusers",
                 "--out", str(tmp_path / "a")]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    export = json.loads((tmp_path / "a" / "export.json").read_text())
    assert export["teacher_loras"] == [{"file": "pytorch_lora_weights.safetensors", "strength": STRENGTH,
                                        "sha256": style.sha256, "network": "transformer"}]
    assert export["with_style"] is False
    pipe = stock_pipeline(folder)
    pipe.load_lora_weights(str(tmp_path / "a" / export["teacher_loras"][0]["file"]), adapter_name="style")
    for k, path in enumerate(files):
        pipe.load_lora_weights(path, adapter_name=phase_adapter(k))
    on_top = stock_latents(pipe, [PROMPT], TWO_PHASES, noise, 1.0, lambda k: pipe.set_adapters(
        ["style", phase_adapter(k)], adapter_weights=[STRENGTH, 1.0]))
    torch.testing.assert_close(on_top, ours, rtol=1e-4, atol=1e-4)

    assert main(["lora", "export", "--student", str(student), "--layout", "diffusers", "--with-style",
                 "--out", str(tmp_path / "b")]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert [Path(f).name.split("-", 1)[1] for f in files] == [f"phase_{k}-with-style-diffusers.safetensors"
                                                               for k in (1, 2)]
    with safe_open(files[0], framework="pt") as handle:
        ranks = {key.removeprefix("transformer.").removesuffix(".lora_A.weight"): handle.get_slice(key).get_shape()[0]
                 for key in handle.keys() if key.endswith(".lora_A.weight")}
    assert ranks["transformer_blocks.0.attn.to_q"] == 6 and ranks["transformer_blocks.0.attn.to_k"] == 2
    assert ranks["transformer_blocks.0.ff.net.2"] == 4
    pipe = stock_pipeline(folder)
    for k, path in enumerate(files):
        pipe.load_lora_weights(path, adapter_name=phase_adapter(k))
    alone = stock_latents(pipe, [PROMPT], TWO_PHASES, noise, 1.0, lambda k: pipe.set_adapters(phase_adapter(k)))
    torch.testing.assert_close(alone, ours, rtol=1e-4, atol=1e-4)

    card = str(render_card(student, repo_id=str(student)))
    assert "with its style LoRA(s) `pytorch_lora_weights.safetensors × 0.7` fused in" in card
    code = snippet(card)
    assert 'weight_name="teacher_loras/pytorch_lora_weights.safetensors", adapter_name="style_1")' in code
    assert "STYLE = {'style_1': 0.7}" in code and "pipe.set_adapters([*STYLE, " in code
    run_snippet(code, tmp_path)  # writes student.png
    assert main(["sample", "--student", str(student), "--prompt", PROMPT, "--seed", "0",
                 "--out", str(tmp_path / "pdmd.png")]) == 0
    card_image, pdmd_image = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("student.png", "pdmd.png"))
    assert np.abs(card_image - pdmd_image).max() <= 1 and pdmd_image.std() > 5


# --- bad style LoRAs: one line, nothing written ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(folder, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its one line says)."""
    from diffusers import FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline

    where = tmp_path_factory.mktemp("bad")
    (where / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"weight": torch.zeros(2, 2)}, str(where / "no_lora.safetensors"))
    (where / "style.pt").write_bytes(b"pickle")
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4)
    other_family = peft_lora_file(sd3, StableDiffusion3Pipeline, where / "sd3", seed=4, target_modules=["to_q"])
    dora = peft_lora_file(stock_pipeline(folder).transformer, FluxPipeline, where / "dora", seed=5,
                          target_modules=["to_q"], use_dora=True)
    return {"not safetensors": (where / "garbage.safetensors", "is not a readable safetensors file"),
            "no LoRA keys": (where / "no_lora.safetensors", "no LoRA weights found"),
            "pickle": (where / "style.pt", "pickle files are never loaded"),
            "missing": (where / "nowhere.safetensors", "does not exist"),
            "other family": (other_family, "does not fit this flux teacher (a LoRA of another model?): LoRA shapes"),
            "DoRA": (dora, "(full-weight diffs, DoRA or bias terms): "
                           "transformer.single_transformer_blocks.0.attn.to_q.lora_magnitude_vector")}


def test_bad_style_loras_are_one_line_and_nothing_is_written(folder, style_file, bad_files, tmp_path, capsys):
    """Checks without the model (the file, the strength, the built-in teacher) fail the config; checks against it
    (another family's LoRA, DoRA) fail loading the teacher; before the run folder or any output exists. Teachers
    no style can be fused into are refused before their pipeline loads."""
    output = tmp_path / "run"

    def config(**changes):
        return dict(teacher=str(folder), updates_per_phase=1, batch_size=1, output_dir=str(output), **SIZE, **changes)
    for name, (path, said) in bad_files.items():
        with pytest.raises((ConfigError, TeacherError)) as raised:
            Trainer(TrainConfig.from_dict(config(teacher_loras=[{"file": str(path)}])))
        assert one_line(str(raised.value)) and said in str(raised.value), name
        assert name not in ("other family", "DoRA") or isinstance(raised.value, TeacherError)  # at loading
    for changes, said in (
            (dict(teacher_loras=[{"file": str(style_file), "strength": 2.5}]),
             "strength 2.5 must be a number in [0, 2]"),
            (dict(teacher_loras=[{"path": str(style_file)}]), "must be a mapping with 'file'"),
            (dict(teacher_loras=str(style_file)), "must be a list"),
            (dict(teacher="builtin", height=None, width=None, teacher_loras=[{"file": str(style_file)}]),
             "teacher_loras apply to diffusers teachers")):
        with pytest.raises(ConfigError, match=said.replace("[", r"\[").replace("]", r"\]")) as raised:
            TrainConfig.from_dict({**config(), **changes})
        assert one_line(str(raised.value))
    assert not output.exists()
    with pytest.raises(TeacherError, match="the built-in teacher takes none"):
        load_teacher("builtin", teacher_loras=(style_lora(style_file),))
    with pytest.raises(TeacherError, match="cannot be fused into an nf4 base"):  # on CUDA; the CPU refuses nf4 itself
        check_takes_style_loras({}, "nf4", (style_lora(style_file),))

    for argument, said in ((f"{style_file}:2.5", "strength 2.5"), (str(bad_files["pickle"][0]), "pickle")):
        with pytest.raises(SystemExit):
            main(["sample", "--teacher", str(folder), "--teacher-lora", argument, "--prompt", PROMPT,
                  "--out", str(tmp_path / "x.png")])
        assert said in error_line(capsys.readouterr().err)
    assert main(["sample", "--teacher", str(folder), "--teacher-lora", str(bad_files["other family"][0]),
                 "--prompt", PROMPT, "--out", str(tmp_path / "x.png")]) == 2
    assert "does not fit this flux teacher" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_export_with_style_needs_a_style(folder, tmp_path, capsys):
    random_student(load_teacher(str(folder), **SIZE), TWO_PHASES, tmp_path / "plain")
    assert main(["lora", "export", "--student", str(tmp_path / "plain"), "--with-style", "--out",
                 str(tmp_path / "out")]) == 2
    assert "has no style LoRA to include" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# --- the showcase file and the Compare tab ------------------------------------------------------------------------
def test_the_showcase_file_takes_a_teachers_style_loras_and_refuses_bad_ones(folder, student, style, style_file,
                                                                             tmp_path):
    def read(**changes) -> Showcase:
        teacher = {"name": "styled", "model": str(folder), "height": 16, "width": 16,
                   "teacher_loras": [{"file": style_file.name, "strength": STRENGTH}],  # relative to the file
                   "students": [{"name": "phased", "folder": str(student)}], **changes}
        path = style_file.parent / f"showcase-{tmp_path.name}.yaml"
        path.write_text(yaml.safe_dump({"teachers": [teacher]}))
        return Showcase.read(path)
    (teacher,) = read().teachers
    assert teacher.options["teacher_loras"] == (style,)
    for changes, said in ((dict(teacher_loras=[{"file": style_file.name, "strength": 2.5}]),
                           "teachers[styled]: teacher_loras[0] strength 2.5 must be a number in [0, 2]"),
                          (dict(teacher_loras=[{"file": "nowhere.safetensors"}]), "does not exist"),
                          (dict(teacher_loras=[{"file": style_file.name, "strength": 0.5}]),
                           "was distilled with teacher_loras [pytorch_lora_weights.safetensors × 0.7]"),
                          (dict(teacher_loras=[]), "was distilled with teacher_loras"),
                          (dict(teacher_loras=[{"file": style_file.name, "strength": STRENGTH,
                                                "network": "transformer_2"}]),
                           "was distilled with teacher_loras [pytorch_lora_weights.safetensors × 0.7], not "),
                          (dict(teacher_loras=[{"file": style_file.name, "network": "high"}]),
                           "teacher_loras[0] network 'high' must be transformer or transformer_2")):
        with pytest.raises(ShowcaseError) as raised:
            read(**changes)
        assert one_line(str(raised.value)) and said in str(raised.value), changes


def test_the_compare_handler_checks_the_style_lora_on_the_server(folder, style_file, bad_files):
    from ui.models import ModelStore
    from ui.teacher_picker import on_load_teacher

    store = ModelStore()
    for path, strength, said in ((style_file, 2.5, "style LoRA strength 2.5 must lie between 0 and 2"),
                                 (style_file, "lots", "is not a number"),
                                 (bad_files["not safetensors"][0], 1.0, "is not a readable safetensors file"),
                                 (bad_files["other family"][0], 1.0, "does not fit this flux teacher")):
        status = on_load_teacher(store, "builtin", str(folder), 16, 16, None, str(path), strength)[1]
        assert "pdmd-error" in status and said in status and one_line(status)
    assert store.loaded_teachers() == []  # nothing loaded, nothing kept
    assert "takes none" in on_load_teacher(store, "builtin", "", None, None, None, str(style_file), 1.0)[1]
    public = on_load_teacher(ModelStore(other_teachers=False), "builtin", "", None, None, None,
                             "/etc/secret.safetensors", 1)
    assert "turned off on this public server" in public[1] and "secret" not in public[1]

    state, status, *_ = on_load_teacher(store, "builtin", str(folder), 16, 16, None, str(style_file), STRENGTH)
    assert status.startswith("✓") and f"+ style LoRA pytorch_lora_weights.safetensors × {STRENGTH:g}" in status
    assert state["options"]["teacher_loras"] == (style_lora(style_file, STRENGTH),)
    assert store.teacher(state["name"], state["options"]).style_loras == state["options"]["teacher_loras"]


# --- a two-network teacher (Wan 2.2 A14B): a style file per network ----------------------------------------------
WAN_SIZE = SIZES["wan2.2"]
HIGH, LOW = 0.7, 1.3  # the strengths of the high-noise (transformer) and the low-noise (transformer_2) style
# each network's style adapts a module the other's does not: a file fused into, or summed with, the wrong network
# would show
HIGH_MODULES, LOW_MODULES = ["to_q", "ffn.net.2"], ["to_q", "proj_out"]


@pytest.fixture(scope="module")
def wan_folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.2")


def stock_wan(folder: Path):
    from diffusers import WanPipeline
    return WanPipeline.from_pretrained(str(folder))


def into(network: str) -> dict:
    return {"load_into_transformer_2": True} if network == "transformer_2" else {}


@pytest.fixture(scope="module")
def wan_style_files(wan_folder, tmp_path_factory) -> tuple[Path, Path]:
    """The high-noise and the low-noise style file, each made with PEFT on its transformer and saved by
    WanPipeline.save_lora_weights, as a style for Wan 2.2 A14B is published."""
    from diffusers import WanPipeline

    pipe, where = stock_wan(wan_folder), tmp_path_factory.mktemp("wan-style")
    return (peft_lora_file(pipe.transformer, WanPipeline, where / "high", seed=6, target_modules=HIGH_MODULES),
            peft_lora_file(pipe.transformer_2, WanPipeline, where / "low", seed=7, target_modules=LOW_MODULES))


@pytest.fixture(scope="module")
def wan_styles(wan_style_files):
    high, low = wan_style_files
    return style_lora(high, HIGH), style_lora(low, LOW, network="transformer_2")


@pytest.fixture(scope="module")
def wan_student(wan_folder, wan_styles, tmp_path_factory) -> Path:
    """Random phase LoRAs on base + style, one phase per network (t = 1 on transformer, t = 0.8 on transformer_2)."""
    teacher = load_teacher(str(wan_folder), **WAN_SIZE, teacher_loras=wan_styles)
    where = tmp_path_factory.mktemp("wan-styled") / "student"
    random_student(teacher, PhaseSchedule.from_dict(EXPERT_SPLIT), where)
    return where


def stock_wan_latents(pipe, prompts, schedule: PhaseSchedule, noise, guidance: float, activate=None):
    """WanPipeline's own Euler over ``schedule``'s timesteps from ``noise``: it takes no sigmas, so its scheduler
    is handed ours; ``activate(k)`` as for stock_latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = list(schedule.timesteps[:-1])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the timesteps are already shifted
    scheduler.set_timesteps = lambda *args, device=None, **kwargs: \
        FlowMatchEulerDiscreteScheduler.set_timesteps(scheduler, sigmas=sigmas, device=device)
    pipe.scheduler = scheduler
    return pipe(prompts, num_inference_steps=len(sigmas), guidance_scale=guidance, latents=noise,
                output_type="latent", callback_on_step_end=phase_switch(schedule, activate), **WAN_SIZE).frames


def test_a_two_network_teacher_fuses_each_style_file_into_its_network(wan_folder, wan_style_files, wan_styles):
    """The high-noise file into transformer at 0.7, the low-noise one into transformer_2 at 1.3 sample what stock
    WanPipeline samples with load_lora_weights(high), load_lora_weights(low, load_into_transformer_2=True) at those
    strengths, over steps on both networks: latents to 1e-4. The network is part of the teacher's identity; int8
    quantizes both fused networks."""
    teacher = load_teacher(str(wan_folder), **WAN_SIZE, teacher_loras=wan_styles)
    assert teacher.style_loras == wan_styles and not any("lora" in name for name, _ in teacher.model.named_modules())
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    assert {teacher.network_at(t) for t in schedule.timesteps[:-1]} == {"transformer", "transformer_2"}
    ours = teacher.sample(PROMPTS[:1], 0, schedule, teacher.default_cfg).sample
    high, low = wan_style_files
    pipe = stock_wan(wan_folder)
    pipe.load_lora_weights(str(high), adapter_name="high")
    pipe.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    pipe.set_adapters(["high", "low"], adapter_weights=[HIGH, LOW])
    theirs = stock_wan_latents(pipe, PROMPTS[:1], schedule, teacher.noise(1, 0), teacher.default_cfg)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    swapped = (style_lora(high, HIGH, network="transformer_2"), style_lora(low, LOW))
    assert teacher_key(str(wan_folder), teacher.options()) != \
        teacher_key(str(wan_folder), {**teacher.options(), "teacher_loras": swapped})

    quantized = load_teacher(str(wan_folder), **WAN_SIZE, teacher_loras=wan_styles, quantize="int8").model
    for network in ("transformer", "transformer_2"):
        fused = teacher.model[network].blocks[0].attn1.to_q.weight
        plain = getattr(pipe, network).blocks[0].attn1.to_q.base_layer.weight  # under the stock pipeline's LoRA
        weight = quantized[network].blocks[0].attn1.to_q.weight
        assert type(weight) is not torch.nn.Parameter  # a torchao int8 tensor
        assert (weight.dequantize() - fused).abs().max() < (fused - plain).abs().max() / 20, network  # W + style


def test_a_style_lora_for_a_network_the_teacher_lacks_or_that_does_not_fit_its_network_is_one_line(
        folder, style_file, wan_folder, tmp_path, capsys):
    """transformer_2 on a one-network teacher is refused before its pipeline loads; a low-noise file of another
    Wan (other widths) when it is checked against transformer_2; an unknown network in the config. The command
    line's FILE[:STRENGTH][:NETWORK] reads the network."""
    from diffusers import WanPipeline, WanTransformer3DModel

    with pytest.raises(TeacherError) as raised:
        load_teacher(str(folder), **SIZE, teacher_loras=(style_lora(style_file, network="transformer_2"),))
    assert one_line(str(raised.value)) and "is for network transformer_2, which this one-network teacher does not " \
                                           "have" in str(raised.value)
    other_wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                      in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                      num_layers=1)
    misfit = peft_lora_file(other_wan, WanPipeline, tmp_path / "other", seed=8, target_modules=["to_q"])
    with pytest.raises(TeacherError) as raised:
        load_teacher(str(wan_folder), **WAN_SIZE, teacher_loras=(style_lora(misfit, network="transformer_2"),))
    assert one_line(str(raised.value)) and "does not fit this wan teacher's transformer_2 (a LoRA of another " \
                                           "model?): LoRA shapes do not fit" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        TrainConfig.from_dict(dict(teacher=str(wan_folder), output_dir=str(tmp_path / "run"), **WAN_SIZE,
                                   teacher_loras=[{"file": str(style_file), "network": "transformer_3"}]))
    assert one_line(str(raised.value)) and "teacher_loras[0] network 'transformer_3' must be transformer or " \
                                           "transformer_2" in str(raised.value)

    assert teacher_lora(f"{style_file}:0.8:transformer_2") == style_lora(style_file, 0.8, network="transformer_2")
    assert teacher_lora(f"{style_file}:transformer_2") == style_lora(style_file, network="transformer_2")
    assert teacher_lora(f"{style_file}:0.8") == style_lora(style_file, 0.8)
    assert main(["sample", "--teacher", str(folder), "--teacher-lora", f"{style_file}:0.8:transformer_2",
                 "--prompt", PROMPT, "--out", str(tmp_path / "x.png")]) == 2
    assert "which this one-network teacher does not have" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_a_phased_run_on_wan22_with_a_style_per_network_records_each_network(wan_folder, wan_style_files,
                                                                             tmp_path):
    """One phase per network (boundaries [0.8]), one update each at batch 1: the run's config reads back with the
    networks, the manifest records each style's network, the student rebuilds base + both styles and samples as
    the trainer's experts did. A manifest written before networks were recorded reads its styles as
    transformer's."""
    high, low = wan_style_files
    config = TrainConfig.from_dict(dict(
        teacher=str(wan_folder), method="phased", schedule=EXPERT_SPLIT, updates_per_phase=1, batch_size=1,
        fake_ratio=1, lora={"rank": 2, "alpha": 2}, prompts=PROMPTS, sample_prompts=PROMPTS[:1], sample_every=100,
        checkpoint_every=100, lr_generator=1e-2, output_dir=str(tmp_path / "run"), **WAN_SIZE,
        teacher_loras=[{"file": str(high), "strength": HIGH},
                       {"file": str(low), "strength": LOW, "network": "transformer_2"}]))
    trainer = Trainer(config)
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_dict(written).teacher_loras == config.teacher_loras
    student = Path(result["student"])
    manifest = Manifest.read(student)
    assert manifest.networks == ("transformer", "transformer_2")
    assert [(lora.network, lora.strength) for lora in manifest.teacher_loras] == [("transformer", HIGH),
                                                                                  ("transformer_2", LOW)]
    for lora, source in zip(manifest.teacher_loras, (high, low)):
        assert (student / lora.file).read_bytes() == source.read_bytes()
    expected = trainer.teacher.sample(PROMPTS[:1], 3, config.schedule, config.student_cfg, trainer.experts).sample
    rebuilt = load_student(student)
    assert rebuilt.roles.teacher.style_loras == config.teacher_loras
    torch.testing.assert_close(rebuilt.sample(PROMPTS[:1], seed=3).sample, expected, rtol=1e-4, atol=1e-5)

    recorded = json.loads((student / "manifest.json").read_text())
    assert [entry["network"] for entry in recorded["teacher_loras"]] == ["transformer", "transformer_2"]
    unnamed = [{k: v for k, v in entry.items() if k != "network"} for entry in recorded["teacher_loras"]]
    assert {lora.network for lora in Manifest.from_dict({**recorded, "teacher_loras": unnamed}).teacher_loras} == \
        {"transformer"}
    with pytest.raises(StudentError, match=r"teacher_loras\[1\].network = 'transformer_3' must be transformer or"):
        Manifest.from_dict({**recorded, "teacher_loras": [unnamed[0], {**unnamed[1], "network": "transformer_3"}]})


def test_both_exports_of_a_wan22_student_reproduce_it_in_stock_diffusers(wan_folder, wan_student, tmp_path,
                                                                         capsys):
    """The card's snippet, as written up to the decode (mp4 is lossy), loads each style copy into its network;
    (a) the export on top of the styles, loaded as the card does; (b) `--with-style` alone, each phase file the
    sum of its phase and its own network's style only (rank 4 + 2 on to_q, the style's 4 where the style alone
    adapts a module, nothing of the other network's). All give the latents of `pdmd sample --student` to 1e-4."""
    student = load_student(wan_student)
    ours = student.sample([PROMPT], seed=0).sample
    noise, schedule = student.roles.teacher.noise(1, 0), student.schedule

    code = snippet(str(render_card(wan_student, repo_id=str(wan_student))))
    assert 'weight_name="teacher_loras/pytorch_lora_weights.safetensors", adapter_name="style_1")' in code
    assert 'weight_name="teacher_loras/2-pytorch_lora_weights.safetensors", adapter_name="style_2", ' \
           'load_into_transformer_2=True)' in code and f"STYLE = {{'style_1': {HIGH}, 'style_2': {LOW}}}" in code
    latent = snippet_latents(code, tmp_path)
    torch.testing.assert_close(latent, ours, rtol=1e-4, atol=1e-4)

    assert main(["lora", "export", "--student", str(wan_student), "--layout", "diffusers",
                 "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    export = json.loads((tmp_path / "a" / "export.json").read_text())
    assert [(style["network"], style["strength"]) for style in export["teacher_loras"]] == [
        ("transformer", HIGH), ("transformer_2", LOW)]
    pipe = stock_wan(wan_folder)
    for k, style in enumerate(export["teacher_loras"]):
        pipe.load_lora_weights(str(tmp_path / "a" / style["file"]), adapter_name=f"style_{k + 1}",
                               **into(style["network"]))
    for phase in export["phases"]:
        pipe.load_lora_weights(str(tmp_path / "a" / phase["file"]), adapter_name=phase_adapter(phase["phase"] - 1),
                               **into(phase["network"]))
    on_top = stock_wan_latents(pipe, [PROMPT], schedule, noise, 1.0, lambda k: pipe.set_adapters(
        ["style_1", "style_2", phase_adapter(k)], adapter_weights=[HIGH, LOW, 1.0]))
    torch.testing.assert_close(on_top, ours, rtol=1e-4, atol=1e-4)

    assert main(["lora", "export", "--student", str(wan_student), "--layout", "diffusers", "--with-style",
                 "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    export = json.loads((tmp_path / "b" / "export.json").read_text())
    assert [phase["network"] for phase in export["phases"]] == ["transformer", "transformer_2"]
    ranks = []
    for phase in export["phases"]:
        with safe_open(str(tmp_path / "b" / phase["file"]), framework="pt") as handle:
            ranks.append({key.removeprefix("transformer.").removesuffix(".lora_A.weight"):
                          handle.get_slice(key).get_shape()[0]
                          for key in handle.keys() if key.endswith(".lora_A.weight")})
    high_file, low_file = ranks
    assert high_file["blocks.0.attn1.to_q"] == low_file["blocks.0.attn1.to_q"] == 6
    assert high_file["blocks.0.ffn.net.2"] == 4 and "proj_out" not in high_file
    assert low_file["proj_out"] == 4 and "blocks.0.ffn.net.2" not in low_file
    pipe = stock_wan(wan_folder)
    for phase in export["phases"]:
        pipe.load_lora_weights(str(tmp_path / "b" / phase["file"]), adapter_name=phase_adapter(phase["phase"] - 1),
                               **into(phase["network"]))
    alone = stock_wan_latents(pipe, [PROMPT], schedule, noise, 1.0, lambda k: pipe.set_adapters(phase_adapter(k)))
    torch.testing.assert_close(alone, ours, rtol=1e-4, atol=1e-4)


def test_the_showcase_file_takes_a_style_per_network_of_a_wan22_teacher(wan_folder, wan_student, wan_styles,
                                                                       wan_style_files, tmp_path):
    high, low = wan_style_files
    path = tmp_path / "showcase.yaml"
    path.write_text(yaml.safe_dump({"teachers": [{
        "name": "styled-wan", "model": str(wan_folder), **{"height": 16, "width": 16, "frames": 5},
        "teacher_loras": [{"file": str(high), "strength": HIGH},
                          {"file": str(low), "strength": LOW, "network": "transformer_2"}],
        "students": [{"name": "phased", "folder": str(wan_student)}]}]}))
    (teacher,) = Showcase.read(path).teachers
    assert teacher.options["teacher_loras"] == wan_styles
