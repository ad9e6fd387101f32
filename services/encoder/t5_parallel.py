"""Tensor parallelism for transformers' T5 encoder, as a change of layer types.

`shard_t5(model, tp)` rewrites a loaded T5EncoderModel in place so that this rank holds 1/T of
every attention and feed-forward layer, and transformers' own forward runs unchanged:

- T5Attention: q, k, v column-parallel (by whole heads), o row-parallel; the relative position
  bias table (nn.Embedding(num_buckets, n_heads), in the first layer) keeps this rank's heads'
  columns; n_heads / inner_dim become the local counts (the forward reshapes with -1 heads, and
  reads n_heads only to build a zero bias for layers without a table).
- T5DenseGatedActDense (wi_0, wi_1 -> wo) and T5DenseActDense (wi -> wo): the input projections
  column-parallel, wo row-parallel. The activation and the gating product are elementwise, so
  they act on the local hidden units alone.

One all-reduce per attention and per feed-forward (inside RowParallelLinear). Embeddings,
layer norms and the final norm stay replicated: they are ~3% of T5-XXL's weights. wo keeps the
dtype transformers loaded it in (T5 keeps it in fp32 for stability: `_keep_in_fp32_modules`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.t5.modeling_t5 import T5Attention, T5DenseActDense, T5DenseGatedActDense

from services.runtime.errors import InvalidRequestError
from services.runtime.tensor_parallel import ColumnParallelLinear, RowParallelLinear, TensorParallel


def check_t5_tp(config: dict, tp_size: int) -> None:
    """Refuse, before any rank starts, a degree that does not split T5's heads and hidden units.
    `config`: the T5 component's config.json."""
    for key in ("num_heads", "d_ff"):
        if config[key] % tp_size:
            raise InvalidRequestError(
                f"encoder --tp-size {tp_size} does not divide the T5 encoder's {key} ({config[key]})", "tp_size")


def shard_t5(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """This rank's shard of `model` (a T5EncoderModel), in place. Call it with the weights on the
    host: each shard is a copy, so the full tensors are freed as the model's references go."""
    for module in list(model.modules()):
        if isinstance(module, T5Attention):
            _shard_attention(module, tp)
        elif isinstance(module, T5DenseGatedActDense):
            module.wi_0 = _parallel(ColumnParallelLinear, module.wi_0, tp)
            module.wi_1 = _parallel(ColumnParallelLinear, module.wi_1, tp)
            module.wo = _parallel(RowParallelLinear, module.wo, tp)
        elif isinstance(module, T5DenseActDense):
            module.wi = _parallel(ColumnParallelLinear, module.wi, tp)
            module.wo = _parallel(RowParallelLinear, module.wo, tp)
    return model


def _shard_attention(attn: T5Attention, tp: TensorParallel) -> None:
    heads = tp.split(attn.n_heads, "T5 attention heads")
    for name in ("q", "k", "v"):
        setattr(attn, name, _parallel(ColumnParallelLinear, getattr(attn, name), tp))
    attn.o = _parallel(RowParallelLinear, attn.o, tp)
    if attn.has_relative_attention_bias:
        full = attn.relative_attention_bias.weight.detach()
        with torch.device("meta"):
            table = nn.Embedding(full.shape[0], heads)
        table.weight = nn.Parameter(full[:, tp.rank * heads : (tp.rank + 1) * heads].clone(), requires_grad=False)
        attn.relative_attention_bias = table
    attn.n_heads = heads
    attn.inner_dim = heads * attn.key_value_proj_dim


def _parallel(cls, full: nn.Linear, tp: TensorParallel) -> nn.Linear:
    """`full` as a `cls` layer holding this rank's slice. Built on the meta device, so nothing of
    full size is allocated or initialised; the slice is cloned so that it does not keep the
    full weight's storage alive."""
    with torch.device("meta"):
        layer = cls(full.in_features, full.out_features, tp, bias=full.bias is not None)
    for name, param in full.named_parameters():
        piece = layer.shard(name, param.detach()).clone(memory_format=torch.contiguous_format)
        setattr(layer, name, nn.Parameter(piece, requires_grad=False))
    return layer.eval()
