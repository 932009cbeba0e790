import shutil

import pytest
import torch

from pdmd.builtin import metrics, scenes
from pdmd.builtin.evaluate import eval_prompts, measure

HELD_OUT_SEED = 424_242  # neither a probe-training seed nor the held-out seed of train-probe


@pytest.fixture(scope="module")
def probe():
    return metrics.load_probe()


@pytest.fixture(scope="module")
def held_out():
    return scenes.make_batch(512, HELD_OUT_SEED)


def test_probe_is_accurate_on_held_out_images(probe, held_out):
    images, labels = held_out
    predicted = metrics.probe_outputs(probe, images)
    for name in ("colour", "shape", "background"):
        accuracy = (predicted[name] == labels[name]).float().mean()
        assert accuracy >= 0.95, f"{name} accuracy {accuracy:.3f}"


def test_real_images_score_adherence_near_one(probe, held_out):
    images, labels = held_out
    targets = [scenes.parse_prompt(p).attributes for p in scenes.prompts_of(labels)]
    assert metrics.adherence(metrics.probe_outputs(probe, images), targets) >= 0.95


def test_adherence_counts_wrong_colour_or_shape():
    predicted = {"colour": torch.tensor([0, 1, 0]), "shape": torch.tensor([2, 2, 3])}
    targets = [scenes.Attributes(0, 2, None), scenes.Attributes(0, 2, None), scenes.Attributes(0, None, 1)]
    assert metrics.adherence(predicted, targets) == pytest.approx(2 / 3)


def test_identical_images_have_zero_diversity_and_spread(probe):
    image, _ = scenes.make_batch(1, seed=0)
    same = image.repeat(6, 1, 1, 1)
    features = metrics.probe_outputs(probe, same)["features"]
    assert metrics.feature_diversity([features]) == pytest.approx(0, abs=1e-5)
    assert metrics.spatial_spread([same]) == pytest.approx((0, 0), abs=1e-4)


def test_varied_images_of_one_prompt_are_diverse(probe):
    attributes = scenes.parse_prompt("a red star on a dark background").attributes
    images = scenes.render(scenes.labels_for_prompt(attributes, 16, seed=1))
    features = metrics.probe_outputs(probe, images)["features"]
    assert metrics.feature_diversity([features]) > 0.1
    position, size = metrics.spatial_spread([images])
    assert position > 2 and size > 0.5


def test_position_and_size_are_measured_on_the_image():
    images, labels = scenes.make_batch(64, seed=9)
    centre, size = metrics.position_and_size(images)
    assert (centre[:, 0] - labels["cx"]).abs().max() < 1.5
    assert (centre[:, 1] - labels["cy"]).abs().max() < 1.5
    for shape in range(len(scenes.SHAPES)):  # size = sqrt(area): proportional to the radius within a shape
        rows = labels["shape"] == shape
        assert torch.corrcoef(torch.stack([size[rows], labels["radius"][rows]]))[0, 1] > 0.95


def test_frechet_distance_of_dataset_to_itself_is_far_below_noise(probe):
    first, _ = scenes.make_batch(512, seed=11)
    second, _ = scenes.make_batch(512, seed=12)
    noise = torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = {name: metrics.probe_outputs(probe, x)["features"]
                for name, x in {"first": first, "second": second, "noise": noise}.items()}
    same = metrics.frechet_distance(features["first"], features["second"])
    against_noise = metrics.frechet_distance(features["first"], features["noise"])
    assert metrics.frechet_distance(features["first"], features["first"]) == pytest.approx(0, abs=1e-4)
    assert same < 0.05 * against_noise


def test_frechet_distance_of_gaussians_matches_closed_form():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 2, generator=generator)
    b = 2 * torch.randn(20000, 2, generator=generator) + 1
    # ||mu||^2 = 2, traces 2 + 8, cross term 2 * tr(sqrt(4 I)) = 8 -> 2 + 10 - 8 = 4
    assert metrics.frechet_distance(a, b) == pytest.approx(4, rel=0.05)


def test_measure_scores_dataset_images_as_the_reference_does(probe):
    prompts = eval_prompts(4)
    groups = [scenes.render(scenes.labels_for_prompt(scenes.parse_prompt(p).attributes, 8, seed=100 + i))
              for i, p in enumerate(prompts)]
    result = measure(groups, prompts, probe)
    assert result["adherence"] >= 0.95
    assert result["diversity"] > 0 and result["position_spread"] > 1


def test_missing_or_corrupt_probe_names_the_file_and_the_rebuild_command(tmp_path):
    shutil.copytree(metrics.PROBE_DIR, tmp_path / "probe")
    weights = tmp_path / "probe" / "probe.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(metrics.ProbeAssetError, match="probe.safetensors.*train-probe"):
        metrics.load_probe(tmp_path / "probe")
    weights.unlink()
    with pytest.raises(metrics.ProbeAssetError, match="probe.safetensors.*missing.*train-probe"):
        metrics.load_probe(tmp_path / "probe")
