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


# --- video (Wan) -------------------------------------------------------------------------------------------
VIDEO_SUFFIXES = (".gif", ".mp4")
DEFAULT_FPS = 16  # Wan's frame rate


def as_stills(images: Tensor) -> Tensor:
    """Images (B, 3, H, W) unchanged; videos (B, F, 3, H, W) as each video's frames side by side (B, 3, H, F*W),
    so a video teacher's samples fit every PNG writer."""
    if images.ndim == 5:
        return torch.cat(list(images.transpose(0, 1)), dim=3)
    return images


def _frames(video: Tensor) -> list:
    """(F, 3, H, W) in [0, 1] -> a list of uint8 (H, W, 3) arrays."""
    return list((video.float().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())


def save_video(videos: Tensor, path: Path, fps: int = DEFAULT_FPS) -> Path:
    """Videos (B, F, 3, H, W) in [0, 1], side by side, as an animated GIF (Pillow) or an MP4 (diffusers'
    export_to_video, which needs imageio and imageio-ffmpeg)."""
    from PIL import Image

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: a video is written as {' or '.join(VIDEO_SUFFIXES)}")
    frames = _frames(torch.cat(list(videos), dim=3))  # the batch side by side, frame by frame
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}")
    if suffix == ".gif":
        first, *rest = [Image.fromarray(frame) for frame in frames]
        first.save(temporary, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    else:
        try:
            import imageio  # noqa: F401  (export_to_video falls back to OpenCV without it)
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError(f"writing {path} needs imageio and imageio-ffmpeg (pip install -r requirements.txt); "
                             "or write a .gif") from None
        from diffusers.utils import export_to_video
        export_to_video(frames, str(temporary.with_suffix(".mp4")), fps=fps, macro_block_size=1)
        temporary = temporary.with_suffix(".mp4")
    temporary.replace(path)
    return path


def save_media(images: Tensor, path: Path) -> Path:
    """A teacher's decoded output by the file's suffix: PNG for images (a video's frames side by side), GIF or
    MP4 for videos."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        if images.ndim != 5:
            raise ValueError(f"{path}: this teacher makes images; write a .png")
        return save_video(images, path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: write a .png" + (f", {', '.join(VIDEO_SUFFIXES)}" if images.ndim == 5 else ""))
    return save_png(as_stills(images), path)
