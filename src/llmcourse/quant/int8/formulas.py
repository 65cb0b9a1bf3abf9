"""The 8-bit formulas: absmax and zero-point int8, per tensor, per row or per group of inputs.

Source: the course's notebook "Introduction to Weight Quantization" (M. Labonne), whose formulas
we keep, applied to a whole tensor, to each row (output channel) or to groups of ``group_size``
consecutive inputs of each row. With ``X`` one such block:

* absmax (symmetric):  ``s = 127 / max|X|``,  ``Xq = round(s X)``,  ``X' = Xq / s``.
* zero-point (asymmetric):  ``s = 255 / (max X - min X)``,  ``z = round(-s min X - 128)``,
  ``Xq = clip(round(s X + z), -128, 127)``,  ``X' = (Xq - z) / s``.
  Worked example: max 3.2, min -3.0 gives ``s = 41.13``, ``z = -5``; 0.1 maps to
  ``round(4.11 - 5) = -1`` and back to ``(-1 + 5) / 41.13 = 0.097``.

Rounding is ``torch.round``: to nearest, ties to even (the notebook uses the same function).
Neither scheme clips a value of its own block (except a tie at exactly 127.5, which lands on
127), so the round trip is bounded element-wise by ``|X - X'| <= 1 / (2 s)``.

Guards: a block whose absmax is 0 (or so small that ``127 / max|X|`` overflows) gets ``s = 1``
and all-zero codes; a block with ``max == min`` gets the notebook's range of 1, which still
returns the constant within ``1 / (2 s)``.

This module is the bottom of the lab: tensors in, :class:`QuantizedTensor` out, nothing about
modules or models (the runtime modules in :mod:`.linear` / :mod:`.llm_int8` and the model level
in :mod:`.model` build on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmcourse.core.errors import UserError

METHODS = ("absmax", "zeropoint", "llm.int8")
GRANULARITIES = ("tensor", "row", "group")


# --------------------------------------------------------------------------------------------
# The formulas, on blocks of a 2-D view of the tensor
# --------------------------------------------------------------------------------------------


def to_blocks(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """``x`` as fp32 blocks over which one scale is taken: (1, 1, n), (rows, 1, cols) or (rows, G, g).

    A ragged last group is padded by repeating the row's last value, which changes neither
    its max nor its min.
    """
    x2 = x.detach().float().reshape(x.shape[0], -1) if x.dim() > 1 else x.detach().float().reshape(1, -1)
    if granularity == "tensor":
        return x2.reshape(1, 1, -1)
    if granularity == "row":
        return x2.unsqueeze(1)
    assert group_size is not None and group_size >= 1
    cols = x2.shape[1]
    group_size = min(group_size, cols)  # a group wider than the row is the row (no padding to allocate)
    n_groups = math.ceil(cols / group_size)
    pad = n_groups * group_size - cols
    if pad:
        x2 = torch.cat([x2, x2[:, -1:].expand(-1, pad)], dim=1)
    return x2.reshape(x2.shape[0], n_groups, group_size)


def expand_stat(stat: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """A (rows, G) per-group statistic repeated over its columns: (rows, cols). Row / tensor
    statistics of shape (rows, 1) / (1, 1) are returned as they are (they broadcast)."""
    if stat.shape[1] == 1:
        return stat
    assert group_size is not None
    return stat.repeat_interleave(group_size, dim=1)[:, :cols]


def absmax_scale(blocks: torch.Tensor) -> torch.Tensor:
    """``s = 127 / max|X|`` per block (last dim), guarded: 1 where that is not finite."""
    s = 127.0 / blocks.abs().amax(dim=-1)
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def zeropoint_params(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = 255 / (max - min)`` (range 1 for constant blocks, as the notebook) and ``z = round(-s min - 128)``."""
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    rng = hi - lo
    s = 255.0 / torch.where(rng > 0, rng, torch.ones_like(rng))
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, 255.0))
    z = torch.round(-s * lo - 128.0)
    return s, z


