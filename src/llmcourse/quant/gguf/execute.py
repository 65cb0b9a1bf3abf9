"""GGUF tensors executed as stored: modules that hold ggml's quantized blocks and multiply by them.

A GGUF loaded for generation, serving or evaluation keeps its quantized bytes (mapped from the file)
instead of fp32 copies: every projection whose tensor has a block type the runtime's kernels run
(:data:`llmcourse.core.runtime.kernels.BLOCK_TYPES`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
becomes a :class:`BlockLinear`, and a quantized token-embedding table a :class:`BlockEmbedding`
(rows de-quantized on lookup; the tied output head multiplies by the same blocks).

The product (``core/runtime/kernels``) quantizes the activations to 8 bits per block as llama.cpp's
CPU backend does (Q8_0 blocks of 32 for the legacy types, Q8_K blocks of 256 for the k-quants), so
``y = x Wᵀ`` is the de-quantize-then-multiply product up to that rounding. ``BlockLinear.forward``
serves transformers' eager forward; ``decode_weight`` hands the runtime a
:class:`~llmcourse.core.runtime.weights.BlockCodes` (the same kernel, called inside the compiled step).
"""

from __future__ import annotations

import torch
from torch import nn

from llmcourse.core.runtime.kernels import BLOCK_TYPES, block_rows, forced_level, row_bytes
from llmcourse.core.runtime.weights import BLOCK_GEMM_ROWS, BlockCodes, block_linear

GEMM_ROWS = BLOCK_GEMM_ROWS  # from this many rows: de-quantize + fp32 GEMM (core's block_linear)


def runnable(qtype: int, in_features: int) -> bool:
    """Whether the kernels run a tensor of ``qtype`` with rows of ``in_features`` values."""
    return int(qtype) in BLOCK_TYPES and in_features % BLOCK_TYPES[int(qtype)][0] == 0


class BlockLinear(nn.Module):
    """``nn.Linear``'s product with the weight (O, I) kept as ggml blocks: ``blocks`` uint8 (O, row bytes)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, tied: bool = False) -> None:
        super().__init__()
        self.tied = tied  # multiplies by the embedding table's blocks (counted there)
        if blocks.shape != (out_features, row_bytes(int(qtype), in_features)):
            raise ValueError(f"blocks of shape {tuple(blocks.shape)} do not hold a ({out_features}, {in_features}) weight")
        self.qtype, self.in_features, self.out_features = int(qtype), in_features, out_features
        self.register_buffer("blocks", blocks, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A few rows through the block kernel, many as de-quantized chunks and the fp32 GEMM
        (:func:`~llmcourse.core.runtime.weights.block_linear`)."""
        y = block_linear(self.decode_weight(), x.reshape(-1, self.in_features).float(), self.in_features)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_count(self) -> int:
        """Weights held (``LoadedModel.n_params``); 0 for a head tied to the embeddings."""
        return 0 if self.tied else self.in_features * self.out_features

    def decode_weight(self) -> BlockCodes:
        return BlockCodes(self.blocks, self.qtype, self.out_features, self.bias, forced_level())

    def dequantized(self) -> torch.Tensor:
        """The weight (O, I) in fp32 (tests, conversions)."""
        return block_rows(self.blocks, torch.arange(self.out_features), self.qtype, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


class BlockEmbedding(nn.Module):
    """An embedding table (V, H) kept as ggml blocks; a lookup de-quantizes the rows it returns
    (times ``scale``: Gemma's sqrt(H), as its scaled embedding module)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, dim: int, scale: float | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.qtype, self.embedding_dim, self.num_embeddings = int(qtype), dim, blocks.shape[0]
        self.scale, self.dtype = scale, dtype
        self.register_buffer("blocks", blocks, persistent=False)

    def weight_count(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = block_rows(self.blocks, ids.reshape(-1).to(torch.long).contiguous(), self.qtype, self.embedding_dim)
        y = y.to(self.dtype)
        if self.scale is not None:
            y = y * torch.tensor(self.scale, dtype=self.dtype)
        return y.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
