"""The memory of a distillation run, predicted from the teacher's architecture on the meta device.

Weights, adapters and optimizer states are counted on the meta-built networks (with the run's dtype, quantization
and LoRA applied by the same libraries the trainer uses, so the counts are exact); the activations of the
generator rollout and of a fake update are traced on the meta device by running the trainer's own step functions
(pdmd.core.distill) under ``LivePeak``, at the run's batch, resolution, frames and checkpointing mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from diffusers import ModelMixin
from torch import nn
from transformers import PreTrainedModel

from pdmd.core import distill
from pdmd.core.schedule import PhaseSchedule
from pdmd.plan.architectures import meta_teacher
from pdmd.plan.stacks import extrapolated
from pdmd.plan.trace import LivePeak, meta_attention
from pdmd.students.manifest import LoraSpec
from pdmd.students.roles import FAKE, Roles, phase_adapter
from pdmd.teachers.diffusers_base import parse_dtype
from pdmd.teachers.quantize import nf4_bytes


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
        read = lambda name, default: getattr(config, name, default)  # noqa: E731
        device = "cuda" if torch.cuda.is_available() else "cpu"
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


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor; a quantized tensor subclass (torchao) by its inner tensors."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


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
    elif teacher.family == "sd3":  # 77 CLIP tokens followed by the T5 ones
        cond = {"prompt_embeds": embeds(77 + length, config.joint_attention_dim),
                "pooled_projections": torch.zeros(batch, config.pooled_projection_dim, dtype=dtype, device=device)}
    elif teacher.family == "flux":
        cond = {"prompt_embeds": embeds(length, config.joint_attention_dim),
                "pooled_projections": torch.zeros(batch, config.pooled_projection_dim, dtype=dtype, device=device)}
    else:  # qwen-image: at most prompt_length tokens (the pipeline trims to the longest prompt)
        cond = {"prompt_embeds": embeds(length, config.joint_attention_dim),
                "prompt_embeds_mask": torch.ones(batch, length, dtype=torch.long, device=device)}
    return cond, (None if teacher.guidance_embedded else dict(cond))


def _conditioning_bytes(cond) -> int:
    return sum(tensor_bytes(t) for t in (cond or {}).values())


def _one_network_velocity(teacher):
    """A two-network teacher (Wan 2.2) runs one network per sample; both have the same architecture, so the
    activations are traced through the first (its dispatch reads tensor values, which meta tensors lack)."""
    if teacher.network_names:
        network = teacher.model[teacher.network_names[0]]
        teacher.velocity = lambda x, t, cond: teacher._run(network, x, teacher.timesteps(t, x) * 1000, cond)


TRAINING_TRACES = ("fake update", "generator update")
INFERENCE_TRACES = ("sampling step", "VAE decode")


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
        _drop_gradients(roles)
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
        _drop_gradients(roles)
    peaks["generator update"] = live.peak
    teacher.enable_gradient_checkpointing(False)
    return peaks


def _drop_gradients(roles: Roles) -> None:
    for param in roles.parameters_of(*roles.adapters):
        param.grad = None


def trace_inference(teacher, settings: PlanSettings) -> dict[str, int]:
    """Peak bytes of one guided teacher step and of the VAE decode of a batch, without gradients."""
    cond, uncond = prompt_conditioning(teacher, settings.batch_size)
    x = torch.zeros(settings.batch_size, *teacher.latent_shape, device="meta")
    t = torch.full((settings.batch_size,), 0.5, device="meta")
    from pdmd.core.sampling import guided_velocity
    with torch.no_grad(), LivePeak() as step:
        guided_velocity(teacher.with_guidance(teacher.velocity, teacher.default_cfg), x, t, cond, uncond,
                        teacher.default_cfg, teacher.combine_guidance)
    with torch.no_grad(), LivePeak() as decode:
        teacher.decode(x)
    return {"sampling step": step.peak, "VAE decode": decode.peak}


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


def build_meta_run(settings: PlanSettings):
    """(meta teacher with its base quantized as configured, Roles with K experts and the fake adapter)."""
    from pdmd.teachers.quantize import quantize_networks

    teacher = meta_teacher(settings.teacher, settings.height, settings.width, settings.num_frames)
    dtype = parse_dtype(settings.dtype)
    for module in (*teacher.model.modules(), *teacher.text_encoders, teacher.pipe.vae):
        if isinstance(module, (ModelMixin, PreTrainedModel)):
            cast_like_from_pretrained(module, dtype)
    quantize_networks(teacher, settings.quantize)
    roles = Roles(teacher, [phase_adapter(k) for k in range(settings.schedule.num_phases)] + [FAKE], settings.lora)
    teacher.model.to("meta")  # PEFT leaves adapters of a meta layer on the CPU
    return teacher, roles


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


def weight_rows(settings: PlanSettings) -> tuple[list[Component], dict]:
    """What stays resident: networks, encoders, VAE, prompt embeddings, adapters, optimizer states; and the facts
    behind them (latent shape, parameter counts). The meta run is cached over the settings that do not change
    the networks (only read here; the activation trace builds its own)."""
    key = replace(settings, batch_size=1, gradient_checkpointing=False, offload=False, processes=1,
                  optimizer="adamw", device="cuda", prompts=0)
    if key not in _RUNS:
        _RUNS[key] = build_meta_run(settings)
    teacher, roles = _RUNS[key]
    on_gpu = settings.device == "cuda"
    adapters = roles.parameters_of(*roles.adapters)
    rows = []
    networks = dict(teacher.model.items()) if teacher.network_names else {"transformer": teacher.model}
    for name, network in networks.items():
        note = settings.quantize if settings.quantize != "none" else settings.dtype
        share = nf4_bytes(network) if settings.quantize == "nf4" else sharded_bytes(network, settings.processes)
        if settings.processes > 1:
            note += f", rank 0's 1/{settings.processes} (FSDP2)"
        rows.append(Component(name, share, "both", note))
    if settings.processes > 1:  # FSDP2 gathers one block at a time and prefetches the next
        largest = max((module_bytes(block) for blocks in teacher.model.modules() if isinstance(blocks, nn.ModuleList)
                       for block in blocks), default=0)
        rows.append(Component("FSDP all-gather buffers", 2 * largest, "both", "two unsharded blocks"))
    for index, encoder in enumerate(teacher.text_encoders):
        note = "offloaded: on the GPU only while encoding" if settings.offload else (
            "released after the prompt embeddings" if on_gpu else "kept (CPU run)")
        when = "inference" if (on_gpu or settings.offload) else "both"
        rows.append(Component(f"text encoder {index + 1} ({type(encoder).__name__})", module_bytes(encoder), when,
                              note))
    offloaded = settings.offload and on_gpu
    rows.append(Component("VAE", module_bytes(teacher.pipe.vae), "inference" if offloaded else "both",
                          "offloaded: on the GPU only while decoding" if offloaded else settings.dtype))
    prompts = settings.prompts or len(teacher.default_prompts)
    cond, uncond = prompt_conditioning(teacher, prompts)
    rows.append(Component("prompt embeddings", _conditioning_bytes(cond) + _conditioning_bytes(uncond), "training",
                          f"{prompts} prompts"))
    rows.append(Component("LoRA experts + fake adapter", sum(tensor_bytes(p) for p in adapters), "training",
                          f"{len(roles.adapters)} adapters, rank {roles.lora.rank}"))
    trainable = roles.parameters_of(phase_adapter(0)) + roles.parameters_of(FAKE)
    rows.append(Component("optimizer states", optimizer_bytes(trainable, settings.optimizer), "training",
                          f"{settings.optimizer}, generator + fake"))
    facts = {"latent_shape": list(teacher.latent_shape), "height": teacher.height, "width": teacher.width,
             "num_frames": getattr(teacher, "num_frames", None),
             "base_parameters": sum(t.numel() for t in base_tensors(teacher.model) if isinstance(t, nn.Parameter)),
             "adapter_parameters": sum(p.numel() for p in adapters)}
    return rows, facts


_ACTIVATIONS: dict = {}


def activation_rows(settings: PlanSettings, fast: bool = False) -> list[Component]:
    """The traced activations (cached: offload, FSDP and the optimizer do not change them). ``fast``: trace each
    block stack at one and two blocks and extrapolate to its length (pdmd.plan.stacks)."""
    key = (replace(settings, offload=False, processes=1, optimizer="adamw", device="cuda"), fast)
    if key not in _ACTIVATIONS:
        teacher, roles = build_meta_run(settings)
        _one_network_velocity(teacher)
        phases = range(settings.schedule.num_phases)

        def trace() -> dict[str, int]:
            worst = max((trace_step(teacher, roles, settings, k) for k in phases),
                        key=lambda peaks: max(peaks.values()))
            return {**worst, **trace_inference(teacher, settings)}

        network = teacher.model[teacher.network_names[0]] if teacher.network_names else teacher.model
        with meta_attention():
            traced = extrapolated(network, trace) if fast else trace()
        mode = {True: "checkpointing", "rollout": "checkpointed rollout", False: "no checkpointing"}[
            settings.gradient_checkpointing]
        how = ", extrapolated from 1-2 blocks" if fast else ""
        rows = [Component(f"activations: {name}", traced[name], "training peak",
                          f"batch {settings.batch_size}, {mode}{how}") for name in TRAINING_TRACES]
        rows += [Component(f"activations: {name}", traced[name], "inference peak", f"batch {settings.batch_size}{how}")
                 for name in INFERENCE_TRACES]
        _ACTIVATIONS[key] = rows
    return _ACTIVATIONS[key]


def components(settings: PlanSettings, fast: bool = False) -> tuple[list[Component], dict]:
    rows, facts = weight_rows(settings)
    return rows + activation_rows(settings, fast), facts


def peaks(rows: list[Component]) -> dict[str, int]:
    """Training peak: what stays resident plus the larger update's activations; inference: the base, encoders and
    VAE plus the larger of a sampling step and the decode."""
    resident = sum(r.bytes for r in rows if r.when in ("both", "training"))
    training = resident + max((r.bytes for r in rows if r.when == "training peak"), default=0)
    loading = sum(r.bytes for r in rows if r.when in ("both", "inference"))
    inference = loading + max((r.bytes for r in rows if r.when == "inference peak"), default=0)
    return {"training": training, "inference": inference, "peak": max(training, loading)}


def with_settings(settings: PlanSettings, **changes) -> PlanSettings:
    return replace(settings, **changes)
