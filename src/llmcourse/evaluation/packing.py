"""Many questions per forward: each question's choices as one *tree* sequence, questions batched by length, the
LM head applied only where a log-probability is read.

Prefix sharing through the K/V cache (:meth:`Scorer._score_cached`) runs one question per forward: two small
forwards (the context, then its choices), whose matrix products are too thin to keep a CPU core busy, while
lm-eval's ``hf`` backend at batch 8 runs eight requests as one wide product. Here the unit is the question,
written once as a tree (the idea of tree attention in speculative decoding, e.g. SpecInfer, Miao et al. 2023,
and of packed sequences with a block mask, e.g. Krell et al. 2021 "Efficient sequence packing"):

    tokens     = P + T_1 + T_2 + ... + T_k        P the choices' common input prefix, T_i choice i's remaining input
    position   = 0..|P|-1 for P, then |P|..|P|+|T_i|-1 for every T_i (each branch continues the prefix)
    attend(a, b) = b <= a  and  (b in P  or  branch(b) == branch(a))

so every token sees exactly the tokens it sees in its own request's forward (its prefix and its own earlier
tokens, at the same positions): the same function of the same inputs, up to floating-point summation order. The
trees are sorted by length and packed, first-fit decreasing, into the rows of batches of at most ``max_tokens``
tokens (rows x width, padding included; the width is the batch's longest tree, so shorter trees share a row,
block-diagonally); each batch is one forward of the base model with a 4D additive mask (0 where ``attend``, the dtype's minimum
elsewhere; a padding token attends to itself) and explicit ``position_ids``. The LM head (49,152 x 576 for
the default model: a fifth of its FLOPs) and the log-softmax then run only on the hidden states whose next-token
distribution a continuation reads, in chunks, as

    ll_i = sum_j log_softmax(z_{r_ij})[c_ij],     is_greedy_i = all_j argmax(z_{r_ij}) == c_ij

with ``z_r = lm_head(h_r)`` the logits at tree index ``r``, ``c_ij`` choice i's j-th continuation token and
``r_ij`` the index of the token before it (in P when the continuation starts inside the common prefix).

It needs a model whose base forward takes a 4D float mask as given and ``position_ids`` (transformers' Llama,
Mistral, Qwen2/3 and GPT-2 families: :func:`packable`); others keep the cached path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# model types whose transformers forward takes a ready 4D additive mask and position_ids unchanged, and whose
# logits are lm_head(final hidden state) with nothing after it (no soft-capping or logit scale)
PACKABLE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})


@dataclass(frozen=True)
class Tree:
    """One question's choices as one sequence (see the module docstring)."""

    tokens: list[int]  # P + T_1 + ... + T_k
    positions: list[int]
    branch: list[int]  # -1 in P, i in T_i
    reads: list[list[int]]  # per choice: the tree index whose next-token distribution predicts each target
    targets: list[list[int]]  # per choice: its continuation tokens (after lm-eval's left truncation)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def build_tree(encoded: Sequence[tuple[list[int], list[int]]], max_length: int) -> Tree:
    """The tree of one question's (context, continuation) requests; each request is cut as lm-eval cuts it,
    ``(ctx + cont)[-(L + 1):]``, and reads its input ``[:-1]``."""
    seqs = [(c + t)[-(max_length + 1):] for c, t in encoded]
    starts = [len(s) - len(t) for s, (_, t) in zip(seqs, encoded, strict=True)]  # index of the first target
    inputs = [s[:-1] for s in seqs]
    p = common_prefix(inputs)
    tokens, positions, branch = list(inputs[0][:p]), list(range(p)), [-1] * p
    reads, targets = [], []
    for i, (inp, s, first) in enumerate(zip(inputs, seqs, starts, strict=True)):
        offset = len(tokens) - p  # tree index of this branch's position p
        tail = inp[p:]
        tokens += tail
        positions += range(p, p + len(tail))
        branch += [i] * len(tail)
        reads.append([j if j < p else j + offset for j in range(first - 1, len(inp))])
        targets.append(s[first:])
    return Tree(tokens, positions, branch, reads, targets)


