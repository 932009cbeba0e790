"""Qwen-Image 2.1 (``QwenImage21Pipeline``) end to end on the tiny pipeline (pdmd/teachers/tiny.py
``build_qwen_image21``): the teacher samples and decodes what the pipeline does (its KV cache on), a phased student
trains and reloads, its diffusers export and the model card's snippet reproduce ``pdmd sample --student`` in the
stock pipeline, its ComfyUI export uses the keys ComfyUI's Qwen-Image 2.1 loader maps, published layouts import as
diffusers loads them, and the real checkpoint's plan answers offline."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_card import run_snippet, snippet
from test_diffusers_teachers import fresh_accelerator_state, random_student  # noqa: F401  (autouse)
from torch import nn

from pdmd.cli import main
from pdmd.core.schedule import PhaseSchedule
from pdmd.students import lora_formats as lf
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import Manifest
from pdmd.students.roles import phase_adapter
from pdmd.teachers import load_teacher
from pdmd.teachers.flux2 import pack_grid, unpack_grid
from pdmd.teachers.qwen_image21 import QwenImage21Teacher
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

SIZE = dict(height=32, width=64)  # a 16 x 2 x 4 latent: eight image tokens, two img_mask slots
PROMPTS = ["a red cat on a sofa", "two blue dogs"]  # of different lengths: the batch is padded
PROMPT = "a cat sitting on a windowsill"  # the card's example prompt
TWO_PHASES = PhaseSchedule((0.6,), (2, 2), 1.5)


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("qwen-image21")


@pytest.fixture(scope="module")
def teacher(folder) -> QwenImage21Teacher:
    return load_teacher(str(folder), **SIZE)


def stock_pipeline(folder: Path):
    from diffusers import QwenImage21Pipeline
    return QwenImage21Pipeline.from_pretrained(str(folder))


def pipeline_run(pipe, prompts, schedule: PhaseSchedule, noise: torch.Tensor, after_step=None, **call):
    """The pipeline's own __call__ over ``schedule``'s timesteps (as sigmas, to a scheduler without a shift: they
    are shifted already) from ``noise``, ``after_step(pipe, step)`` run after each step: (its final latent grid,
    its decoded RGBA images in [0, 1])."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    final = {}

    def record(pipe, step, timestep, tensors):
        if after_step is not None:
            after_step(pipe, step)
        final.update(tensors)
        return tensors
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    out = pipe(list(prompts), num_inference_steps=schedule.nfe, sigmas=list(schedule.timesteps[:-1]),
               latents=pack_grid(noise), output_type="pt", callback_on_step_end=record, **SIZE, **call)
    return unpack_grid(final["latents"], *noise.shape[2:]), out.images


