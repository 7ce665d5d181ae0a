"""Token and sequence log-probabilities, token entropy and the SFT loss, computed in chunks.

Pure functions of tensors. The log-probability of a label is computed as gather minus
logsumexp, forward and backward chunk by chunk (custom autograd functions), so no
full-vocabulary log-softmax is ever materialised.

Alignment convention for token log-probabilities: `logits[:, t]` scores `labels[:, t]`. The
caller aligns them; for a causal LM, whose logits at position t predict token t + 1, use
`shift_for_causal_lm` first.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rlhf_core.algorithms._checks import require_same_shape

# A chunk of logits holds about this many elements (128 MiB in float32), whatever the vocab.
_CHUNK_ELEMENTS = 2**25


# --------------------------------------------------------------------------------------------
# Token log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def shift_for_causal_lm(
    logits: Tensor, input_ids: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Align causal-LM logits with the tokens they predict.

    A causal LM's logits at position t score token t + 1, so the aligned triple is
    `(logits[:, :-1], input_ids[:, 1:], mask[:, 1:])`. The returned logits are a view (no copy);
    the functions in this module read views without copying them.

    Args:
        logits: (batch, seq, vocab) model output for `input_ids`.
        input_ids: (batch, seq) token ids that were fed to the model.
        mask: (batch, seq) 1 where a token counts as a target (e.g. completion tokens).

    Returns:
        (batch, seq - 1, vocab) logits, (batch, seq - 1) labels, (batch, seq - 1) mask.
    """
    if logits.dim() != 3:
        raise ValueError(
            f"logits must have shape (batch, seq, vocab) but has shape {tuple(logits.shape)}."
        )
    require_same_shape(input_ids=input_ids, mask=mask)
    if tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"logits has shape {tuple(logits.shape)} but input_ids has shape "
            f"{tuple(input_ids.shape)}; the first two dimensions (batch, seq) must match."
        )
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"sequences have length {input_ids.shape[1]}; shifting for a causal LM needs at "
            "least 2 tokens per sequence."
        )
    return logits[:, :-1], input_ids[:, 1:], mask[:, 1:]


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Log-probability of each label under its (already aligned) logits.

    log p(yₜ | zₜ) = zₜ[yₜ] − log Σᵥ exp(zₜ[v]), computed as gather minus logsumexp so no
    full-vocabulary log-softmax is materialised. Forward and backward both run in chunks of at
    most `chunk_tokens` positions: apart from the gradient of `logits` itself, no temporary is
    larger than one chunk. Half-precision logits are upcast to float32 chunk by chunk. Checking
    that counted labels are in range reads two numbers back from the device (one sync).

    Args:
        logits: (batch, seq, vocab), aligned with `labels` (see `shift_for_causal_lm`).
        labels: (batch, seq) integer token ids.
        mask: optional (batch, seq) bool or 0/1; where it is 0 the label may hold anything
            (e.g. -100 or a pad id), is never gathered, and the output is 0.
        chunk_tokens: positions per chunk; by default enough to hold about 2²⁵ logits.

    Returns:
        (batch, seq) log-probabilities (float32 for half-precision logits, else logits' dtype).
    """
    _check_logits_and_labels(logits, labels)
    if mask is None:
        valid = torch.ones_like(labels, dtype=torch.bool)
    else:
        require_same_shape(labels=labels, mask=mask)
        valid = mask.bool()
    safe_labels = labels.long().masked_fill(~valid, 0)  # gather needs int64 indices
    vocab_size = logits.shape[-1]
    if safe_labels.numel() > 0 and (safe_labels.min() < 0 or safe_labels.max() >= vocab_size):
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) wherever they count; pass a mask that is 0 "
            "at ignored positions (e.g. label -100) or fix the token ids."
        )
    chunk_tokens = _resolve_chunk_tokens(chunk_tokens, vocab_size)
    logprobs = _ChunkedLabelLogprobs.apply(logits, safe_labels, chunk_tokens)  # (batch, seq)
    return logprobs.masked_fill(~valid, 0.0)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    average: bool = False,
    *,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Log-probability of each sequence: the sum (or mean) of its counted token log-probs.

    log π(y | x) = Σₜ mₜ · log p(yₜ | zₜ); with `average=True`, divided by Σₜ mₜ.

    `logits` and `labels` must already be aligned (`logits[:, t]` scores `labels[:, t]`); for a
    causal LM call `shift_for_causal_lm` first. Masked positions may hold any label.

    Args:
        logits: (batch, seq, vocab).
        labels: (batch, seq) integer token ids.
        mask: (batch, seq) bool or 0/1, 1 where the token counts (usually completion tokens).
        average: return the per-token mean instead of the sum (IPO, SimPO-style scoring).
        chunk_tokens: positions per chunk, see `token_logprobs`.

    Returns:
        (batch,) per-sequence log-probabilities.
    """
    logprobs = token_logprobs(logits, labels, mask=mask, chunk_tokens=chunk_tokens)  # (b, s)
    summed = logprobs.sum(-1)  # (batch,)
    if not average:
        return summed
    counts = mask.bool().sum(-1)  # (batch,)
    if (counts == 0).any():
        empty_rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"sequences {empty_rows} have no counted tokens, so their mean log-probability is "
            "undefined; drop empty completions or raise the maximum length."
        )
    return summed / counts


