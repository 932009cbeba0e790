"""Pictures the app shows: 32x32 tensors upscaled for display, labelled strips and grids, matplotlib to PIL."""
from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

DISPLAY_SIZE = 256  # main images: 8x the 32x32 output, nearest-neighbour so pixels stay crisp
TILE_SIZE = 128     # strip and grid tiles
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def to_pil(image: Tensor, size: int = DISPLAY_SIZE) -> Image.Image:
    """One image (3, H, W) in [0, 1] -> an RGB PIL image whose longer side is ``size``, aspect kept: enlarged
    with nearest-neighbour (crisp pixels), reduced with Lanczos."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    scale = size / max(picture.size)
    resized = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(resized, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def font(size: int = 15) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_block(lines: list[str], width: int, size: int = 15) -> Image.Image:
    """White panel holding ``lines`` of text, as wide as ``width``."""
    line_height = size + 6
    panel = Image.new("RGB", (width, 8 + line_height * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    for row, line in enumerate(lines):
        draw.text((6, 4 + row * line_height), line, fill=INK, font=font(size))
    return panel


def stack_vertically(parts: list[Image.Image]) -> Image.Image:
    width = max(p.width for p in parts)
    canvas = Image.new("RGB", (width, sum(p.height for p in parts)), BACKGROUND)
    top = 0
    for part in parts:
        canvas.paste(part, (0, top))
        top += part.height
    return canvas


def stack_horizontally(parts: list[Image.Image], gap: int = 8) -> Image.Image:
    height = max(p.height for p in parts)
    canvas = Image.new("RGB", (sum(p.width for p in parts) + gap * (len(parts) - 1), height), BACKGROUND)
    left = 0
    for part in parts:
        canvas.paste(part, (left, 0))
        left += part.width + gap
    return canvas


def captioned(image: Image.Image, lines: list[str], size: int = 15) -> Image.Image:
    return stack_vertically([image, text_block(lines, image.width, size)])


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], column_titles: list[str]) -> Image.Image:
    """A table of tiles: a title over each column, a label left of each row."""
    label_width, gap = 170, 6
    columns = max(len(tiles) for _, tiles in rows)
    tile = rows[0][1][0].width
    header = text_block([""], label_width)
    for title in column_titles:
        header = stack_horizontally([header, text_block([title], tile)], gap)
    lines = [header]
    for label, tiles in rows:
        padded = tiles + [Image.new("RGB", (tile, tile), BACKGROUND)] * (columns - len(tiles))
        lines.append(stack_horizontally([_label_panel(label, label_width, tile), *padded], gap))
    return stack_vertically(_with_gaps(lines, gap))


def _with_gaps(parts: list[Image.Image], gap: int) -> list[Image.Image]:
    spacer = Image.new("RGB", (1, gap), BACKGROUND)
    return [piece for part in parts for piece in (part, spacer)][:-1]


def _label_panel(label: str, width: int, height: int) -> Image.Image:
    panel = Image.new("RGB", (width, height), BACKGROUND)
    block = text_block(label.split("\n"), width, 14)
    panel.paste(block, (0, max(0, (height - block.height) // 2)))
    return panel


def image_grid(images: list[Image.Image], columns: int, gap: int = 4) -> Image.Image:
    rows = [images[i:i + columns] for i in range(0, len(images), columns)]
    return stack_vertically([stack_horizontally(row, gap) for row in rows if row])


def figure_to_image(figure) -> Image.Image:
    """Render a matplotlib figure to PIL and close it (figures left open leak memory in a long-lived app)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
