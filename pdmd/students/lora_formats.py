"""Published LoRA files in and our students out, in the key layouts people actually share.

In: a LoRA file in the diffusers/PEFT layout (``transformer.<module>.lora_A.weight``), the ComfyUI /
original-checkpoint layout (``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` + ``.alpha``, or with
``lora_A``/``lora_B`` as the Wan2.2-Lightning files have, or with a bias delta ``diff_b`` per module and zero
norm-weight deltas ``norm_k_img.diff`` as the Wan 2.1 I2V Lightx2v files have: the biases become PEFT's lora_bias,
a student's ``lora.bias``) or the kohya layout (``lora_unet_...``) is converted by
the diffusers LoRA loader of the teacher's family (``<Family>LoraLoaderMixin.lora_state_dict``, the classmethod
every diffusers pipeline uses, which runs the right converter) into module-relative PEFT keys with the
``alpha / rank`` scale folded in. Every key either lands on a module of the teacher or is reported: nothing is
silently dropped.

Out: a student's per-phase LoRAs as single files in the diffusers layout (``pipe.load_lora_weights``) or in a
layout ComfyUI's LoRA loader reads (comfy/lora.py ``model_lora_keys_unet``): Wan under its original module names
``diffusion_model.blocks.N.self_attn.q.lora_down.weight``, Qwen-Image as ``diffusion_model.<module>.lora_down``
(ComfyUI's Qwen-Image keeps the diffusers module names), Qwen-Image 2.1 as ``<module>.lora_down`` unprefixed (what
ComfyUI's QwenImage branch maps for every module, gate_layer / proj onto the halves of its checkpoint's fused
``img_mlp.gate_up``, which ``diffusion_model.`` names would miss; a LoRA on gate_up imports split back),
FLUX and SD3 as ``transformer.<module>.lora_A`` which
ComfyUI maps itself (``flux_to_diffusers`` / ``mmdit_to_diffusers``), Z-Image as ``diffusion_model.<diffusers
module>.lora_down`` which ComfyUI's Lumina2 branch maps (``z_image_to_diffusers``: to_q/to_k/to_v onto rows of
its fused qkv; the same keys ai-toolkit's published Z-Image LoRAs use, with lora_A/lora_B), FLUX.2 under its
original module names ``diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`` (q, k, v fused exactly;
pdmd/students/lora_flux2.py), HunyuanVideo 1.5 under ComfyUI's names for its HunyuanVideo model
``diffusion_model.double_blocks.N.img_attn.qkv.lora_down.weight`` (q, k, v fused exactly; diffusers has no converter
for this family, so pdmd/students/lora_hunyuan_video15.py reads its layouts too). Scales are folded into
``lora_up``/``lora_B``
so no ``.alpha`` is needed: every reader then applies the LoRA at scale 1.

A *published student* is an ordinary student folder (manifest.json + phase_k/pytorch_lora_weights.safetensors)
made from such files: phase k gets file k, times its strength.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pdmd.core.sampling import phase_sigmas
from pdmd.core.schedule import PhaseSchedule
from pdmd.limits import MAX_STRENGTH
from pdmd.students import StudentError, lora_flux2, lora_hunyuan_video15
from pdmd.students.folder import (
    LORA_METADATA_KEY,
    LORA_WEIGHT_NAME,
    networks_of_phase,
    schedule_metadata,
    teacher_fields,
)
from pdmd.students.manifest import MANIFEST, PICKLE_SUFFIXES, PUBLISHED, LoraSpec, Manifest
from pdmd.students.roles import phase_adapter
from pdmd.teachers.base import Teacher

# family -> the diffusers LoRA loader mixin its pipeline inherits (and whose lora_state_dict converts)
LOADERS = {"sd3": "SD3LoraLoaderMixin", "flux": "FluxLoraLoaderMixin", "wan": "WanLoraLoaderMixin",
           "qwen-image": "QwenImageLoraLoaderMixin",
           "qwen-image21": "QwenImageLoraLoaderMixin",  # QwenImage21Pipeline inherits Qwen-Image's loader
           "z-image": "ZImageLoraLoaderMixin",
           "flux2": "Flux2LoraLoaderMixin",
           "hunyuan-video-1.5": None}  # no diffusers LoRA loader nor converter: pdmd/students/lora_hunyuan_video15.py
FAMILIES = tuple(LOADERS)
EXPORT_LAYOUTS = ("diffusers", "comfyui")
TRANSFORMER_PREFIX = "transformer"
SHOWN_KEYS = 8

# Wan: diffusers module name -> original checkpoint name (what ComfyUI's Wan model and the published
# Wan LoRAs use); the inverse of diffusers' _convert_non_diffusers_wan_lora_to_diffusers
WAN_BLOCK_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                   "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                   "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
                   "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
                   "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
WAN_TOP_NAMES = {"condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
                 "condition_embedder.text_embedder.linear_1": "text_embedding.0",
                 "condition_embedder.text_embedder.linear_2": "text_embedding.2",
                 "condition_embedder.time_embedder.linear_1": "time_embedding.0",
                 "condition_embedder.time_embedder.linear_2": "time_embedding.2",
                 "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
                 "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3"}
# Z-Image: the diffusers module names ComfyUI's LoRA loader maps for its Lumina2/Z-Image models
# (comfy/lora.py, the Lumina2 branch, keys from comfy/utils.py z_image_to_diffusers)
Z_IMAGE_COMFYUI_BLOCKS = re.compile(r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.to_(q|k|v|out\.0)|"
                                    r"feed_forward\.w[123]|adaLN_modulation\.0)")
Z_IMAGE_COMFYUI_TOP = {"all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "all_x_embedder.2-1",
                       "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"}
# Qwen-Image 2.1: the diffusers module names ComfyUI's LoRA loader maps for its QwenImage21 model (comfy/lora.py,
# the QwenImage branch: each weight's own name, and gate_layer / proj onto the halves of the gate_up its checkpoint
# fuses them into)
QWEN_IMAGE21_COMFYUI_BLOCKS = re.compile(
    r"transformer_blocks\.\d+\.(attn\.to_(q|k|v|out\.0)|img_mlp\.(gate_layer|proj|out))")
QWEN_IMAGE21_COMFYUI_TOP = {"img_in", "txt_in.in_layer", "txt_in.out_layer", "modulation.1", "norm_out.linear",
                            "proj_out", "time_text_embed.timestep_embedder.linear_1",
                            "time_text_embed.timestep_embedder.linear_2"}
QWEN_IMAGE21_FUSED_MLP = ".img_mlp.gate_up"  # ComfyUI's fused [gate_layer; proj] rows, as a LoRA trained on it names it
# a two-network teacher's files are named by network, as the published Wan2.2-Lightning files are: the key
# names alone cannot tell a ComfyUI user which model a file belongs to
NETWORK_FILE_NAMES = {"transformer": "high_noise", "transformer_2": "low_noise"}
KOHYA_PARTS = {"lora_A": "lora_down", "lora_B": "lora_up"}
PAIR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
BIAS = re.compile(r"^(?P<module>.+)\.lora_B\.bias$")  # PEFT's lora_bias: a module's bias delta (Wan ``diff_b``)
# Wan LoRAs carry per-module bias deltas (``diff_b``, which diffusers' converter makes lora_B biases) and norm
# weight deltas (``norm_q.diff``...: all zeros in the published Lightx2v files; diffusers drops them)
BIAS_FAMILIES = {"wan"}


class LoraFormatError(StudentError):
    """A LoRA file that cannot be converted or does not fit the teacher; the message lists the keys."""


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def family_of(pipeline_class: str) -> str:
    """Our family id for a diffusers pipeline class name (``WanPipeline`` -> ``wan``)."""
    for prefix, family in (("StableDiffusion3", "sd3"), ("Flux2", "flux2"), ("Flux", "flux"), ("Wan", "wan"),
                           # QwenImage21Pipeline starts with "QwenImage" too: it has to be tried first
                           ("QwenImage21", "qwen-image21"), ("QwenImage", "qwen-image"), ("ZImage", "z-image"),
                           ("HunyuanVideo15", "hunyuan-video-1.5")):
        if pipeline_class.startswith(prefix) and not pipeline_class.startswith("Flux3"):
            return family
    raise LoraFormatError(f"no LoRA converter for pipeline {pipeline_class!r}; supported families: "
                          f"{', '.join(FAMILIES)}")


def _check_family(family: str) -> str:
    if family not in LOADERS:
        raise LoraFormatError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")
    return family


# --- reading -----------------------------------------------------------------------------------------------
def read_lora(path: str | Path) -> dict[str, Tensor]:
    """A LoRA file's tensors; only .safetensors is ever opened (pickles can run code)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(f"{path.name} refused: pickle files are never loaded; use .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path.name} is not a .safetensors file")
    if not path.is_file():
        raise LoraFormatError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise LoraFormatError(f"{path.name} is not a readable safetensors file ({err})") from None