def batches(lengths: Sequence[int], max_tokens: int) -> list[list[list[int]]]:
    """The trees cut into forwards: each batch a list of rows, each row a list of tree indices. First-fit
    decreasing: trees sorted longest first; a batch's width is its first (longest) tree; a tree goes into the
    first row of the batch with room left, else a new row while ``rows x width <= max_tokens``, else it opens the
    next batch (a tree longer than ``max_tokens`` goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[list[int]]] = []
    width, free = 0, []  # the current batch's width and its rows' free room
    for i in order:
        n = lengths[i]
        row = next((r for r, f in enumerate(free) if f >= n), None) if out else None
        if row is not None:
            out[-1][row].append(i)
            free[row] -= n
        elif out and (len(free) + 1) * width <= max_tokens:
            out[-1].append([i])
            free.append(width - n)
        else:
            out.append([[i]])
            width, free = n, [0]
    return out


def tree_mask(segment: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (rows, 1, W, W) additive mask of rows of packed trees: ``segment`` (rows, W) numbers the trees of a
    row (-1 in padding), ``branch`` is -1 in a tree's prefix, the choice index in a branch and -2 in padding.
    Block-diagonal over trees, causal, and within a tree the prefix plus the token's own branch."""
    W = branch.shape[1]
    causal = torch.ones(W, W, dtype=torch.bool, device=branch.device).tril()
    same_tree = segment[:, :, None] == segment[:, None, :]  # (rows, W, W)
    same_branch = branch[:, :, None] == branch[:, None, :]  # padding sees padding: no empty row
    prefix = (branch == -1)[:, None, :]
    allowed = causal & same_tree & (same_branch | prefix)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=branch.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def packable(model: Any) -> bool:
    """Whether the tree path can run ``model``: a known transformers causal LM with a base model, an output
    embedding, and a forward taking ``attention_mask`` and ``position_ids``."""
    import inspect

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in PACKABLE_TYPES:
        return False
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        return False
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params and "position_ids" in params


@torch.inference_mode()
def score_trees(model: Any, trees: Sequence[Tree], max_tokens: int, head_rows: int = 512,
                on_batch: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, is_greedy) of every choice of every tree, in the trees' order."""
    base, head = model.base_model, model.get_output_embeddings()
    param = next(model.parameters())
    device = param.device
    dtype = param.dtype if param.is_floating_point() else torch.float32
    out: list[list[tuple[float, bool]] | None] = [None] * len(trees)
    for batch in batches([len(t.tokens) for t in trees], max_tokens):
        W = len(trees[batch[0][0]].tokens)
        ids = torch.zeros(len(batch), W, dtype=torch.long)
        pos = torch.zeros(len(batch), W, dtype=torch.long)
        seg = torch.full((len(batch), W), -1, dtype=torch.long)
        br = torch.full((len(batch), W), -2, dtype=torch.long)
        rows, tgts, group = [], [], []
        for r, row in enumerate(batch):
            at = 0
            for k, i in enumerate(row):
                t = trees[i]
                n = len(t.tokens)
                ids[r, at:at + n] = torch.tensor(t.tokens)
                pos[r, at:at + n] = torch.tensor(t.positions)
                seg[r, at:at + n] = k
                br[r, at:at + n] = torch.tensor(t.branch)
                for rd, tg in zip(t.reads, t.targets, strict=True):
                    rows += [r * W + at + j for j in rd]
                    tgts += tg
                group.append(i)
                at += n
        hidden = base(input_ids=ids.to(device), attention_mask=tree_mask(seg, br, dtype).to(device),
                      position_ids=pos.to(device), use_cache=False).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(rows, device=device)]  # (n_reads, H)
        tgt = torch.tensor(tgts, device=device)
        lp_parts, greedy_parts = [], []
        for k in range(0, h.shape[0], head_rows):  # the head on the read rows only, a chunk at a time
            z = head(h[k:k + head_rows]).float()  # (chunk, V)
            tk = tgt[k:k + head_rows]
            # log_softmax as lm-eval computes it: torch.logsumexp sums the 49k exponentials less accurately in
            # fp32 (up to 1e-5 per token on the default model, 1e-4 over a continuation)
            lp_parts.append(torch.log_softmax(z, dim=-1).gather(1, tk[:, None])[:, 0])
            greedy_parts.append(z.argmax(-1) == tk)
        lp = torch.cat(lp_parts).double().tolist()
        greedy = torch.cat(greedy_parts).tolist()
        k = 0
        for i in group:
            res = []
            for tg in trees[i].targets:
                n = len(tg)
                res.append((float(sum(lp[k:k + n])), bool(all(greedy[k:k + n]))))
                k += n
            out[i] = res
        if on_batch is not None:
            on_batch(len(group))
    return [o for o in out if o is not None]
