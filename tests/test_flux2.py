"""FLUX.2 [dev] (Flux2Pipeline: guidance as a network input) and FLUX.2 [klein] (Flux2KleinPipeline: true CFG
against "", none when step-distilled) on tiny real-architecture pipelines (pdmd/teachers/tiny.py): sampling as
the pipelines' own __call__, phased distillation, LoRA export (diffusers into the stock pipeline, the model card's
snippet; ComfyUI's original module names), published FLUX.2 LoRAs in, and the real checkpoints' offline plan."""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_card import run_snippet, snippet
from test_diffusers_teachers import fresh_accelerator_state, random_student  # noqa: F401
from torch import nn

from pdmd.cli import main
from pdmd.core.schedule import PhaseSchedule
from pdmd.students import lora_formats as lf
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import MANIFEST, Manifest
from pdmd.teachers import load_teacher
from pdmd.teachers.flux2 import FLUX2_TARGETS, flux2_mu, unpack_grid
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

FAMILIES = ("flux2-dev", "flux2-klein")
SIZE = dict(height=16, width=16)  # latent grid 16 channels x 4 x 4
PROMPTS = ["a red cat on a sofa", "two blue dogs"]
PROMPT = "a cat sitting on a windowsill"  # the model card's example prompt


@pytest.fixture(scope="module")
def teachers(tiny_pipeline):
    return {family: load_teacher(str(tiny_pipeline(family)), **SIZE) for family in FAMILIES}