def token_entropy(logits: Tensor, *, chunk_tokens: int | None = None) -> Tensor:
    """Entropy of the categorical distribution at each position.

    H(zₜ) = −Σᵥ pᵥ log pᵥ with log pᵥ = zₜ[v] − logsumexp(zₜ); terms with pᵥ = 0 (e.g. logits of
    −inf) contribute 0. Computed in chunks like `token_logprobs`.

    Args:
        logits: (batch, seq, vocab).
        chunk_tokens: positions per chunk, see `token_logprobs`.

    Returns:
        (batch, seq) entropies in nats.
    """
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            "logits must be a floating-point tensor of shape (batch, seq, vocab) but has shape "
            f"{tuple(logits.shape)} and dtype {logits.dtype}."
        )
    chunk_tokens = _resolve_chunk_tokens(chunk_tokens, logits.shape[-1])
    return _ChunkedEntropy.apply(logits, chunk_tokens)


def sft_loss(
    logits: Tensor, labels: Tensor, mask: Tensor, *, chunk_tokens: int | None = None
) -> Tensor:
    """Supervised fine-tuning loss: token-mean cross-entropy over counted tokens.

    L = −Σ_{b,t} m_{b,t} log p(y_{b,t} | z_{b,t}) / Σ_{b,t} m_{b,t}

    The mean runs over all counted tokens of the whole batch (not a mean of per-sequence
    means), so long completions weigh more, as in standard causal-LM training. Mask out the
    prompt and padding. Inputs are aligned as in `sequence_logprobs`. This is the supervised
    fine-tuning step of Ouyang et al. (2022), InstructGPT, arXiv:2203.02155.

    Args:
        logits: (batch, seq, vocab).
        labels: (batch, seq) integer token ids.
        mask: (batch, seq) bool or 0/1, 1 on completion tokens.
        chunk_tokens: positions per chunk, see `token_logprobs`.

    Returns:
        Scalar loss.
    """
    logprobs = token_logprobs(logits, labels, mask=mask, chunk_tokens=chunk_tokens)  # (b, s)
    token_count = mask.bool().sum()
    if token_count == 0:
        raise ValueError(
            "the mask has no counted tokens, so the SFT loss is undefined; check that "
            "completions are not empty or truncated away."
        )
    return -logprobs.sum() / token_count


