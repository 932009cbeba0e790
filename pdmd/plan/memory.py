"""The memory of a distillation run, predicted from the teacher's architecture on the meta device.

Weights, adapters and optimizer states are counted on the meta-built networks (with the run's dtype, quantization
and LoRA applied by the same libraries the trainer uses, so the counts are exact); the activations of the
generator rollout and of a fake update are traced on the meta device by running the trainer's own step functions
(pdmd.core.distill) under ``LivePeak``, at the run's batch, resolution, frames and checkpointing mode.

By default (``fast``) each network is built with its block stacks cut to one block per kind, sums are taken to the
full depth by kind and traces run the full depth with blocks replaying their kind's memory (pdmd.plan.stacks,
pdmd.plan.replay), and phases with as many steps are traced once: a plan takes seconds, not minutes.
``fast=False`` builds and traces everything whole: the reference tests/test_plan.py holds the fast plan to.
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from diffusers import ModelMixin
from torch import nn
from transformers import PreTrainedModel

from pdmd.core import distill
from pdmd.core.schedule import PhaseSchedule
from pdmd.plan.architectures import TRANSFORMERS, assemble, family_adapter, pipeline_components
from pdmd.plan.replay import Replayed
from pdmd.plan.stacks import Layout
from pdmd.plan.trace import LivePeak, MetaReplay, meta_attention
from pdmd.students.manifest import LoraSpec
from pdmd.students.roles import FAKE, Roles, phase_adapter
from pdmd.teachers import qwen_image_edit
from pdmd.teachers.diffusers_base import parse_dtype
from pdmd.teachers.flux_kontext import REFERENCE_LATENTS, FluxKontextTeacher
from pdmd.teachers.quantize import module_bytes, nf4_bytes, tensor_bytes
from pdmd.teachers.wan_i2v import IMAGE_CONDITION, IMAGE_EMBEDS, WanI2VTeacher


@dataclass(frozen=True)
class PlanSettings:
    """What the memory depends on; ``from_config`` reads a TrainConfig by attribute, so renamed fields elsewhere in
    the config do not matter here."""
    teacher: str
    dtype: str = "bf16"
    quantize: str = "none"
    batch_size: int = 1
    schedule: PhaseSchedule = field(default_factory=lambda: distill.METHODS["phased"].schedule)
    method: str = "phased"
    lora: LoraSpec = field(default_factory=LoraSpec)
    gradient_checkpointing: bool | str = False
    offload: bool = False
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    processes: int = 1              # FSDP: the frozen base is sharded over this many processes
    optimizer: str = "adamw"
    device: str = "cuda"            # on "cpu" the text encoders stay in the same memory after encoding
    prompts: int = 0                # prompt embeddings kept for the run (0: the teacher's default list)

    @classmethod
    def from_config(cls, config, **overrides) -> "PlanSettings":
        """The config's run; with no dtype, the one load_teacher gives the device planned for (bf16 on CUDA)."""
        read = lambda name, default: getattr(config, name, default)  # noqa: E731
        device = overrides.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        values = dict(teacher=config.teacher, dtype=read("dtype", None) or ("bf16" if device == "cuda" else "fp32"),
                      quantize=read("quantize", "none"), batch_size=config.batch_size, schedule=config.schedule,
                      method=config.method, lora=config.lora, gradient_checkpointing=config.gradient_checkpointing,
                      offload=read("offload", False), height=read("height", None), width=read("width", None),
                      num_frames=read("num_frames", None), optimizer=read("optimizer", "adamw"), device=device,
                      prompts=len(read("prompts", ()) or ()))
        return cls(**{**values, **overrides})


@dataclass
class Component:
    name: str
    bytes: int
    when: str      # "training", "inference" or "both": which peak it counts in
    note: str = ""


def base_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The frozen base's parameters and buffers (LoRA weights excluded)."""
    return [p for n, p in module.named_parameters() if "lora_" not in n] + list(module.buffers())


