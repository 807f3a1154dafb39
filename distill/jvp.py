"""Forward-mode derivatives through a network: the tangent a consistency method needs.

`jvp(fn, primals, tangents)` evaluates fn and its directional derivative in one
pass with `torch.autograd.forward_ad` (dual tensors), without gradient: nothing
is kept for a backward, so activation checkpointing has nothing to do here, and
FSDP2's all-gathers move plain parameters (the tangent is carried by the inputs).

Attention is the one op that needs help. SDPA's fused kernels (flash, efficient,
cuDNN; on the CPU its flash kernel) have no forward-mode rule, and its math
decomposition holds the whole [queries x keys] matrix and its tangent at once,
which no GPU has room for at video lengths. So inside `jvp` every
`F.scaled_dot_product_attention` call goes through `AttentionWithTangent`: the
value from SDPA itself (fused), the tangent written out, a block of queries at a
time within `ATTENTION_WORKSPACE_BYTES`:

    S = scale * Q K^T + mask,  P = softmax(S),  O = P V
    dS = scale * (dQ K^T + Q dK^T)
    dO = P dV + (P * dS) V - rowsum(P * dS) * O

Attention that does not go through SDPA (another model.attention_backend) has no
such rule; the methods that use `jvp` refuse it before anything is built.
"""

import logging
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

# the tangent's [query block x keys x heads x batch] working set, float32
ATTENTION_WORKSPACE_BYTES = 1 << 30
WORKING_COPIES = 4  # S (then P), dS, P * dS, and the block of dO being summed
_announced = False


def jvp(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor]
        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), d/de fn(primals + e * tangents) at e = 0), both detached."""
    _announce()
    with torch.no_grad(), fwAD.dual_level(), AttentionTangentMode():
        duals = [fwAD.make_dual(p, t.to(p.dtype)) for p, t in zip(primals, tangents)]
        value, tangent = fwAD.unpack_dual(fn(*duals))
    if tangent is None:  # fn does not depend on its inputs
        tangent = torch.zeros_like(value)
    return value, tangent


def _announce() -> None:
    global _announced
    if not _announced:
        log.info("forward-mode JVP: attention runs SDPA for its value and an explicit tangent in blocks of queries "
                 "(SDPA's fused kernels have no forward-mode rule)")
        _announced = True


class AttentionTangentMode(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to AttentionWithTangent while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return attention_with_tangent(*args, **kwargs)
        return func(*args, **kwargs)


def attention_with_tangent(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False) -> torch.Tensor:
    if dropout_p:
        raise ValueError("attention under forward-mode AD with dropout_p > 0: the tangent of a random mask is "
                         "undefined (dropout is off in training's forward passes here)")
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped heads: repeat them, as SDPA does
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if is_causal:  # SDPA's: aligned top-left, query i sees keys 0..i
        n, m = query.shape[-2], key.shape[-2]
        attn_mask = torch.ones(n, m, dtype=torch.bool, device=query.device).tril()
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return AttentionWithTangent.apply(query, key, value, attn_mask, scale)


class AttentionWithTangent(torch.autograd.Function):
    """softmax(scale Q K^T + mask) V with a forward-mode rule (no backward: it runs without gradient)."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, scale):
        # the mode is off while its handler runs, so this is SDPA itself (fused where it can be)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        ctx.save_for_forward(query, key, value, out)
        ctx.attn_mask, ctx.scale = attn_mask, scale
        return out

    @staticmethod
    def jvp(ctx, d_query, d_key, d_value, _d_mask, _d_scale):
        query, key, value, out = ctx.saved_tensors
        return attention_tangent(query, key, value, out, d_query, d_key, d_value, ctx.attn_mask, ctx.scale)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("AttentionWithTangent has no backward: it runs only inside distill.jvp.jvp (no gradient)")


def _bytes_per_query(rows: int, keys: int) -> int:
    """The tangent's float32 working set per query: `rows` (batch x heads) x keys x WORKING_COPIES."""
    return WORKING_COPIES * 4 * rows * keys


def query_block(rows: int, keys: int) -> int:
    """Queries per block of the tangent, its working set within ATTENTION_WORKSPACE_BYTES."""
    return max(1, ATTENTION_WORKSPACE_BYTES // _bytes_per_query(rows, keys))


def workspace_bytes(rows: int, queries: int, keys: int) -> int:
    """At most the tangent's working set over `queries` queries (what the memory plan counts)."""
    return min(_bytes_per_query(rows, keys) * queries, ATTENTION_WORKSPACE_BYTES)


def attention_tangent(query, key, value, out, d_query: Optional[torch.Tensor], d_key: Optional[torch.Tensor],
                      d_value: Optional[torch.Tensor], attn_mask, scale: float) -> torch.Tensor:
    """dO of O = softmax(scale Q K^T + mask) V, in float32, a block of queries at a time."""
    q, k, v, o = (t.float() for t in (query, key, value, out))
    dq, dk, dv = (None if t is None else t.float() for t in (d_query, d_key, d_value))
    block = query_block(math.prod(q.shape[:-2]), k.shape[-2])
    parts = []
    for start in range(0, q.shape[-2], block):
        rows = slice(start, start + block)
        s = scale * q[..., rows, :] @ k.transpose(-1, -2)
        if attn_mask is not None:
            mask = attn_mask[..., rows, :] if attn_mask.shape[-2] > 1 else attn_mask
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
        p = torch.softmax(s, dim=-1)
        del s
        d_out = torch.zeros_like(o[..., rows, :])
        if dv is not None:
            d_out += p @ dv
        ds = None
        if dq is not None:
            ds = scale * dq[..., rows, :] @ k.transpose(-1, -2)
        if dk is not None:
            term = scale * q[..., rows, :] @ dk.transpose(-1, -2)
            ds = term if ds is None else ds + term
        if ds is not None:
            p_ds = torch.nan_to_num(p * ds)  # a masked key: p = 0, ds finite
            d_out += p_ds @ v - p_ds.sum(-1, keepdim=True) * o[..., rows, :]
        parts.append(d_out)
    return torch.cat(parts, dim=-2).to(out.dtype)