def _resolve_chunk_tokens(chunk_tokens: int | None, vocab_size: int) -> int:
    """Default to about `_CHUNK_ELEMENTS` logits per chunk; reject non-positive sizes."""
    if chunk_tokens is None:
        return max(1, _CHUNK_ELEMENTS // max(vocab_size, 1))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer but is {chunk_tokens}.")
    return chunk_tokens


def _token_blocks(batch: int, seq: int, chunk_tokens: int) -> Iterator[tuple[slice, slice]]:
    """Cover a (batch, seq) grid with (rows, positions) blocks of at most `chunk_tokens` cells.

    Blocks take whole rows when a row fits, else cut rows along the sequence. Indexing with
    slices gives views, so a shifted (non-contiguous) logits view is never copied whole.
    """
    if batch * seq <= chunk_tokens:
        yield slice(None), slice(None)
        return
    rows_per_block = max(1, chunk_tokens // seq)
    positions_per_block = min(seq, chunk_tokens)
    for row_start in range(0, batch, rows_per_block):
        for position_start in range(0, seq, positions_per_block):
            yield (
                slice(row_start, row_start + rows_per_block),
                slice(position_start, position_start + positions_per_block),
            )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float16/bfloat16 logits lose too much precision in logsumexp; compute in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Both functions below compute forward AND backward block by block. Plain autograd over chunks
# would bound only the forward pass: each chunk's backward yields its own (chunk, vocab)
# gradient, all of which are held until they are stitched into the full gradient.


class _ChunkedLabelLogprobs(torch.autograd.Function):
    """log p(y) = z[y] − logsumexp(z), with gradient ∂/∂z_v = 1[v = y] − softmax(z)_v."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_tokens: int) -> Tensor:
        batch, seq, _ = logits.shape
        compute_dtype = _compute_dtype(logits.dtype)
        logprobs = logits.new_empty((batch, seq), dtype=compute_dtype)
        logsumexps = torch.empty_like(logprobs)  # kept for the backward pass, (batch, seq)
        for rows, positions in _token_blocks(batch, seq, chunk_tokens):
            block = logits[rows, positions].to(compute_dtype)  # (b, s, vocab)
            block_labels = labels[rows, positions].unsqueeze(-1)  # (b, s, 1)
            block_logsumexp = torch.logsumexp(block, dim=-1)  # (b, s)
            logsumexps[rows, positions] = block_logsumexp
            picked = block.gather(-1, block_labels).squeeze(-1)  # (b, s)
            logprobs[rows, positions] = picked - block_logsumexp
        ctx.save_for_backward(logits, labels, logsumexps)
        ctx.chunk_tokens = chunk_tokens
        return logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, logsumexps = ctx.saved_tensors
        batch, seq, _ = logits.shape
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for rows, positions in _token_blocks(batch, seq, ctx.chunk_tokens):
            block = logits[rows, positions].to(logsumexps.dtype)  # (b, s, vocab)
            upstream = grad_logprobs[rows, positions].unsqueeze(-1)  # (b, s, 1)
            block_grad = (block - logsumexps[rows, positions].unsqueeze(-1)).exp_()  # softmax
            block_grad.mul_(-upstream)
            block_grad.scatter_add_(-1, labels[rows, positions].unsqueeze(-1), upstream)
            grad_logits[rows, positions] = block_grad
        return grad_logits, None, None


class _ChunkedEntropy(torch.autograd.Function):
    """H = −Σ_v p_v log p_v, with gradient ∂H/∂z_k = −p_k (log p_k + H)."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_tokens: int) -> Tensor:
        batch, seq, _ = logits.shape
        compute_dtype = _compute_dtype(logits.dtype)
        entropies = logits.new_empty((batch, seq), dtype=compute_dtype)
        logsumexps = torch.empty_like(entropies)  # kept for the backward pass, (batch, seq)
        for rows, positions in _token_blocks(batch, seq, chunk_tokens):
            block = logits[rows, positions].to(compute_dtype)  # (b, s, vocab)
            block_logsumexp = torch.logsumexp(block, dim=-1, keepdim=True)  # (b, s, 1)
            logsumexps[rows, positions] = block_logsumexp.squeeze(-1)
            probs, finite_log_probs = _probs_and_finite_log_probs(block, block_logsumexp)
            entropies[rows, positions] = -(probs * finite_log_probs).sum(-1)
        ctx.save_for_backward(logits, logsumexps, entropies)
        ctx.chunk_tokens = chunk_tokens
        return entropies

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropies: Tensor) -> tuple[Tensor, None]:
        logits, logsumexps, entropies = ctx.saved_tensors
        batch, seq, _ = logits.shape
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for rows, positions in _token_blocks(batch, seq, ctx.chunk_tokens):
            block = logits[rows, positions].to(logsumexps.dtype)  # (b, s, vocab)
            block_logsumexp = logsumexps[rows, positions].unsqueeze(-1)  # (b, s, 1)
            probs, finite_log_probs = _probs_and_finite_log_probs(block, block_logsumexp)
            finite_log_probs.add_(entropies[rows, positions].unsqueeze(-1))
            upstream = grad_entropies[rows, positions].unsqueeze(-1)  # (b, s, 1)
            grad_logits[rows, positions] = probs.mul_(finite_log_probs).mul_(-upstream)
        return grad_logits, None


def _probs_and_finite_log_probs(logits: Tensor, logsumexp: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax and log-softmax of a block, with log p set to 0 where p = 0 (so p·log p = 0)."""
    log_probs = logits - logsumexp  # (b, s, vocab)
    probs = log_probs.exp()
    return probs, log_probs.masked_fill_(probs == 0, 0.0)


def _check_logits_and_labels(logits: Tensor, labels: Tensor) -> None:
    """Validate (batch, seq, vocab) floating logits against (batch, seq) integer labels."""
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            "logits must be a floating-point tensor of shape (batch, seq, vocab) but has shape "
            f"{tuple(logits.shape)} and dtype {logits.dtype}."
        )
    if tuple(labels.shape) != tuple(logits.shape[:2]) or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape {tuple(logits.shape[:2])} (the first "
            f"two dimensions of logits) but has shape {tuple(labels.shape)} and dtype "
            f"{labels.dtype}."
        )
