"""Published LoRA layouts in (diffusers, ComfyUI / original names, kohya) and our students out, checked against
diffusers' own loaders and against hand-computed weight deltas, on tiny real diffusers transformers."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from pdmd.cli import main
from pdmd.core.schedule import PRESETS, PhaseSchedule
from pdmd.students import lora_formats as lf
from pdmd.students.folder import LORA_WEIGHT_NAME, load_student
from pdmd.students.manifest import MANIFEST, Manifest
from pdmd.teachers import load_teacher

RANK = 4
# Wan2.2-Lightning's two phases, with the boundary just below the A14B experts' switch at t = 0.875 so that every
# step of phase 2 runs on the low-noise expert
LIGHTNING = PRESETS["wan2.2-lightning"]


# --- tiny transformers and LoRA files ------------------------------------------------------------------------
def tiny_transformer(family: str) -> nn.Module:
    from diffusers import (
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
        SD3Transformer2DModel,
        WanTransformer3DModel,
    )

    torch.manual_seed(0)
    if family == "z-image":
        from diffusers import ZImageTransformer2DModel
        return ZImageTransformer2DModel(in_channels=4, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2,
                                        n_kv_heads=2, cap_feat_dim=8, axes_dims=[4, 2, 2], axes_lens=[64, 16, 16])
    if family == "flux2":
        from diffusers import Flux2Transformer2DModel
        return Flux2Transformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16,
                                       axes_dims_rope=(2, 2, 2, 2))
    if family == "hunyuan-video-1.5":
        from diffusers import HunyuanVideo15Transformer3DModel
        return HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2,
                                                attention_head_dim=8, num_layers=1, num_refiner_layers=1,
                                                mlp_ratio=2.0, text_embed_dim=8, text_embed_2_dim=8, image_embed_dim=8,
                                                rope_axes_dim=(2, 2, 4))
    if family == "wan":
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    if family == "qwen-image21":
        from diffusers import QwenImage21Transformer2DModel
        return QwenImage21Transformer2DModel(in_channels=8, out_channels=8, num_layers=1, attention_head_dim=8,
                                             num_attention_heads=2, context_in_dim=8, axes_dims_rope=(2, 2, 4))
    if family == "qwen-image":
        return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           axes_dims_rope=(2, 2, 4))
    if family == "flux":
        return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def random_peft(model: nn.Module, modules=None, rank=RANK, seed=0) -> dict[str, torch.Tensor]:
    """Module-relative lora_A/lora_B pairs (non-zero B) on ``modules`` (default: every Linear)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in linears(model).items():
        if modules is None or name in modules:
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    return state


