"""Loss functions and log-probability helpers for SFT, reward modelling, DPO and SimPO.

Every function here is a pure function of tensors: trainers compose them and never re-derive
the math. Each loss returns per-example values (reduce with `.mean()` in the trainer) unless
its docstring says otherwise.

Alignment convention for token log-probabilities: `logits[:, t]` scores `labels[:, t]`. The
caller aligns them; for a causal LM, whose logits at position t predict token t + 1, use
`shift_for_causal_lm` first.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rlhf_core.training.settings import DPO_LOSS_TYPES

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
    _require_same_shape(input_ids=input_ids, mask=mask)
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
        _require_same_shape(labels=labels, mask=mask)
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


# --------------------------------------------------------------------------------------------
# Reward-model losses
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Bradley–Terry pairwise loss for reward models, per pair.

    L = −log σ(r⁺ − r⁻ − m)

    computed with `logsigmoid` for stability. It is not clamped: a misranked pair (r⁺ < r⁻)
    keeps a gradient of magnitude 1 − σ(r⁺ − r⁻ − m), which approaches 1.

    Bradley & Terry (1952), "Rank analysis of incomplete block designs"; as the reward-model
    loss in Ouyang et al. (2022), InstructGPT, arXiv:2203.02155. The margin m (e.g. from a
    preference-strength rating) follows Touvron et al. (2023), Llama 2, arXiv:2307.09288.

    Args:
        chosen_rewards: (batch,) rewards r⁺ of the preferred responses.
        rejected_rewards: (batch,) rewards r⁻ of the other responses.
        margin: optional m, a float or a tensor shaped like the rewards.

    Returns:
        (batch,) per-pair losses.
    """
    _require_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    reward_gap = chosen_rewards - rejected_rewards
    if margin is not None:
        if isinstance(margin, Tensor) and margin.dim() > 0:
            _require_same_shape(chosen_rewards=chosen_rewards, margin=margin)
        reward_gap = reward_gap - margin
    return -F.logsigmoid(reward_gap)


