"""pdmd.conditions: every condition image is judged from its size and header before a pixel is decoded, bad ones
are one line naming the file, and a folder pairs with its prompts.txt or the config's prompts."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pdmd.conditions import ConditionError, condition_set, fit, open_image, open_row


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` (8-bit RGB) with a few bytes of pixel data: what a header-only
    upload of a huge image looks like (it would decode to width * height * 3 bytes)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(bytes(64))))


def random_images(size: dict, count: int, seed: int = 0) -> list[Image.Image]:
    """``count`` seeded random RGB images at ``size`` (a teacher's ``height`` and ``width``): a conditioned
    teacher's test images, at its own size so that neither pdmd nor the stock pipeline resizes them."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size["height"], size["width"], 3), dtype=np.uint8))
            for _ in range(count)]


def picture(path, width=40, height=20, format=None):
    rows = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype("uint8")
    Image.fromarray(rows).save(path, format=format)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not an image at all"), "not an image this program reads"),
    (lambda p: p.write_bytes(png_header(20000, 20000)), "more pixels than the 16,777,216"),
    (lambda p: p.write_bytes(png_header(5000, 5000)), "5000x5000 pixels, more than the 16,777,216"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_bytes(picture(p.with_suffix(".jpg"), 64, 64).read_bytes()[:300]), "damaged or cut short"),
    (lambda p: picture(p, format="GIF"), "a GIF image; use PNG, JPEG, WEBP"),
])
def test_a_bad_image_is_one_line_naming_the_file(tmp_path, make, message):
    path = tmp_path / "upload.png"
    make(path)
    with pytest.raises(ConditionError, match=message) as caught:
        open_image(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_huge_header_is_refused_without_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(20000, 20000))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a refused image"))
    with pytest.raises(ConditionError, match="more pixels than"):
        open_image(path)
    path.write_bytes(png_header(5000, 5000))  # under PIL's own limit, over ours
    with pytest.raises(ConditionError, match="5000x5000 pixels, more than"):
        open_image(path)


def test_fit_covers_the_size_and_crops_the_centre(tmp_path):
    image = open_image(picture(tmp_path / "wide.png", width=40, height=20))
    out = fit(image, 10, 10)
    assert out.shape == (3, 10, 10) and 0 <= out.min() and out.max() <= 1
    # scaled by 1/2 to 20x10, the centre 10 columns kept: the middle of the source's gradient
    middle = torch.from_numpy(np.array(image.resize((20, 10), Image.BICUBIC))[:, 5:15]).permute(2, 0, 1) / 255
    torch.testing.assert_close(out, middle.float())


def test_a_folder_pairs_with_its_prompts_file_or_cycles_the_configs_prompts(tmp_path):
    for name in ("b.png", "a.jpg", "c.webp"):
        picture(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image: skipped by suffix")
    cycled = condition_set(tmp_path, ["one", "two"])
    assert [(p.name, prompt) for p, prompt in cycled] == [("a.jpg", "one"), ("b.png", "two"), ("c.webp", "one")]
    (tmp_path / "prompts.txt").write_text("first\nsecond\n\nthird\n")
    assert [prompt for _, prompt in condition_set(tmp_path, ["ignored"])] == ["first", "second", "third"]
    (tmp_path / "prompts.txt").write_text("only one\n")
    with pytest.raises(ConditionError, match="1 prompts for 3 images"):
        condition_set(tmp_path)


def test_a_list_with_a_bad_or_missing_file_stops_before_anything_runs(tmp_path):
    good = picture(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    with pytest.raises(ConditionError, match="bad.png: not an image"):
        condition_set([good, bad], ["a prompt"])
    with pytest.raises(ConditionError, match="missing.png: no such image file"):
        condition_set([good, tmp_path / "missing.png"], ["a prompt"])
    with pytest.raises(ConditionError, match="no prompts"):
        condition_set([good])


def test_a_folder_of_folders_gives_each_prompt_its_images(tmp_path):
    """For a teacher that composes several images a prompt: each subfolder is a row, its images in name order; a
    list of lists likewise; rows of different sizes, an empty subfolder or a missing file stop the run."""
    for row, names in (("1-cat", ("b.png", "a.png")), ("2-dog", ("x.png", "y.jpg"))):
        (tmp_path / row).mkdir()
        for name in names:
            picture(tmp_path / row / name)
    (tmp_path / "prompts.txt").write_text("put the cat in the room\nthe dog wears the hat\n")
    pairs = condition_set(tmp_path)
    assert [([p.name for p in row], prompt) for row, prompt in pairs] == [
        (["a.png", "b.png"], "put the cat in the room"), (["x.png", "y.jpg"], "the dog wears the hat")]
    assert [image.size for image in open_row(pairs[0][0])] == [(40, 20)] * 2
    assert open_row(tmp_path / "1-cat" / "a.png").size == (40, 20)  # a single file: the image itself
    listed = condition_set([[tmp_path / "1-cat" / "a.png", tmp_path / "2-dog" / "x.png"]], ["compose them"])
    assert isinstance(listed[0][0], tuple) and len(listed[0][0]) == 2
    (tmp_path / "2-dog" / "y.jpg").unlink()
    with pytest.raises(ConditionError, match=r"every prompt needs as many images \(the rows have \[1, 2\]\)"):
        condition_set(tmp_path)
    (tmp_path / "2-dog" / "x.png").unlink()
    with pytest.raises(ConditionError, match="2-dog: no .png"):
        condition_set(tmp_path)
    with pytest.raises(ConditionError, match="missing.png: no such image file"):
        condition_set([[tmp_path / "1-cat" / "a.png", tmp_path / "missing.png"]], ["x"])
