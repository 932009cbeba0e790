"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline``) end to end on the tiny pipeline (pdmd/teachers/tiny.py
``build_hunyuan_video15``): the teacher samples what the pipeline samples (Qwen2.5-VL and ByT5 glyph prompts, the
guider's CFG), a phased student trains, reloads and exports, the exported diffusers files load into the stock
pipeline's transformer and the model card's snippet reproduces ``pdmd sample --student``, the ComfyUI files name the
modules of ComfyUI's HunyuanVideo model, published layouts import as diffusers' own HunyuanVideo converter reads
them, and the real checkpoint's plan answers offline."""
from __future__ import annotations

import json
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
from pdmd.students import lora_hunyuan_video15 as lh
from pdmd.students.card import render_card
from pdmd.students.folder import load_student
from pdmd.students.manifest import Manifest
from pdmd.students.roles import phase_adapter
from pdmd.teachers import TeacherError, load_teacher
from pdmd.teachers.hunyuan_video15 import HunyuanVideo15Teacher
from pdmd.training.config import TrainConfig
from pdmd.training.trainer import Trainer

FAMILY = "hunyuan-video-1.5"
SIZE = dict(height=32, width=32, num_frames=5)  # latents (4, 2, 2, 2): 8 video tokens
PROMPTS = ["a red cat on a sofa", 'a shop sign that says "OPEN"']  # the second one's quoted text goes to ByT5
PROMPT = "a cat sitting on a windowsill"  # the card's example prompt
TWO_PHASES = PhaseSchedule((0.6,), (1, 1), 3.0)


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline(FAMILY)


@pytest.fixture(scope="module")
def teacher(folder) -> HunyuanVideo15Teacher:
    return load_teacher(str(folder), **SIZE)


def stock_pipeline(folder: Path, guidance_scale: float | None = None):
    """HunyuanVideo15Pipeline from the folder; CFG is its guider component, not a __call__ argument."""
    from diffusers import ClassifierFreeGuidance, HunyuanVideo15Pipeline

    pipe = HunyuanVideo15Pipeline.from_pretrained(str(folder))
    if guidance_scale is not None:
        pipe.guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
    return pipe


def switching_scheduler(pipe, boundary: int):
    """Euler with no shift (the student's timesteps are shifted already) that hands the transformer the second phase's
    adapter after step ``boundary - 1``: the pipeline's __call__ has no step callback."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Switching(FlowMatchEulerDiscreteScheduler):
        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            if self.step_index == boundary:
                pipe.transformer.set_adapters(phase_adapter(1))
            return out
    return Switching(shift=1.0)


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def random_pairs(model: nn.Module, modules, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in modules:
        layer = model.get_submodule(name)
        state[f"{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.1
    return state


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module -> B @ A of a module-relative lora_A / lora_B state."""
    return {k.removesuffix(".lora_A.weight"): state[k.replace(".lora_A.", ".lora_B.")] @ v
            for k, v in state.items() if k.endswith(".lora_A.weight")}


# --- (a) the teacher is the pipeline ---------------------------------------------------------------------------
def test_teacher_samples_and_decodes_what_the_hunyuan_video15_pipeline_does(teacher, folder):
    """From the same noise over the pipeline's own timesteps (its scheduler's shift 5, its default sigmas): latents
    to 1e-4 with the guider at guidance_scale 3 (CFG, two evaluations a step; the decoded frames too), at 1 (one,
    both prompts at once) and in its original formulation (cond + s (cond - uncond), our CFG 1 + s); the prompt
    with quoted text reaches the ByT5 glyph encoder; the defaults are the pipeline's and the guider's."""
    from diffusers import ClassifierFreeGuidance

    schedule = PhaseSchedule.uniform(2, teacher.default_shift)
    noise = teacher.noise(len(PROMPTS), 0)
    pipe = stock_pipeline(folder)
    decoded = {}
    decode = pipe.vae.decode  # the latents the pipeline decodes, unscaled
    pipe.vae.decode = lambda latents, **kwargs: decode(decoded.setdefault("latents", latents), **kwargs)
    for guider, cfg, rows, nfe in (({"guidance_scale": 3.0}, 3.0, [1], 4), ({"guidance_scale": 1.0}, 1.0, [0, 1], 2),
                                   ({"guidance_scale": 2.0, "use_original_formulation": True}, 3.0, [0], 4)):
        pipe.guider = ClassifierFreeGuidance(**guider)
        guided = HunyuanVideo15Teacher(pipe, str(folder), **SIZE)  # the teacher of this guider
        assert guided.default_cfg == cfg
        prompts = [PROMPTS[row] for row in rows]
        ours = guided.sample(prompts, seed=0, schedule=schedule, cfg=cfg, noise=noise[rows])
        # the stock VAE decodes one video at a time only (its causal mask broadcasts for a batch of 1)
        output = "pt" if len(rows) == 1 and cfg == 3.0 and not guider.get("use_original_formulation") else "latent"
        theirs = pipe(prompts, num_inference_steps=2, latents=noise[rows].clone(), output_type=output, **SIZE).frames
        torch.testing.assert_close(pipe.scheduler.sigmas.tolist(), list(schedule.timesteps), rtol=0, atol=1e-6)
        latents = decoded.pop("latents") * teacher.pipe.vae.config.scaling_factor if output == "pt" else theirs
        torch.testing.assert_close(ours.sample, latents, rtol=1e-4, atol=1e-4)
        assert ours.nfe == nfe and ours.sample.abs().mean() > 0.1
        if output == "pt":
            frames = teacher.decode(ours.sample)
            assert frames.shape == (1, 5, 3, 32, 32)
            torch.testing.assert_close(frames, theirs, rtol=1e-4, atol=1e-4)
    assert teacher.decode(noise).shape == (2, 5, 3, 32, 32)  # ours decodes a batch, one video at a time

    cond, uncond = teacher.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 1000, 16) and cond["prompt_embeds_2"].shape == (2, 256, 16)
    assert cond["prompt_embeds_mask_2"][0].sum() == 0 < cond["prompt_embeds_mask_2"][1].sum()
    assert uncond["prompt_embeds_mask_2"].sum() == 0 and not torch.equal(cond["prompt_embeds"], uncond["prompt_embeds"])
    assert (teacher.default_steps, teacher.default_cfg, teacher.default_shift) == (50, 6.0, 5.0)
    # no size given: the pipeline's (its target-size bucket nearest 16:9, 121 frames)
    default = HunyuanVideo15Teacher(stock_pipeline(folder), str(folder))
    theirs = stock_pipeline(folder, guidance_scale=1.0)("x", num_inference_steps=1, output_type="latent").frames
    assert (default.height, default.width, default.num_frames) == (48, 80, 121)
    assert theirs.shape[1:] == default.latent_shape == (4, 31, 3, 5)
    with pytest.raises(TeacherError, match="1 \\+ a multiple of 4"):
        load_teacher(str(folder), height=32, width=32, num_frames=6)


