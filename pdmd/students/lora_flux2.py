"""FLUX.2 LoRA keys in the original (BFL) checkpoint layout: the module names of FLUX.2's own checkpoint, which
ComfyUI loads unchanged (comfy/model_detection.py tells FLUX.2 by ``double_stream_modulation_img.lin.weight``; its
state dict keys are ``diffusion_model.double_blocks.N.img_attn.qkv.weight`` and so on) and which published FLUX.2
LoRAs (ai-toolkit, BFL) use: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``.

Out (``comfyui_state``): ComfyUI's LoRA loader maps ``diffusion_model.<module>`` to every weight of the model
(comfy/lora.py ``model_lora_keys_unet``, its generic key map) and reads ``<module>.lora_B.weight`` /
``.lora_A.weight`` pairs (``load_lora``). Its ``transformer.<diffusers module>`` map (``flux_to_diffusers``) was
written for FLUX.1, whose module names FLUX.2's single-stream blocks (``attn.to_qkv_mlp_proj``) do not have; the
entries for those came only in January 2026 (Comfy-Org/ComfyUI pull requests 11980 / 11981), so the original
names are the layout every ComfyUI with FLUX.2 reads. The parts are named lora_A / lora_B, not
lora_down / lora_up: diffusers' FLUX.2 loader takes any ``.lora_down.weight`` for a kohya file, so only lora_A /
lora_B files under ``diffusion_model.`` go through its original-layout converter (the test's read-back).

The original double-stream blocks fuse q, k, v into one ``qkv`` Linear (rows q, then k, then v). Separate q, k, v
LoRAs (A_i: r_i x d, B_i: d x r_i) are one exact LoRA of the fused Linear: A = [A_q; A_k; A_v] and B block
diagonal (B_q in q's rows and A_q's columns, ...), so B A stacks B_q A_q, B_k A_k, B_v A_v. diffusers' converter
reads it back exactly too: it gives each of q, k, v the whole A and its own third of B's rows.

In (``normalised_original``): diffusers' FLUX.2 converter for the original layout takes lora_A / lora_B and no
``.alpha``; files with lora_down / lora_up or alphas under ``diffusion_model.`` are renamed and their alpha / rank
folded into lora_B first.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

ORIGINAL_PREFIX = "diffusion_model."
PAIR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
# diffusers module inside transformer_blocks.N -> inside double_blocks.N
DOUBLE_BLOCK_NAMES = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                      "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                      "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
# the fused projections of double_blocks.N and the diffusers modules of their q, k, v rows, in row order
FUSED_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_BLOCK_NAMES = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
TOP_NAMES = {"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin",
             "proj_out": "final_layer.linear"}
DOUBLE_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
SINGLE_BLOCK = re.compile(r"single_transformer_blocks\.(\d+)\.(.+)")


class Flux2KeyError(ValueError):
    """A FLUX.2 module or key with no counterpart in the other layout (lora_formats re-raises it as its own)."""


def original_name(module: str) -> tuple[str, int | None]:
    """diffusers FLUX.2 module -> (original module, None), or (fused qkv module, row block 0/1/2) for q, k, v."""
    if module in TOP_NAMES:
        return TOP_NAMES[module], None
    single = SINGLE_BLOCK.fullmatch(module)
    if single and single[2] in SINGLE_BLOCK_NAMES:
        return f"single_blocks.{single[1]}.{SINGLE_BLOCK_NAMES[single[2]]}", None
    double = DOUBLE_BLOCK.fullmatch(module)
    if double:
        index, inner = double[1], double[2]
        if inner in DOUBLE_BLOCK_NAMES:
            return f"double_blocks.{index}.{DOUBLE_BLOCK_NAMES[inner]}", None
        for fused, members in FUSED_QKV.items():
            if inner in members:
                return f"double_blocks.{index}.{fused}", members.index(inner)
    if module == "norm_out.linear":
        raise Flux2KeyError("FLUX.2 module 'norm_out.linear' has no exact original-layout LoRA: the original "
                            "final_layer.adaLN_modulation.1 holds its shift and scale halves in the opposite order, "
                            "which diffusers' LoRA converter does not swap back; leave it out of lora.target_modules")
    raise Flux2KeyError(f"FLUX.2 module {module!r} has no name in the original checkpoint layout ComfyUI loads")


def comfyui_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scale-folded PEFT weights (module-relative keys) -> ``diffusion_model.<original module>.lora_A/lora_B``,
    q, k, v fused exactly into their qkv Linear (module doc)."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = PAIR.match(key)
        if match is None:
            raise Flux2KeyError(f"{key} is not a lora_A/lora_B weight")
        pairs.setdefault(match["module"], {})[match["part"]] = value
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise Flux2KeyError(f"{module} lacks its lora_A or lora_B half")
        name, row_block = original_name(module)
        if row_block is None:
            out[f"{ORIGINAL_PREFIX}{name}.lora_A.weight"] = parts["lora_A"]
            out[f"{ORIGINAL_PREFIX}{name}.lora_B.weight"] = parts["lora_B"]
        else:
            fused.setdefault(name, {})[row_block] = (parts["lora_A"], parts["lora_B"])
    for name, members in fused.items():
        down, up = fuse_row_blocks(members)
        out[f"{ORIGINAL_PREFIX}{name}.lora_A.weight"] = down
        out[f"{ORIGINAL_PREFIX}{name}.lora_B.weight"] = up
    return out


def fuse_row_blocks(members: dict[int, tuple[Tensor, Tensor]], blocks: int = 3) -> tuple[Tensor, Tensor]:
    """The (down, up) pairs of the row blocks of one fused Linear (q, k and v of a qkv projection: block 0, 1, 2)
    as one exact pair: the downs stacked, each up in its block's rows and its own rank's columns, so up @ down is
    each block's own product in its rows; a block without a LoRA keeps zero rows. FLUX.2's and HunyuanVideo 1.5's
    ComfyUI models both fuse q, k and v this way (FLUX's double-stream block)."""
    rows = next(iter(members.values()))[1].shape[0]  # q, k and v have one width
    down = torch.cat([members[block][0] for block in sorted(members)])
    up = down.new_zeros(blocks * rows, down.shape[0])
    column = 0
    for block in sorted(members):
        rank = members[block][0].shape[0]
        up[block * rows:(block + 1) * rows, column:column + rank] = members[block][1]
        column += rank
    return down.contiguous(), up


def normalised_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original-layout keys (``diffusion_model.``) as diffusers' FLUX.2 converter takes them: lora_down / lora_up
    renamed lora_A / lora_B, each ``.alpha`` folded into its lora_B as alpha / rank. Other keys pass unchanged."""
    out, alphas = {}, {}
    for key, value in state.items():
        if not key.startswith(ORIGINAL_PREFIX):
            out[key] = value
        elif key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = value
        else:
            out[key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")] = value
    for module, alpha in alphas.items():
        down, up = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if down not in out or up not in out:
            raise Flux2KeyError(f"{module}.alpha has no lora_A/lora_B (lora_down/lora_up) pair beside it")
        out[up] = out[up] * (float(alpha) / out[down].shape[0])
    return out
