import shutil

import pytest
import torch
from diffusers import ModelMixin

from pdmd.builtin import scenes
from pdmd.core.schedule import PhaseSchedule
from pdmd.teachers.base import Teacher
from pdmd.teachers.builtin import (
    ASSET_DIR,
    REBUILD_COMMAND,
    AssetError,
    images_to_latents,
    latents_to_images,
    load_builtin_teacher,
)


@pytest.fixture(scope="module")
def teacher():
    return load_builtin_teacher()


def test_loads_from_assets_as_a_plain_teacher(teacher):
    assert isinstance(teacher, Teacher) and teacher.name == "builtin"
    assert isinstance(teacher.model, ModelMixin)  # PEFT adapters attach to a plain diffusers model
    assert teacher.default_steps > 0 and teacher.default_cfg >= 1 and teacher.default_shift > 0


def test_shipped_weights_fit_the_size_budget():
    shipped = sum(f.stat().st_size for f in ASSET_DIR.parent.rglob("*") if f.is_file())
    assert shipped <= 20 * 1024 * 1024


def test_samples_have_image_shape_and_unit_range(teacher):
    result = teacher.sample(["a red star on a dark background", ""], seed=0, schedule=PhaseSchedule.uniform(2))
    assert result.sample.shape == (2, *teacher.latent_shape)
    assert result.nfe == 4  # 2 steps, CFG counted
    images = teacher.decode(result.sample)
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1


def test_same_seed_same_sample(teacher):
    schedule = PhaseSchedule.uniform(2)
    first = teacher.sample(["a blue circle"], seed=5, schedule=schedule).sample
    assert torch.equal(first, teacher.sample(["a blue circle"], seed=5, schedule=schedule).sample)
    assert not torch.equal(first, teacher.sample(["a blue circle"], seed=6, schedule=schedule).sample)


def test_velocity_depends_on_the_prompt(teacher):
    cond, uncond = teacher.encode_prompts(["a red circle", "a blue star on a light background"])
    assert torch.equal(uncond, torch.full((2,), scenes.UNCONDITIONAL_CLASS))
    x = teacher.noise(2, seed=0)
    t = torch.full((2,), 0.5)
    assert not torch.allclose(teacher.velocity(x, t, cond), teacher.velocity(x, t, uncond))


def test_unknown_prompt_words_are_reported(teacher):
    with pytest.warns(UserWarning, match="dragon"):
        teacher.encode_prompts(["a red dragon"])


def test_latents_round_trip_images():
    images, _ = scenes.make_batch(2, seed=0)
    assert torch.allclose(latents_to_images(images_to_latents(images, 2), 2), images, atol=1e-6)


def test_missing_asset_names_the_file_and_the_rebuild_command(tmp_path):
    shutil.copytree(ASSET_DIR, tmp_path / "teacher")
    (tmp_path / "teacher" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(AssetError) as error:
        load_builtin_teacher(tmp_path / "teacher")
    assert "diffusion_pytorch_model.safetensors" in str(error.value) and REBUILD_COMMAND in str(error.value)


@pytest.mark.parametrize("name, damage", [
    ("diffusion_pytorch_model.safetensors", lambda data: data[: len(data) // 2]),
    ("diffusion_pytorch_model.safetensors", lambda data: b"not a safetensors file"),
    ("config.json", lambda data: data[:10]),
])
def test_corrupt_asset_names_the_file_and_the_rebuild_command(tmp_path, name, damage):
    shutil.copytree(ASSET_DIR, tmp_path / "teacher")
    target = tmp_path / "teacher" / name
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(AssetError) as error:
        load_builtin_teacher(tmp_path / "teacher")
    assert name in str(error.value) and REBUILD_COMMAND in str(error.value)
