"""Importing a published LoRA pair of the real Wan2.2 A14B size: how long conversion and checking take, on CPU.

    python benchmarks/lora_import.py [--rank 64] [--blocks 40]

Writes a Wan2.2-Lightning-style pair (original module names under ``diffusion_model.``, lora_A/lora_B + alpha,
bf16, the attention and FFN layers of every block) to a temporary folder, then times, per file: reading it,
converting it with diffusers' Wan LoRA loader and checking every key against the full-size expert (built on the
meta device: shapes only, no weights), and writing the student's phase file. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdmd.students import lora_formats as lf


def full_size_expert(blocks: int):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                     in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                     num_layers=blocks, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     eps=1e-6, rope_max_seq_len=1024)


def lightning_file(path: Path, model, rank: int, seed: int) -> int:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.startswith("blocks."):
            original = f"diffusion_model.{lf.wan_original_name(name)}"
            state[f"{original}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator).bfloat16()
            state[f"{original}.lora_B.weight"] = (torch.randn(layer.out_features, rank, generator=generator)
                                                  * 0.01).bfloat16()
            state[f"{original}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = full_size_expert(args.blocks)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for seed, name in enumerate(("high_noise_model", "low_noise_model")):
            path = Path(folder) / f"{name}.safetensors"
            size = lightning_file(path, model, args.rank, seed)
            start = time.perf_counter()
            raw = lf.read_lora(path)
            read = time.perf_counter()
            state = lf.convert_published(raw, "wan", model, strength=1.0)
            converted = time.perf_counter()
            save_file({f"transformer.{k}": v for k, v in state.items()}, str(Path(folder) / f"{name}-phase.safetensors"))
            written = time.perf_counter()
            results.append({"file": path.name, "mib": round(size / 2**20, 1), "keys": len(raw),
                            "read_s": round(read - start, 2), "convert_and_check_s": round(converted - read, 2),
                            "write_s": round(written - converted, 2)})
            del raw, state
    print(json.dumps({"rank": args.rank, "blocks": args.blocks, "files": results}))


if __name__ == "__main__":
    main()
