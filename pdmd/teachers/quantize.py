"""A quantized frozen base: the teacher's transformer(s) loaded through diffusers' own quantization support.

Backend: torchao (``TorchAoConfig`` in a ``PipelineQuantizationConfig``). It is the one that also runs on the CPU
(int8 and fp8 weight-only are plain PyTorch tensor subclasses; bitsandbytes needs CUDA for its 4-bit kernels and
optimum-quanto has no PEFT LoRA support), and PEFT puts LoRA on its int8 layers (peft.tuners.lora.torchao).
nf4 goes through bitsandbytes and needs a CUDA GPU. Only the transformer(s) are quantized: the text encoders run
once per prompt and the VAE decodes, neither is on the training path.
"""
from __future__ import annotations

import torch

from pdmd.teachers.base import TeacherError

QUANTIZATIONS = ("none", "int8", "fp8", "nf4")
TRANSFORMERS = ("transformer", "transformer_2")


def _torchao_config(mode: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    return {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[mode]()


def check_quantization(mode: str, device: torch.device | str | None = None) -> None:
    """Refuse, in one line, a quantization that is unknown or cannot run here."""
    if mode not in QUANTIZATIONS:
        raise TeacherError(f"quantize = {mode!r} is unknown; choose one of {', '.join(QUANTIZATIONS)}")
    if mode == "none":
        return
    if mode == "nf4":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if not bitsandbytes_available() or device.type != "cuda":
            raise TeacherError("quantize = nf4 needs bitsandbytes and a CUDA GPU; on the CPU use int8 or fp8")
        return
    import importlib.util
    if importlib.util.find_spec("torchao") is None:
        raise TeacherError(f"quantize = {mode} needs torchao: pip install -r requirements.txt")


def pipeline_quantization(mode: str, components: list[str]):
    """diffusers' PipelineQuantizationConfig quantizing ``components`` (the transformers present), or None."""
    if mode == "none":
        return None
    from diffusers import PipelineQuantizationConfig
    targets = [name for name in TRANSFORMERS if name in components]
    if mode == "nf4":
        from diffusers import BitsAndBytesConfig
        config = lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # noqa: E731
                                            bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        from diffusers import TorchAoConfig
        config = lambda: TorchAoConfig(_torchao_config(mode))  # noqa: E731
    # a mapping, since diffusers' and transformers' TorchAoConfig signatures differ (its quant_backend path refuses)
    return PipelineQuantizationConfig(quant_mapping={name: config() for name in targets})


def quantize_networks(teacher, mode: str) -> None:
    """Quantize an already built teacher's transformer(s) in place with the config diffusers would apply while
    loading (the planner's meta-device networks, the real-size benchmark's random-weight ones). nf4 is left to
    the planner's byte count (bitsandbytes cannot quantize on the meta device)."""
    if mode in ("none", "nf4"):
        return
    networks = teacher.model.values() if teacher.network_names else [teacher.model]
    for network in networks:
        quantize_module(network, mode)


def quantize_module(module: torch.nn.Module, mode: str) -> None:
    """``module``'s linear layers in torchao ``mode`` ("int8" or "fp8" weight-only), in place."""
    from torchao.quantization import quantize_
    quantize_(module, _torchao_config(mode))


def bitsandbytes_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("bitsandbytes") is not None


def tensor_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor really stores. ``numel * element_size`` is right for a plain tensor only: a torchao
    quantized weight (AffineQuantizedTensor, Int8Tensor, Float8Tensor) shows its bf16 face, twice an int8 weight's
    bytes, so a tensor subclass is counted by the inner tensors it flattens to (``__tensor_flatten__``; a DTensor:
    this rank's shard), and a bitsandbytes parameter by its packed data plus its quantization state."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    total = tensor.numel() * tensor.element_size()
    if getattr(tensor, "quant_state", None) is not None:  # bitsandbytes Params4bit: absmax, code, nested state
        total += _quant_state_bytes(tensor.quant_state)
    if isinstance(getattr(tensor, "SCB", None), torch.Tensor):  # bitsandbytes Int8Params: a scale per row
        total += tensor_bytes(tensor.SCB)
    return total


def _quant_state_bytes(state) -> int:
    tensors = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    return (sum(tensor_bytes(t) for t in tensors if isinstance(t, torch.Tensor))
            + (_quant_state_bytes(nested) if nested is not None else 0))


def module_bytes(module: torch.nn.Module) -> int:
    """The bytes ``module``'s parameters and buffers really store (``tensor_bytes``)."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def nf4_bytes(network) -> int:
    """Bytes of ``network`` with its linear layers in bitsandbytes nf4 (two 4-bit values a byte, one 8-bit absmax
    per 64 values with double quantization, one float32 per 256 absmax) and the rest as it is."""
    from torch import nn
    total = 0
    for path, module in network.named_modules():
        if "lora_" in path:
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            n = tensor.numel()
            if isinstance(module, nn.Linear) and name == "weight":
                total += n // 2 + n // 64 + 4 * (n // (64 * 256))
            else:
                total += n * tensor.element_size()
    return total
