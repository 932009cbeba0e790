"""Teachers: every flow-matching model the trainer and the app can distil or sample, behind one interface.

``load_teacher(ID_OR_PATH)``: ``builtin`` is the tiny model shipped in assets/; a folder holding a diffusers
pipeline (model_index.json) or a Hugging Face Hub id of one loads the matching family adapter. Code from a
model repository is never run (no ``trust_remote_code``, no custom pipelines).
"""
from __future__ import annotations

import json
from pathlib import Path

from pdmd.teachers.base import Teacher, TeacherError

__all__ = ["Teacher", "TeacherError", "load_teacher", "TEACHERS", "PIPELINES", "read_model_index", "teacher_key",
           "same_teacher"]

BUILTIN = "builtin"
TEACHERS = (BUILTIN,)
MODEL_INDEX = "model_index.json"
# diffusers pipeline class -> (module, adapter class)
PIPELINES = {
    "StableDiffusion3Pipeline": ("pdmd.teachers.sd3", "SD3Teacher"),
    "FluxPipeline": ("pdmd.teachers.flux", "FluxTeacher"),
    "WanPipeline": ("pdmd.teachers.wan", "WanTeacher"),
    "QwenImagePipeline": ("pdmd.teachers.qwen_image", "QwenImageTeacher"),
    "QwenImageEditPlusPipeline": ("pdmd.teachers.qwen_image_edit", "QwenImageEditPlusTeacher"),
    "QwenImage21Pipeline": ("pdmd.teachers.qwen_image21", "QwenImage21Teacher"),
    "Flux2Pipeline": ("pdmd.teachers.flux2", "Flux2Teacher"),
    "Flux2KleinPipeline": ("pdmd.teachers.flux2", "Flux2KleinTeacher"),
    "ZImagePipeline": ("pdmd.teachers.z_image", "ZImageTeacher"),
    "HunyuanVideo15Pipeline": ("pdmd.teachers.hunyuan_video15", "HunyuanVideo15Teacher"),
    "WanImageToVideoPipeline": ("pdmd.teachers.wan_i2v", "WanI2VTeacher"),
    "FluxKontextPipeline": ("pdmd.teachers.flux_kontext", "FluxKontextTeacher"),
}


def teacher_key(name: str, options: dict | None = None) -> tuple:
    """One key per teacher and load options: a local folder by its resolved path, a Hub id as typed."""
    name = (name or BUILTIN).strip()
    folder = Path(name).expanduser()
    if name != BUILTIN and folder.is_dir():
        name = str(folder.resolve())
    return name, tuple(sorted((k, v) for k, v in (options or {}).items() if v is not None))


def same_teacher(a: str, b: str) -> bool:
    return teacher_key(a)[0] == teacher_key(b)[0]


def _looks_like_path(name: str) -> bool:
    """A Hub id is ``owner/name``; anything else with a path shape is meant as a folder."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1


def read_model_index(name: str) -> tuple[dict, bool]:
    """The pipeline's model_index.json and whether ``name`` is a local folder (else a Hub id)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / MODEL_INDEX
        if not path.is_file():
            raise TeacherError(f"{folder} has no {MODEL_INDEX}: it is not a diffusers pipeline folder (save one "
                               f"with pipe.save_pretrained(folder); supported: {', '.join(PIPELINES)})")
        try:
            return json.loads(path.read_text()), True
        except ValueError as err:
            raise TeacherError(f"{path} is not valid JSON ({err})") from None
    if folder.exists() or _looks_like_path(name):
        raise TeacherError(f"unknown teacher {name!r}: not 'builtin', no such folder, and not a Hub id "
                           "of the form owner/name")
    from huggingface_hub import hf_hub_download
    try:
        try:
            path = hf_hub_download(name, MODEL_INDEX, local_files_only=True)  # already in the Hub cache
        except Exception:
            if not _hub_resolves():
                raise ConnectionError("the Hub's host name does not resolve") from None
            path = hf_hub_download(name, MODEL_INDEX)
    except Exception as err:  # offline, no such repository, gated, ...: all mean the same to the user
        raise TeacherError(f"could not download {name} ({type(err).__name__}); pass a local folder holding the "
                           f"pipeline (model_index.json and its component folders)") from None
    return json.loads(Path(path).read_text()), False


