"""Weights stored for one-row products on the CPU: `single_row_layout(model)`.

At batch 1 a CPU decoding step multiplies one row by every weight matrix, and the time is the time to read
the weights. Stored as `nn.Linear` keeps them, [out, in] row-major, those products ran slower on the 2-core
development machine than with the same matrices stored [in, out] (transposed strides; the shape, the
values and `state_dict()` names stay). With more rows (batch 8 and more) the usual layout is faster again,
so this is for chat-style decoding of one reply at a time; docs/benchmarks.md has the numbers.

    >>> model = single_row_layout(BlenderbotForConditionalGeneration.from_pretrained(name))   # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


def single_row_layout(model: nn.Module) -> nn.Module:
    """Store every Linear weight of `model` as [in, out] in memory, in place (tied weights stay tied, the
    embedding shares the LM head's storage); returns the model. Float weights on the CPU only."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or any(m.weight.device.type != "cpu" for m in linears):
        raise InputError("single_row_layout is for float Linear weights on the CPU (int8 layers pack their own)")
    with torch.no_grad():
        for weight in {id(m.weight): m.weight for m in linears}.values():  # [out, in] values, [in, out] storage
            weight.data = weight.data.t().contiguous().t()
    return model
