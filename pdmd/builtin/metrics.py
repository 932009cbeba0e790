"""Metrics of the scenes domain, all read off a small probe CNN trained on the dataset's labels.

- adherence: fraction of images whose colour and shape, as the probe classifies them, match the prompt;
- diversity: mean pairwise distance between images of one prompt in probe-feature space, plus the spread
  (std) of the shape's position and size measured directly on the image;
- fd: Frechet distance between probe features of generated images and of dataset images (the domain's FID).

The probe also regresses position and size, so its features keep what varies inside one prompt -- a pure
classifier would learn to ignore exactly the diversity we want to measure.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pdmd.builtin import scenes
from pdmd.paths import PROBE_DIR
from pdmd.training.checkpoints import atomic_export

PROBE_FILES = ("probe.safetensors", "probe.json")
PROBE_REBUILD_COMMAND = "python -m pdmd train-probe --out assets/probe"
FEATURE_DIM = 64
# Foreground = pixels whose colour differs from the background estimate by more than this (max over RGB).
# Background gradients and jitter stay below ~0.1; every shape colour differs from every background by > 0.3.
FOREGROUND_THRESHOLD = 0.2
HEADS = {"colour": len(scenes.COLOURS), "shape": len(scenes.SHAPES), "background": len(scenes.BACKGROUNDS)}


class Probe(nn.Module):
    """Images (B, 3, 32, 32) in [0, 1] -> FEATURE_DIM features -> attribute logits and (cx, cy, radius).

    Features come from globally pooled conv maps (max and mean), which find a small shape anywhere quickly;
    two coordinate input channels (CoordConv) let the pooled features still say where the shape is.
    """

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.conv = nn.Sequential(*block(5, 16), *block(16, 32), *block(32, 64))
        self.embed = nn.Linear(2 * 64, FEATURE_DIM)
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, n) for name, n in HEADS.items()})
        self.geometry = nn.Linear(FEATURE_DIM, 3)  # cx, cy, radius, each divided by the image size
        axis = torch.linspace(-1, 1, scenes.IMAGE_SIZE)
        self.register_buffer("coords", torch.stack(torch.meshgrid(axis, axis, indexing="ij"))[None],
                             persistent=False)

    def features(self, images: Tensor) -> Tensor:
        coords = self.coords.expand(images.shape[0], -1, -1, -1)
        maps = self.conv(torch.cat([images * 2 - 1, coords], dim=1))
        return torch.relu(self.embed(torch.cat([maps.amax(dim=(2, 3)), maps.mean(dim=(2, 3))], dim=1)))

    def forward(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}, self.geometry(features), features


def geometry_targets(labels: dict[str, Tensor]) -> Tensor:
    return torch.stack([labels["cx"], labels["cy"], labels["radius"]], dim=1) / scenes.IMAGE_SIZE


# --- probe assets ------------------------------------------------------------------------------------
class ProbeAssetError(RuntimeError):
    """The shipped probe is missing or unreadable; the message names the file and the rebuild command."""


def save_probe(probe: Probe, out: Path, info: dict) -> None:
    def write(folder: Path):
        save_file({k: v.detach().contiguous() for k, v in probe.state_dict().items()},
                  str(folder / "probe.safetensors"))
        (folder / "probe.json").write_text(json.dumps({"feature_dim": FEATURE_DIM, "heads": HEADS, **info},
                                                      indent=2))
    atomic_export(Path(out), write)


def load_probe(path: str | Path | None = None, device: str | torch.device | None = None) -> Probe:
    path = Path(path) if path is not None else PROBE_DIR
    for name in PROBE_FILES:
        if not (path / name).is_file():
            raise ProbeAssetError(f"probe asset {path / name} is missing; rebuild it with: {PROBE_REBUILD_COMMAND}")
    probe = Probe()
    try:
        config = json.loads((path / "probe.json").read_text())
        if config["feature_dim"] != FEATURE_DIM or config["heads"] != HEADS:
            raise ValueError(f"it describes a different probe ({config['feature_dim']} features, {config['heads']})")
    except (ValueError, KeyError, TypeError) as err:
        raise ProbeAssetError(f"probe asset {path / 'probe.json'} is corrupt ({err}); "
                              f"rebuild it with: {PROBE_REBUILD_COMMAND}") from err
    try:
        probe.load_state_dict(load_file(str(path / "probe.safetensors")))
    except Exception as err:  # safetensors' own error types, or a state dict of the wrong shape
        raise ProbeAssetError(f"probe asset {path / 'probe.safetensors'} is corrupt ({err}); "
                              f"rebuild it with: {PROBE_REBUILD_COMMAND}") from err
    return probe.to(device or "cpu").eval().requires_grad_(False)


@torch.no_grad()
def probe_outputs(probe: Probe, images: Tensor, batch: int = 256) -> dict[str, Tensor]:
    """Predicted colour / shape / background indices, geometry and features of a set of images."""
    parts = []
    for start in range(0, images.shape[0], batch):
        chunk = images[start:start + batch].to(next(probe.parameters()).device, torch.float32)
        logits, geometry, features = probe(chunk)
        parts.append({**{name: x.argmax(1) for name, x in logits.items()}, "geometry": geometry,
                      "features": features})
    return {key: torch.cat([p[key] for p in parts]).cpu() for key in parts[0]}


# --- the metrics -------------------------------------------------------------------------------------
def adherence(predicted: dict[str, Tensor], targets: list[scenes.Attributes]) -> float:
    """Fraction of images whose predicted colour and shape match their prompt's (unspecified ones match)."""
    hits = []
    for i, target in enumerate(targets):
        colour_ok = target.colour is None or int(predicted["colour"][i]) == target.colour
        shape_ok = target.shape is None or int(predicted["shape"][i]) == target.shape
        hits.append(colour_ok and shape_ok)
    return sum(hits) / len(hits)