def _hub_resolves() -> bool:
    """Without a network the Hub's host name fails to resolve at once, where a download retries for ~30 s."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


def load_teacher(name: str, device=None, dtype=None, offload: bool = False, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, quantize: str = "none",
                 teacher_loras=()) -> Teacher:
    """A teacher by id or path.

    ``dtype``: "fp32", "bf16", "fp16" or a torch dtype (default: bf16 on CUDA, fp32 on the CPU). ``offload``
    keeps the text encoders and the VAE on the CPU, moving each to ``device`` only while it runs. ``height``,
    ``width`` (pixels) and ``num_frames`` (video) default to the pipeline's own. ``quantize`` ("int8", "fp8",
    "nf4"): the frozen transformer(s) loaded quantized (pdmd.teachers.quantize). ``teacher_loras``: style LoRAs
    (StyleLoras, or ``{file, strength, network}`` entries as a config lists them) fused into the base, each into its
    network, before it is quantized (pdmd.teachers.style_loras).
    """
    from pdmd.teachers.quantize import check_quantization, pipeline_quantization, quantize_networks
    from pdmd.teachers.style_loras import check_takes_style_loras, fuse_style_loras, parse_teacher_loras
    check_quantization(quantize, device)
    teacher_loras = parse_teacher_loras(teacher_loras)
    if teacher_loras and name == BUILTIN:
        raise TeacherError("teacher_loras are style LoRAs of a diffusers teacher; the built-in teacher takes none")
    if name == "builtin":
        from pdmd.teachers.builtin import load_builtin_teacher
        teacher = load_builtin_teacher(device=device)
        quantize_networks(teacher, quantize)
        return teacher
    import importlib

    import torch

    from pdmd.teachers.diffusers_base import parse_dtype

    index, local = read_model_index(name)
    class_name = index.get("_class_name")
    if class_name not in PIPELINES:
        raise TeacherError(f"{name} holds a {class_name or 'pipeline with no _class_name'}, which is not supported; "
                           f"supported pipelines: {', '.join(PIPELINES)} (or 'builtin')")
    module, adapter = PIPELINES[class_name]
    teacher_class = getattr(importlib.import_module(module), adapter)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if num_frames is not None and not teacher_class.is_video:
        raise TeacherError(f"num_frames is for video teachers; {name} is a {class_name}")
    if teacher_loras:
        check_takes_style_loras(index, quantize, teacher_loras)
    import diffusers
    # style LoRAs are fused into the unquantized base, which is quantized afterwards (style_loras)
    quantization = pipeline_quantization("none" if teacher_loras else quantize, list(index))
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(
            str(Path(name).expanduser()) if local else name, dtype=dtype,
            **({"quantization_config": quantization} if quantization else {}))
    except torch.OutOfMemoryError as err:
        from pdmd.teachers.diffusers_base import MEMORY_ADVICE
        raise TeacherError(f"{name} does not fit in memory ({err}): {MEMORY_ADVICE}") from None
    except ImportError as err:  # e.g. FLUX.2 [dev]'s and Qwen-Image 2.1's processors want torchvision
        reason = " ".join(str(err).split()).split(". ")[0]  # transformers' message spans lines: its first sentence
        raise TeacherError(f"could not load {class_name} from {name}: a package it needs is not installed "
                           f"({reason}); see the README's family table") from None
    except Exception as err:  # a damaged folder, a missing component, no network for a component file
        where = "" if local else "; if it could not download, pass a local folder"
        raise TeacherError(f"could not load {class_name} from {name}: {type(err).__name__}: {err}{where}") from None
    if teacher_loras:
        fuse_style_loras(pipe, teacher_class.family, teacher_loras, quantize)
    extra = {"num_frames": num_frames} if teacher_class.is_video else {}
    teacher = teacher_class(pipe, name, device=device, offload=offload, height=height, width=width, **extra)
    teacher.style_loras = teacher_loras
    return teacher
