"""HunyuanVideo 1.5 LoRA keys in the layouts outside diffusers'. diffusers 0.42 has no LoRA converter (nor loader
mixin) for this family, so both directions are done here.

The names of one module in the three layouts, e.g. the image stream's query projection of block 0:

- diffusers: ``transformer_blocks.0.attn.to_q`` (HunyuanVideo15Transformer3DModel);
- ComfyUI: ``double_blocks.0.img_attn.qkv``, rows 0 .. d-1. ComfyUI's HunyuanVideo 1.5 (comfy/supported_models.py
  ``HunyuanVideo15(HunyuanVideo)``, told apart in comfy/model_detection.py by ``cond_type_embedding`` and
  ``vision_in.proj.0``) is its HunyuanVideo model (comfy/ldm/hunyuan_video/model.py) built from FLUX's
  ``DoubleStreamBlock``, so q, k, v are one fused Linear, the modulations are ``img_mod.lin``, the MLPs ``img_mlp.0``
  / ``img_mlp.2``, the token refiner's attention ``self_attn.qkv``, its embedders ``in_layer`` / ``out_layer``
  (``MLPEmbedder``; ``process_unet_state_dict`` renames the original checkpoint's names to these) and the image
  projection Wan's ``MLPProj`` (``vision_in.proj.1`` / ``.3``); its LoRA loader maps ``diffusion_model.<module>`` and
  ``lora_unet_<module with underscores>`` onto every weight of the model (comfy/lora.py ``model_lora_keys_unet``,
  the generic key map; read from Comfy-Org/ComfyUI);
- Tencent's original checkpoint (and the LoRAs trained on it: musubi-tuner's ``lora_unet_double_blocks_0_img_attn_q``):
  ``double_blocks.0.img_attn_q``, with q, k, v separate in the double-stream blocks (fused ``self_attn_qkv`` in the
  token refiner), ``img_mod.linear``, ``img_mlp.fc1``, ``time_in.mlp.0``; the names of scripts/
  convert_hunyuan_video1_5_to_diffusers.py in diffusers. HunyuanVideo 1.0's names differ only by a fused
  ``img_attn_qkv`` / ``txt_attn_qkv``, which ComfyUI's HunyuanVideo branch of the LoRA loader maps too
  (diffusion-pipe's layout): read here as well.

Out (``comfyui_state``): ComfyUI's names, ``diffusion_model.<module>.lora_down.weight`` / ``.lora_up.weight``. Separate
q, k, v LoRAs (A_i: r_i x d, B_i: d x r_i) are one exact LoRA of the fused Linear: A = [A_q; A_k; A_v] and B block
diagonal (B_q in q's rows and A_q's columns, ...). diffusers' ``norm_out.linear`` is the original
``final_layer.adaLN_modulation.1`` with its (scale, shift) halves in the other order (the conversion script's
``swap_scale_shift``): its lora_up's row halves are swapped, which is exact too.

In (``to_peft``): the diffusers layout (``transformer.`` prefix, lora_A / lora_B or lora_down / lora_up), ComfyUI's
and the original names under ``diffusion_model.`` (either part naming) and kohya's ``lora_unet_`` keys of either
name set, each ``.alpha`` folded into its lora_B as alpha / rank; a fused qkv LoRA gives q, k and v each the whole
A and its own third of B's rows (exact). A key that names no module is an error, listed.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from pdmd.students.lora_flux2 import fuse_row_blocks

ORIGINAL_PREFIX, KOHYA_PREFIX, DIFFUSERS_PREFIX = "diffusion_model.", "lora_unet_", "transformer."
PAIR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
PARTS = {"lora_down": "lora_A", "lora_up": "lora_B", "lora_A": "lora_A", "lora_B": "lora_B"}
SHOWN = 8

# inside transformer_blocks.N (diffusers) -> inside double_blocks.N: (ComfyUI's module, row block of its fused
# qkv or None, the original checkpoint's module)
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn.qkv", 0, "img_attn_q"),
    "attn.to_k": ("img_attn.qkv", 1, "img_attn_k"),
    "attn.to_v": ("img_attn.qkv", 2, "img_attn_v"),
    "attn.add_q_proj": ("txt_attn.qkv", 0, "txt_attn_q"),
    "attn.add_k_proj": ("txt_attn.qkv", 1, "txt_attn_k"),
    "attn.add_v_proj": ("txt_attn.qkv", 2, "txt_attn_v"),
    "attn.to_out.0": ("img_attn.proj", None, "img_attn_proj"),
    "attn.to_add_out": ("txt_attn.proj", None, "txt_attn_proj"),
    "ff.net.0.proj": ("img_mlp.0", None, "img_mlp.fc1"),
    "ff.net.2": ("img_mlp.2", None, "img_mlp.fc2"),
    "ff_context.net.0.proj": ("txt_mlp.0", None, "txt_mlp.fc1"),
    "ff_context.net.2": ("txt_mlp.2", None, "txt_mlp.fc2"),
    "norm1.linear": ("img_mod.lin", None, "img_mod.linear"),
    "norm1_context.linear": ("txt_mod.lin", None, "txt_mod.linear"),
}
# inside context_embedder.token_refiner.refiner_blocks.N -> inside txt_in.individual_token_refiner.blocks.N (q, k, v
# fused in both ComfyUI's model and the original checkpoint)
REFINER_BLOCK = {
    "attn.to_q": ("self_attn.qkv", 0, "self_attn_qkv"),
    "attn.to_k": ("self_attn.qkv", 1, "self_attn_qkv"),
    "attn.to_v": ("self_attn.qkv", 2, "self_attn_qkv"),
    "attn.to_out.0": ("self_attn.proj", None, "self_attn_proj"),
    "ff.net.0.proj": ("mlp.0", None, "mlp.fc1"),
    "ff.net.2": ("mlp.2", None, "mlp.fc2"),
    "norm_out.linear": ("adaLN_modulation.1", None, "adaLN_modulation.1"),
}
# outside the blocks: diffusers module -> (ComfyUI's module, the original checkpoint's)
TIMESTEP, TEXT = "context_embedder.time_text_embed.timestep_embedder", "context_embedder.time_text_embed.text_embedder"
TOP = {
    "context_embedder.proj_in": ("txt_in.input_embedder", "txt_in.input_embedder"),
    f"{TIMESTEP}.linear_1": ("txt_in.t_embedder.in_layer", "txt_in.t_embedder.mlp.0"),
    f"{TIMESTEP}.linear_2": ("txt_in.t_embedder.out_layer", "txt_in.t_embedder.mlp.2"),
    f"{TEXT}.linear_1": ("txt_in.c_embedder.in_layer", "txt_in.c_embedder.linear_1"),
    f"{TEXT}.linear_2": ("txt_in.c_embedder.out_layer", "txt_in.c_embedder.linear_2"),
    "context_embedder_2.linear_1": ("byt5_in.fc1", "byt5_in.fc1"),
    "context_embedder_2.linear_2": ("byt5_in.fc2", "byt5_in.fc2"),
    "context_embedder_2.linear_3": ("byt5_in.fc3", "byt5_in.fc3"),
    "image_embedder.linear_1": ("vision_in.proj.1", "vision_in.proj.1"),
    "image_embedder.linear_2": ("vision_in.proj.3", "vision_in.proj.3"),
    "time_embed.timestep_embedder.linear_1": ("time_in.in_layer", "time_in.mlp.0"),
    "time_embed.timestep_embedder.linear_2": ("time_in.out_layer", "time_in.mlp.2"),
    "proj_out": ("final_layer.linear", "final_layer.linear"),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),  # halves swapped
}
SWAPPED_HALVES = "norm_out.linear"
BLOCKS = (("transformer_blocks", "double_blocks", DOUBLE_BLOCK),
          ("context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks", REFINER_BLOCK))


class HunyuanVideo15KeyError(ValueError):
    """A HunyuanVideo 1.5 module or key with no counterpart in the other layout (lora_formats re-raises it)."""


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN]) + (f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def comfyui_name(module: str) -> tuple[str, int | None]:
    """diffusers module -> (ComfyUI's module, None), or (its fused qkv module, row block 0/1/2) for q, k, v."""
    if module in TOP:
        return TOP[module][0], None
    for diffusers_stack, comfyui_stack, table in BLOCKS:
        match = re.fullmatch(rf"{re.escape(diffusers_stack)}\.(\d+)\.(.+)", module)
        if match and match[2] in table:
            name, row_block, _ = table[match[2]]
            return f"{comfyui_stack}.{match[1]}.{name}", row_block
    raise HunyuanVideo15KeyError(f"HunyuanVideo 1.5 module {module!r} has no name in ComfyUI's HunyuanVideo model "
                                 "(a LoRA there adapts Linear layers of its transformer blocks and embedders)")


def _swap_halves(up: Tensor) -> Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _pairs(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = PAIR.match(key)
        if match is None:
            raise HunyuanVideo15KeyError(f"{key} is not a lora_A/lora_B weight")
        pairs.setdefault(match["module"], {})[match["part"]] = value
    lonely = [m for m, parts in pairs.items() if set(parts) != {"lora_A", "lora_B"}]
    if lonely:
        raise HunyuanVideo15KeyError(f"LoRA modules missing their lora_A or lora_B half: {_listing(lonely)}")
    return pairs


def comfyui_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scale-folded PEFT weights (module-relative diffusers keys) -> ``diffusion_model.<ComfyUI module>.lora_down /
    lora_up``, q, k, v fused exactly into their qkv Linear and the final modulation's halves swapped (module doc)."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    for module, parts in sorted(_pairs(state).items()):
        name, row_block = comfyui_name(module)
        down, up = parts["lora_A"], parts["lora_B"]
        if row_block is not None:
            fused.setdefault(name, {})[row_block] = (down, up)
            continue
        out[f"{ORIGINAL_PREFIX}{name}.lora_down.weight"] = down
        out[f"{ORIGINAL_PREFIX}{name}.lora_up.weight"] = _swap_halves(up) if module == SWAPPED_HALVES else up
    for name, members in fused.items():
        down, up = fuse_row_blocks(members)
        out[f"{ORIGINAL_PREFIX}{name}.lora_down.weight"] = down
        out[f"{ORIGINAL_PREFIX}{name}.lora_up.weight"] = up
    return out


def _published_names() -> list[tuple[re.Pattern, re.Pattern, list[tuple[str, int | None]]]]:
    """Every ComfyUI and original module name as (its dotted pattern, kohya's pattern of it: the dots made
    underscores, the diffusers modules it holds as (template with {} for the block index, row block of a fused qkv
    or None)). kohya's names are matched whole against these: their underscores alone are ambiguous."""
    names: dict[tuple[str, str], list[tuple[str, int | None]]] = {}

    def add(stack: str, inner: str, target: tuple[str, int | None]) -> None:
        flat = lambda name: re.escape(name.replace(".", "_"))  # noqa: E731
        if stack:
            key = (rf"{re.escape(stack)}\.(\d+)\.{re.escape(inner)}", rf"{flat(stack)}_(\d+)_{flat(inner)}")
        else:
            key = (re.escape(inner), flat(inner))
        if target not in names.setdefault(key, []):  # a name ComfyUI and the original checkpoint share
            names[key].append(target)
    for diffusers_stack, comfyui_stack, table in BLOCKS:
        for inner, (comfyui, row_block, original) in table.items():
            module = f"{diffusers_stack}.{{}}.{inner}"
            add(comfyui_stack, comfyui, (module, row_block))
            add(comfyui_stack, original, (module, row_block if original.endswith("qkv") else None))
            if row_block is not None and not original.endswith("qkv"):
                # HunyuanVideo 1.0's fused name, which ComfyUI's HunyuanVideo LoRA keys (diffusion-pipe's) also use
                add(comfyui_stack, comfyui.replace(".qkv", "_qkv"), (module, row_block))
    for module, (comfyui, original) in TOP.items():
        for name in {comfyui, original}:
            add("", name, (module, None))
    return [(re.compile(dotted), re.compile(kohya), targets) for (dotted, kohya), targets in names.items()]


PUBLISHED_NAMES = _published_names()


def _diffusers_modules(name: str, kohya: bool = False) -> list[tuple[str, int | None]] | None:
    """A ComfyUI or original module name (dotted, or kohya's flattened one) -> its diffusers modules with the qkv
    row block, or None."""
    for dotted, flattened, targets in PUBLISHED_NAMES:
        match = (flattened if kohya else dotted).fullmatch(name)
        if match:
            return [(template.format(*match.groups()), row_block) for template, row_block in targets]
    return None


def to_peft(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A HunyuanVideo 1.5 LoRA in any supported layout -> module-relative diffusers ``lora_A`` / ``lora_B`` keys with
    every ``.alpha`` folded into its lora_B (module doc). Unknown keys are an error, listed."""
    named: dict[str, dict[str, Tensor]] = {}  # (source module name -> part -> tensor), parts as lora_A / lora_B
    alphas: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        match = re.fullmatch(r"(?P<module>.+)\.(?P<part>lora_down|lora_up|lora_A|lora_B)\.weight|(?P<alpha>.+)\.alpha",
                             key)
        if match is None:
            unknown.append(key)
        elif match["alpha"]:
            alphas[match["alpha"]] = value
        else:
            named.setdefault(match["module"], {})[PARTS[match["part"]]] = value
    out: dict[str, Tensor] = {}
    for source, parts in named.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise HunyuanVideo15KeyError(f"{source} lacks its lora_A or lora_B (lora_down or lora_up) half")
        down, up = parts["lora_A"], parts["lora_B"]
        if source in alphas:
            up = up * (float(alphas.pop(source)) / down.shape[0])
        targets, published_name = _targets(source)
        if targets is None:
            unknown.extend(f"{source}.{part}.weight" for part in parts)
            continue
        for module, row_block in targets:
            rows = up if row_block is None else up.chunk(3, dim=0)[row_block]
            if module == SWAPPED_HALVES and published_name:  # the original (shift, scale) order
                rows = _swap_halves(rows)
            # each module its own tensors: q, k and v of a fused qkv share one A, and safetensors refuses shared memory
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = down.clone(), rows.contiguous()
    unknown.extend(f"{name}.alpha" for name in alphas)  # an alpha with no pair beside it
    if unknown:
        raise HunyuanVideo15KeyError(f"LoRA keys match no module of the teacher: {_listing(unknown)}")
    return out


def _targets(source: str) -> tuple[list[tuple[str, int | None]] | None, bool]:
    """(The diffusers modules a source module name stands for, with the qkv row block; whether the name is a
    ComfyUI or original one rather than diffusers'). Its prefix says its layout."""
    if source.startswith(DIFFUSERS_PREFIX):
        return [(source.removeprefix(DIFFUSERS_PREFIX), None)], False
    if source.startswith(ORIGINAL_PREFIX):
        name = source.removeprefix(ORIGINAL_PREFIX)
        targets = _diffusers_modules(name)
        if targets is not None:
            return targets, True
        try:  # diffusers' own names under diffusion_model. (as ai-toolkit writes its LoRAs)
            comfyui_name(name)
        except HunyuanVideo15KeyError:
            return None, False
        return [(name, None)], False
    if source.startswith(KOHYA_PREFIX):
        return _diffusers_modules(source.removeprefix(KOHYA_PREFIX), kohya=True), True
    return None, False