def read_adapter_config(path: str | Path) -> dict:
    """The transformer's PEFT LoraConfig that diffusers' ``save_lora_weights`` records in a file's metadata
    (``lora_adapter_metadata``: ``transformer.r``, ``transformer.lora_alpha`` and their per-module patterns), which
    diffusers' loader applies instead of reading the scale off the keys; {} when the file records none."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        packed = json.loads(metadata.get(LORA_METADATA_KEY, "{}"))
    except ValueError:
        raise LoraFormatError(f"{Path(path).name}: its {LORA_METADATA_KEY} metadata is not JSON") from None
    prefix = f"{TRANSFORMER_PREFIX}."
    return {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)} if isinstance(packed, dict) \
        else {}


def detect_layout(state: dict[str, Tensor]) -> str:
    """``kohya`` (lora_unet_...), ``comfyui`` (original names: diffusion_model. prefix or lora_down/lora_up) or
    ``diffusers`` (lora_A/lora_B on diffusers module names)."""
    keys = list(state)
    if not keys:
        raise LoraFormatError("the LoRA file holds no tensors")
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") or ".lora_down." in k for k in keys):
        return "comfyui"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    raise LoraFormatError(f"no LoRA weights found (no lora_A/lora_B/lora_down/lora_up keys): {_listing(keys)}")


# --- import ------------------------------------------------------------------------------------------------
def _unsupported(state: dict[str, Tensor], family: str) -> list[str]:
    """Keys diffusers' converters would drop with only a log line: full-weight diffs, DoRA scales, and bias terms
    outside the families whose LoRAs carry them (BIAS_FAMILIES)."""
    biases = () if family in BIAS_FAMILIES else (".diff_b", ".lora_B.bias")
    return [k for k in state if k.endswith((".diff", ".dora_scale", *biases)) or ".lora_magnitude_vector" in k]


def _without_zero_norm_diffs(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` less its norm-weight deltas (``...norm_k_img.diff``) when every one is zero, as in the published
    Wan Lightx2v files, so dropping them changes nothing; a non-zero one stays, to be refused."""
    norms = [k for k in state if k.endswith(".diff") and "norm" in k.rpartition(".")[0].rpartition(".")[2]]
    if not norms or any(state[k].any() for k in norms):
        return state
    return {k: v for k, v in state.items() if k not in norms}