@dataclass
class QuantizedTensor:
    """int8 codes of a tensor with their scales (and zero-points for the zero-point scheme).

    ``q`` has the tensor's shape viewed as 2-D (rows, cols); ``scale`` (and ``zero``) are fp32 of
    shape (1, 1) per tensor, (rows, 1) per row or (rows, ceil(cols / group_size)) per group.
    De-quantization: ``(q - zero) / scale`` with the statistic of each element's block.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    granularity: str
    group_size: int | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``X' = (Xq - z) / s`` (absmax: ``Xq / s``), in ``dtype``, shape (rows, cols)."""
        cols = self.q.shape[1]
        w = self.q.float()
        if self.zero is not None:
            w = w - expand_stat(self.zero, cols, self.group_size)
        return (w / expand_stat(self.scale, cols, self.group_size)).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes plus their statistics."""
        n = self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n


def absmax_quantize(x: torch.Tensor, granularity: str = "tensor", group_size: int | None = None) -> QuantizedTensor:
    """Absmax (symmetric) int8: ``s = 127 / max|X|``, ``Xq = round(s X)`` per block."""
    check_granularity(granularity, group_size)
    b = to_blocks(x, granularity, group_size)
    s = absmax_scale(b)  # (rows, G)
    q = torch.round(b * s.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    q = q.reshape(b.shape[0], -1)[:, : _cols(x)] if granularity != "tensor" else q.reshape(_rows(x), -1)
    return QuantizedTensor(q.contiguous(), s.contiguous(), None, granularity, group_size)


def zeropoint_quantize(x: torch.Tensor, granularity: str = "tensor", group_size: int | None = None) -> QuantizedTensor:
    """Zero-point (asymmetric) int8: ``Xq = clip(round(s X + z), -128, 127)`` per block."""
    check_granularity(granularity, group_size)
    b = to_blocks(x, granularity, group_size)
    s, z = zeropoint_params(b)
    q = torch.round(b * s.unsqueeze(-1) + z.unsqueeze(-1)).clamp_(-128, 127).to(torch.int8)
    q = q.reshape(b.shape[0], -1)[:, : _cols(x)] if granularity != "tensor" else q.reshape(_rows(x), -1)
    return QuantizedTensor(q.contiguous(), s.contiguous(), z.contiguous(), granularity, group_size)


def quantize_tensor(x: torch.Tensor, method: str, granularity: str = "row", group_size: int | None = None) -> QuantizedTensor:
    """Quantize ``x`` with ``method`` (absmax | zeropoint; llm.int8 stores absmax per row)."""
    if method == "zeropoint":
        return zeropoint_quantize(x, granularity, group_size)
    if method in ("absmax", "llm.int8"):
        return absmax_quantize(x, granularity, group_size)
    raise UserError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")


def fake_quantize(x: torch.Tensor, method: str, granularity: str = "tensor", group_size: int | None = None) -> torch.Tensor:
    """The notebook's operation: ``x`` replaced by its de-quantized value, same shape and dtype."""
    return quantize_tensor(x, method, granularity, group_size).dequantize(x.dtype).reshape(x.shape)


def _rows(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 1 else 1


def _cols(x: torch.Tensor) -> int:
    return x.numel() // _rows(x)


MAX_GROUP = 1 << 20


def check_granularity(granularity: str, group_size: int | None) -> None:
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
    if granularity == "group" and (group_size is None or group_size < 1):
        raise UserError(f"group granularity needs a group size >= 1 (got {group_size})", "pass --group-size, e.g. 128")
    if granularity == "group" and group_size > MAX_GROUP:
        raise UserError(f"--group-size {group_size} is over {MAX_GROUP:,} (wider than any weight row)",
                        "pass e.g. --group-size 128, or --granularity row for one scale per row")


