"""int8 weights for CPU decoding: `quantize_int8(model)`.

Every `nn.Linear` (attention projections, feed-forward layers, the LM head) becomes a dynamically
quantized one: int8 weights, one scale per output channel, and activations quantized to 8 bits per call
from their own range, with int32 accumulation (PyTorch's `torch.ao` dynamic quantization on its fbgemm /
oneDNN CPU kernels). Embeddings, layer norms and the attention arithmetic stay float32. At batch 1 a
decoding step is bound by reading the weights, so a quarter of the bytes makes it faster; the logits move
by a little (tests/test_torch_quantization.py states how much), so tokens can differ where two candidates
are nearly tied.

    >>> model = BlenderbotForConditionalGeneration.from_pretrained(name)   # doctest: +SKIP
    >>> quantize_int8(model).generate(**inputs)                             # doctest: +SKIP

The quantized model is for inference on the CPU: it cannot be trained, moved to a GPU or saved with
`save_pretrained` (save the float32 model and quantize after loading; it takes a second or two).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import InputError

QUANTIZATIONS = ("int8",)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize `model`'s Linear layers to int8 in place (see the module docstring); returns the model, in
    eval mode. The model must be float32 and on the CPU."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params):
        raise InputError("int8 quantization runs on the CPU; load the model without a device, or use a float "
                         "dtype (bfloat16, float16) on the GPU")
    if any(p.dtype != torch.float32 for p in params if p.is_floating_point()):
        raise InputError("int8 quantization starts from float32 weights; load the model with dtype=None")
    model.eval()
    with warnings.catch_warnings():  # torch.ao announces its move to torchao, whose CPU path is slower here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model


def quantize(model: nn.Module, method: str | None) -> nn.Module:
    """`model` quantized by `method` (one of QUANTIZATIONS), or as it is for None."""
    if method is None:
        return model
    if method not in QUANTIZATIONS:
        raise InputError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return quantize_int8(model)