def module_of(key: str) -> str | None:
    """The module a PEFT key belongs to (its lora_A / lora_B weight or lora_B bias), or None."""
    match = PAIR.match(key) or BIAS.match(key)
    return match["module"] if match else None


def _fold_leftover_alphas(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers-named files may still carry kohya suffixes or ``.alpha`` (FLUX's converter hands alphas back
    separately; SD3's has no converter): rename to lora_A/lora_B and fold alpha / rank into lora_B."""
    renamed = {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v
               for k, v in state.items()}
    alphas = {k[: -len(".alpha")]: v for k, v in renamed.items() if k.endswith(".alpha")}
    out = {k: v for k, v in renamed.items() if not k.endswith(".alpha")}
    for module, alpha in alphas.items():
        down, up = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if down not in out or up not in out:
            raise LoraFormatError(f"{module}.alpha has no lora_A/lora_B pair beside it")
        out[up] = out[up] * (float(alpha) / out[down].shape[0])
    return out


def _fold_adapter_config(state: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Fold the scale PEFT gives each module under ``config`` (read_adapter_config) into its lora_B: lora_alpha / r,
    or lora_alpha / sqrt(r) with rsLoRA, a module's own values from rank_pattern / alpha_pattern (a pattern names a
    module or a dotted tail of its name, as PEFT matches them)."""
    if "r" not in config and "lora_alpha" not in config:
        return state

    def value(pattern: str, module: str, default):
        for key, own in (config.get(pattern) or {}).items():
            if module == key or module.endswith(f".{key}"):
                return own
        return default
    out = dict(state)
    for module in {match["module"] for match in map(PAIR.match, state) if match}:
        rank = value("rank_pattern", module, config.get("r"))
        alpha = value("alpha_pattern", module, config.get("lora_alpha"))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in (rank, alpha)):
            raise LoraFormatError(f"{LORA_METADATA_KEY} gives {module} rank {rank!r} and alpha {alpha!r}: not two "
                                  "positive numbers")
        for key in (f"{module}.lora_B.weight", f"{module}.lora_B.bias"):  # PEFT scales lora_B's bias alike
            if key in out:
                out[key] = out[key] * (alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
    return out


def to_peft(state: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """Any supported layout -> ``{<module>.lora_A.weight, <module>.lora_B.weight}`` relative to the
    transformer, scale folded in (load at alpha = rank). Text-encoder parts and keys diffusers would drop are
    errors, listed."""
    from diffusers import loaders

    layout = detect_layout(state)
    if family in BIAS_FAMILIES:
        state = _without_zero_norm_diffs(state)
    if family == "wan" and layout == "comfyui":  # its converter takes an alpha on the blocks' modules only
        state = _fold_leftover_alphas(state)
    unsupported = _unsupported(state, family)
    if unsupported:
        raise LoraFormatError(f"unsupported LoRA keys (full-weight diffs, DoRA or bias terms): {_listing(unsupported)}")
    if layout == "kohya":
        stray = [k for k in state if not k.startswith(("lora_unet_", "lora_te"))]
        if stray:  # the kohya converters keep lora_unet_/lora_te keys only and drop the rest unreported
            raise LoraFormatError(f"LoRA keys match no module of the teacher: {_listing(stray)}")
    if _check_family(family) == "sd3" and layout != "diffusers":
        raise LoraFormatError(f"diffusers has no converter for SD3 LoRAs in the {layout} layout; "
                              "use a diffusers-layout file (transformer.<module>.lora_A.weight)")
    if family == "flux2":  # diffusers' FLUX.2 converter takes no .alpha nor lora_down beside original names
        try:
            state = lora_flux2.normalised_original(state)
        except lora_flux2.Flux2KeyError as err:
            raise LoraFormatError(str(err)) from None
    if family == "hunyuan-video-1.5":  # diffusers has no converter: every layout is read by lora_hunyuan_video15
        try:
            return lora_hunyuan_video15.to_peft(state)
        except lora_hunyuan_video15.HunyuanVideo15KeyError as err:
            raise LoraFormatError(str(err)) from None
    loader = getattr(loaders, LOADERS[family])
    work = dict(state)
    try:
        converted = loader.lora_state_dict(work, **({"return_alphas": True} if family == "flux" else {}))
    except (ValueError, KeyError, IndexError, NotImplementedError, AttributeError) as err:
        raise LoraFormatError(f"diffusers' {family} LoRA converter cannot read this {layout}-layout file: "
                              f"{str(err)[:400]}") from None
    if family == "flux2" and layout == "kohya" and len(work) < len(state) and work:
        # the FLUX.2 kohya converter pops the keys it maps from the dict it is given and only logs the others
        raise LoraFormatError(f"LoRA keys match no module of the teacher: {_listing(work)}")
    if family == "flux":
        converted, alphas = converted
        converted = {**converted, **(alphas or {})}
    converted = _fold_leftover_alphas(converted)
    prefix = f"{TRANSFORMER_PREFIX}."
    outside = [k for k in converted if not k.startswith(prefix) and k.startswith(("text_encoder", "unet."))]
    if outside:
        raise LoraFormatError(f"only the transformer's LoRA is loaded; these keys are for other parts: "
                              f"{_listing(outside)}")
    converted = {k.removeprefix(prefix): v for k, v in converted.items()}
    return split_fused_mlp(converted) if family == "qwen-image21" else converted


def check_fits(state: dict[str, Tensor], model: nn.Module) -> None:
    """Every key names a Linear of ``model`` with a matching shape, or a LoraFormatError lists the misfits."""
    modules = dict(model.named_modules())
    unmatched, misshapen = [], []
    for key, value in state.items():
        match = PAIR.match(key) or BIAS.match(key)
        module = modules.get(match["module"]) if match else None
        module = getattr(module, "base_layer", module)  # already wrapped by PEFT
        part = match.groupdict().get("part", "lora_B") if match else None  # a bias is lora_B's
        if not isinstance(module, nn.Linear):
            unmatched.append(key)
        elif (part == "lora_A" and value.shape[1] != module.in_features) or \
                (part == "lora_B" and value.shape[0] != module.out_features):
            misshapen.append(f"{key} {tuple(value.shape)} vs {match['module']} "
                             f"({module.out_features}x{module.in_features})")
    if unmatched:
        raise LoraFormatError(f"LoRA keys match no module of the teacher: {_listing(unmatched)}")
    if misshapen:
        raise LoraFormatError(f"LoRA shapes do not fit the teacher: {_listing(misshapen)}")
    pairs = {module_of(k) for k in state}
    lonely = [m for m in pairs if f"{m}.lora_A.weight" not in state or f"{m}.lora_B.weight" not in state]
    if lonely:
        raise LoraFormatError(f"LoRA modules missing their lora_A or lora_B half: {_listing(lonely)}")


def load_published(path: str | Path, family: str, model: nn.Module | None = None,
                   strength: float = 1.0) -> dict[str, Tensor]:
    """One published LoRA file as PEFT weights for ``family``, times ``strength`` (0 = no change, 1 = as
    published), checked against ``model`` when given."""
    return convert_published(read_lora(path), family, model, strength, read_adapter_config(path))


def convert_published(raw: dict[str, Tensor], family: str, model: nn.Module | None = None,
                      strength: float = 1.0, adapter_config: dict | None = None) -> dict[str, Tensor]:
    """load_published for tensors already read (and the file's read_adapter_config)."""
    state = to_peft(raw, family)
    if adapter_config and not any(k.endswith(".alpha") for k in raw):  # the keys' own alphas are folded already
        state = _fold_adapter_config(state, adapter_config)
    if model is not None:
        check_fits(state, model)
    return {k: (v * strength if ".lora_B." in k else v).contiguous() for k, v in state.items()}  # dtype kept


def _pad_rank(state: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    """Zero-pad every pair to ``rank``: the extra rows of A meet zero columns of B, so B @ A is unchanged."""
    out = {}
    for key, value in state.items():
        if BIAS.match(key):  # a bias has no rank
            out[key] = value
        elif ".lora_A." in key:
            out[key] = torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])], 0)
        else:
            out[key] = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1])], 1)
    return out