def pipeline_velocity(transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """A diffusers Qwen-Image 2.1 transformer called as QwenImage21Pipeline.__call__ calls it for one unpadded
    prompt (no text mask; img_mask: the text, then a slot per 2x2 image tokens), as a velocity."""
    batch, _, height, width = x.shape
    text = cond["prompt_embeds"]
    slots = torch.cat([torch.zeros(batch, text.shape[1], dtype=torch.bool),
                       torch.ones(batch, height * width // 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        out = transformer(hidden_states=pack_grid(x), timestep=t * 1000 / 1000, encoder_hidden_states=text,
                          img_shapes=[[(1, height, width)]] * batch, img_mask=slots, return_dict=False)[0]
    return unpack_grid(out[:, -height * width:], height, width)


# --- (a) the teacher is the pipeline ---------------------------------------------------------------------------
def test_teacher_samples_and_decodes_what_the_pipeline_does_with_guidance_on_and_off(teacher, folder):
    """From the same noise over the same timesteps: without guidance (the pipeline's default true_cfg_scale 1, one
    evaluation a step) and with true CFG 3 against " ", the pipeline with its text KV cache on (its default): latents
    and decoded RGB to 1e-4. The defaults are the pipeline's, the shift its scheduler's (without the terminal
    stretch, which a phase schedule does not do)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    pipe = stock_pipeline(folder)
    schedule = PhaseSchedule.uniform(4, teacher.default_shift)
    noise = teacher.noise(len(PROMPTS), 0)
    # one negative prompt per prompt: the pipeline does not repeat a single one over the batch
    for cfg, call, nfe in ((1.0, {}, 4), (3.0, {"negative_prompt": [" "] * len(PROMPTS), "true_cfg_scale": 3.0}, 8)):
        ours = teacher.sample(PROMPTS, seed=0, schedule=schedule, cfg=cfg)
        latents, images = pipeline_run(pipe, PROMPTS, schedule, noise.clone(), **call)
        torch.testing.assert_close(ours.sample, latents, rtol=1e-4, atol=1e-4)
        assert ours.nfe == nfe and ours.sample.abs().mean() > 0.1
        decoded = teacher.decode(ours.sample)
        assert decoded.shape == (2, 3, 32, 64) and images.shape == (2, 4, 32, 64)  # the VAE decodes RGBA
        torch.testing.assert_close(decoded, images[:, :3], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(teacher.sample(PROMPTS, 0, schedule, 1.0).sample, ours.sample, atol=1e-3)
    assert (teacher.default_steps, teacher.default_cfg) == (40, 1.0)
    config = dict(teacher.pipe.scheduler.config)
    mu = calculate_shift(teacher.image_tokens(), config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    assert teacher.image_tokens() == 8 and teacher.default_shift == pytest.approx(math.exp(mu))
    unstretched = FlowMatchEulerDiscreteScheduler.from_config({**config, "shift_terminal": None})
    unstretched.set_timesteps(sigmas=np.linspace(1.0, 1 / 40, 40), mu=mu)
    default = torch.tensor(PhaseSchedule.uniform(40, teacher.default_shift).timesteps, dtype=torch.float32)
    torch.testing.assert_close(default, unstretched.sigmas, rtol=1e-5, atol=1e-6)
    assert config["shift_terminal"] == 0.02  # the real checkpoint's, as the tiny one has it


# --- (b) a phased student trains and reloads -------------------------------------------------------------------
def test_two_phased_updates_then_the_student_reloads_and_samples_the_same(tmp_path, folder):
    config = TrainConfig.from_dict(dict(
        teacher=str(folder), method="phased", schedule={"boundaries": [0.8], "steps": [1, 1]}, updates_per_phase=1,
        batch_size=1, fake_ratio=1, lora={"rank": 2, "alpha": 4}, prompts=PROMPTS + ["a green tree"],
        sample_prompts=PROMPTS[:1], sample_every=2, checkpoint_every=100, lr_generator=1e-2, teacher_cfg=3.0,
        output_dir=str(tmp_path / "run"), **SIZE))
    trainer = Trainer(config)
    result = trainer.fit(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["finished"] and [r["phase"] for r in rows] == [1, 2] and all(r["loss_fake"] > 0 for r in rows)
    # the Qwen3-VL encoder was released after the run's one encoding
    assert [id(e) for e in trainer.teacher.text_encoders] == [id(trainer.teacher.pipe.text_encoder)]
    assert id(trainer.teacher.pipe.text_encoder) in trainer.teacher._offloaded
    student = Path(result["student"])
    manifest = Manifest.read(student)
    assert manifest.family == "qwen-image21" and manifest.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    expected = trainer.teacher.sample(PROMPTS[:1], 3, config.schedule, config.student_cfg, trainer.experts).sample
    torch.testing.assert_close(load_student(student).sample(PROMPTS[:1], seed=3).sample, expected,
                               rtol=1e-4, atol=1e-5)
    # both export layouts read back to the trained deltas times alpha / rank; ComfyUI's key map takes every key
    base = stock_pipeline(folder).transformer
    for layout in lf.EXPORT_LAYOUTS:
        written = lf.export_student(student, tmp_path / layout, layout)
        assert [p.name for p in written] == [f"run-phase_{k}-{layout}.safetensors" for k in (1, 2)]
        for relative, path in zip(manifest.phases, written):
            trained = {k.removeprefix("transformer."): v for k, v in load_file(str(student / relative)).items()}
            exported, back = load_file(str(path)), lf.load_published(path, "qwen-image21", base)
            if layout == "comfyui":
                comfyui_additions(exported, comfyui_weights(base))
            modules = {lf.PAIR.match(k)["module"] for k in trained}
            assert any(trained[f"{m}.lora_B.weight"].abs().sum() > 0 for m in modules)
            delta = lambda state, m: state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"]  # noqa: E731
            for module in modules:
                torch.testing.assert_close(delta(back, module), 2.0 * delta(trained, module))  # alpha / rank


# --- (c) diffusers export into the stock pipeline, and the card -----------------------------------------------
def test_exported_diffusers_loras_in_the_stock_pipeline_and_the_cards_snippet_reproduce_pdmd_sample(tmp_path, folder,
                                                                                                    capsys):
    """`lora export --layout diffusers` files, loaded with load_lora_weights and switched at the phase boundary,
    give the student's latents with the pipeline's text KV cache off (on, it would serve phase 2 the text keys and
    values phase 1's LoRA made); the card's snippet, run as written (student CFG 2: true CFG against " "), writes
    the image `pdmd sample --student` writes."""
    student = tmp_path / "student"
    # a teacher of its own: Roles adds adapters
    roles = random_student(load_teacher(str(folder), **SIZE), TWO_PHASES, student, student_cfg=2.0)
    assert main(["lora", "export", "--student", str(student), "--layout", "diffusers", "--out",
                 str(tmp_path / "export")]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    ours = load_student(student).sample([PROMPT], seed=0)
    assert ours.nfe == 8

    pipe = stock_pipeline(folder)
    for k, path in enumerate(files):
        pipe.load_lora_weights(path, adapter_name=phase_adapter(k))
    boundary = TWO_PHASES.boundary_step_indices[0]

    def switch(pipe, step):
        if step + 1 == boundary:
            pipe.set_adapters(phase_adapter(1))
    for use_kv_cache in (False, True):
        pipe.set_adapters(phase_adapter(0))
        theirs, _ = pipeline_run(pipe, [PROMPT], TWO_PHASES, roles.teacher.noise(1, 0), after_step=switch,
                                 negative_prompt=" ", true_cfg_scale=2.0, use_kv_cache=use_kv_cache)
        if use_kv_cache:
            assert not torch.allclose(theirs, ours.sample, atol=1e-3)
        else:
            torch.testing.assert_close(theirs, ours.sample, rtol=1e-4, atol=1e-4)

    code = snippet(str(render_card(student, repo_id=str(student))))
    assert 'true_cfg_scale=2, negative_prompt=" ", use_kv_cache=False,' in code and "height=32, width=64" in code
    run_snippet(code, tmp_path)  # writes student.png
    assert main(["sample", "--student", str(student), "--prompt", PROMPT, "--seed", "0",
                 "--out", str(tmp_path / "pdmd.png")]) == 0
    card_image = Image.open(tmp_path / "student.png")
    assert card_image.mode == "RGBA"  # the pipeline's own output; pdmd writes its RGB channels
    card_rgb, pdmd_image = (np.asarray(i).astype(int) for i in (card_image.convert("RGB"),
                                                                  Image.open(tmp_path / "pdmd.png")))
    assert card_rgb.shape == pdmd_image.shape == (32, 64, 3)
    assert np.abs(card_rgb - pdmd_image).max() <= 1 and pdmd_image.std() > 5


# --- (d) ComfyUI's keys ---------------------------------------------------------------------------------------
def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def random_pairs(model: nn.Module, modules, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    layers = dict(model.named_modules())
    state = {}
    for name in modules:
        state[f"{name}.lora_A.weight"] = torch.randn(rank, layers[name].in_features, generator=generator) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(layers[name].out_features, rank, generator=generator) * 0.1
    return state


def comfyui_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Linear weights of ComfyUI's QwenImage21 model (comfy/ldm/qwen_image21/model.py) for this transformer:
    the diffusers names, but each block's img_mlp.gate_layer and img_mlp.proj fused into img_mlp.gate_up, their
    rows in that order (what its checkpoint holds and its SwiGLU splits in half)."""
    weights = {n: model.get_submodule(n).weight.detach() for n in linears(model)}
    for name in [n for n in weights if n.endswith(".img_mlp.gate_layer")]:
        block = name.removesuffix(".gate_layer")
        weights[f"{block}.gate_up"] = torch.cat([weights.pop(name), weights.pop(f"{block}.proj")])
    return weights


def comfyui_additions(exported: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI adds to each weight for a LoRA file, its key map restated (comfy/lora.py model_lora_keys_unet:
    every weight's ``diffusion_model.<name>`` and ``lora_unet_...``; the QwenImage branch's ``<name>`` and
    ``transformer.<name>``, gate_layer / proj onto the first / second half of gate_up's rows; a pair is lora_up /
    lora_down or lora_B / lora_A, with no alpha at scale 1). Every key of the file must be one it loads."""
    targets = {}
    for name, weight in weights.items():
        spans = [(name, None)]
        if name.endswith(".img_mlp.gate_up"):
            half = weight.shape[0] // 2
            spans = [(name.replace("gate_up", "gate_layer"), slice(0, half)),
                     (name.replace("gate_up", "proj"), slice(half, 2 * half))]
        targets[f"diffusion_model.{name}"] = (name, None)
        targets["lora_unet_" + name.replace(".", "_")] = (name, None)
        for lora_name, rows in spans:
            targets[lora_name] = targets[f"transformer.{lora_name}"] = (name, rows)
    added, loaded = {name: torch.zeros_like(w) for name, w in weights.items()}, set()
    for base, (name, rows) in targets.items():
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if base + up in exported:
                added[name][rows if rows is not None else slice(None)] += exported[base + up] @ exported[base + down]
                loaded |= {base + up, base + down}
    assert loaded == set(exported), f"keys ComfyUI would not load: {sorted(set(exported) - loaded)[:4]}"
    return added


def test_comfyui_export_adds_exactly_the_students_weights_to_comfyuis_fused_model(teacher):
    """A LoRA on every Linear, exported for ComfyUI: unprefixed diffusers names (ComfyUI's generic
    ``diffusion_model.<name>`` would miss gate_layer and proj, which its model fuses), every key one its loader maps,
    and what it adds to its fused weights is the LoRA's own B @ A, gate_up's rows included."""
    model = teacher.model
    state = random_pairs(model, linears(model))
    exported = lf.comfyui_state(state, "qwen-image21")
    assert all(re.fullmatch(r"[a-z_0-9.]+\.lora_(down|up)\.weight", k) and not k.startswith("diffusion_model.")
               for k in exported)
    assert "transformer_blocks.1.img_mlp.gate_layer.lora_down.weight" in exported
    additions = comfyui_additions(exported, comfyui_weights(model))
    expected = {n: state[f"{n}.lora_B.weight"] @ state[f"{n}.lora_A.weight"] for n in linears(model)}
    for block in range(len(model.transformer_blocks)):
        mlp = f"transformer_blocks.{block}.img_mlp"
        expected[f"{mlp}.gate_up"] = torch.cat([expected.pop(f"{mlp}.gate_layer"), expected.pop(f"{mlp}.proj")])
    assert set(additions) == set(expected)
    for name, added in additions.items():
        torch.testing.assert_close(added, expected[name], msg=name)
    with pytest.raises(lf.LoraFormatError, match="not one ComfyUI's Qwen-Image 2.1 LoRA loader maps"):
        lf.comfyui_state({"transformer_blocks.0.img_mlp.gate_up.lora_A.weight": torch.zeros(2, 2)}, "qwen-image21")
    # and it reads back, through diffusers' Qwen-Image converter, to the same weights
    back = lf.convert_published(exported, "qwen-image21", model)
    for name in linears(model):
        torch.testing.assert_close(back[f"{name}.lora_B.weight"] @ back[f"{name}.lora_A.weight"],
                                   state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"])


# --- (e) published Qwen-Image 2.1 LoRAs in -------------------------------------------------------------------
def block_linears(model: nn.Module) -> list[str]:
    return [n for n in linears(model) if n.startswith("transformer_blocks.")]


def test_published_layouts_import_as_the_stock_pipeline_loads_them(tmp_path, teacher, folder, capsys):
    """`pdmd lora import` of an ai-toolkit file (``diffusion_model.<module>.lora_A/lora_B``, phase 1, strength 1)
    and a ComfyUI-style one (``lora_down/lora_up`` with ``.alpha``, phase 2, strength 0.5), on every block Linear:
    each phase's velocity equals the stock pipeline's transformer with that file loaded by load_lora_weights at that
    adapter weight. A LoRA on ComfyUI's fused gate_up imports as the same weights on gate_layer and proj."""
    base = stock_pipeline(folder).transformer
    generator = torch.Generator().manual_seed(5)
    ai_toolkit, comfy = {}, {}
    for name in block_linears(base):
        layer = base.get_submodule(name)
        for state, rank in ((ai_toolkit, 2), (comfy, 4)):
            down = torch.randn(rank, layer.in_features, generator=generator) * 0.3
            up = torch.randn(layer.out_features, rank, generator=generator) * 0.3
            key = f"diffusion_model.{name}"
            if state is ai_toolkit:
                state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
            else:
                state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
                state[f"{key}.alpha"] = torch.tensor(2.0)
    paths = tmp_path / "ai_toolkit.safetensors", tmp_path / "comfy.safetensors"
    save_file(ai_toolkit, str(paths[0]))
    save_file(comfy, str(paths[1]))
    assert main(["lora", "import", "--teacher", str(folder), "--files", *map(str, paths), "--strengths", "1", "0.5",
                 "--boundaries", "0.6", "--steps", "2, 2", "--height", "32", "--width", "64",
                 "--out", str(tmp_path / "student")]) == 0
    capsys.readouterr()
    manifest = Manifest.read(tmp_path / "student")
    assert manifest.published["layouts"] == ["comfyui", "comfyui"] and manifest.family == "qwen-image21"
    student = load_student(tmp_path / "student")
    cond, _ = student.roles.teacher.encode_prompts(PROMPTS[:1])
    x, t = teacher.noise(1, 4), torch.tensor([0.7])
    plain = pipeline_velocity(base, x, t, cond)
    for phase, (path, strength) in enumerate(zip(paths, (1.0, 0.5))):
        pipe = stock_pipeline(folder)
        pipe.load_lora_weights(str(path), adapter_name="published")
        pipe.set_adapters("published", adapter_weights=strength)
        theirs = pipeline_velocity(pipe.transformer, x, t, cond)
        with torch.no_grad():
            mine = student.experts[phase](x, t, cond)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mine, plain, atol=1e-3)

    # ComfyUI's own names for a LoRA trained on its model: gate_up, whose rows are gate_layer's then proj's
    mlp = "transformer_blocks.0.img_mlp"
    gate = base.get_submodule(f"{mlp}.gate_layer")  # proj has its shape
    down, up = torch.randn(4, gate.in_features, generator=generator), torch.randn(2 * gate.out_features, 4,
                                                                                    generator=generator)
    save_file({f"diffusion_model.{mlp}.gate_up.lora_down.weight": down,
               f"diffusion_model.{mlp}.gate_up.lora_up.weight": up,
               f"diffusion_model.{mlp}.gate_up.alpha": torch.tensor(2.0)}, str(tmp_path / "fused.safetensors"))
    split = lf.load_published(tmp_path / "fused.safetensors", "qwen-image21", base)
    fused_delta = 0.5 * up @ down  # alpha / rank
    halves = [split[f"{mlp}.{half}.lora_B.weight"] @ split[f"{mlp}.{half}.lora_A.weight"]
              for half in ("gate_layer", "proj")]
    torch.testing.assert_close(torch.cat(halves), fused_delta)
    # kohya's underscored names: diffusers' Qwen-Image converter splits gate_layer into gate.layer: refused, named
    save_file({f"lora_unet_{mlp.replace('.', '_')}_gate_layer.lora_down.weight": down,
               f"lora_unet_{mlp.replace('.', '_')}_gate_layer.lora_up.weight": up[: gate.out_features]},
              str(tmp_path / "kohya.safetensors"))
    with pytest.raises(lf.LoraFormatError, match=r"match no module.*gate\.layer"):
        lf.load_published(tmp_path / "kohya.safetensors", "qwen-image21", base)
    assert lf.family_of("QwenImage21Pipeline") == "qwen-image21" and lf.family_of("QwenImagePipeline") == "qwen-image"


# --- the real checkpoint's plan, offline ----------------------------------------------------------------------
def test_plan_of_qwen_image_21_answers_offline_from_the_shipped_architecture(capsys, monkeypatch):
    """assets/architectures/Qwen--Qwen-Image-2.1: the 7.12 B transformer and the Qwen3-VL 8B encoder on the meta
    device, no Hub access; at 1024x1024 on 80 GiB it needs gradient checkpointing."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["plan", "--teacher", "Qwen/Qwen-Image-2.1", "--gpu-memory", "80", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row["bytes"] for row in result["components"]}
    assert result["latent_shape"] == [64, 64, 64]
    assert rows["transformer"] == pytest.approx(2 * 7.115e9, rel=0.001)  # bf16
    assert rows["text encoder 1 (Qwen3VLForConditionalGeneration)"] == pytest.approx(2 * 8.767e9, rel=0.001)
    assert result["fits"] is False and result["suggestions"] == ["gradient_checkpointing: true"]