def sharded_bytes(module: nn.Module, processes: int) -> int:
    """One rank's share of ``module``'s base under FSDP2: each parameter split on dim 0 into ``processes``
    chunks, rank 0 holding the largest (ceil); buffers stay whole on every rank."""
    total = sum(tensor_bytes(b) for b in module.buffers())
    for tensor in base_tensors(module):
        if isinstance(tensor, nn.Parameter):
            rows = tensor.shape[0] if tensor.dim() else 1
            total += math.ceil(rows / processes) * (tensor_bytes(tensor) // max(rows, 1))
    return total


def prompt_conditioning(teacher, batch: int, device="meta"):
    """(cond, uncond) shaped as the family's encode_prompts returns them (padded to its prompt length)."""
    config = teacher.pipe.transformer.config
    length, dtype = teacher.prompt_length, teacher.dtype
    embeds = lambda tokens, width: torch.zeros(batch, tokens, width, dtype=dtype, device=device)  # noqa: E731
    if teacher.family == "wan":
        cond = {"prompt_embeds": embeds(length, config.text_dim)}
        if isinstance(teacher, WanI2VTeacher) and not teacher.pipe.config.expand_timesteps:
            cond.update(image_conditioning(teacher, batch, device))
    elif teacher.family == "sd3":  # 77 CLIP tokens followed by the T5 ones
        cond = {"prompt_embeds": embeds(77 + length, config.joint_attention_dim),
                "pooled_projections": torch.zeros(batch, config.pooled_projection_dim, dtype=dtype, device=device)}
    elif teacher.family == "flux":
        cond = {"prompt_embeds": embeds(length, config.joint_attention_dim),
                "pooled_projections": torch.zeros(batch, config.pooled_projection_dim, dtype=dtype, device=device)}
        if isinstance(teacher, FluxKontextTeacher):  # an editing run: the reference image's latent (float32) at
            # the teacher's size, as many tokens again in every call (a text-only run on Kontext needs less)
            cond[REFERENCE_LATENTS] = torch.zeros(batch, *teacher.latent_shape, device=device)
    elif teacher.family == "flux2":  # padded to prompt_length; an unconditional branch only where CFG is true CFG
        cond = {"prompt_embeds": embeds(length, config.joint_attention_dim)}
        return cond, (None if teacher.negative_prompt is None else dict(cond))
    elif teacher.family == "z-image":  # at most prompt_length tokens of the Qwen3 encoder (each prompt its own)
        cond = {"prompt_embeds": embeds(length, config.cap_feat_dim),
                "prompt_mask": torch.ones(batch, length, dtype=torch.bool, device=device)}
    elif teacher.family == "qwen-image21":  # prompt_length Qwen3-VL tokens (the pipeline caps none), then the
        # image's H/16 * W/16 tokens, which the transformer appends itself
        cond = {"prompt_embeds": embeds(length, config.context_in_dim),
                "prompt_embeds_mask": torch.ones(batch, length, dtype=torch.bool, device=device)}
    elif teacher.family == "hunyuan-video-1.5":  # 1000 Qwen2.5-VL and 256 ByT5 glyph tokens, always padded, with
        # their masks in the model dtype (the transformer adds its 729 masked image tokens itself)
        glyphs = teacher.glyph_length
        cond = {"prompt_embeds": embeds(length, config.text_embed_dim),
                "prompt_embeds_mask": torch.ones(batch, length, dtype=dtype, device=device),
                "prompt_embeds_2": embeds(glyphs, config.text_embed_2_dim),
                "prompt_embeds_mask_2": torch.ones(batch, glyphs, dtype=dtype, device=device)}
    elif isinstance(teacher, qwen_image_edit.QwenImageEditPlusTeacher):  # prompt_length tokens after the
        # condition image's (the template's few around them left out: no tokenizer here), and the reference latent
        # (float32) at the teacher's size, as many tokens again as the noisy ones in every call
        length += teacher.condition_image_tokens()
        cond = {"prompt_embeds": embeds(length, config.joint_attention_dim),
                "prompt_embeds_mask": torch.ones(batch, length, dtype=torch.long, device=device),
                qwen_image_edit.REFERENCE_LATENTS: torch.zeros(batch, 1, *teacher.latent_shape, device=device)}
    else:  # qwen-image: at most prompt_length tokens (the pipeline trims to the longest prompt)
        cond = {"prompt_embeds": embeds(length, config.joint_attention_dim),
                "prompt_embeds_mask": torch.ones(batch, length, dtype=torch.long, device=device)}
    return cond, (None if teacher.guidance_embedded else dict(cond))


def image_conditioning(teacher: WanI2VTeacher, batch: int, device="meta") -> dict:
    """Wan 2.1 / 2.2 I2V's image entries of cond as WanI2VTeacher encodes them: the frame mask and condition
    latent (float32, on every network input), and where there is an image encoder its penultimate hidden states,
    one per patch of its square input plus the class token."""
    channels, *latent = teacher.latent_shape
    mask_channels = teacher.pipe.vae_scale_factor_temporal
    image = {IMAGE_CONDITION: torch.zeros(batch, mask_channels + channels, *latent, device=device)}
    if teacher.image_encoder is not None:
        vision = teacher.image_encoder.config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        image[IMAGE_EMBEDS] = torch.zeros(batch, tokens, vision.hidden_size, dtype=teacher.dtype, device=device)
    return image


def _conditioning_bytes(cond) -> int:
    return sum(tensor_bytes(t) for t in (cond or {}).values())


def _one_network_velocity(teacher):
    """A two-network teacher (Wan 2.2) runs one network per sample; both have the same architecture, so the
    activations are traced through the first (its dispatch reads tensor values, which meta tensors lack)."""
    if teacher.network_names:
        network = teacher.model[teacher.network_names[0]]
        teacher.velocity = lambda x, t, cond: teacher._run(network, x, teacher.timesteps(t, x) * 1000, cond)


TRAINING_TRACES = ("fake update", "generator update")


def trace_step(teacher, roles: Roles, settings: PlanSettings, phase: int) -> dict[str, int]:
    """Peak bytes allocated by one fake update and by one generator update of ``phase`` (gradients included)."""
    schedule, method = settings.schedule, distill.get_method(settings.method, settings.schedule)
    guided = teacher.with_guidance
    experts = [guided(roles.velocity(phase_adapter(k)), 1.0) for k in range(schedule.num_phases)]
    fake, real = guided(roles.velocity(FAKE), 1.0), guided(roles.velocity(None), teacher.default_cfg)
    for name in roles.adapters:
        for param in roles.parameters_of(name):
            param.requires_grad_(name in (phase_adapter(phase), FAKE))
    cond, uncond = prompt_conditioning(teacher, settings.batch_size)
    noise = torch.zeros(settings.batch_size, *teacher.latent_shape, device="meta")
    generator = torch.Generator().manual_seed(0)
    checkpointing = settings.gradient_checkpointing
    teacher.enable_gradient_checkpointing(checkpointing is True)
    peaks = {}
    with LivePeak() as live:
        with torch.no_grad():
            x_s, s = distill.rollout(experts, phase, schedule, noise, cond, sgts=method.sgts, generator=generator)
        loss = distill.fake_loss(fake, x_s, s, cond, generator=generator)
        with roles.active(FAKE):
            loss.backward()
        del x_s, loss
        _drop_gradients(teacher, roles)
    peaks["fake update"] = live.peak
    with LivePeak() as live:
        teacher.enable_gradient_checkpointing(bool(checkpointing))
        x_s, s = distill.rollout(experts, phase, schedule, noise, cond, sgts=method.sgts, generator=generator)
        teacher.enable_gradient_checkpointing(checkpointing is True)
        loss, _ = distill.generator_loss(x_s, s, real, fake, cond, uncond, teacher.default_cfg,
                                      combine=teacher.combine_guidance, generator=generator)
        with roles.active(phase_adapter(phase)):
            loss.backward()
        del x_s, loss
        _drop_gradients(teacher, roles)
    peaks["generator update"] = live.peak
    teacher.enable_gradient_checkpointing(False)
    return peaks


def _drop_gradients(teacher, roles: Roles) -> None:
    for param in roles.parameters_of(*roles.adapters):
        param.grad = None
    for module in teacher.model.modules():
        if isinstance(module, Replayed):
            module.drop_gradients()


def trace_sampling_step(teacher, settings: PlanSettings) -> dict[str, int]:
    """Peak bytes of one guided teacher step, without gradients."""
    from pdmd.core.sampling import guided_velocity

    cond, uncond = prompt_conditioning(teacher, settings.batch_size)
    x = torch.zeros(settings.batch_size, *teacher.latent_shape, device="meta")
    t = torch.full((settings.batch_size,), 0.5, device="meta")
    with torch.no_grad(), LivePeak() as step:
        guided_velocity(teacher.with_guidance(teacher.velocity, teacher.default_cfg), x, t, cond, uncond,
                        teacher.default_cfg, teacher.combine_guidance)
    return {"sampling step": step.peak}


def trace_decode(teacher, settings: PlanSettings) -> int:
    """Peak bytes of the VAE decode of a batch."""
    x = torch.zeros(settings.batch_size, *teacher.latent_shape, device="meta")
    with torch.no_grad(), LivePeak() as decode:
        teacher.decode(x)
    return decode.peak


def optimizer_bytes(params: list[nn.Parameter], optimizer: str) -> int:
    """AdamW: exp_avg and exp_avg_sq like the parameter, plus a float32 step per parameter. torchao's AdamW8bit
    keeps 8-bit codes with one float32 scale per 256 values for tensors of at least 4096 values (a multiple of
    256), float32 states otherwise (torchao.optim.adam)."""
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "adamw8bit" and n >= 4096 and n % 256 == 0:
            total += 2 * (n + 4 * (n // 256))
        else:
            total += 2 * n * p.element_size()
        total += 4
    return total


@dataclass
class MetaRun:
    """A teacher's networks built once on the meta device in a run's dtype, quantization and adapters (each network
    cut to one block per kind, or whole), shared by every size a plan tries."""
    pipe: object
    class_name: str
    roles: Roles
    layouts: dict[str, Layout]  # network name -> its block stacks

    def total(self, count: Callable[[nn.Module], int]) -> int:
        """``count`` (a function of a module that adds up over submodules) over every network at full depth."""
        return sum(layout.total(count) for layout in self.layouts.values())

    sizes: dict = field(default_factory=dict)

    def at_size(self, settings: PlanSettings):
        """(family adapter at the settings' size, the roles on it): the same networks, so nothing is rebuilt."""
        size = (settings.height, settings.width, settings.num_frames)
        if size not in self.sizes:
            teacher = family_adapter(self.pipe, self.class_name, settings.teacher, *size)
            roles = copy.copy(self.roles)
            roles.teacher = teacher
            self.sizes[size] = teacher, roles
        return self.sizes[size]


def _numbered(lora: LoraSpec) -> bool:
    """Whether LoRA targets name single blocks ("blocks.3.attn1.to_q"): then no two blocks are alike."""
    return any(part.isdigit() for name in lora.target_modules for part in name.split("."))


_COMPONENTS: dict = {}


def _shared_components(settings: PlanSettings, cut: bool) -> tuple[str, dict, dict[str, Layout]]:
    """(pipeline class name, its components with the text encoders and VAE cast to the run's dtype, the layouts
    of its networks as built, cut when asked): built once per teacher and dtype. Builds share the encoders and the
    VAE (only counted, never changed) and copy the networks, which each build casts, quantizes and adapts."""
    key = (settings.teacher, settings.dtype, cut)
    if key not in _COMPONENTS:
        class_name, components = pipeline_components(settings.teacher)
        dtype = parse_dtype(settings.dtype)
        for name, module in components.items():
            if name not in TRANSFORMERS and isinstance(module, (ModelMixin, PreTrainedModel)):
                cast_like_from_pretrained(module, dtype)
        layouts = {name: Layout(components[name]) for name in TRANSFORMERS if components.get(name) is not None}
        if cut:
            for layout in layouts.values():
                layout.cut()
        _COMPONENTS[key] = class_name, components, layouts
    return _COMPONENTS[key]


def build_meta_run(settings: PlanSettings, cut: bool = True) -> MetaRun:
    """The meta networks with the base cast and quantized as configured and K experts plus the fake adapter;
    ``cut``: each network's block stacks cut to one block per kind first (pdmd.plan.stacks), so casting,
    quantizing and injecting LoRA touch a few blocks."""
    from pdmd.teachers.quantize import quantize_networks

    class_name, components, layouts = _shared_components(settings, cut and not _numbered(settings.lora))
    layouts = copy.deepcopy(layouts)  # this build's own networks
    pipe = assemble(class_name, {**components, **{name: layout.network for name, layout in layouts.items()}})
    teacher = family_adapter(pipe, class_name, settings.teacher, settings.height, settings.width,
                             settings.num_frames)
    dtype = parse_dtype(settings.dtype)
    for layout in layouts.values():
        for module in layout.network.modules():
            if isinstance(module, ModelMixin):
                cast_like_from_pretrained(module, dtype)
    with MetaReplay():  # torchao computes every weight's scales, on the meta device a Python kernel per operator
        quantize_networks(teacher, settings.quantize)
    roles = Roles(teacher, [phase_adapter(k) for k in range(settings.schedule.num_phases)] + [FAKE], settings.lora)
    teacher.model.to("meta")  # PEFT leaves adapters of a meta layer on the CPU
    return MetaRun(pipe, class_name, roles, layouts)


def cast_like_from_pretrained(module: nn.Module, dtype: torch.dtype) -> None:
    """``module`` in ``dtype`` except the submodules its class keeps in float32, as ``from_pretrained(dtype=)``
    loads it."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if isinstance(module, PreTrainedModel):  # transformers keeps these for fp16 only, the "strict" ones always
        keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ()) | (
            keep if dtype == torch.float16 else set())
    for param in module.parameters(recurse=True):
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    if dtype != torch.float32:
        for name, sub in module.named_modules():
            if any(part in keep for part in name.split(".")):
                for param in sub.parameters():
                    param.data = param.data.float()


_RUNS: dict = {}


def meta_run(settings: PlanSettings, cut: bool) -> MetaRun:
    """``build_meta_run``, cached over what does not change the networks (size, batch, checkpointing, ...)."""
    key = (settings.teacher, settings.dtype, settings.quantize, settings.lora, settings.schedule.num_phases, cut)
    if key not in _RUNS:
        _RUNS[key] = build_meta_run(settings, cut)
    return _RUNS[key]


def _adapter_parameters(module: nn.Module, *names: str) -> list[nn.Parameter]:
    """The LoRA parameters of adapters ``names`` within ``module`` (as Roles.parameters_of names them)."""
    return [p for n, p in module.named_parameters() if "lora_" in n and any(f".{name}." in n for name in names)]


def weight_rows(settings: PlanSettings, fast: bool = True) -> tuple[list[Component], dict]:
    """What stays resident: networks, encoders, VAE, prompt embeddings, adapters, optimizer states; and the facts
    behind them (latent shape, parameter counts), summed over the full depth of each network."""
    run = meta_run(settings, cut=fast)
    teacher, roles = run.at_size(settings)
    on_gpu = settings.device == "cuda"
    rows = []
    for name, layout in run.layouts.items():
        note = settings.quantize if settings.quantize != "none" else settings.dtype
        if settings.quantize == "nf4":
            share = layout.total(nf4_bytes)
        else:
            share = layout.total(lambda module: sharded_bytes(module, settings.processes))
        if settings.processes > 1:
            note += f", rank 0's 1/{settings.processes} (FSDP2)"
        rows.append(Component(name, share, "both", note))
    if settings.processes > 1:  # FSDP2 gathers one block at a time and prefetches the next
        largest = max((module_bytes(block) for blocks in teacher.model.modules() if isinstance(blocks, nn.ModuleList)
                       for block in blocks), default=0)
        rows.append(Component("FSDP all-gather buffers", 2 * largest, "both", "two unsharded blocks"))
    encoders = [(f"text encoder {index + 1}", encoder) for index, encoder in enumerate(teacher.text_encoders)]
    if getattr(teacher, "image_encoder", None) is not None:  # Wan 2.1 I2V's CLIP tower, placed and released alike
        encoders.append(("image encoder", teacher.image_encoder))
    for label, encoder in encoders:
        note = "offloaded: on the GPU only while encoding" if settings.offload else (
            "released after the prompt embeddings" if on_gpu else "kept (CPU run)")
        when = "inference" if (on_gpu or settings.offload) else "both"
        rows.append(Component(f"{label} ({type(encoder).__name__})", module_bytes(encoder), when, note))
    offloaded = settings.offload and on_gpu
    rows.append(Component("VAE", module_bytes(teacher.pipe.vae), "inference" if offloaded else "both",
                          "offloaded: on the GPU only while decoding" if offloaded else settings.dtype))
    prompts = settings.prompts or len(teacher.default_prompts)
    cond, uncond = prompt_conditioning(teacher, prompts)
    rows.append(Component("prompt embeddings", _conditioning_bytes(cond) + _conditioning_bytes(uncond), "training",
                          f"{prompts} prompts"))
    adapters = lambda module: sum(tensor_bytes(p) for p in _adapter_parameters(module, *roles.adapters))  # noqa: E731
    rows.append(Component("LoRA experts + fake adapter", run.total(adapters), "training",
                          f"{len(roles.adapters)} adapters, rank {roles.lora.rank}"))
    trainable = lambda module: optimizer_bytes(_adapter_parameters(module, phase_adapter(0), FAKE),  # noqa: E731
                                               settings.optimizer)
    rows.append(Component("optimizer states", run.total(trainable), "training",
                          f"{settings.optimizer}, generator + fake"))
    facts = {"latent_shape": list(teacher.latent_shape), "height": teacher.height, "width": teacher.width,
             "num_frames": getattr(teacher, "num_frames", None),
             "base_parameters": run.total(lambda m: sum(t.numel() for t in base_tensors(m)
                                                        if isinstance(t, nn.Parameter))),
             "adapter_parameters": run.total(lambda m: sum(p.numel() for p in _adapter_parameters(m, *roles.adapters)))}
    return rows, facts


def distinct_phases(schedule: PhaseSchedule) -> list[int]:
    """One phase per number of steps. Phases with as many steps hold the same memory: a phase's update differs
    from phase 1's only by the earlier phases' steps run without gradients first, and each of those holds no more
    than the no-gradient fake-score forward of the generator update, which every phase runs with more alive."""
    first: dict[int, int] = {}
    for phase, steps in enumerate(schedule.steps):
        first.setdefault(steps, phase)
    return list(first.values())


_ACTIVATIONS: dict = {}


def _trace_once(key, compute: Callable[[], list[Component]]) -> list[Component]:
    if key not in _ACTIVATIONS:
        _ACTIVATIONS[key] = compute()
    return _ACTIVATIONS[key]


def _full_depth(teacher, run: MetaRun, fast: bool):
    """A context in which ``teacher`` (through its first network only) runs at full depth: the cut network's
    stacks filled with replaying blocks (pdmd.plan.replay), or the whole network as it is."""
    _one_network_velocity(teacher)
    if not fast:
        return nullcontext()
    return run.layouts[teacher.network_names[0] if teacher.network_names else "transformer"].replayed()


def training_activation_rows(settings: PlanSettings, fast: bool = True) -> list[Component]:
    """The traced activations of a fake update and of a generator update, each its worst phase's (cached: offload,
    FSDP, the optimizer and the prompt list do not change them)."""
    key = ("training", replace(settings, offload=False, processes=1, optimizer="adamw", device="cuda", prompts=0),
           fast)

    def compute() -> list[Component]:
        run = meta_run(settings, cut=fast)
        teacher, roles = run.at_size(settings)
        phases = distinct_phases(settings.schedule) if fast else range(settings.schedule.num_phases)
        with meta_attention(), _full_depth(teacher, run, fast):
            traced = [trace_step(teacher, roles, settings, k) for k in phases]
        worst = {name: max(peaks[name] for peaks in traced) for name in TRAINING_TRACES}
        mode = {True: "checkpointing", "rollout": "checkpointed rollout", False: "no checkpointing"}[
            settings.gradient_checkpointing]
        how = ", blocks replayed" if fast else ""
        return [Component(f"activations: {name}", worst[name], "training peak",
                          f"batch {settings.batch_size}, {mode}{how}") for name in TRAINING_TRACES]
    return _trace_once(key, compute)


def inference_activation_rows(settings: PlanSettings, fast: bool = True) -> list[Component]:
    """The traced activations of a guided teacher step and of the VAE decode (cached over the training-only
    settings)."""
    key = ("inference", replace(settings, gradient_checkpointing=False, offload=False, processes=1,
                                optimizer="adamw", device="cuda", prompts=0), fast)

    def compute() -> list[Component]:
        run = meta_run(settings, cut=fast)
        teacher, _ = run.at_size(settings)
        with meta_attention(), _full_depth(teacher, run, fast):
            traced = {**trace_sampling_step(teacher, settings), "VAE decode": trace_decode(teacher, settings)}
        how = ", blocks replayed" if fast else ""
        return [Component("activations: sampling step", traced["sampling step"], "inference peak",
                          f"batch {settings.batch_size}{how}"),
                Component("activations: VAE decode", traced["VAE decode"], "inference peak",
                          f"batch {settings.batch_size}")]
    return _trace_once(key, compute)


def activation_rows(settings: PlanSettings, fast: bool = True) -> list[Component]:
    return training_activation_rows(settings, fast) + inference_activation_rows(settings, fast)


def components(settings: PlanSettings, fast: bool = True) -> tuple[list[Component], dict]:
    rows, facts = weight_rows(settings, fast)
    return rows + activation_rows(settings, fast), facts


def fit_peak(settings: PlanSettings, fast: bool = True) -> int:
    """The peak a memory budget is held to (``peaks(...)["peak"]``): it needs no inference trace."""
    rows, _ = weight_rows(settings, fast)
    return peaks(rows + training_activation_rows(settings, fast))["peak"]


def peaks(rows: list[Component]) -> dict[str, int]:
    """Training peak: what stays resident plus the larger update's activations; inference: the base, encoders and
    VAE plus the larger of a sampling step and the decode."""
    resident = sum(r.bytes for r in rows if r.when in ("both", "training"))
    training = resident + max((r.bytes for r in rows if r.when == "training peak"), default=0)
    loading = sum(r.bytes for r in rows if r.when in ("both", "inference"))
    inference = loading + max((r.bytes for r in rows if r.when == "inference peak"), default=0)
    return {"training": training, "inference": inference, "peak": max(training, loading)}