def pipeline_run(teacher, schedule: PhaseSchedule, cfg: float, noise: torch.Tensor):
    """The pipeline's own __call__ over ``schedule``'s timesteps (given as sigmas, to a scheduler without a shift:
    they are shifted already) from ``noise``: (its final latent grid, its decoded images in [0, 1])."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, final = teacher.pipe, {}
    scheduler, pipe.scheduler = pipe.scheduler, FlowMatchEulerDiscreteScheduler(shift=1.0)
    try:
        out = pipe(prompt=PROMPTS, num_inference_steps=schedule.nfe, sigmas=list(schedule.timesteps[:-1]),
                   latents=noise, guidance_scale=cfg, output_type="pt",
                   callback_on_step_end=lambda pipe, step, t, tensors: final.update(tensors) or tensors, **SIZE)
    finally:
        pipe.scheduler = scheduler
    return unpack_grid(final["latents"], *teacher.latent_shape[1:]), out.images


# --- (a) sampling as the pipelines do --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_samples_and_decodes_what_its_pipeline_does_with_guidance_on(teachers, family):
    teacher = teachers[family]
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0)  # [dev]: guidance input; [klein]: CFG
    latents, images = pipeline_run(teacher, schedule, 3.0, teacher.noise(len(PROMPTS), 0))
    torch.testing.assert_close(ours.sample, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher.decode(ours.sample), images, rtol=1e-4, atol=1e-4)
    assert ours.nfe == (4 if family == "flux2-dev" else 8) and ours.sample.abs().mean() > 0.1
    assert not torch.allclose(teacher.sample(PROMPTS, 0, schedule, 1.0).sample, ours.sample, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_schedule_is_the_schedulers_with_the_pipelines_mu(teachers, family):
    """The pipelines set mu = compute_empirical_mu(image tokens, steps) and the scheduler shifts exponentially."""
    teacher = teachers[family]
    steps, scheduler = teacher.default_steps, copy.deepcopy(teacher.pipe.scheduler)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux2_mu(teacher.image_tokens(), steps))
    ours = torch.tensor(PhaseSchedule.uniform(steps, teacher.default_shift).timesteps, dtype=torch.float32)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=1e-5, atol=1e-6)
    assert teacher.default_shift > 1.5  # a real shift, not the identity


def test_a_step_distilled_klein_ignores_guidance_as_its_pipeline_does(tiny_pipeline, tmp_path):
    folder = shutil.copytree(tiny_pipeline("flux2-klein"), tmp_path / "klein-distilled")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    teacher = load_teacher(str(folder), **SIZE)
    assert (teacher.default_steps, teacher.default_cfg) == (4, 1.0) and teacher.encode_prompts(PROMPTS)[1] is None
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=3.0)
    torch.testing.assert_close(ours.sample, pipeline_run(teacher, schedule, 3.0, teacher.noise(2, 0))[0],
                               rtol=1e-4, atol=1e-4)
    assert ours.nfe == 4


# --- (b) distillation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_two_phased_updates_then_export_of_the_student(tmp_path, tiny_pipeline, family):
    config = TrainConfig.from_dict(dict(
        teacher=str(tiny_pipeline(family)), method="phased", schedule={"boundaries": [0.8], "steps": [1, 1]},
        updates_per_phase=1, batch_size=2, fake_ratio=1, lora={"rank": 2, "alpha": 2},
        prompts=PROMPTS + ["a green tree"], sample_prompts=PROMPTS[:1], sample_every=2, checkpoint_every=100,
        lr_generator=1e-2, output_dir=str(tmp_path / "run"), **SIZE))
    trainer = Trainer(config)
    result = trainer.fit(progress=False)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert result["finished"] and [r["phase"] for r in rows] == [1, 2] and all(r["loss_fake"] > 0 for r in rows)
    folder = Path(result["student"])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["family"] == "flux2" and manifest["lora"]["target_modules"] == list(FLUX2_TARGETS)
    for relative in manifest["phases"]:  # the single-stream blocks' fused projection is trained too
        weights = load_file(str(folder / relative))
        assert weights["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight"].abs().sum() > 0

    for layout in lf.EXPORT_LAYOUTS:
        written = lf.export_student(folder, tmp_path / layout, layout)
        assert len(written) == 2
        for relative, path in zip(manifest["phases"], written):
            exported = load_file(str(path))
            prefixes = ("transformer.",) if layout == "diffusers" else ("diffusion_model.double_blocks.",
                                                                        "diffusion_model.single_blocks.")
            assert all(k.startswith(prefixes) for k in exported)
            # diffusers' FLUX.2 converter reads either layout back to the student's weights (scale alpha/rank = 1)
            back = lf.load_published(path, "flux2", trainer.teacher.pipe.transformer)
            ours = load_file(str(folder / relative))
            for key in (k for k in ours if k.endswith(".lora_A.weight")):
                module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                torch.testing.assert_close(back[f"{module}.lora_B.weight"] @ back[f"{module}.lora_A.weight"],
                                           ours[key.replace("lora_A", "lora_B")] @ ours[key])
    expected = trainer.teacher.sample(PROMPTS[:1], 3, config.schedule, config.student_cfg, trainer.experts).sample
    torch.testing.assert_close(load_student(folder).sample(PROMPTS[:1], seed=3).sample, expected,
                               rtol=1e-4, atol=1e-5)


# --- (c) the diffusers export in the stock pipeline -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_export_in_the_stock_pipeline_and_the_cards_snippet_reproduce_pdmd_sample(tmp_path, teachers,
                                                                                             family):
    teacher = copy.deepcopy(teachers[family])  # the student's adapters go onto this copy
    student = tmp_path / "student"
    random_student(teacher, PhaseSchedule((0.6,), (2, 2), teacher.default_shift), student)
    assert main(["sample", "--student", str(student), "--prompt", PROMPT, "--seed", "0",
                 "--out", str(tmp_path / "pdmd.png")]) == 0
    code = snippet(str(render_card(student, repo_id=str(student))))
    written = lf.export_student(student, tmp_path / "export", "diffusers")
    # the same recipe with each phase's exported file instead of the student folder's
    exported = re.sub(r'STUDENT, weight_name="phase_(\d)/[^"]+"', lambda m: repr(str(written[int(m[1]) - 1])), code)
    assert exported.count("load_lora_weights(") == 2 and "STUDENT," not in exported
    (tmp_path / "card").mkdir()
    (tmp_path / "exported").mkdir()
    run_snippet(code, tmp_path / "card")
    run_snippet(exported, tmp_path / "exported")
    reference = np.asarray(Image.open(tmp_path / "pdmd.png")).astype(int)
    assert reference.std() > 5
    for where in ("card", "exported"):
        theirs = np.asarray(Image.open(tmp_path / where / "student.png")).astype(int)
        assert theirs.shape == reference.shape and np.abs(theirs - reference).max() <= 1, where


# --- (d) ComfyUI's keys -----------------------------------------------------------------------------------------
def random_pairs(model: nn.Module, modules, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    layers = dict(model.named_modules())
    state = {}
    for name in modules:
        layer = layers[name]
        state[f"{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.1
    return state


def comfyui_additions(exported: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI adds to its FLUX.2 model's weights: B @ A onto ``<module>.weight`` of the key
    ``diffusion_model.<module>`` (comfy/lora.py: the generic key map, lora_B / lora_A pairs, no alpha: scale 1),
    named as in the original checkpoint the model is loaded from."""
    return {k.removeprefix("diffusion_model.").removesuffix(".lora_A.weight") + ".weight":
            exported[k.replace(".lora_A.", ".lora_B.")] @ exported[k] for k in exported if k.endswith(".lora_A.weight")}