def feature_diversity(features_per_prompt: list[Tensor]) -> float:
    """Mean pairwise Euclidean distance between one prompt's images in feature space, averaged over prompts."""
    means = []
    for features in features_per_prompt:
        n = features.shape[0]
        if n < 2:
            continue
        distances = torch.cdist(features.double(), features.double())
        means.append(distances.sum() / (n * (n - 1)))
    return float(torch.stack(means).mean()) if means else 0.0


def foreground_mask(images: Tensor) -> Tensor:
    """(B, 32, 32) booleans: pixels far from the background, estimated as the median colour of the frame."""
    frame = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2)
    background = frame.median(dim=2).values[:, :, None, None]
    return (images - background).abs().amax(dim=1) > FOREGROUND_THRESHOLD


def position_and_size(images: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground centroid (B, 2) in pixels and size sqrt(area) (B,) in pixels, measured on the image."""
    mask = foreground_mask(images).float()
    area = mask.sum(dim=(1, 2))
    coords = torch.arange(images.shape[-1], dtype=torch.float32) + 0.5
    cx = (mask.sum(dim=1) * coords).sum(dim=1) / area.clamp_min(1)
    cy = (mask.sum(dim=2) * coords).sum(dim=1) / area.clamp_min(1)
    return torch.stack([cx, cy], dim=1), area.sqrt()


def spatial_spread(images_per_prompt: list[Tensor]) -> tuple[float, float]:
    """Std of position (mean of the x and y stds) and of size within one prompt, averaged over prompts."""
    position, size = [], []
    for images in images_per_prompt:
        centre, extent = position_and_size(images)
        position.append(centre.std(dim=0).mean())
        size.append(extent.std())
    return float(torch.stack(position).mean()), float(torch.stack(size).mean())


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 via eigendecompositions."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm_psd(m: Tensor) -> Tensor:
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T

    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross))
