"""Phased DMD Studio: distil a many-step flow-matching teacher into one LoRA expert per SNR phase."""
import logging


class _ImportNoise(logging.Filter):
    """torchao (for quantized bases) logs on import that its CUDA kernels cannot load on a CPU machine and that
    torch now handles its enums natively, and diffusers that torchao's old tensor classes are gone: harmless
    here, yet printed by every command. Only these lines are dropped; every other warning still shows."""

    LINES = ("Failed to load", "is an Enum subclass and is now natively supported",
             "Unable to import `torchao` Tensor objects")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(line in record.getMessage() for line in self.LINES)


for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).addFilter(_ImportNoise())
