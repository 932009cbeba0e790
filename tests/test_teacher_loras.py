"""A teacher that carries its owner's style LoRA ("distil my model") on the tiny FLUX.1-dev pipeline
(pdmd/teachers/tiny.py; guidance is a network input there, so one evaluation a step): base + style samples what
the stock pipeline with the LoRA loaded samples; a phased run on it records the LoRA in its student, which rebuilds
base + style from its own copy; both exports reproduce the student in stock diffusers; a bad style LoRA is one line
with nothing written, in a config, on the command line, in the showcase file and in the Compare tab's handler."""
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
from test_card import run_snippet, snippet
from test_diffusers_teachers import fresh_accelerator_state, random_student  # noqa: F401  (autouse)

from pdmd.cli import main
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


def stock_latents(pipe, prompts, schedule: PhaseSchedule, noise, guidance: float, activate=None) -> torch.Tensor:
    """The stock pipeline's Euler over ``schedule``'s timesteps from ``noise``; ``activate(k)``: the adapters of
    phase k, switched in at each phase boundary."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the timesteps are already shifted
    starts = {step: k + 1 for k, step in enumerate(schedule.boundary_step_indices[:-1])}
    if activate:
        activate(0)

    def switch(pipe, step, timestep, callback_kwargs):
        if activate and step + 1 in starts:
            activate(starts[step + 1])
        return callback_kwargs
    latents = pipe(prompts, sigmas=list(schedule.timesteps[:-1]),
                   num_inference_steps=schedule.nfe, guidance_scale=guidance, latents=pack_2x2(noise),
                   output_type="latent", callback_on_step_end=switch, **SIZE).images
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
                                        "sha256": style.sha256}] and export["with_style"] is False
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


def test_bad_style_loras_are_one_line_and_nothing_is_written(folder, style_file, bad_files, tiny_pipeline, tmp_path,
                                                             capsys):
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
    with pytest.raises(TeacherError, match="teacher_loras are for one-network teachers"):  # before it loads
        load_teacher(str(tiny_pipeline("wan2.2")), teacher_loras=(style_lora(style_file),))
    with pytest.raises(TeacherError, match="cannot be fused into an nf4 base"):  # on CUDA; the CPU refuses nf4 itself
        check_takes_style_loras({}, "nf4")

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
                          (dict(teacher_loras=[]), "was distilled with teacher_loras")):
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