def phase_networks(teacher: Teacher, schedule: PhaseSchedule) -> list[tuple[str | None, nn.Module]]:
    """Per phase, the network its LoRA goes into: the teacher's one network, or for a two-network teacher
    (Wan2.2 A14B) the network every step of the phase runs on (a phase straddling the networks' switch has
    no single published LoRA that fits it)."""
    if not teacher.network_names:
        return [(None, teacher.model)] * schedule.num_phases
    networks = []
    for k in range(schedule.num_phases):
        used = networks_of_phase(teacher, schedule, k)
        if len(used) != 1:
            steps = ", ".join(f"t={t:.4g} on {teacher.network_at(t)}" for t in phase_sigmas(schedule, k)[:-1])
            raise LoraFormatError(
                f"phase {k + 1} runs on more than one network ({steps}): a published per-network LoRA needs every "
                f"step of its phase on one network: put the phase boundary just below the noise level where the "
                f"teacher switches networks (here steps at t >= {teacher.boundary:g} run the high-noise one), e.g. "
                f"{teacher.boundary - 0.005:g}")
        networks.append((used[0], teacher.model[used[0]]))
    return networks


def make_published_student(folder: str | Path, files: list[str | Path], teacher: Teacher, schedule: PhaseSchedule,
                           strengths: list[float] | None = None, cfg: float = 1.0,
                           teacher_id: str | None = None) -> Path:
    """A student folder from published per-phase LoRA files: phase k <- files[k] x strengths[k].

    For a two-network teacher each file goes into the network its phase runs on (Wan2.2-Lightning: the
    high-noise file as phase 1 into ``transformer``, the low-noise file as phase 2 into ``transformer_2``),
    recorded in the manifest's ``networks``. Ranks are zero-padded to the largest, so one LoRA spec
    (alpha = rank, scale 1) serves every phase exactly.
    """
    folder, files = Path(folder), [Path(f) for f in files]
    if teacher.family is None:
        raise LoraFormatError(f"{teacher.name} is not a diffusers pipeline: published LoRAs are for the "
                              f"{', '.join(FAMILIES)} families")
    if len(files) != schedule.num_phases:
        raise LoraFormatError(f"{len(files)} LoRA file(s) for a {schedule.num_phases}-phase schedule: give one "
                              "file per phase (e.g. Wan2.2-Lightning: high-noise file, then low-noise file)")
    strengths = [1.0] * len(files) if strengths is None else [float(s) for s in strengths]
    if len(strengths) != len(files) or not all(0.0 <= s <= MAX_STRENGTH for s in strengths):
        raise LoraFormatError(f"strengths {strengths} must be one number in [0, {MAX_STRENGTH:g}] per phase")
    networks = phase_networks(teacher, schedule)
    states, layouts = [], []
    for path, strength, (_, network) in zip(files, strengths, networks):  # one file in memory at a time
        raw = read_lora(path)
        layouts.append(detect_layout(raw))
        states.append(convert_published(raw, teacher.family, network, strength, read_adapter_config(path)))
    rank = max(v.shape[0] for state in states for k, v in state.items() if ".lora_A." in k)
    modules = sorted({module_of(k) for state in states for k in state})
    bias = any(BIAS.match(k) for state in states for k in state)
    phases = []
    for k, state in enumerate(states):
        (folder / phase_adapter(k)).mkdir(parents=True, exist_ok=True)
        padded = {f"{TRANSFORMER_PREFIX}.{key}": v for key, v in _pad_rank(state, rank).items()}
        save_file(padded, str(folder / phase_adapter(k) / LORA_WEIGHT_NAME),
                  metadata={"format": "pt", **schedule_metadata(schedule, k)})
        phases.append(f"{phase_adapter(k)}/{LORA_WEIGHT_NAME}")
    Manifest(teacher=teacher_id or teacher.name, family=teacher.family, method=PUBLISHED, student_cfg=float(cfg),
             updates_trained=0, schedule=schedule, phases=tuple(phases),
             lora=LoraSpec(rank, float(rank), tuple(modules), bias), lora_prefix=TRANSFORMER_PREFIX,
             **teacher_fields(teacher, folder),
             networks=tuple(name for name, _ in networks) if teacher.network_names else None,
             # a published LoRA of an image-to-video or editing teacher is sampled with its image (Wan 2.1 I2V
             # cannot go without one); of a teacher that is text-only too (Wan 2.2 TI2V-5B), from prompts alone
             conditions=teacher.conditions if teacher.needs_conditions or teacher.conditions_by_default else (),
             published={"files": [re.sub(r"[^A-Za-z0-9_.-]+", "-", f.name)[:80] for f in files],
                        "layouts": layouts, "strengths": strengths}).write(folder)
    return folder


