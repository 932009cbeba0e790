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
