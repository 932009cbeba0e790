"""Published Wan image-to-video LoRAs in the Lightx2v layout (the Wan 2.1 I2V step/CFG-distill files): original
module names under ``diffusion_model.``, lora_down / lora_up with an ``alpha`` per module, a bias delta per module
(``diff_b``, PEFT's lora_bias) and zero norm-weight deltas (``norm_k_img.diff``), on the image attention
(``cross_attn.k_img`` / ``v_img``) and the CLIP embedder (``img_emb.proj``) too. Imported as a published student of
the tiny Wan 2.1 I2V pipeline it samples what the stock WanImageToVideoPipeline samples with the same file loaded
by ``load_lora_weights``, and it exports back to the same layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_conditions import random_images
from test_diffusers_teachers import fresh_accelerator_state  # noqa: F401  (autouse)
from test_wan21_i2v import SIZE, with_sigmas

from pdmd.core.schedule import PhaseSchedule
from pdmd.students import lora_formats as lf
from pdmd.students.folder import load_student
from pdmd.students.manifest import Manifest
from pdmd.teachers import load_teacher

RANK, ALPHA = 4, 8.0
PROMPT = "a red cat on a sofa"


@pytest.fixture(scope="module")
def folder(tiny_pipeline) -> Path:
    return tiny_pipeline("wan2.1-i2v")


@pytest.fixture(scope="module")
def teacher(folder):
    return load_teacher(str(folder), **SIZE)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return random_images(SIZE, 1)[0]


def lightx2v_file(path: Path, transformer: torch.nn.Module, seed: int = 0, norm_diff: float = 0.0) -> Path:
    """A LoRA on every Linear with an original Wan name, each with its diff_b (and in the blocks its alpha), plus
    the blocks' norm diffs (``norm_diff`` everywhere: 0 as published)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        try:
            original = f"diffusion_model.{lf.wan_original_name(name)}"
        except lf.LoraFormatError:  # a module the original checkpoints name otherwise (e.g. the norms' Linears)
            continue
        state[f"{original}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=generator) * 0.1
        state[f"{original}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=generator) * 0.1
        if original.startswith("diffusion_model.blocks."):  # as diffusers' converter reads them: the blocks' only
            state[f"{original}.alpha"] = torch.tensor(ALPHA)
        state[f"{original}.diff_b"] = torch.randn(module.out_features, generator=generator) * 0.05
    for k, block in enumerate(transformer.blocks):
        for attention, norms in (("self_attn", ("norm_q", "norm_k")), ("cross_attn", ("norm_q", "norm_k", "norm_k_img"))):
            for norm in norms:
                state[f"diffusion_model.blocks.{k}.{attention}.{norm}.diff"] = torch.full((block.attn1.to_q.out_features,),
                                                                                          norm_diff)
    assert any(".cross_attn.k_img." in key for key in state) and any(".img_emb.proj.1." in key for key in state)
    save_file(state, str(path))
    return path


def stock_sample(folder: Path, lora: Path, schedule: PhaseSchedule, image, noise: torch.Tensor) -> torch.Tensor:
    from diffusers import WanImageToVideoPipeline

    pipe = with_sigmas(WanImageToVideoPipeline.from_pretrained(str(folder)), list(schedule.timesteps[:-1]))
    pipe.load_lora_weights(str(lora))
    return pipe(image=image, prompt=PROMPT, num_inference_steps=len(schedule.timesteps) - 1, guidance_scale=1.0,
                latents=noise.clone(), output_type="latent", **SIZE).frames


def test_a_lightx2v_i2v_lora_samples_as_the_stock_pipeline_with_it_loaded(folder, teacher, image, tmp_path):
    lora = lightx2v_file(tmp_path / "lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors",
                         teacher.pipe.transformer)
    schedule = PhaseSchedule.uniform(4, 5.0)  # its four steps, one expert for all of them
    student = lf.make_published_student(tmp_path / "published", [lora], teacher, schedule, cfg=1.0,
                                        teacher_id=str(folder))
    manifest = Manifest.read(student)
    assert manifest.lora.bias and manifest.published["layouts"] == ["comfyui"]
    saved = load_file(str(student / manifest.phases[0]))
    assert "transformer.blocks.0.attn2.add_k_proj.lora_B.bias" in saved and not any(".diff" in k for k in saved)

    ours = load_student(student).sample([PROMPT], seed=0, images=[image]).sample
    theirs = stock_sample(folder, lora, schedule, image, teacher.noise(1, 0))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    plain = teacher.sample([PROMPT], seed=0, schedule=schedule, cfg=1.0, images=[image]).sample
    assert (plain - ours).abs().max() > 1e-3  # the file changed the network, biases and all

    # exported in the ComfyUI layout it is the same file again: diff_b under the original names, scale folded
    (exported,) = lf.export_student(student, tmp_path / "out", layout="comfyui")
    keys = load_file(str(exported))
    assert "diffusion_model.blocks.0.cross_attn.k_img.diff_b" in keys
    again = lf.make_published_student(tmp_path / "again", [exported], teacher, schedule, cfg=1.0,
                                      teacher_id=str(folder))
    torch.testing.assert_close(load_student(again).sample([PROMPT], seed=0, images=[image]).sample, ours,
                               rtol=1e-5, atol=1e-5)


def test_a_non_zero_norm_diff_is_refused_by_name(teacher, tmp_path):
    """Dropping a norm delta is exact only where it is zero: otherwise the file is refused, the key named."""
    lora = lightx2v_file(tmp_path / "odd.safetensors", teacher.pipe.transformer, norm_diff=0.1)
    with pytest.raises(lf.LoraFormatError, match=r"^unsupported LoRA keys .*norm_k(_img)?\.diff"):
        lf.load_published(lora, "wan", teacher.pipe.transformer)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 16),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, RANK),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.bias": torch.zeros(16)},
              str(tmp_path / "qwen-bias.safetensors"))
    with pytest.raises(lf.LoraFormatError, match=r"^unsupported LoRA keys .*to_q\.lora_B\.bias"):
        lf.load_published(tmp_path / "qwen-bias.safetensors", "qwen-image")