def published_folder_name(files: list[str | Path], strengths: list[float], salt: str = "") -> str:
    """A name made from the files' contents, the strengths and ``salt`` (never from a client's file name)."""
    digest = hashlib.sha256(json.dumps([[float(s) for s in strengths], salt]).encode())
    for path in files:
        with open(path, "rb") as handle:  # in chunks: a published LoRA can be a gigabyte
            for chunk in iter(lambda: handle.read(2**24), b""):
                digest.update(chunk)
    return f"{PUBLISHED}-{digest.hexdigest()[:10]}"


# --- export ------------------------------------------------------------------------------------------------
def wan_original_name(module: str) -> str:
    """diffusers Wan module name -> the original checkpoint's (ComfyUI's) name."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if match and match[2] in WAN_BLOCK_NAMES:
        return f"blocks.{match[1]}.{WAN_BLOCK_NAMES[match[2]]}"
    if module in WAN_TOP_NAMES:
        return WAN_TOP_NAMES[module]
    raise LoraFormatError(f"Wan module {module!r} has no original-checkpoint name ComfyUI knows")


def z_image_comfyui_name(module: str) -> str:
    """A diffusers Z-Image module name as ComfyUI's Z-Image LoRA keys use it: unchanged (ComfyUI's Lumina2
    branch maps ``diffusion_model.<diffusers name>`` itself, to_q/to_k/to_v onto rows of its fused qkv), provided
    it is one of the names that map covers."""
    if not (Z_IMAGE_COMFYUI_BLOCKS.fullmatch(module) or module in Z_IMAGE_COMFYUI_TOP):
        raise LoraFormatError(f"Z-Image module {module!r} is not one ComfyUI's Z-Image LoRA loader maps")
    return module


def qwen_image21_comfyui_name(module: str) -> str:
    """A diffusers Qwen-Image 2.1 module name as ComfyUI's LoRA keys for its QwenImage21 model use it: unchanged
    and unprefixed, the "QwenImage LoRA format" its QwenImage branch of ``model_lora_keys_unet`` maps (with
    ``transformer.`` too, not with ``diffusion_model.``, for the two MLP inputs its checkpoint fuses), provided it is
    one of the names that map covers."""
    if not (QWEN_IMAGE21_COMFYUI_BLOCKS.fullmatch(module) or module in QWEN_IMAGE21_COMFYUI_TOP):
        raise LoraFormatError(f"Qwen-Image 2.1 module {module!r} is not one ComfyUI's Qwen-Image 2.1 LoRA loader maps")
    return module


def split_fused_mlp(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Qwen-Image 2.1 LoRA on ComfyUI's fused ``img_mlp.gate_up`` (rows: gate_layer's, then proj's) as LoRAs on
    diffusers' two modules: the same lora_A, lora_B's halves of rows, which adds exactly the same weights."""
    out = dict(state)
    for key in [k for k in state if k.endswith(f"{QWEN_IMAGE21_FUSED_MLP}.lora_B.weight")]:
        module = key.removesuffix(".lora_B.weight")
        down, up = out.pop(f"{module}.lora_A.weight", None), out.pop(key)
        if down is None or up.shape[0] % 2:
            raise LoraFormatError(f"{module}: a fused gate_up LoRA needs its lora_A and an even number of lora_B rows")
        for name, half in zip(("gate_layer", "proj"), up.chunk(2)):
            target = module.removesuffix("gate_up") + name
            if f"{target}.lora_B.weight" in out:
                raise LoraFormatError(f"{target} has a LoRA both of its own and in {module}")
            out[f"{target}.lora_A.weight"], out[f"{target}.lora_B.weight"] = down, half.contiguous()
    return out