def plackett_luce_loss(scores: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Plackett–Luce negative log-likelihood of an observed ranking, per example.

    With scores s₁ … s_L of L responses listed best first,

        L = −Σ_{i=1}^{L−1} [ sᵢ − log Σ_{j=i}^{L} exp(sⱼ) ]

    i.e. the best response is picked from all L, the second from the remaining L − 1, and so
    on. At L = 2 this is exactly the Bradley–Terry loss −log σ(s₁ − s₂).

    Plackett (1975), "The analysis of permutations"; Luce (1959), "Individual choice behavior".
    InstructGPT (Ouyang et al. 2022, arXiv:2203.02155) collects rankings of K = 4..9 responses
    but trains on all C(K, 2) pairwise comparisons (see `pairwise_ranking_loss`); here we use
    the full Plackett–Luce likelihood, as analysed by Zhu, Jordan & Jiao (2023),
    arXiv:2301.11270.

    Args:
        scores: (batch, K) scores in preferred-first order.
        lengths: optional (batch,) integers L in [2, K], the number of real responses per
            example; entries at positions ≥ L are padding and affect neither the loss nor any
            gradient. Defaults to K for every example.

    Returns:
        (batch,) per-example losses.
    """
    valid = _ranking_mask(scores, lengths)  # (batch, K)
    num_responses = valid.sum(-1)  # (batch,)
    positions = torch.arange(scores.shape[1], device=scores.device)
    # A large finite fill (not -inf) keeps logcumsumexp and its gradient free of NaN.
    padded = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    # log Σ_{j ≥ i} exp(s_j) over real responses, by a reversed cumulative logsumexp.
    remaining_logsumexp = padded.flip(-1).logcumsumexp(-1).flip(-1)  # (batch, K)
    is_choice = positions < (num_responses - 1).unsqueeze(-1)  # (batch, K): i < L − 1
    choice_logprobs = (padded - remaining_logsumexp).masked_fill(~is_choice, 0.0)
    return -choice_logprobs.sum(-1)


def pairwise_ranking_loss(scores: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Mean Bradley–Terry loss over all pairs of a ranking, per example (InstructGPT form).

    L = 1 / C(L, 2) · Σ_{i < j ≤ L} −log σ(sᵢ − sⱼ)

    Ouyang et al. (2022), InstructGPT, arXiv:2203.02155, eq. 1: all C(K, 2) comparisons from
    one ranking are kept in one example so the reward model sees each prompt once per epoch.

    Args:
        scores: (batch, K) scores in preferred-first order.
        lengths: optional (batch,) integers L in [2, K]; positions ≥ L are padding and affect
            neither the loss nor any gradient. Defaults to K.

    Returns:
        (batch,) per-example losses.
    """
    valid = _ranking_mask(scores, lengths)  # (batch, K)
    num_responses = valid.sum(-1)  # (batch,)
    num_slots = scores.shape[1]
    better_first = torch.ones(num_slots, num_slots, dtype=torch.bool, device=scores.device)
    better_first = better_first.triu(diagonal=1)  # (K, K): i < j
    is_pair = better_first & valid.unsqueeze(1) & valid.unsqueeze(2)  # (batch, K, K)
    score_gaps = scores.unsqueeze(2) - scores.unsqueeze(1)  # (batch, K, K): s_i − s_j
    pair_losses = (-F.logsigmoid(score_gaps)).masked_fill(~is_pair, 0.0)
    num_pairs = num_responses * (num_responses - 1) // 2
    return pair_losses.sum((1, 2)) / num_pairs


def _ranking_mask(scores: Tensor, lengths: Tensor | None) -> Tensor:
    """(batch, K) bool, True at real responses; validates `scores` and `lengths`."""
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(
            "scores must be a floating-point tensor of shape (batch, K) but has shape "
            f"{tuple(scores.shape)} and dtype {scores.dtype}."
        )
    batch, num_slots = scores.shape
    if lengths is None:
        if num_slots < 2:
            raise ValueError(f"a ranking needs at least 2 responses but scores has K={num_slots}.")
        return torch.ones_like(scores, dtype=torch.bool)
    if lengths.shape != (batch,) or lengths.is_floating_point():
        raise ValueError(
            f"lengths must be an integer tensor of shape ({batch},) but has shape "
            f"{tuple(lengths.shape)} and dtype {lengths.dtype}."
        )
    if batch > 0 and (lengths.min() < 2 or lengths.max() > num_slots):
        raise ValueError(
            f"lengths must lie in [2, {num_slots}] (at least two ranked responses, at most K) "
            f"but range from {int(lengths.min())} to {int(lengths.max())}."
        )
    positions = torch.arange(num_slots, device=scores.device)
    return positions < lengths.to(scores.device).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# Direct preference optimisation
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-family losses on sequence log-probabilities, per pair.

    With h = (log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻)):

    - "sigmoid": L = −(1 − ε) log σ(β h) − ε log σ(−β h).
      Rafailov et al. (2023), DPO, arXiv:2305.18290; ε > 0 is conservative DPO for noisy
      labels, Mitchell (2023), "A note on DPO with noisy preferences & relationship to IPO".
    - "ipo": L = (h − 1/(2β))². Azar et al. (2023), IPO, arXiv:2310.12036. The paper uses
      per-token average log-probabilities; the caller chooses sum or mean through
      `sequence_logprobs(..., average=...)`.
    - "hinge": L = max(0, 1 − β h). SLiC-HF, Zhao et al. (2023), arXiv:2305.10425.

    Implicit rewards r⁺ = β (log π(y⁺) − log π_ref(y⁺)) and r⁻ = β (log π(y⁻) − log π_ref(y⁻))
    are returned detached, for logging and reward accuracy.

    Args:
        policy_chosen_logps: (batch,) log π(y⁺ | x), e.g. from `sequence_logprobs`.
        policy_rejected_logps: (batch,) log π(y⁻ | x).
        ref_chosen_logps: (batch,) log π_ref(y⁺ | x).
        ref_rejected_logps: (batch,) log π_ref(y⁻ | x).
        beta: β > 0, the strength of the implicit KL penalty (IPO: the regularisation τ).
        loss_type: one of "sigmoid", "ipo", "hinge".
        label_smoothing: ε in [0, 0.5), the assumed label-flip rate; "sigmoid" only.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (batch,).
    """
    _require_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES} but is {loss_type!r}.")
    _require_positive_beta(beta)
    _require_valid_label_smoothing(label_smoothing)
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing={label_smoothing} only applies to loss_type='sigmoid'; set it "
            f"to 0 for loss_type={loss_type!r}."
        )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (batch,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (batch,)
    logratio_gap = chosen_logratios - rejected_logratios  # h, (batch,)
    if loss_type == "sigmoid":
        losses = _smoothed_logistic_loss(beta * logratio_gap, label_smoothing)
    elif loss_type == "ipo":
        losses = (logratio_gap - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = F.relu(1.0 - beta * logratio_gap)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO: reference-free, length-normalised preference loss, per pair.

    Rewards are length-normalised log-probabilities r = β / |y| · log π(y | x), and

        L = −(1 − ε) log σ(r⁺ − r⁻ − γ) − ε log σ(−(r⁺ − r⁻ − γ)),  γ = gamma_beta_ratio · β.

    With ε = 0 (the paper's setting) this is −log σ(r⁺ − r⁻ − γ). Meng, Xia & Chen (2024),
    SimPO, arXiv:2405.14734.

    Args:
        policy_chosen_logps: (batch,) SUMMED log π(y⁺ | x), i.e. `sequence_logprobs(...)` with
            `average=False`; the division by length happens here.
        policy_rejected_logps: (batch,) summed log π(y⁻ | x).
        chosen_lengths: (batch,) number of counted tokens |y⁺| (> 0).
        rejected_lengths: (batch,) number of counted tokens |y⁻| (> 0).
        beta: β > 0, the reward scale.
        gamma_beta_ratio: γ / β, the target reward margin relative to β.
        label_smoothing: ε in [0, 0.5), as in conservative DPO.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (batch,); the rewards are detached.
    """
    _require_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _require_positive_beta(beta)
    _require_valid_label_smoothing(label_smoothing)
    if chosen_lengths.numel() > 0 and (
        (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any()
    ):
        raise ValueError(
            "chosen_lengths and rejected_lengths must be positive token counts; drop pairs "
            "with an empty completion."
        )
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths  # (batch,)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths  # (batch,)
    gamma = gamma_beta_ratio * beta
    losses = _smoothed_logistic_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def reward_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs whose chosen reward is strictly higher (ties count as wrong).

    Args:
        chosen_rewards: (batch,) rewards of the preferred responses.
        rejected_rewards: (batch,) rewards of the other responses.

    Returns:
        Scalar float tensor in [0, 1].
    """
    _require_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return (chosen_rewards > rejected_rewards).float().mean()


def _smoothed_logistic_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1 − ε) log σ(x) − ε log σ(−x), the logistic loss with label-flip rate ε."""
    losses = -F.logsigmoid(logits)
    if label_smoothing == 0.0:
        return losses
    return (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _require_same_shape(**tensors: Tensor) -> None:
    """Raise a ValueError naming the first tensor whose shape differs from the first one."""
    (first_name, first), *others = tensors.items()
    for name, tensor in others:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape "
                f"{tuple(first.shape)}; they must match (one value per example)."
            )


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


def _require_positive_beta(beta: float) -> None:
    """Raise a ValueError unless β > 0."""
    if not beta > 0:
        raise ValueError(f"beta must be positive but is {beta}.")


def _require_valid_label_smoothing(label_smoothing: float) -> None:
    """Raise a ValueError unless ε lies in [0, 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5) (the assumed label-flip rate) but is "
            f"{label_smoothing}."
        )
