"""A cheaper forward for PEFT's LoRA linear layer (same function, fewer passes over the activations).

PEFT computes ``y = W x + B(A(dropout(x))) * s``: dropout scales the whole ``(N, in)`` input by
``1 / (1 - p)``, the ``(N, out)`` update is multiplied by ``s`` and then added to ``W x`` in a new tensor.
The low-rank branch costs ``2 N r (in + out)`` flops, but those three full-size passes over memory cost more
than its matmuls on a CPU. The same function, with the scalars moved to the ``(N, r)`` intermediate:

    y = addmm(W x, (A (m * x)) * s / (1 - p), B^T)      m ~ Bernoulli(1 - p)   (training, p > 0)
    y = addmm(W x, (A x) * s, B^T)                                              (otherwise)

so dropout is one mask and one multiply, and the update is accumulated into ``W x`` by the matmul itself.
Only plain LoRA with one active adapter takes this path (DoRA, merged, disabled or mixed-adapter layers keep
PEFT's own forward). The base weight stays frozen (``requires_grad=False``): autograd computes only the input
gradient ``dy W`` of the base matmul, never its weight gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


class FusedLoraLinear(LoraLinear):
    """PEFT's ``lora.Linear`` with the forward above (the class is swapped in place; state is unchanged)."""

    def _plain(self, kwargs: dict[str, Any]) -> str | None:
        """The adapter name when the fused path applies, else None."""
        active = self.active_adapters
        if (self.disable_adapters or self.merged or kwargs or len(active) != 1 or active[0] in self.lora_variant
                or active[0] not in self.lora_A):
            return None
        return active[0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._plain(kwargs) if not args else None
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        scale = self.scaling[name]
        drop = self.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        xa = x if x.dtype == A.dtype else x.to(A.dtype)
        if self.training and p > 0:
            mask = torch.empty_like(xa).bernoulli_(1.0 - p)
            h = F.linear(xa * mask, A) * (scale / (1.0 - p))
        else:
            h = F.linear(xa, A) * scale
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(B.dtype), B.t())
        return out.reshape(result.shape).to(result.dtype)


def fuse_lora(model: nn.Module) -> int:
    """Swap every PEFT ``lora.Linear`` of ``model`` to :class:`FusedLoraLinear` (in place); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is LoraLinear:
            m.__class__ = FusedLoraLinear
            n += 1
    return n
