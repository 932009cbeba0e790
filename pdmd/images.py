"""Image files: every PNG the library writes goes through here (atomically: temp file, then rename)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def save_png(images: Tensor, path: Path) -> Path:
    """Images (B, 3, H, W) in [0, 1], side by side in one PNG."""
    from PIL import Image

    row = (torch.cat(list(images.float().cpu()), dim=2).permute(1, 2, 0).clamp(0, 1) * 255).round().byte()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}")
    Image.fromarray(row.numpy()).save(temporary, format="PNG")
    temporary.replace(path)
    return path


def save_grid(rows: list[tuple[str, Tensor]], title: str, path: Path) -> Path:
    """A labelled figure: one row of images (B, 3, H, W) in [0, 1] per (label, images) pair."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(images.shape[0] for _, images in rows)
    figure, axes = plt.subplots(len(rows), 1, figsize=(columns * 0.8 + 0.2, len(rows) * 1.05), squeeze=False)
    for axis, (label, images) in zip(axes[:, 0], rows):
        axis.imshow(torch.cat(list(images.float().cpu().permute(0, 2, 3, 1)), dim=1).numpy(),
                    interpolation="nearest")
        axis.set_title(label, fontsize=8, pad=2)
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
