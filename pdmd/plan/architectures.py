"""A teacher's real networks on the meta device, from its model folder's config files alone (no weight is read).

Shipped: assets/architectures/<owner>--<name>/ holds the published config.json of each component of the public
checkpoints people name most, laid out as the diffusers pipeline folder is, so ``plan --teacher <Hub id>`` needs no
download. A local pipeline folder is read the same way (its config files; its weights are never opened).
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from pdmd.paths import ASSETS
from pdmd.teachers import MODEL_INDEX, PIPELINES
from pdmd.teachers.base import TeacherError

ARCHITECTURES = ASSETS / "architectures"
TRANSFORMERS = ("transformer", "transformer_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class PlanError(ValueError):
    """Input the planner cannot use (a folder without config files, an unknown checkpoint); one line."""


class UntokenisedProcessor:
    """Stands in for a pipeline's processor (its tokenizer, image and video processors) where prompts are never
    tokenised: what a pipeline's constructor reads from it (QwenImage21Pipeline counts its chat template's system
    tokens and looks up the image placeholder's id) gets a placeholder answer the planner never uses."""

    @property
    def tokenizer(self) -> "UntokenisedProcessor":
        return self

    def apply_chat_template(self, *args, **kwargs) -> list[list[int]]:
        return [[]]

    def encode(self, *args, **kwargs) -> list[int]:
        return [0]


def shipped_checkpoints() -> list[str]:
    """Hub ids whose architecture ships under assets/architectures."""
    return sorted(p.name.replace("--", "/", 1) for p in ARCHITECTURES.iterdir() if (p / MODEL_INDEX).is_file())


def config_folder(name: str) -> Path:
    """The folder whose config files describe ``name``: a local pipeline folder, or the shipped copy of a Hub id."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        folder = ARCHITECTURES / name.replace("/", "--", 1)
        if not folder.is_dir():
            raise PlanError(f"no architecture known for {name!r}: pass a local pipeline folder or one of "
                            f"{', '.join(shipped_checkpoints())}")
    if not (folder / MODEL_INDEX).is_file():
        raise PlanError(f"{folder} has no {MODEL_INDEX}: not a diffusers pipeline folder (the planner reads its "
                        "model_index.json and each component's config.json)")
    return folder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PlanError(f"{path} is missing: the planner needs each component's config file")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise PlanError(f"{path} is not valid JSON ({err})") from None


def _build_component(folder: Path, name: str, library: str, class_name: str) -> nn.Module:
    """One component from its config.json, with its parameters on the meta device."""
    config = _read_json(folder / name / "config.json")
    module = importlib.import_module(library)
    cls = getattr(module, class_name)
    from diffusers.models.modeling_utils import no_init_weights

    # meta tensors hold no values: initialising them only costs time (diffusers skips it alike when it loads)
    with torch.device("meta"), no_init_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if library == "diffusers":
            return cls.from_config(config)
        from transformers import AutoConfig
        return cls._from_config(AutoConfig.for_model(**config))


def pipeline_components(name: str) -> tuple[str, dict]:
    """(pipeline class name, its components: every network on the meta device, no tokenizer, and the pipeline's
    settings such as Wan 2.2's boundary_ratio)."""
    folder = config_folder(name)
    index = _read_json(folder / MODEL_INDEX)
    class_name = index.get("_class_name")
    if class_name not in PIPELINES:
        raise PlanError(f"{name} holds a {class_name or 'pipeline with no _class_name'}; supported: "
                        f"{', '.join(PIPELINES)}")
    import diffusers
    components = {}
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or value[0] is None:
            if not key.startswith("_") and not isinstance(value, list):
                components[key] = value  # pipeline settings such as Wan 2.2's boundary_ratio
            continue
        library, component_class = value
        if key in ("scheduler", "guider"):  # config-only components (HunyuanVideo 1.5 has a guider), each read
            component = getattr(diffusers, component_class)  # from its own file: scheduler_config.json, ...
            components[key] = component.from_config(_read_json(folder / key / component.config_name))
        elif key.startswith("tokenizer"):
            components[key] = None  # prompts are never tokenised here: the embeddings' shapes are known
        elif key == "processor":  # a tokenizer with the image and video processors (QwenImage21Pipeline)
            components[key] = UntokenisedProcessor()
        elif key == "image_processor":  # Wan 2.1 I2V's CLIP processor: no image is read here either
            components[key] = None
        else:
            components[key] = _build_component(folder, key, library, component_class)
    return class_name, components


def assemble(class_name: str, components: dict):
    """The diffusers pipeline ``class_name`` holding ``components`` (those its constructor takes)."""
    import diffusers
    pipe_class = getattr(diffusers, class_name)
    expected, optional = pipe_class._get_signature_keys(pipe_class)
    accepted = set(expected) | set(optional)
    return pipe_class(**{k: v for k, v in components.items() if k in accepted})


def meta_pipeline(name: str):
    """(diffusers pipeline with every network on the meta device and no tokenizer, pipeline class name)."""
    class_name, components = pipeline_components(name)
    return assemble(class_name, components), class_name


def meta_teacher(name: str, height: int | None = None, width: int | None = None, num_frames: int | None = None):
    """The family adapter (pdmd.teachers) around the meta pipeline: the same latent shape, velocity call and
    LoRA targets the trainer uses."""
    pipe, class_name = meta_pipeline(name)
    return family_adapter(pipe, class_name, name, height, width, num_frames)


def family_adapter(pipe, class_name: str, name: str, height: int | None, width: int | None,
                   num_frames: int | None):
    """The family adapter around an already built meta pipeline, at a size (validated as a loaded teacher's)."""
    module, adapter = PIPELINES[class_name]
    teacher_class = getattr(importlib.import_module(module), adapter)
    extra = {"num_frames": num_frames} if teacher_class.is_video else {}
    try:
        return teacher_class(pipe, name, device="meta", height=height, width=width, **extra)
    except TeacherError as err:
        raise PlanError(str(err)) from None