def wan_lightning_file(path: Path, model: nn.Module, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """A Wan LoRA as the Wan2.2-Lightning files are written: original module names under ``diffusion_model.``,
    ``lora_A``/``lora_B`` weights and a per-module ``alpha``, on the attention and FFN layers of every block."""
    peft = random_peft(model, [n for n in linears(model) if n.startswith("blocks.")], seed=seed)
    state = {}
    for key, value in peft.items():
        module, part = lf.PAIR.match(key)["module"], lf.PAIR.match(key)["part"]
        original = f"diffusion_model.{lf.wan_original_name(module)}"
        state[f"{original}.{part}.weight"] = value
        state[f"{original}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return peft


def delta(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]


def with_lora(model: nn.Module, state: dict[str, torch.Tensor], name: str = "phase") -> nn.Module:
    """``model`` with ``state`` (scale folded in, so alpha = rank) as an active PEFT adapter."""
    rank = max(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    modules = sorted({lf.PAIR.match(k)["module"] for k in state})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=modules), model, adapter_name=name)
    result = set_peft_model_state_dict(model, lf._pad_rank(state, rank), adapter_name=name)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    return model


def wan_output(transformer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    config = transformer.config
    x = torch.randn(1, config.in_channels, 1, 4, 4, generator=generator)
    text = torch.randn(1, 5, config.text_dim, generator=generator)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                           return_dict=False)[0]


@pytest.fixture(scope="module")
def wan22_folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.2")


def wan22_pipeline(folder: Path):
    from diffusers import WanPipeline
    return WanPipeline.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def wan22_teacher(wan22_folder):
    return load_teacher(str(wan22_folder), height=16, width=16, num_frames=5)


def write_student(folder: Path, family: str, phases: list[dict[str, torch.Tensor]], alpha_over_rank: float = 1.0):
    """A student folder as the trainer writes one (transformer-prefixed PEFT keys, rank/alpha in the manifest)."""
    rank = max(v.shape[0] for state in phases for k, v in state.items() if ".lora_A." in k)
    files = []
    for k, state in enumerate(phases):
        (folder / f"phase_{k + 1}").mkdir(parents=True)
        save_file({f"transformer.{key}": v for key, v in lf._pad_rank(state, rank).items()},
                  str(folder / f"phase_{k + 1}" / LORA_WEIGHT_NAME))
        files.append(f"phase_{k + 1}/{LORA_WEIGHT_NAME}")
    (folder / MANIFEST).write_text(json.dumps({
        "teacher": "some/teacher", "family": family, "schedule": PhaseSchedule.uniform(2 * len(phases)).as_dict()
        if len(phases) == 1 else PhaseSchedule((0.5,), (2, 2), 3.0).as_dict(), "phases": files, "cfg": 1.0,
        "lora": {"rank": rank, "alpha": alpha_over_rank * rank, "target_modules": ["to_q"], "prefix": "transformer"}}))
    return folder


# --- detection -----------------------------------------------------------------------------------------------
def test_layouts_are_told_apart():
    weight = torch.zeros(2, 2)
    assert lf.detect_layout({"transformer.blocks.0.attn1.to_q.lora_A.weight": weight}) == "diffusers"
    assert lf.detect_layout({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": weight}) == "comfyui"
    assert lf.detect_layout({"transformer_blocks.0.attn.to_q.lora_down.weight": weight}) == "comfyui"
    assert lf.detect_layout({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": weight}) == "kohya"
    with pytest.raises(lf.LoraFormatError, match="no LoRA weights"):
        lf.detect_layout({"blocks.0.weight": weight})
    assert lf.family_of("WanPipeline") == "wan" and lf.family_of("QwenImagePipeline") == "qwen-image"
    assert lf.family_of("StableDiffusion3Pipeline") == "sd3" and lf.family_of("FluxPipeline") == "flux"


# --- Wan2.2: a Lightning pair into both experts -----------------------------------------------------------------
def test_lightning_pair_loads_into_both_wan22_experts_as_diffusers_does(wan22_folder, tmp_path):
    pipe = wan22_pipeline(wan22_folder)
    high, low = tmp_path / "high_noise_model.safetensors", tmp_path / "low_noise_model.safetensors"
    wan_lightning_file(high, pipe.transformer, alpha=8.0, seed=1)
    wan_lightning_file(low, pipe.transformer_2, alpha=2.0, seed=2)
    base = [wan_output(pipe.transformer), wan_output(pipe.transformer_2)]

    ours = wan22_pipeline(wan22_folder)
    with_lora(ours.transformer, lf.load_published(high, "wan", ours.transformer))
    with_lora(ours.transformer_2, lf.load_published(low, "wan", ours.transformer_2))
    # the reference: diffusers' own WanPipeline loader, high-noise file into transformer, low into transformer_2
    pipe.load_lora_weights(str(high), adapter_name="high")
    pipe.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    for expert, before in zip(("transformer", "transformer_2"), base):
        mine, theirs = wan_output(getattr(ours, expert)), wan_output(getattr(pipe, expert))
        assert not torch.allclose(mine, before, atol=1e-4), f"the LoRA did not change {expert}"
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_lightning_pair_as_a_published_student_of_the_tiny_wan22(wan22_teacher, tmp_path):
    """High-noise file -> phase 1 on ``transformer``, low-noise file -> phase 2 on ``transformer_2``; sampling
    the student differs from the teacher, and at strength 0 it is the teacher on the same schedule."""
    pipe = wan22_teacher.pipe
    high, low = tmp_path / "high_noise_model.safetensors", tmp_path / "low_noise_model.safetensors"
    wan_lightning_file(high, pipe.transformer, alpha=8.0, seed=1)
    wan_lightning_file(low, pipe.transformer_2, alpha=8.0, seed=2)
    folder = lf.make_published_student(tmp_path / "lightning", [high, low], wan22_teacher, LIGHTNING,
                                       strengths=[1.0, 0.5], teacher_id="tiny-wan")
    manifest = Manifest.read(folder)
    assert manifest.networks == ("transformer", "transformer_2") and manifest.method == lf.PUBLISHED
    assert manifest.published["strengths"] == [1.0, 0.5] and manifest.published["layouts"] == ["comfyui"] * 2
    assert manifest.teacher == "tiny-wan" and manifest.teacher_options["num_frames"] == 5
    low_phase = load_file(str(folder / "phase_2" / LORA_WEIGHT_NAME))
    module = "blocks.0.attn1.to_q"
    torch.testing.assert_close(low_phase[f"transformer.{module}.lora_B.weight"] @
                               low_phase[f"transformer.{module}.lora_A.weight"],
                               0.5 * delta(lf.load_published(low, "wan"), module))

    student = load_student(folder, copy.deepcopy(wan22_teacher))
    teacher_video = wan22_teacher.sample(["a cat"], 0, LIGHTNING, 1.0).sample
    assert not torch.allclose(student.sample(["a cat"], 0).sample, teacher_video, atol=1e-4)
    for phase in (0, 1):  # each phase's LoRA changes its own expert's output and leaves the other one alone
        x, t = wan22_teacher.noise(1, 3), torch.tensor([0.95 if phase == 0 else 0.5])
        cond, _ = wan22_teacher.encode_prompts(["a cat"])
        assert not torch.allclose(student.experts[phase](x, t, cond), wan22_teacher.velocity(x, t, cond), atol=1e-5)
        other = torch.tensor([0.5 if phase == 0 else 0.95])
        torch.testing.assert_close(student.experts[phase](x, other, cond), wan22_teacher.velocity(x, other, cond))

    zero = lf.make_published_student(tmp_path / "zero", [high, low], wan22_teacher, LIGHTNING, strengths=[0, 0])
    torch.testing.assert_close(load_student(zero, copy.deepcopy(wan22_teacher)).sample(["a cat"], 0).sample,
                               teacher_video)


def test_a_phase_across_the_expert_switch_is_refused(wan22_teacher, tmp_path):
    high, low = tmp_path / "high.safetensors", tmp_path / "low.safetensors"
    wan_lightning_file(high, wan22_teacher.pipe.transformer, alpha=8.0, seed=1)
    wan_lightning_file(low, wan22_teacher.pipe.transformer_2, alpha=8.0, seed=2)
    # a boundary on the switch: phase 2's first step (t = 0.875) runs on the high-noise expert
    on_the_switch = PhaseSchedule((0.875,), (2, 2), 5.0)
    with pytest.raises(lf.LoraFormatError, match="phase 2 runs on more than one network"):
        lf.make_published_student(tmp_path / "s", [high, low], wan22_teacher, on_the_switch)
    assert not (tmp_path / "s").exists()


# --- strength --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_strength_scales_the_lora(tmp_path, strength):
    model = tiny_transformer("wan")
    path = tmp_path / "lora.safetensors"
    wan_lightning_file(path, model, alpha=4.0, seed=3)
    full, scaled = lf.load_published(path, "wan", model), lf.load_published(path, "wan", model, strength)
    torch.testing.assert_close(delta(scaled, "blocks.1.ffn.net.2"), strength * delta(full, "blocks.1.ffn.net.2"))
    base = wan_output(model)
    out = wan_output(with_lora(model, scaled))
    if strength == 0.0:
        torch.testing.assert_close(out, base)  # strength 0 is the teacher, exactly
    else:
        assert not torch.allclose(out, base, atol=1e-4)


# --- Qwen-Image, FLUX kohya, SD3 -------------------------------------------------------------------------------
def test_qwen_image_lightning_style_file_loads_with_its_alpha(tmp_path):
    model = tiny_transformer("qwen-image")
    peft = random_peft(model, [n for n in linears(model) if n.startswith("transformer_blocks.")])
    state = {}
    for key, value in peft.items():  # bare diffusers module names, kohya suffixes and an alpha per module
        module, part = lf.PAIR.match(key)["module"], lf.PAIR.match(key)["part"]
        state[f"{module}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = value
        state[f"{module}.alpha"] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "Qwen-Image-Lightning-8steps.safetensors"))
    loaded = lf.load_published(tmp_path / "Qwen-Image-Lightning-8steps.safetensors", "qwen-image", model)
    module = "transformer_blocks.0.img_mlp.net.2"
    torch.testing.assert_close(delta(loaded, module), delta(peft, module) * 2.0 / RANK)
    assert {lf.PAIR.match(k)["module"] for k in loaded} == {lf.PAIR.match(k)["module"] for k in peft}


def test_kohya_flux_file_loads_with_fused_qkv_split(tmp_path):
    model = tiny_transformer("flux")
    dim = model.inner_dim
    generator = torch.Generator().manual_seed(4)
    down, up = torch.randn(RANK, dim, generator=generator), torch.randn(3 * dim, RANK, generator=generator)
    state = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
             "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(RANK, dim * 5, generator=generator),
             "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(dim, RANK, generator=generator),
             "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(float(RANK))}
    save_file(state, str(tmp_path / "kohya.safetensors"))
    loaded = lf.load_published(tmp_path / "kohya.safetensors", "flux", model)
    scale = 2.0 / RANK
    for k, name in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(delta(loaded, f"transformer_blocks.0.attn.{name}"),
                                   scale * up[k * dim:(k + 1) * dim] @ down)
    torch.testing.assert_close(delta(loaded, "single_transformer_blocks.0.proj_out"),
                               state["lora_unet_single_blocks_0_linear2.lora_up.weight"]
                               @ state["lora_unet_single_blocks_0_linear2.lora_down.weight"])


def test_sd3_diffusers_file_loads_and_other_sd3_layouts_are_named(tmp_path):
    model = tiny_transformer("sd3")
    peft = random_peft(model, ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2"])
    save_file({f"transformer.{k}": v for k, v in peft.items()}, str(tmp_path / "sd3.safetensors"))
    loaded = lf.load_published(tmp_path / "sd3.safetensors", "sd3", model)
    torch.testing.assert_close(loaded, peft)
    save_file({"diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight": torch.zeros(2, 2)},
              str(tmp_path / "sd3-comfy.safetensors"))
    with pytest.raises(lf.LoraFormatError, match="no converter for SD3 LoRAs in the comfyui layout"):
        lf.load_published(tmp_path / "sd3-comfy.safetensors", "sd3", model)


# --- bad input -------------------------------------------------------------------------------------------------
def test_keys_that_match_no_module_are_listed(tmp_path):
    model = tiny_transformer("wan")  # two blocks: a LoRA for a 40-block model does not fit
    state = {"diffusion_model.blocks.39.self_attn.q.lora_A.weight": torch.zeros(RANK, 16),
             "diffusion_model.blocks.39.self_attn.q.lora_B.weight": torch.zeros(16, RANK)}
    save_file(state, str(tmp_path / "big.safetensors"))
    with pytest.raises(lf.LoraFormatError, match=r"match no module.*blocks\.39\.attn1\.to_q\.lora_A\.weight"):
        lf.load_published(tmp_path / "big.safetensors", "wan", model)
    peft = random_peft(model, ["blocks.0.attn1.to_q"])
    save_file({"transformer.blocks.0.attn9.to_q.lora_A.weight": peft["blocks.0.attn1.to_q.lora_A.weight"],
               "transformer.blocks.0.attn9.to_q.lora_B.weight": peft["blocks.0.attn1.to_q.lora_B.weight"]},
              str(tmp_path / "typo.safetensors"))
    with pytest.raises(lf.LoraFormatError, match=r"attn9\.to_q\.lora_A\.weight.*attn9\.to_q\.lora_B\.weight"):
        lf.load_published(tmp_path / "typo.safetensors", "wan", model)


def test_shapes_text_encoder_parts_and_dropped_keys_are_errors(tmp_path):
    model = tiny_transformer("qwen-image")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 3),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, RANK)},
              str(tmp_path / "shape.safetensors"))
    with pytest.raises(lf.LoraFormatError, match="shapes do not fit"):
        lf.load_published(tmp_path / "shape.safetensors", "qwen-image", model)
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(RANK, 16),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(16, RANK),
               "something_else.lora_down.weight": torch.zeros(RANK, 16)}, str(tmp_path / "stray.safetensors"))
    with pytest.raises(lf.LoraFormatError, match="something_else"):
        lf.load_published(tmp_path / "stray.safetensors", "flux", tiny_transformer("flux"))
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(RANK, 16),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(16, RANK),
               "diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(16, 16)}, str(tmp_path / "diff.safetensors"))
    with pytest.raises(lf.LoraFormatError, match=r"unsupported.*self_attn\.q\.diff"):  # a full-weight diff
        lf.load_published(tmp_path / "diff.safetensors", "wan")


