"""Heterogeneous-rank LoRA maths (FlexLoRA, HetLoRA): pure functions over tensors and state dicts.

A LoRA module adds scale * B @ A to a frozen weight, with A (r, in), B (out, r) and
scale = alpha / r. Keys follow peft: `<module>.lora_A.<adapter>.weight`, `<module>.lora_B...`.
"""

from __future__ import annotations

import torch

from fedtune.algorithms.aggregate import State, weighted_mean


def lora_key(key: str) -> tuple[str, str, str] | None:
    """peft's name of a LoRA factor, parsed: `<module>.lora_A.<adapter>.weight` -> (module, "A",
    "<adapter>.weight"); None for any other key. The one place that reads peft's key names."""
    for which in ("A", "B"):
        prefix, found, rest = key.partition(f".lora_{which}.")
        if found:
            return prefix, which, rest
    return None


def lora_pairs(state: State) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key) for every LoRA module in `state`."""
    pairs = {}
    for key in state:
        parsed = lora_key(key)
        if parsed and parsed[1] == "A":
            prefix, _, rest = parsed
            b_key = f"{prefix}.lora_B.{rest}"
            if b_key not in state:
                raise ValueError(f"{key} has no matching {b_key}")
            pairs[prefix] = (key, b_key)
    return pairs


def split_lora(states: list[State]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """(LoRA pairs, the other keys, e.g. the head) of the first state."""
    pairs = lora_pairs(states[0])
    lora_keys = {k for pair in pairs.values() for k in pair}
    return pairs, [k for k in states[0] if k not in lora_keys]


def merged_delta_svd(As: list[torch.Tensor], Bs: list[torch.Tensor], coefficients: list[float]):
    """SVD of W = sum_k c_k * B_k @ A_k without forming W: returns U (out, R), S (R,), Vh (R, in).

    W = P @ Q with P = [c_1 B_1 ... c_K B_K] (out, R) and Q = [A_1; ...; A_K] (R, in), R = sum r_k.
    With P = Q_p R_p and Q^T = Q_q R_q (reduced QR), W = Q_p (R_p R_q^T) Q_q^T, so only the
    small (R, R) core needs an SVD: O((out + in) R^2) instead of O(out * in * min(out, in)).
    """
    P = torch.cat([c * B.double() for c, B in zip(coefficients, Bs)], dim=1)
    Q = torch.cat([A.double() for A in As], dim=0)
    q_p, r_p = torch.linalg.qr(P)
    q_q, r_q = torch.linalg.qr(Q.T)
    u_core, S, vh_core = torch.linalg.svd(r_p @ r_q.T)
    return q_p @ u_core, S, vh_core @ q_q.T


def svd_split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scale: float):
    """(B, A) of rank `rank` with scale * B @ A = the best rank-`rank` approximation U_r S_r Vh_r.

    Zero-pads when the SVD has fewer than `rank` components.
    """
    k = min(rank, S.numel())
    B = torch.zeros(U.shape[0], rank, dtype=U.dtype)
    A = torch.zeros(rank, Vh.shape[1], dtype=Vh.dtype)
    B[:, :k] = U[:, :k] * S[:k] / scale
    A[:k] = Vh[:k]
    return B, A


def flexlora_aggregate(states: list[State], weights: list[float], alpha: float, server_rank: int) -> State:
    """FlexLoRA: W = sum_k w_k (alpha / r_k) B_k A_k per module, kept as its rank-`server_rank` SVD.

    The result is a LoRA state of rank `server_rank` (scale alpha / server_rank) whose leading
    components are W's top singular directions; `truncate_for_client` cuts it to any rank.
    Non-LoRA keys (the head) are averaged by weight.
    """
    pairs, others = split_lora(states)
    total = float(sum(weights))
    merged = weighted_mean([{k: s[k] for k in others} for s in states], weights) if others else {}
    for a_key, b_key in pairs.values():
        As, Bs = [s[a_key] for s in states], [s[b_key] for s in states]
        coefficients = [(w / total) * alpha / A.shape[0] for w, A in zip(weights, As)]
        B, A = svd_split(*merged_delta_svd(As, Bs, coefficients), rank=server_rank, scale=alpha / server_rank)
        merged[a_key], merged[b_key] = A.to(As[0].dtype), B.to(Bs[0].dtype)
    return {k: merged[k] for k in states[0]}


def truncate_for_client(state: State, rank: int, rescale: bool) -> State:
    """Cut every LoRA pair of `state` to `rank`.

    rescale=True (FlexLoRA): B is multiplied by rank / R so that, under the client's own
    scale alpha / rank, the client's delta is the best rank-`rank` approximation of the
    global one. rescale=False (HetLoRA): plain truncation of A's rows and B's columns.
    """
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        server_rank = state[a_key].shape[0]
        if rank > server_rank:
            raise ValueError(f"client rank {rank} exceeds the server's rank {server_rank}")
        out[a_key] = state[a_key][:rank].clone()
        out[b_key] = state[b_key][:, :rank] * (rank / server_rank if rescale else 1.0)
    return out


def zero_pad(state: State, rank: int, rescale: bool = False) -> State:
    """HetLoRA: pad every LoRA pair with zeros up to `rank` (A rows, B columns).

    rescale=True multiplies B by rank / r, so that the padded pair under the larger rank's
    scale alpha / rank is the same delta as the client's pair under its own alpha / r.
    """
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        A, B = state[a_key], state[b_key]
        out[a_key] = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], dim=0)
        out[b_key] = torch.cat([B * (rank / B.shape[1] if rescale else 1.0), B.new_zeros(B.shape[0], rank - B.shape[1])],
                               dim=1)
    return out


def delta_norms(state: State, alpha: float) -> dict[str, float]:
    """Module prefix -> ||(alpha / r) B @ A||_F, the size of the update the module makes."""
    return {prefix: float(torch.linalg.norm((alpha / state[a].shape[0]) * state[b].double() @ state[a].double()))
            for prefix, (a, b) in lora_pairs(state).items()}


def hetlora_aggregate(states: list[State], weights: list[float], server_rank: int, rescale: bool = False,
                      sparsity_alpha: float | None = None) -> State:
    """HetLoRA: zero-pad every client to `server_rank` (with `rescale`, keeping each client's
    delta), then a weighted mean.

    Weights: `weights` (examples) by default; with `sparsity_alpha` (the LoRA alpha), Cho et al.'s
    sparsity-weighted aggregation: per module, client k weighs ||(alpha / r_k) B_k A_k||_F (the
    head keeps `weights`). A module every client left at zero falls back to `weights`.
    """
    padded = [zero_pad(s, server_rank, rescale) for s in states]
    merged = weighted_mean(padded, weights)
    if sparsity_alpha is None:
        return merged
    norms = [delta_norms(s, sparsity_alpha) for s in states]
    for prefix, (a_key, b_key) in lora_pairs(states[0]).items():
        module_weights = [n[prefix] for n in norms]
        if sum(module_weights) > 0:
            pair = weighted_mean([{a_key: p[a_key], b_key: p[b_key]} for p in padded], module_weights)
            merged.update(pair)
    return merged


def fedex_residual(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FedEx-LoRA's residual as factors (P, Q): P @ Q = scale * (sum_k w_k B_k A_k - mean(B) mean(A)),
    with w normalised and mean() the weighted mean. P is (out, (K+1) r), Q ((K+1) r, in)."""
    total = float(sum(weights))
    w = [x / total for x in weights]
    mean_a = sum(wk * A.double() for wk, A in zip(w, As))
    mean_b = sum(wk * B.double() for wk, B in zip(w, Bs))
    P = torch.cat([scale * wk * B.double() for wk, B in zip(w, Bs)] + [-scale * mean_b], dim=1)
    Q = torch.cat([A.double() for A in As] + [mean_a], dim=0)
    return P.to(Bs[0].dtype), Q.to(As[0].dtype)


def flora_stack(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float],
                scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking: (P, Q) with P @ Q = sum_k w_k scale_k B_k A_k (w normalised), exactly;
    the ranks may differ. P = [w_1 s_1 B_1 ... w_K s_K B_K] (out, sum r_k), Q = [A_1; ...; A_K]."""
    total = float(sum(weights))
    P = torch.cat([(wk / total) * s * B for wk, s, B in zip(weights, scales, Bs)], dim=1)
    return P, torch.cat(list(As), dim=0)


def tail_norm(pairs: list[tuple[torch.Tensor, torch.Tensor]], keep: int) -> torch.Tensor:
    """HetLoRA's self-pruning regulariser: sum over modules of ||A[keep:]|| * ||B[:, keep:]||, the
    size of the components past the first `keep` (A is (r, in), B (out, r)). Differentiable."""
    return sum(torch.linalg.norm(A[keep:]) * torch.linalg.norm(B[:, keep:]) for A, B in pairs)