def comfyui_state(state: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """Scale-folded PEFT weights -> the keys ComfyUI's LoRA loader maps for ``family`` (see module doc)."""
    if family == "flux2":  # q, k, v are fused across keys there: pdmd.students.lora_flux2
        try:
            return lora_flux2.comfyui_state(state)
        except lora_flux2.Flux2KeyError as err:
            raise LoraFormatError(str(err)) from None
    if family == "hunyuan-video-1.5":  # ComfyUI fuses q, k, v there too: pdmd.students.lora_hunyuan_video15
        try:
            return lora_hunyuan_video15.comfyui_state(state)
        except lora_hunyuan_video15.HunyuanVideo15KeyError as err:
            raise LoraFormatError(str(err)) from None
    out = {}
    for key, value in state.items():
        if (bias := BIAS.match(key)) and family == "wan":  # ComfyUI adds a ``diff_b`` to the module's bias
            out[f"diffusion_model.{wan_original_name(bias['module'])}.diff_b"] = value
            continue
        match = PAIR.match(key)
        if match is None:
            raise LoraFormatError(f"{key} is not a lora_A/lora_B weight")
        module, kohya_part = match["module"], KOHYA_PARTS[match["part"]]
        if family == "wan":
            out[f"diffusion_model.{wan_original_name(module)}.{kohya_part}.weight"] = value
        elif family == "qwen-image":
            out[f"diffusion_model.{module}.{kohya_part}.weight"] = value
        elif family == "z-image":
            out[f"diffusion_model.{z_image_comfyui_name(module)}.{kohya_part}.weight"] = value
        elif family == "qwen-image21":
            out[f"{qwen_image21_comfyui_name(module)}.{kohya_part}.weight"] = value
        elif family in ("flux", "sd3"):
            out[f"{TRANSFORMER_PREFIX}.{key}"] = value
        else:
            raise LoraFormatError(f"no ComfyUI layout for family {family!r}; supported: {', '.join(FAMILIES)}")
    return out


def student_phase_files(folder: str | Path) -> tuple[Manifest, list[list[tuple[str | None, Path]]]]:
    """A student folder's manifest and, per phase, its (network, file) pairs: network None for a one-network
    teacher; for a two-network one the transformer each file belongs to (a phase across the switch has two)."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    phases = []
    for k in range(len(manifest.phases)):
        pairs = []
        for network, relative in manifest.phase_files(k).items():
            path = (folder / relative).resolve()
            if folder.resolve() not in path.parents or path.suffix != ".safetensors" or not path.is_file():
                raise LoraFormatError(f"{folder / MANIFEST}: phase {k + 1} file {relative!r} is not a .safetensors "
                                      "file inside the folder")
            pairs.append((network, path))
        phases.append(pairs)
    return manifest, phases


def with_style(state: dict[str, Tensor], styles: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``state`` plus the style LoRA(s) ``styles`` as one LoRA, exactly (all with their scales folded in): per module
    the A's stacked as rows and the B's side by side as columns, so B @ A is the sum of every B_i @ A_i at rank
    r_style + r_phase; a module only one of them adapts keeps that one's pair."""
    parts = [*styles, state]
    dtype = next(iter(state.values())).dtype
    combined = {}
    for module in sorted({module_of(k) for part in parts for k in part}):
        down, up, bias = f"{module}.lora_A.weight", f"{module}.lora_B.weight", f"{module}.lora_B.bias"
        having = [part for part in parts if down in part]
        combined[down] = torch.cat([part[down].to(dtype) for part in having], 0).contiguous()
        combined[up] = torch.cat([part[up].to(dtype) for part in having], 1).contiguous()
        if any(bias in part for part in parts):  # the bias deltas add up
            combined[bias] = sum(part[bias].to(dtype) for part in parts if bias in part).contiguous()
    return combined


def style_states(folder: Path, manifest: Manifest) -> dict[str, list[dict[str, Tensor]]]:
    """The style LoRAs of a student's teacher by the network they were fused into, from their copies in the student
    folder, as PEFT weights with alpha / r and the strength folded in; each copy must still have the sha256 the
    manifest records."""
    from pdmd.teachers.style_loras import sha256_of

    states = {}
    for lora in manifest.teacher_loras:
        path = (folder / lora.file).resolve()
        if folder.resolve() not in path.parents or not path.is_file():
            raise LoraFormatError(f"{folder / MANIFEST}: its style LoRA copy {lora.file} is missing")
        if sha256_of(path) != lora.sha256:
            raise LoraFormatError(f"{folder / lora.file} has changed since the student was made (sha256)")
        states.setdefault(lora.network, []).append(load_published(path, manifest.family, strength=lora.strength))
    return states


def export_student(folder: str | Path, out: str | Path, layout: str = "comfyui",
                   include_style: bool = False) -> list[Path]:
    """Write each phase of a student as one LoRA file per network, ``out/<student>-phase_k[-network]-<layout>
    .safetensors``, with the PEFT scale (alpha / rank) folded into lora_B, plus ``export.json`` saying which file
    is which phase and, for two-network Wan, which transformer it loads into.

    A student of a teacher with style LoRAs (``teacher_loras``): by default the phase files go on top of the style
    LoRA(s), which are copied beside them as they are; ``include_style`` writes self-contained phase files instead,
    each the exact sum of its phase LoRA and the style LoRA(s) of its network (``with_style``), to be loaded
    alone."""
    from safetensors.torch import load_file

    from pdmd.teachers.style_loras import DEFAULT_NETWORK

    if layout not in EXPORT_LAYOUTS:
        raise LoraFormatError(f"unknown export layout {layout!r}; choose {' or '.join(EXPORT_LAYOUTS)}")
    folder, out = Path(folder), Path(out)
    manifest, phases = student_phase_files(folder)
    family = manifest.family
    if family is None:
        raise LoraFormatError(f"{folder / MANIFEST} names no model family: only students of diffusers teachers "
                              f"({', '.join(FAMILIES)}) have a diffusers or ComfyUI counterpart")
    _check_family(family)
    name = folder.parent.name if folder.name == "student" else folder.name
    if include_style and not manifest.teacher_loras:
        raise LoraFormatError(f"{name}'s teacher has no style LoRA to include: export it without --with-style")
    styles = style_states(folder, manifest) if manifest.teacher_loras else {}  # checked before anything is written
    scale, prefix = manifest.lora.alpha / manifest.lora.rank, f"{manifest.lora_prefix}."
    out.mkdir(parents=True, exist_ok=True)
    written, described = [], []
    for k, pairs in enumerate(phases):
        for network, source in pairs:
            state = {key.removeprefix(prefix): (v * scale if ".lora_B." in key else v).contiguous()
                     for key, v in load_file(str(source)).items()}
            if include_style:  # a one-network teacher's phases (network None) run on its transformer
                state = with_style(state, styles.get(network or DEFAULT_NETWORK, []))
            keys = comfyui_state(state, family) if layout == "comfyui" else \
                {f"{TRANSFORMER_PREFIX}.{key}": v for key, v in state.items()}
            path = out / f"{name}-{phase_adapter(k)}{'-' + NETWORK_FILE_NAMES.get(network, network) if network else ''}" \
                         f"{'-with-style' if include_style else ''}-{layout}.safetensors"
            save_file(keys, str(path), metadata={"format": "pt", **schedule_metadata(manifest.schedule, k),
                                                 "pdmd_family": family, **({"pdmd_network": network} if network else {})})
            written.append(path)
            described.append({"file": path.name, "phase": k + 1, **({"network": network} if network else {})})
    styled = []
    for lora in manifest.teacher_loras:
        styled.append({"file": Path(lora.file).name, "strength": lora.strength, "sha256": lora.sha256,
                       "network": lora.network})
        if not include_style:  # the phase files need them underneath
            shutil.copyfile(folder / lora.file, out / Path(lora.file).name)
    notes = ["load a 'network': 'transformer_2' file with load_lora_weights(..., load_into_transformer_2=True)"
             if any("network" in d for d in described) else "",
             ("each phase file already holds the teacher_loras: load it alone" if include_style else
              "load the teacher_loras files first, each into its network at its strength (set_adapters), then each "
              "phase file on top")
             if styled else ""]
    (out / "export.json").write_text(json.dumps({
        "student": name, "teacher": manifest.teacher, "family": family, "layout": layout,
        "schedule": manifest.schedule.as_dict(), "cfg": manifest.student_cfg, "phases": described,
        **({"teacher_loras": styled, "with_style": include_style} if styled else {}),
        "note": " ".join(note for note in notes if note)}, indent=2))
    return written