def test_comfyui_export_adds_exactly_the_students_weights_under_flux2s_original_names(teachers):
    """Our ComfyUI file's additions, converted by diffusers' own FLUX.2 checkpoint converter (the original
    checkpoint -> diffusers names, fused qkv split by rows), are the student's B @ A on every diffusers module."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    model = teachers["flux2-dev"].pipe.transformer  # has the guidance embedder
    weights = dict(model.named_parameters())
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    everything = random_pairs(model, [n for n in linears if n != "norm_out.linear"])
    only_q_and_v = random_pairs(model, ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"], seed=1)
    for state in (everything, only_q_and_v):
        exported = lf.comfyui_state(state, "flux2")
        assert all(re.fullmatch(r"diffusion_model\.[a-z_0-9.]+\.lora_[AB]\.weight", k) for k in exported)
        as_diffusers = convert_flux2_transformer_checkpoint_to_diffusers(comfyui_additions(exported))
        expected = {k.replace(".lora_A.weight", ".weight"): state[k.replace(".lora_A.", ".lora_B.")] @ v
                    for k, v in state.items() if k.endswith(".lora_A.weight")}
        for key, added in as_diffusers.items():
            assert added.shape == weights[key].shape, key
            torch.testing.assert_close(added, expected.get(key, torch.zeros_like(added)), msg=key)
        assert set(expected) <= set(as_diffusers)
    exported = lf.comfyui_state(everything, "flux2")
    for key in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_mlp.0",
                "single_blocks.0.linear1", "single_blocks.0.linear2", "guidance_in.in_layer", "final_layer.linear",
                "double_stream_modulation_img.lin", "img_in", "txt_in"):
        assert f"diffusion_model.{key}.lora_A.weight" in exported, key
    assert set(comfyui_additions(lf.comfyui_state(only_q_and_v, "flux2"))) == {"double_blocks.0.img_attn.qkv.weight"}
    with pytest.raises(lf.LoraFormatError, match="norm_out.linear.*opposite order"):
        lf.comfyui_state(random_pairs(model, ["norm_out.linear"]), "flux2")


# --- (e) published FLUX.2 LoRAs in ------------------------------------------------------------------------------
def published_layout(model: nn.Module, seed: int = 2, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA as published FLUX.2 LoRAs (ai-toolkit, BFL) are written: the original module names under
    ``diffusion_model.``, lora_A / lora_B, fused qkv, on every block Linear of the tiny transformer."""
    layers = dict(model.named_modules())
    shapes = {}  # original module -> (in, out), from the diffusers modules it stands for
    for index in range(len(model.transformer_blocks)):
        block, original = f"transformer_blocks.{index}", f"double_blocks.{index}"
        q, add_q = layers[f"{block}.attn.to_q"], layers[f"{block}.attn.add_q_proj"]
        shapes[f"{original}.img_attn.qkv"] = (q.in_features, 3 * q.out_features)
        shapes[f"{original}.txt_attn.qkv"] = (add_q.in_features, 3 * add_q.out_features)
        for name, diffusers_name in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                                     ("img_mlp.0", "ff.linear_in"), ("img_mlp.2", "ff.linear_out"),
                                     ("txt_mlp.0", "ff_context.linear_in"), ("txt_mlp.2", "ff_context.linear_out")):
            layer = layers[f"{block}.{diffusers_name}"]
            shapes[f"{original}.{name}"] = (layer.in_features, layer.out_features)
    for index in range(len(model.single_transformer_blocks)):
        for name, diffusers_name in (("linear1", "attn.to_qkv_mlp_proj"), ("linear2", "attn.to_out")):
            layer = layers[f"single_transformer_blocks.{index}.{diffusers_name}"]
            shapes[f"single_blocks.{index}.{name}"] = (layer.in_features, layer.out_features)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fan_in, fan_out) in shapes.items():
        state[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.1
        state[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.1
    return state


def transformer_output(transformer: nn.Module) -> torch.Tensor:
    from diffusers import Flux2Pipeline

    generator = torch.Generator().manual_seed(1)
    config = transformer.config
    grid = torch.randn(1, config.in_channels, 4, 4, generator=generator)
    text = torch.randn(1, 5, config.joint_attention_dim, generator=generator)
    with torch.no_grad():
        return transformer(hidden_states=grid.flatten(2).transpose(1, 2), encoder_hidden_states=text,
                           timestep=torch.tensor([0.6]), img_ids=Flux2Pipeline._prepare_latent_ids(grid),
                           txt_ids=Flux2Pipeline._prepare_text_ids(text), return_dict=False)[0]


def test_a_published_flux2_lora_imports_as_the_stock_pipeline_loads_it(tiny_pipeline, tmp_path, capsys):
    from diffusers import Flux2KleinPipeline

    folder = tiny_pipeline("flux2-klein")
    pipe = Flux2KleinPipeline.from_pretrained(str(folder))
    published = published_layout(pipe.transformer)
    save_file(published, str(tmp_path / "flux2-lora.safetensors"))
    assert main(["lora", "import", "--teacher", str(folder), "--files", str(tmp_path / "flux2-lora.safetensors"),
                 "--steps", "4", "--height", "16", "--width", "16", "--out", str(tmp_path / "student")]) == 0
    capsys.readouterr()
    assert Manifest.read(tmp_path / "student").published["layouts"] == ["comfyui"]
    student = load_student(tmp_path / "student")
    with student.roles.active("phase_1"):
        ours = transformer_output(student.roles.teacher.model)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "flux2-lora.safetensors"), adapter_name="published")  # the reference
    assert not torch.allclose(ours, base, atol=1e-4)
    torch.testing.assert_close(ours, transformer_output(pipe.transformer), rtol=1e-5, atol=1e-5)

    # the same LoRA with kohya part names and an alpha (half the rank): the same weights at half strength
    module = "transformer_blocks.0.attn.to_k"
    plain = lf.load_published(tmp_path / "flux2-lora.safetensors", "flux2", pipe.transformer)
    renamed = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in published.items()}
    renamed.update({k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.0) for k in published if ".lora_A." in k})
    save_file(renamed, str(tmp_path / "with-alpha.safetensors"))
    halved = lf.load_published(tmp_path / "with-alpha.safetensors", "flux2", pipe.transformer)
    delta = lambda state: state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]  # noqa: E731
    torch.testing.assert_close(delta(halved), 0.5 * delta(plain))
    # and as kohya / musubi-tuner write it (lora_unet_...): the same weights again, alpha folded the same way
    kohya = {re.sub(r"^diffusion_model\.(.+)\.(lora_down|lora_up|alpha)", lambda m: "lora_unet_" +
                    m[1].replace(".", "_") + "." + m[2], k): v for k, v in renamed.items()}
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    torch.testing.assert_close(delta(lf.load_published(tmp_path / "kohya.safetensors", "flux2", pipe.transformer)),
                               delta(halved))
    save_file({**kohya, "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(32, 4)},
              str(tmp_path / "stray.safetensors"))
    with pytest.raises(lf.LoraFormatError, match="img_mod_lin"):  # diffusers would only log and drop it
        lf.load_published(tmp_path / "stray.safetensors", "flux2", pipe.transformer)
    assert lf.family_of("Flux2Pipeline") == lf.family_of("Flux2KleinPipeline") == "flux2"


# --- the real checkpoints, offline ------------------------------------------------------------------------------
def test_plan_answers_for_flux2_klein_4b_with_no_download(capsys):
    code = main(["plan", "--teacher", "black-forest-labs/FLUX.2-klein-4B", "--height", "256", "--width", "256",
                 "--gpu-memory", "24", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["fits"] is True and result["latent_shape"] == [128, 16, 16]
    assert result["base_parameters"] == pytest.approx(3.88e9, rel=0.01)
    names = {row["name"] for row in result["components"]}
    assert {"transformer", "text encoder 1 (Qwen3ForCausalLM)", "VAE"} <= names
