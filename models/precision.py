"""How the model computes on a CPU when it scores (``[worker] cpu_precision``, default auto) and trains
(``[models] cpu_precision``, default float32: bf16 training was as good and 1.5x faster, but not always
bit-reproducible on several threads of a busy CPU, 1 run in 10-15; on one thread it was, as bf16 scoring was); a
GPU always runs bf16 autocast.

- ``float32``: the reference every held-out figure is measured in.
- ``bf16``: bf16 autocast, as on a GPU: matrix multiplies in bfloat16, softmax and layer norms in float32, the
  weights kept float32. Fast only where the CPU multiplies bfloat16 itself (Intel AMX or AVX512-BF16); elsewhere
  it is emulated and slower than float32.
- ``int8`` (scoring only): dynamically quantized linear layers (``models.quantization``); its labels differ from
  float32's for 3-4% of texts, so its records carry ``<version>+int8``.
- ``auto`` (the default): bf16 where the CPU has bfloat16 instructions, else float32.

Measured on the quick model's held-out tweets (2,397 rows) and the news probe (400), 2 cores of a Xeon with AMX,
end to end through the scorer at batch 64, two passes each (``finpulse evaluate --cpu-precision bf16`` reports
agreement and accuracy for any model):

| precision | rate vs float32 | same topic / sentiment label as float32 | held-out topic / sentiment accuracy |
|---|---|---|---|
| float32 | 1.0x (251-256 seq/s) | - | 0.8537 / 0.8112 |
| bf16 autocast (this) | 3.0x (760-775 seq/s) | 99.87% / 99.92%; the probe's 400: all | 0.8523 / 0.8102 |
| weights cast to bfloat16 | 3.9x (972-995 seq/s) | 99.50% / 99.96% | 0.8530 / 0.8112 |
| int8 | 1.15-1.26x | 95.6-95.8% / 97.2% | within a point |

Casting the weights was faster still but agreed less, and autocast is what the GPU runs: a model scores the same
on either.
"""
from __future__ import annotations

FLOAT32, BF16, INT8 = "float32", "bf16", "int8"
AUTO = "auto"
CPU_PRECISIONS = (AUTO, FLOAT32, BF16, INT8)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16), as oneDNN uses for autocast."""
    import torch
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:   # a probe that cannot read this CPU's features: assume none
        return False


def autocast(device, cpu_precision: str):
    """The context a forward pass runs in: bf16 autocast on a GPU, and on a CPU when ``cpu_precision`` is bf16."""
    import torch
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=effective(device, cpu_precision) == BF16)


def effective(device, cpu_precision: str) -> str:
    """What the model computes in on ``device``: bf16 (autocast: always on a GPU), float32 or int8."""
    return BF16 if device.type == "cuda" else cpu_precision


def describe(device, cpu_precision: str) -> str:
    """Device and precision as logs and progress lines say them, e.g. "cpu, bf16 autocast"."""
    precision = effective(device, cpu_precision)
    return f"{device}, {'bf16 autocast' if precision == BF16 else precision}"


def resolve_cpu_precision(choice: str) -> str:
    """``choice`` (one of CPU_PRECISIONS) as the scorer or the trainer runs it: ``auto`` becomes bf16 or float32."""
    if choice not in CPU_PRECISIONS:
        raise ValueError(f"cpu precision {choice!r}: use one of {', '.join(CPU_PRECISIONS)}")
    if choice == AUTO:
        return BF16 if native_bf16() else FLOAT32
    return choice
