"""A decoder-only transformer LM whose Dense layers can carry low-rank updates.

Every projection is a `Dense` that computes `x @ W + bias`, and, when its
module path matches one of the target patterns and `rank > 0`,
`x @ W + bias + s * (x @ A.T) @ B`: the weight W + s * A.T @ B with factors
A of shape (K, d_in) and B of shape (K, d_out). A is stored K-major, like the
weight of a Linear layer in PyTorch's PEFT, so that both factor gradients are
(K x tokens) @ (tokens x d) products; see `lowrank_delta`. The frozen weights
live in the `params` collection and the factors in the separate `lowrank`
collection (as `a` and `b`), so the two can be handed to `apply` as
independent pytrees:

  logits = model.apply({'params': base, 'lowrank': factors}, tokens)

With `rank == 0` the model has no `lowrank` collection at all; that is the
`full` mode used for pretraining, where every parameter trains.
"""

import fnmatch
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

LOWRANK = 'lowrank'
# Default targets: every attention projection, both MLP projections and the
# LM head. Patterns are matched against '/'-joined module paths such as
# 'block_0/attn/q'.
DEFAULT_TARGETS = (
    '*/attn/q',
    '*/attn/k',
    '*/attn/v',
    '*/attn/o',
    '*/mlp/up',
    '*/mlp/down',
    'head',
)


def scaling(rule: str, alpha: float, rank: int) -> float:
  """The multiplier s(K) of the low-rank product.

  `standard` is alpha / K (Hu et al., 2021, LoRA); `rslora` is alpha / sqrt(K)
  (Kalajdzievski, 2023, rank-stabilized LoRA); `none` is 1.
  """
  if rule == 'standard':
    return alpha / rank
  if rule == 'rslora':
    return alpha / rank**0.5
  if rule == 'none':
    return 1.0
  raise ValueError(
      f'lowrank.scaling={rule!r} is not one of standard, rslora, none'
  )