# --- (b) a phased student, (d) its ComfyUI export -----------------------------------------------------------------
COMFYUI_NAME = re.compile(r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)|"
                          r"txt_in\.individual_token_refiner\.blocks\.\d+\.(self_attn\.(qkv|proj)|mlp\.[02]|"
                          r"adaLN_modulation\.1)|txt_in\.(input_embedder|[tc]_embedder\.(in|out)_layer)|"
                          r"byt5_in\.fc[123]|vision_in\.proj\.[13]|time_in\.(in|out)_layer|"
                          r"final_layer\.(linear|adaLN_modulation\.1)")


def test_two_phased_updates_then_the_student_reloads_and_exports_in_both_layouts(tmp_path, folder):
    """Two phases x one update at batch 1 (the real score guided, CFG 3), the text encoders released after the
    prompts are encoded; the student reloads and samples the same; both export layouts read back to the trained
    deltas times alpha / rank, the ComfyUI one under ComfyUI's HunyuanVideo module names with q, k, v fused."""
    config = TrainConfig.from_dict(dict(
        teacher=str(folder), method="phased", schedule={"boundaries": [0.8], "steps": [1, 1]}, updates_per_phase=1,
        batch_size=1, fake_ratio=1, lora={"rank": 2, "alpha": 4}, prompts=PROMPTS, sample_prompts=PROMPTS[:1],
        sample_every=2, checkpoint_every=100, lr_generator=1e-2, teacher_cfg=3.0, output_dir=str(tmp_path / "run"),
        **SIZE))
    trainer = Trainer(config)
    encoders = trainer.teacher.text_encoders
    assert len(encoders) == 2 and all(id(e) in trainer.teacher._offloaded for e in encoders)  # released
    result = trainer.fit(progress=False)
    assert result["finished"] and result["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 2] and all(r["loss_fake"] > 0 for r in rows)
    student_folder = Path(result["student"])
    manifest = Manifest.read(student_folder)
    assert manifest.family == FAMILY and manifest.teacher_options["num_frames"] == 5
    expected = trainer.teacher.sample(PROMPTS[:1], 3, config.schedule, config.student_cfg, trainer.experts).sample
    torch.testing.assert_close(load_student(student_folder).sample(PROMPTS[:1], seed=3).sample, expected,
                               rtol=1e-4, atol=1e-5)

    trained = [deltas({k.removeprefix("transformer."): v for k, v in load_file(str(student_folder / p)).items()})
               for p in manifest.phases]
    assert any(m.startswith("context_embedder.token_refiner.") for m in trained[0])  # the refiner's to_q etc. too
    for layout in lf.EXPORT_LAYOUTS:
        written = lf.export_student(student_folder, tmp_path / layout, layout)
        assert [p.name for p in written] == [f"run-phase_{k}-{layout}.safetensors" for k in (1, 2)]
        for state, path in zip(trained, written):
            exported = load_file(str(path))
            if layout == "comfyui":
                for key in exported:
                    match = re.fullmatch(r"diffusion_model\.(.+)\.lora_(down|up)\.weight", key)
                    assert match and COMFYUI_NAME.fullmatch(match[1]), key
                assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in exported
            else:
                assert all(k.startswith("transformer.") and ".lora_" in k for k in exported)
            back = deltas(lf.load_published(path, FAMILY, trainer.teacher.model))
            assert set(back) == set(state)
            for module, delta in state.items():
                torch.testing.assert_close(back[module], 2.0 * delta)  # alpha / rank folded in


def comfyui_additions(exported: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI adds to each weight of its model: lora_up @ lora_down onto ``<module>.weight`` (comfy/lora.py)."""
    return {k.removeprefix("diffusion_model.").removesuffix(".lora_down.weight") + ".weight":
            exported[k.replace(".lora_down.", ".lora_up.")] @ v for k, v in exported.items() if ".lora_down." in k}


# ComfyUI's own module names (FLUX's DoubleStreamBlock, MLPEmbedder) -> the original checkpoint's: the inverse of the
# renames comfy/supported_models.py HunyuanVideo.process_unet_state_dict applies when it loads one (comfy/lora.py's
# HunyuanVideo branch undoes the same ones for LoRA keys)
COMFYUI_TO_ORIGINAL = (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                       ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), ("t_embedder.in_layer.", "t_embedder.mlp.0."),
                       ("t_embedder.out_layer.", "t_embedder.mlp.2."), ("c_embedder.in_layer.", "c_embedder.linear_1."),
                       ("c_embedder.out_layer.", "c_embedder.linear_2."))


def test_comfyui_additions_are_the_students_weights_by_diffusers_own_hunyuanvideo_converter(teacher):
    """The ComfyUI file's additions, renamed to the original checkpoint's names (ComfyUI's own renames) and turned
    into diffusers names by diffusers' HunyuanVideo checkpoint converter (fused qkv split by rows, the final
    modulation's halves swapped), are the student's B @ A on every block, refiner and text-embedder module; the rest
    (time, ByT5 and image embedders, HunyuanVideo 1.5's own) keep ComfyUI's names, read back exactly."""
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    model = teacher.pipe.transformer
    everything = random_pairs(model, linears(model))
    only_q_and_v = random_pairs(model, ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"], seed=1)
    for state in (everything, only_q_and_v):
        exported = lf.comfyui_state(state, FAMILY)
        additions = comfyui_additions(exported)
        outside = ("time_in.", "byt5_in.", "vision_in.")  # HunyuanVideo 1.0's converter names these otherwise
        original = {}
        for key, value in additions.items():
            if not key.startswith(outside):
                for comfyui, name in COMFYUI_TO_ORIGINAL:
                    key = key.replace(comfyui, name)
                original[key] = value
        as_diffusers = convert_hunyuan_video_transformer_to_diffusers(original)
        expected = {f"{module}.weight": delta for module, delta in deltas(state).items()}
        for key, added in as_diffusers.items():
            torch.testing.assert_close(added, expected.get(key, torch.zeros_like(added)), msg=key)
        assert {k for k in expected if not k.startswith(("time_embed.", "context_embedder_2.", "image_embedder."))} \
            <= set(as_diffusers)
    assert set(comfyui_additions(lf.comfyui_state(only_q_and_v, FAMILY))) == {"double_blocks.0.img_attn.qkv.weight"}
    additions = comfyui_additions(lf.comfyui_state(everything, FAMILY))
    torch.testing.assert_close(additions["time_in.in_layer.weight"],
                               deltas(everything)["time_embed.timestep_embedder.linear_1"])
    torch.testing.assert_close(additions["byt5_in.fc3.weight"], deltas(everything)["context_embedder_2.linear_3"])
    with pytest.raises(lf.LoraFormatError, match="no name in ComfyUI's HunyuanVideo model"):
        lf.comfyui_state(random_pairs(model, ["transformer_blocks.0.attn.to_q"]) | {
            "x_embedder.proj.lora_A.weight": torch.zeros(2, 9), "x_embedder.proj.lora_B.weight": torch.zeros(16, 2)},
            FAMILY)


# --- (c) diffusers export into the stock pipeline, and the card ---------------------------------------------------
def test_exported_diffusers_loras_in_the_stock_pipeline_and_the_cards_snippet_reproduce_pdmd_sample(
        tmp_path, folder, capsys):
    """`lora export --layout diffusers` files, loaded into the stock pipeline's transformer with load_lora_adapter
    (HunyuanVideo15Pipeline has no load_lora_weights) and switched at the phase boundary, give the student's
    latents (student CFG 2: the guider at guidance_scale 2); the card's diffusers snippet, run as written, writes
    its mp4, and stopped before the decode gives those latents; decoded, the frames `pdmd sample --student` writes."""
    student = tmp_path / "student"
    # a teacher of its own: Roles adds adapters
    random_student(load_teacher(str(folder), **SIZE), TWO_PHASES, student, student_cfg=2.0)
    assert main(["lora", "export", "--student", str(student), "--layout", "diffusers", "--out",
                 str(tmp_path / "export")]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    ours = load_student(student).sample([PROMPT], seed=0)

    pipe = stock_pipeline(folder, guidance_scale=2.0)
    assert not hasattr(pipe, "load_lora_weights")
    for k, path in enumerate(files):
        pipe.transformer.load_lora_adapter(path, adapter_name=phase_adapter(k), prefix="transformer")
    pipe.transformer.set_adapters(phase_adapter(0))
    pipe.scheduler = switching_scheduler(pipe, TWO_PHASES.boundary_step_indices[0])
    theirs = pipe([PROMPT], sigmas=list(TWO_PHASES.timesteps[:-1]), output_type="latent",
                  generator=torch.Generator().manual_seed(0), **SIZE).frames
    torch.testing.assert_close(theirs, ours.sample, rtol=1e-4, atol=1e-4)
    assert ours.nfe == 4
    plain = load_teacher(str(folder), **SIZE).sample([PROMPT], 0, TWO_PHASES, 2.0).sample
    assert not torch.allclose(plain, ours.sample, atol=1e-3)  # the LoRAs change the sample

    code = snippet(str(render_card(student, repo_id=str(student))))
    assert "pipe.transformer.load_lora_adapter(STUDENT" in code and "guidance_scale=2)" in code
    assert "callback_on_step_end" not in code and "num_frames=5" in code
    run_snippet(code, tmp_path)  # as written: an mp4
    assert (tmp_path / "student.mp4").stat().st_size > 0
    call = "generator=torch.Generator().manual_seed(0))"
    assert call in code
    # the same code stopped before the decode: its latents are the student's (mp4 encoding is lossy) ...
    run = run_snippet(code.replace(call, call[:-1] + ", output_type='latent')").split("video = result")[0], tmp_path)
    torch.testing.assert_close(run["result"].frames, ours.sample, rtol=1e-4, atol=1e-5)
    # ... and decoded as the pipeline's __call__ decodes them, the frames of `pdmd sample --student`
    card_pipe = run["pipe"]
    with torch.no_grad():
        video = card_pipe.vae.decode(run["result"].frames / card_pipe.vae.config.scaling_factor, return_dict=False)[0]
    frames = card_pipe.video_processor.postprocess_video(video, output_type="np")[0]
    assert main(["sample", "--student", str(student), "--prompt", PROMPT, "--seed", "0",
                 "--out", str(tmp_path / "pdmd.png")]) == 0  # a video's frames side by side
    pdmd_frames = np.asarray(Image.open(tmp_path / "pdmd.png")).astype(int)
    card_frames = np.round(np.concatenate(list(frames), axis=1) * 255).astype(int)
    assert card_frames.shape == pdmd_frames.shape == (32, 5 * 32, 3)
    assert np.abs(card_frames - pdmd_frames).max() <= 1 and pdmd_frames.std() > 5


# --- the real checkpoint's plan, offline -------------------------------------------------------------------------
def test_plan_of_the_480p_checkpoint_answers_offline_from_the_shipped_architecture(capsys, monkeypatch):
    """assets/architectures/hunyuanvideo-community--HunyuanVideo-1.5-Diffusers-480p_t2v: the 8.3 B transformer, the
    Qwen2.5-VL-7B text model and the ByT5 glyph encoder on the meta device, no Hub access."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["plan", "--teacher", "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v", "--height", "256",
                 "--width", "256", "--num-frames", "33", "--gpu-memory", "80", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row["bytes"] for row in result["components"]}
    assert rows["transformer"] == pytest.approx(2 * 8.327e9, rel=0.001)  # bf16
    assert rows["text encoder 1 (Qwen2_5_VLTextModel)"] == pytest.approx(2 * 7.071e9, rel=0.001)
    assert rows["text encoder 2 (T5EncoderModel)"] == pytest.approx(2 * 0.219e9, rel=0.01)
    assert result["latent_shape"] == [32, 9, 16, 16] and rows["activations: generator update"] > 0


# --- (e) published HunyuanVideo 1.5 LoRAs in --------------------------------------------------------------------
def original_layout(model: nn.Module, seed: int = 5, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA in the original checkpoint's names under ``diffusion_model.`` with lora_A / lora_B, the layout
    diffusion-pipe writes and ComfyUI's HunyuanVideo LoRA map reads: q, k, v fused (``img_attn_qkv``), on every
    Linear of the blocks, the token refiner and the text embedders (what diffusers' HunyuanVideo converter maps)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {}  # original module -> (in, out); not the refiner's fused self_attn_qkv, whose lora_A the converter
    # would split by rows as if it were a weight
    for index in range(len(model.transformer_blocks)):
        attention = model.get_submodule(f"transformer_blocks.{index}.attn")
        for stream, q in (("img", attention.to_q), ("txt", attention.add_q_proj)):
            shapes[f"double_blocks.{index}.{stream}_attn_qkv"] = (q.in_features, 3 * q.out_features)
        for name, diffusers_name in (("img_attn_proj", "attn.to_out.0"), ("txt_attn_proj", "attn.to_add_out"),
                                     ("img_mlp.fc1", "ff.net.0.proj"), ("img_mlp.fc2", "ff.net.2"),
                                     ("txt_mlp.fc1", "ff_context.net.0.proj"), ("txt_mlp.fc2", "ff_context.net.2"),
                                     ("img_mod.linear", "norm1.linear"), ("txt_mod.linear", "norm1_context.linear")):
            layer = model.get_submodule(f"transformer_blocks.{index}.{diffusers_name}")
            shapes[f"double_blocks.{index}.{name}"] = (layer.in_features, layer.out_features)
    refiner = model.context_embedder.token_refiner.refiner_blocks
    for index, block in enumerate(refiner):
        for name, layer in (("self_attn_proj", block.attn.to_out[0]), ("mlp.fc1", block.ff.net[0].proj),
                            ("mlp.fc2", block.ff.net[2]), ("adaLN_modulation.1", block.norm_out.linear)):
            shapes[f"txt_in.individual_token_refiner.blocks.{index}.{name}"] = (layer.in_features, layer.out_features)
    embedders = model.context_embedder.time_text_embed
    for name, layer in (("txt_in.input_embedder", model.context_embedder.proj_in),
                        ("txt_in.t_embedder.mlp.0", embedders.timestep_embedder.linear_1),
                        ("txt_in.c_embedder.linear_2", embedders.text_embedder.linear_2),
                        ("final_layer.linear", model.proj_out)):
        shapes[name] = (layer.in_features, layer.out_features)
    state = {}
    for name, (fan_in, fan_out) in shapes.items():
        state[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.1
        state[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.1
    return state


def musubi_layout(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA as musubi-tuner writes HunyuanVideo 1.5's (kohya keys over the 1.5 checkpoint's names, whose
    double-stream q, k, v are separate: each the fused A and its third of B's rows), with alpha = rank / 2."""
    out = {}
    for key, value in original.items():
        module, part = re.fullmatch(r"diffusion_model\.(.+)\.(lora_A|lora_B)\.weight", key).groups()
        fused = re.fullmatch(r"(double_blocks\.\d+\.(img|txt)_attn)_qkv", module)
        pieces = [(f"{fused[1]}_{n}", value if part == "lora_A" else value.chunk(3)[i]) for i, n in enumerate("qkv")] \
            if fused else [(module, value)]
        for name, tensor in pieces:
            base = "lora_unet_" + name.replace(".", "_")
            out[f"{base}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = tensor.clone()
            if part == "lora_A":
                out[f"{base}.alpha"] = torch.tensor(value.shape[0] / 2)
    return out


def velocity_of(transformer, teacher, x, t, cond) -> torch.Tensor:
    """``teacher``'s velocity computed with another transformer (the stock pipeline's)."""
    model, teacher.model = teacher.model, transformer
    try:
        with torch.no_grad():
            return teacher.velocity(x, t, cond)
    finally:
        teacher.model = model


def test_published_layouts_import_as_diffusers_hunyuanvideo_converter_reads_them(tmp_path, teacher, folder, capsys):
    """`pdmd lora import` of an original-layout file (phase 1, strength 1) and the same LoRA in musubi-tuner's kohya
    layout with alpha = rank / 2 (phase 2, strength 0.5): each phase's velocity equals the stock transformer with
    the file diffusers' HunyuanVideo LoRA converter (HunyuanVideoLoraLoaderMixin.lora_state_dict, whose block names
    are 1.5's) makes of the original one, loaded with load_lora_adapter at adapter weight 1 and 0.25."""
    from diffusers import HunyuanVideoPipeline

    original = original_layout(stock_pipeline(folder).transformer)
    save_file(original, str(tmp_path / "original.safetensors"))
    save_file(musubi_layout(original), str(tmp_path / "musubi.safetensors"))
    assert main(["lora", "import", "--teacher", str(folder), "--files", str(tmp_path / "original.safetensors"),
                 str(tmp_path / "musubi.safetensors"), "--strengths", "1", "0.5", "--boundaries", "0.6", "--steps",
                 "2, 2", "--height", "32", "--width", "32", "--frames", "5", "--out", str(tmp_path / "student")]) == 0
    capsys.readouterr()
    manifest = Manifest.read(tmp_path / "student")
    assert manifest.published["layouts"] == ["comfyui", "kohya"] and manifest.family == FAMILY
    student = load_student(tmp_path / "student")
    cond, _ = teacher.encode_prompts(PROMPTS[1:])
    x, t = teacher.noise(1, 4), torch.tensor([0.7])
    converted = HunyuanVideoPipeline.lora_state_dict(dict(original))
    plain = velocity_of(stock_pipeline(folder).transformer, teacher, x, t, cond)
    for phase, weight in enumerate((1.0, 0.25)):
        transformer = stock_pipeline(folder).transformer
        transformer.load_lora_adapter(dict(converted), adapter_name="published", prefix="transformer")
        transformer.set_adapters("published", weights=weight)
        theirs = velocity_of(transformer, teacher, x, t, cond)
        with torch.no_grad():
            mine = student.experts[phase](x, t, cond)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mine, plain, atol=1e-3)
    assert lf.family_of("HunyuanVideo15Pipeline") == FAMILY

    # ComfyUI's own names, diffusers' names under diffusion_model. and a stray key
    comfyui = lf.comfyui_state(lf.load_published(tmp_path / "original.safetensors", FAMILY), FAMILY)
    for state in (comfyui, {k.replace("transformer.", "diffusion_model.", 1): v for k, v in converted.items()}):
        back = deltas(lh.to_peft(state))
        for module, delta in deltas(lf.load_published(tmp_path / "original.safetensors", FAMILY)).items():
            torch.testing.assert_close(back[module], delta, msg=module)
    save_file({**original, "diffusion_model.double_blocks.0.img_attn_q_norm.lora_A.weight": torch.zeros(4, 8),
               "diffusion_model.double_blocks.0.img_attn_q_norm.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "stray.safetensors"))
    with pytest.raises(lf.LoraFormatError, match="match no module.*img_attn_q_norm"):
        lf.load_published(tmp_path / "stray.safetensors", FAMILY, teacher.model)


@pytest.mark.parametrize("frames, tokens, batch", [(3, 4, None), (5, 6, 2), (1, 7, 1)])
def test_the_vaes_causal_mask_is_diffusers_own_made_a_frame_at_a_time(frames, tokens, batch):
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15AttnBlock

    from pdmd.teachers.hunyuan_video15 import frame_causal_mask

    stock = HunyuanVideo15AttnBlock.prepare_causal_attention_mask(frames, tokens, torch.float32, "cpu", batch)
    assert torch.equal(frame_causal_mask(frames, tokens, torch.float32, "cpu", batch), stock)