def test_pickles_and_unreadable_files_are_refused(tmp_path):
    (tmp_path / "lora.pt").write_bytes(b"not opened")
    with pytest.raises(lf.LoraFormatError, match="pickle"):
        lf.read_lora(tmp_path / "lora.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(lf.LoraFormatError, match="not a readable safetensors"):
        lf.read_lora(tmp_path / "broken.safetensors")
    with pytest.raises(lf.LoraFormatError, match="unknown model family"):
        lf.to_peft({"transformer.a.lora_A.weight": torch.zeros(1, 1)}, "sdxl")


def test_one_file_per_phase_and_sane_strengths(wan22_teacher, tmp_path):
    path = tmp_path / "one.safetensors"
    wan_lightning_file(path, wan22_teacher.pipe.transformer, alpha=4.0, seed=0)
    with pytest.raises(lf.LoraFormatError, match="1 LoRA file.*2-phase"):
        lf.make_published_student(tmp_path / "s", [path], wan22_teacher, LIGHTNING)
    with pytest.raises(lf.LoraFormatError, match="strengths"):
        lf.make_published_student(tmp_path / "s", [path, path], wan22_teacher, LIGHTNING, [1.0, 9.0])
    with pytest.raises(lf.LoraFormatError, match="not a diffusers pipeline"):
        lf.make_published_student(tmp_path / "s", [path], load_teacher("builtin"), PhaseSchedule.uniform(4))


# --- export ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", lf.FAMILIES)
@pytest.mark.parametrize("layout", lf.EXPORT_LAYOUTS)
def test_export_round_trips_through_diffusers_converters(tmp_path, family, layout):
    """A two-phase student with different ranks and modules per phase -> export -> the family's diffusers
    loader reads each file back to the same weights (and the same output for Wan)."""
    model = tiny_transformer(family)
    names = sorted(linears(model))
    phases = [random_peft(model, names[: len(names) // 2], rank=2, seed=5),
              random_peft(model, names[len(names) // 3:], rank=RANK, seed=6)]
    if family == "wan":  # the Wan converter maps the modules published Wan LoRAs train
        phases = [random_peft(model, [n for n in names if n.startswith("blocks.")], rank=r, seed=r) for r in (2, 4)]
    if family == "flux2":  # whole blocks: the original layout fuses each block's q, k, v (and has no norm_out)
        blocks = [n for n in names if n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
        phases = [random_peft(model, blocks, rank=r, seed=r) for r in (2, 4)]
    if family == "hunyuan-video-1.5":  # whole blocks: ComfyUI's model fuses each block's q, k, v too
        phases = [random_peft(model, names, rank=2, seed=2),
                  random_peft(model, [n for n in names if not n.startswith("transformer_blocks.")], rank=RANK, seed=4)]
    student = write_student(tmp_path / "student", family, phases)
    written = lf.export_student(student, tmp_path / "export", layout)
    described = json.loads((tmp_path / "export" / "export.json").read_text())
    assert [p["file"] for p in described["phases"]] == [p.name for p in written] and described["layout"] == layout
    for state, path in zip(phases, written):
        exported = load_file(str(path))
        if layout == "comfyui" and family in ("wan", "qwen-image"):
            assert all(k.startswith("diffusion_model.") and (".lora_down." in k or ".lora_up." in k) for k in exported)
        back = lf.load_published(path, family, model)
        assert set(back) == set(state)
        for module in {lf.PAIR.match(k)["module"] for k in state}:
            torch.testing.assert_close(delta(back, module), delta(state, module))
    if family == "wan":
        torch.testing.assert_close(wan_output(with_lora(tiny_transformer("wan"), lf.load_published(written[1], "wan"))),
                                   wan_output(with_lora(tiny_transformer("wan"), phases[1])))


def test_export_folds_our_peft_scale(tmp_path):
    """A trained student's alpha / rank is in the exported weights (readers apply them at scale 1)."""
    model = tiny_transformer("wan")
    state = random_peft(model, ["blocks.0.attn1.to_q"], rank=RANK)
    (path,) = lf.export_student(write_student(tmp_path / "s", "wan", [state], alpha_over_rank=2.0), tmp_path / "out",
                                "diffusers")
    back = lf.load_published(path, "wan", model)
    torch.testing.assert_close(delta(back, "blocks.0.attn1.to_q"), 2.0 * delta(state, "blocks.0.attn1.to_q"))


@pytest.mark.parametrize("layout", lf.EXPORT_LAYOUTS)
def test_builtin_students_have_no_published_layout(tmp_path, layout):
    shipped = Path(__file__).resolve().parents[1] / "assets" / "students" / "phased"
    with pytest.raises(lf.LoraFormatError, match="names no model family"):
        lf.export_student(shipped, tmp_path / "out", layout)
    assert not (tmp_path / "out").exists()


def test_exported_lightning_student_loads_into_both_experts_of_a_diffusers_pipeline(wan22_teacher, wan22_folder,
                                                                                    tmp_path):
    """Our export, in either layout, read by diffusers' own WanPipeline.load_lora_weights (the phase-2 file with
    load_into_transformer_2=True) gives the same expert outputs as our student."""
    high, low = tmp_path / "high.safetensors", tmp_path / "low.safetensors"
    wan_lightning_file(high, wan22_teacher.pipe.transformer, alpha=8.0, seed=1)
    wan_lightning_file(low, wan22_teacher.pipe.transformer_2, alpha=2.0, seed=2)
    student = load_student(lf.make_published_student(tmp_path / "s", [high, low], wan22_teacher, LIGHTNING,
                                                     strengths=[0.7, 1.0]), copy.deepcopy(wan22_teacher))
    experts = student.roles.teacher.model
    for layout in lf.EXPORT_LAYOUTS:
        written = lf.export_student(tmp_path / "s", tmp_path / layout, layout)
        described = json.loads((tmp_path / layout / "export.json").read_text())
        assert [p.get("network") for p in described["phases"]] == ["transformer", "transformer_2"]
        pipe = wan22_pipeline(wan22_folder)
        pipe.load_lora_weights(str(written[0]), adapter_name="high")
        pipe.load_lora_weights(str(written[1]), adapter_name="low", load_into_transformer_2=True)
        for phase, expert in enumerate(("transformer", "transformer_2")):
            with student.roles.active(f"phase_{phase + 1}"):
                ours = wan_output(experts[expert])
            torch.testing.assert_close(wan_output(getattr(pipe, expert)), ours, rtol=1e-5, atol=1e-5)


def test_cli_imports_a_lightning_pair_and_exports_it(wan22_folder, tmp_path, capsys):
    pipe = wan22_pipeline(wan22_folder)
    high, low = tmp_path / "high.safetensors", tmp_path / "low.safetensors"
    wan_lightning_file(high, pipe.transformer, alpha=8.0, seed=1)
    wan_lightning_file(low, pipe.transformer_2, alpha=8.0, seed=2)
    assert main(["lora", "import", "--teacher", str(wan22_folder), "--files", str(high), str(low), "--strengths",
                 "1", "0.8", "--boundaries", "0.87", "--steps", "2, 2", "--shift", "5", "--height", "16",
                 "--width", "16", "--frames", "5", "--out", str(tmp_path / "student")]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["networks"] == ["transformer", "transformer_2"] and made["strengths"] == [1.0, 0.8]
    assert Manifest.read(tmp_path / "student").teacher_options == {"height": 16, "width": 16, "num_frames": 5}
    assert main(["lora", "export", "--student", str(tmp_path / "student"), "--out", str(tmp_path / "comfy")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert len(exported["files"]) == 2 and exported["layout"] == "comfyui"
    assert all(k.startswith("diffusion_model.blocks.") for k in load_file(exported["files"][1]))

    assert main(["lora", "import", "--teacher", str(wan22_folder), "--files", str(high), "--height", "16",
                 "--width", "16", "--frames", "5", "--boundaries", "0.87", "--out", str(tmp_path / "bad")]) == 2
    assert "1 LoRA file(s) for a 2-phase schedule" in capsys.readouterr().err
    shipped = Path(__file__).resolve().parents[1] / "assets" / "students" / "phased"
    assert main(["lora", "export", "--student", str(shipped), "--out", str(tmp_path / "x")]) == 2
    assert "names no model family" in capsys.readouterr().err
    # the imported student samples from the command line on the teacher and size its manifest names
    assert main(["sample", "--student", str(tmp_path / "student"), "--prompt", "a cat",
                 "--out", str(tmp_path / "cat.gif")]) == 0
    assert (tmp_path / "cat.gif").is_file() and json.loads(capsys.readouterr().out)["nfe"] == 4


def test_lightning_key_names_fit_the_full_size_wan22_and_qwen_image_architectures(tmp_path):
    """Every block of the real Wan2.2 A14B expert (40 blocks) and Qwen-Image (60) -- built on the meta device,
    no weights -- takes a Lightning-style file: all 40 x 10 Wan modules, all 60 x 14 Qwen-Image block Linears."""
    from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel

    with torch.device("meta"):
        wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                    in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                    num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                    rope_max_seq_len=1024)
        qwen = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                           attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                           axes_dims_rope=(16, 56, 56))
    for family, model, style in (("wan", wan, "lightning"), ("qwen-image", qwen, "kohya-suffix")):
        state = {}
        for name, layer in linears(model).items():
            if not name.startswith(("blocks.", "transformer_blocks.")):
                continue
            down, up = torch.zeros(1, layer.in_features), torch.zeros(layer.out_features, 1)
            if style == "lightning":
                original = f"diffusion_model.{lf.wan_original_name(name)}"
                state.update({f"{original}.lora_A.weight": down, f"{original}.lora_B.weight": up,
                              f"{original}.alpha": torch.tensor(1.0)})
            else:
                state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                              f"{name}.alpha": torch.tensor(1.0)})
        save_file(state, str(tmp_path / f"{family}.safetensors"))
        loaded = lf.load_published(tmp_path / f"{family}.safetensors", family, model)
        blocks = [n for n in linears(model) if n.startswith(("blocks.", "transformer_blocks."))]
        assert len(loaded) == 2 * len(blocks) and len(blocks) == (40 * 10 if family == "wan" else 60 * 14)


@pytest.mark.parametrize("family, pipeline, size, layout", [("sd3", "sd3", 16, "diffusers"),
                                                             ("flux", "flux-dev", 16, "diffusers"),
                                                             ("qwen-image", "qwen-image", 32, "comfyui")])
def test_a_published_file_is_a_one_phase_student_of_each_image_family(tiny_pipeline, tmp_path, family, pipeline,
                                                                       size, layout):
    teacher = load_teacher(str(tiny_pipeline(pipeline)), height=size, width=size)
    attention = [n for n in linears(teacher.model) if ".attn." in n]
    peft = random_peft(teacher.model, attention, rank=2, seed=7)
    path = tmp_path / "published.safetensors"
    if layout == "diffusers":
        save_file({f"transformer.{k}": v for k, v in peft.items()}, str(path))
    else:
        save_file({k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in peft.items()},
                  str(path))
    schedule = PhaseSchedule((), (4,), teacher.default_shift)
    reference = teacher.sample(["a red cat"], 0, schedule, 1.0).sample
    for strength, changes in ((1.0, True), (0.0, False)):
        folder = lf.make_published_student(tmp_path / f"s{strength}", [path], teacher, schedule, [strength])
        assert Manifest.read(folder).published["layouts"] == [layout] and Manifest.read(folder).networks is None
        sample = load_student(folder, copy.deepcopy(teacher)).sample(["a red cat"], 0).sample
        assert changes != torch.allclose(sample, reference, atol=1e-5)