def matches(path: str, patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _contract_tokens(u: jax.Array, v: jax.Array) -> jax.Array:
  """sum over every leading (token) axis of u[..., k] * v[..., d] -> [k, d]."""
  lead = 'abcdefghij'[: u.ndim - 1]
  return jnp.einsum(f'{lead}k,{lead}d->kd', u, v)


@jax.custom_vjp
def lowrank_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """(x @ a.T) @ b for x [..., d_in], a [K, d_in], b [K, d_out].

  The value is the plain product; the custom backward pass only fixes the
  layout of the gradients. Differentiated by autodiff, the gradient of a
  d_in-major factor comes out as a [d_in, K] product, which XLA's CPU backend
  runs as a slow small-dot loop after transposing the activations. Here both
  factor gradients are K-major contractions over the tokens, which it runs
  as ordinary matmuls: the whole training step of the default model at K=2
  is about a quarter faster on a CPU. Under `vmap` (one lane per seed) they
  become batched versions of the same products.
  """
  return (x @ a.T) @ b


def _lowrank_delta_fwd(x, a, b):
  u = x @ a.T
  return u @ b, (x, a, b, u)


def _lowrank_delta_bwd(residuals, g):
  x, a, b, u = residuals
  g_u = g @ b.T  # [..., K]
  return g_u @ a, _contract_tokens(g_u, x), _contract_tokens(u, g)


lowrank_delta.defvjp(_lowrank_delta_fwd, _lowrank_delta_bwd)


def _plain_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """`lowrank_delta` without its custom backward pass."""
  return (x @ a.T) @ b


class Dense(nn.Module):
  """A Dense layer with an optional low-rank factorized update.

  Attributes:
    features: output width d_out.
    rank: width K of the factors; 0 disables them.
    scale: the multiplier s(K) of the product.
    targets: module-path patterns that receive factors.
    dtype: computation dtype (parameters stay float32).
    factor_grad: 'custom' (`lowrank_delta`'s K-major backward pass) or
      'autodiff' (the same product differentiated by JAX, as a first
      implementation would be; same values, slower on a CPU at small K).
  """

  features: int
  rank: int = 0
  scale: float = 1.0
  targets: Sequence[str] = DEFAULT_TARGETS
  dtype: jnp.dtype = jnp.float32
  factor_grad: str = 'custom'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    kernel = self.param(
        'kernel', nn.initializers.lecun_normal(), (d_in, self.features)
    )
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x = x.astype(self.dtype)
    y = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
    if self.rank > 0 and matches('/'.join(self.scope.path), self.targets):
      # Placeholders: real values come from lowrank.init_factors, which owns
      # the initialisation (random A, zero B) and its PRNG keys.
      a = self.variable(
          LOWRANK, 'a', jnp.zeros, (self.rank, d_in), jnp.float32
      ).value
      b = self.variable(
          LOWRANK, 'b', jnp.zeros, (self.rank, self.features), jnp.float32
      ).value
      delta = dict(custom=lowrank_delta, autodiff=_plain_delta).get(
          self.factor_grad
      )
      if delta is None:
        raise ValueError(
            f'model.factor_grad={self.factor_grad!r} is not one of custom,'
            ' autodiff'
        )
      y = y + self.scale * delta(x, a.astype(self.dtype), b.astype(self.dtype))
    return y


def causal_attention(q, k, v) -> jax.Array:
  """Causal softmax attention of q, k, v [..., T, heads, head_dim].

  Written out with einsums; on a CPU this is about a tenth faster per
  training step than `jax.nn.dot_product_attention`'s XLA path at the
  default model size (the layouts XLA picks for its backward pass differ).
  The softmax runs in float32 whatever the compute dtype.
  """
  t, head_dim = q.shape[-3], q.shape[-1]
  logits = jnp.einsum('...tnh,...snh->...nts', q, k).astype(jnp.float32)
  logits = logits / np.sqrt(head_dim)
  causal = jnp.tril(jnp.ones((t, t), bool))
  logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('...nts,...snh->...tnh', weights, v)


class Attention(nn.Module):
  """Causal multi-head self-attention with q, k, v, o projections."""

  config: ml_collections.ConfigDict
  dense: dict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    head_dim = cfg.d_model // cfg.n_heads
    shape = x.shape[:-1] + (cfg.n_heads, head_dim)
    q = Dense(cfg.d_model, name='q', **self.dense)(x).reshape(shape)
    k = Dense(cfg.d_model, name='k', **self.dense)(x).reshape(shape)
    v = Dense(cfg.d_model, name='v', **self.dense)(x).reshape(shape)
    if cfg.attention == 'einsum':
      out = causal_attention(q, k, v)
    elif cfg.attention == 'dot_product_attention':
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:
      raise ValueError(
          f'model.attention={cfg.attention!r} is not one of einsum,'
          ' dot_product_attention'
      )
    out = out.reshape(x.shape[:-1] + (cfg.d_model,))
    return Dense(cfg.d_model, name='o', **self.dense)(out)


class Mlp(nn.Module):
  config: ml_collections.ConfigDict
  dense: dict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Dense(self.config.d_mlp, name='up', **self.dense)(x)
    return Dense(self.config.d_model, name='down', **self.dense)(nn.gelu(h))


class Block(nn.Module):
  config: ml_collections.ConfigDict
  dense: dict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + Attention(self.config, self.dense, name='attn')(
        nn.RMSNorm(name='norm_attn')(x)
    )
    return x + Mlp(self.config, self.dense, name='mlp')(
        nn.RMSNorm(name='norm_mlp')(x)
    )


class Transformer(nn.Module):
  """Pre-norm decoder-only LM: token + position embedding, blocks, head.

  Attributes:
    config: the `model` section of the experiment config (vocab_size, d_model,
      n_heads, n_layers, d_mlp, max_len, dtype, attention, factor_grad).
    rank: low-rank width K for the targeted Dense layers; 0 for none.
    scale: s(K), the multiplier of every low-rank product.
    targets: module-path patterns that receive factors.
  """

  config: ml_collections.ConfigDict
  rank: int = 0
  scale: float = 1.0
  targets: Sequence[str] = DEFAULT_TARGETS

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens [..., T] to float32 logits [..., T, vocab_size]."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dense = dict(
        rank=self.rank,
        scale=self.scale,
        targets=tuple(self.targets),
        dtype=dtype,
        factor_grad=cfg.get('factor_grad', 'custom'),
    )
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, name='embed')
    pos = self.param(
        'pos_embed',
        nn.initializers.normal(0.02),
        (cfg.max_len, cfg.d_model),
    )
    x = embed(tokens) + pos[: tokens.shape[-1]]
    x = x.astype(dtype)
    for i in range(cfg.n_layers):
      x = Block(cfg, dense, name=f'block_{i}')(x)
    x = nn.RMSNorm(name='norm_out')(x)
    logits = Dense(cfg.vocab_size, name='head', **dense)(x)
    return logits.astype(jnp.float32)


def build(
    model_config: ml_collections.ConfigDict,
    rank: int = 0,
    *,
    scaling_rule: str = 'standard',
    alpha: float = 1.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> Transformer:
  """Builds the model; `rank == 0` gives the plain (full-training) model."""
  scale = scaling(scaling_rule, alpha, rank) if rank > 0 else 1.0
  return Transformer(
      model_config, rank=rank, scale=scale, targets=tuple(targets)
  )


def init_base(model_config: ml_collections.ConfigDict, key: jax.Array):
  """Random frozen base parameters (the `params` collection)."""
  tokens = jnp.zeros((1, model_config.max_len), jnp.int32)
  return build(model_config).init(key, tokens)['params']
