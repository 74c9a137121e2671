"""GPT-2 (transformers' ``GPT2LMHeadModel``) in Flax, with a KV cache and one jitted decode loop.

The module tree mirrors transformers' (``transformer.wte``, ``transformer.h.{i}.attn.c_attn``, ...,
``transformer.ln_f``), so a checkpoint maps onto the params through the shared table of
:mod:`ldm_jax.convert.torch_flax` (``gpt2_params_from_torch``). GPT-2's ``Conv1D`` layers store
their weight as ``[in, out]`` already: :class:`Conv1D` keeps it under the name ``weight``, which
the table passes through untransposed. The LM head is tied to ``wte``.

:func:`generate` decodes a batch of prompts left-padded to one fixed length: every row writes the
same cache slot at each step (a traced index), and a row's positions count from its first real
token, so one compilation serves every prompt length up to the buffer's and every sampling setting.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.models.attention import dot_product_attention

__all__ = ["GPT2LMHeadModel", "GPT2Output", "gpt2_from_config", "init_cache", "generate", "sample_logits"]

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# One (key, value) pair of [batch, max_length, heads, head_dim] arrays per layer.
KVCache = tuple


class GPT2Output(NamedTuple):
    logits: jax.Array  # [B, S, vocab_size], float32
    cache: KVCache | None  # the updated cache (None when called without one)


class Conv1D(nn.Module):
    """transformers' ``Conv1D``: a dense layer whose weight is ``[in, out]`` (named ``weight``)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.param_dtype)
        b = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype)) + b.astype(self.dtype)


class GPT2Attention(nn.Module):
    n_embd: int
    n_head: int
    scale: float  # on top of 1/sqrt(head_dim), which the attention applies
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, layer_cache, cache_index):
        b, s, _ = x.shape
        head_dim = self.n_embd // self.n_head
        qkv = Conv1D(3 * self.n_embd, self.dtype, self.param_dtype, name="c_attn")(x)
        q, k, v = (t.reshape(b, s, self.n_head, head_dim) for t in jnp.split(qkv, 3, axis=-1))
        if self.scale != 1.0:
            q = q * self.scale
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            k = lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
            v = lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
            layer_cache = (k, v)
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, impl="xla")
        out = Conv1D(self.n_embd, self.dtype, self.param_dtype, name="c_proj")(out.reshape(b, s, self.n_embd))
        return out, layer_cache


class GPT2MLP(nn.Module):
    n_inner: int
    n_embd: int
    activation_function: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv1D(self.n_inner, self.dtype, self.param_dtype, name="c_fc")(x)
        x = _ACTIVATIONS[self.activation_function](x)
        return Conv1D(self.n_embd, self.dtype, self.param_dtype, name="c_proj")(x)


class GPT2Block(nn.Module):
    n_embd: int
    n_head: int
    n_inner: int
    activation_function: str
    layer_norm_epsilon: float
    attn_scale: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, layer_cache, cache_index):
        def ln(name):
            return nn.LayerNorm(self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        h, layer_cache = GPT2Attention(self.n_embd, self.n_head, self.attn_scale, self.dtype, self.param_dtype,
                                       name="attn")(ln("ln_1")(x), mask, layer_cache, cache_index)
        x = x + h
        x = x + GPT2MLP(self.n_inner, self.n_embd, self.activation_function, self.dtype, self.param_dtype,
                        name="mlp")(ln("ln_2")(x))
        return x, layer_cache


class GPT2Model(nn.Module):
    """transformers' ``GPT2LMHeadModel.transformer``: returns the final hidden states and the ``wte`` table."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str
    layer_norm_epsilon: float
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids, mask, cache, cache_index):
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(self.vocab_size, self.n_embd, embedding_init=init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="wte")
        wpe = nn.Embed(self.n_positions, self.n_embd, embedding_init=init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="wpe")
        x = wte(input_ids) + wpe(position_ids)
        # dot_product_attention divides by sqrt(head_dim); these configs ask for another scale
        base = 1.0 if self.scale_attn_weights else (self.n_embd // self.n_head) ** 0.5
        new_cache = []
        for i in range(self.n_layer):
            scale = base / (i + 1) if self.scale_attn_by_inverse_layer_idx else base
            x, layer_cache = GPT2Block(
                self.n_embd, self.n_head, self.n_inner, self.activation_function, self.layer_norm_epsilon, scale,
                self.dtype, self.param_dtype, name=f"h_{i}")(x, mask, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        x = nn.LayerNorm(self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_f")(x)
        return x, wte, None if cache is None else tuple(new_cache)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 language model: ``input_ids [B, S]`` -> :class:`GPT2Output` (logits over the vocabulary).

    ``attention_mask [B, K]`` (True/1 = a real token) marks the keys that may be attended: the
    ``S`` tokens without a cache, the cache's ``max_length`` slots with one. With ``cache``
    (:func:`init_cache`) the tokens are written at slots ``cache_index ... cache_index + S - 1`` (a
    traced index) and attend to every valid slot up to their own. ``position_ids`` default to the
    slots. Attributes are ``GPT2Config`` names.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, *, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                 cache_index=0) -> GPT2Output:
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"GPT2LMHeadModel: unsupported activation_function {self.activation_function!r}; "
                             f"expected one of {tuple(_ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2LMHeadModel: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"GPT2LMHeadModel expects integer input_ids [batch, length], got "
                             f"{input_ids.dtype} {input_ids.shape}")
        b, s = input_ids.shape
        keys = s if cache is None else cache[0][0].shape[1]
        if keys > self.n_positions:
            raise ValueError(f"GPT2LMHeadModel: {keys} positions exceed n_positions {self.n_positions}")
        slots = cache_index + jnp.arange(s)
        if position_ids is None:
            position_ids = jnp.broadcast_to(slots, (b, s))
        mask = jnp.arange(keys)[None, :] <= slots[:, None]  # causal over slots
        if attention_mask is not None:
            mask = mask[None] & jnp.asarray(attention_mask, bool)[:, None, :]
        x, wte, cache = GPT2Model(
            self.vocab_size, self.n_positions, self.n_embd, self.n_layer, self.n_head, self.n_inner or 4 * self.n_embd,
            self.activation_function, self.layer_norm_epsilon, self.scale_attn_weights,
            self.scale_attn_by_inverse_layer_idx, self.dtype, self.param_dtype, name="transformer")(
                input_ids, position_ids, mask.reshape((-1, 1) + mask.shape[-2:]), cache, cache_index)
        return GPT2Output(wte.attend(x).astype(jnp.float32), cache)  # tied LM head


def init_cache(model: GPT2LMHeadModel, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty KV cache of ``max_length`` slots (at most ``n_positions``) for ``batch`` rows."""
    if max_length > model.n_positions:
        raise ValueError(f"cache of {max_length} slots: the model has n_positions {model.n_positions}")
    shape = (batch, max_length, model.n_head, model.n_embd // model.n_head)
    zeros = jnp.zeros(shape, dtype or model.dtype)
    return tuple((zeros, zeros) for _ in range(model.n_layer))


# ------------------------------------------------------------------------------------------ config
_CONFIG_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                  "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "bos_token_id",
                  "eos_token_id")


def gpt2_from_config(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> GPT2LMHeadModel:
    """Build a :class:`GPT2LMHeadModel` from a transformers ``config.json`` (mapping, file or folder).

    Raises ValueError (naming the source and what it holds) when the config is not a GPT-2 language
    model: ``model_type`` other than ``gpt2``, ``architectures`` without ``GPT2LMHeadModel``, untied
    embeddings. ``overrides`` (e.g. ``dtype=jnp.bfloat16``) win.
    """
    source = "config"
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        source = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist: a GPT-2 folder holds a transformers config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r} is not valid JSON ({e})") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "gpt2":
        raise ValueError(f"{source} is not a GPT-2 model: model_type {model_type!r}, architectures "
                         f"{architectures} (expected model_type 'gpt2', GPT2LMHeadModel)")
    if architectures and "GPT2LMHeadModel" not in architectures:
        raise ValueError(f"{source} is not a GPT-2 language model: architectures {architectures} "
                         f"(expected GPT2LMHeadModel)")
    if config.get("tie_word_embeddings") is False:
        raise ValueError(f"{source}: tie_word_embeddings is false; only GPT-2 with the LM head tied to wte "
                         f"is supported")
    cfg = {k: config[k] for k in _CONFIG_FIELDS if k in config and config[k] is not None}
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(key), (list, tuple)):  # transformers allows a list of ids
            cfg[key] = cfg[key][0] if cfg[key] else None
    cfg.update(overrides)
    return GPT2LMHeadModel(**cfg)


# --------------------------------------------------------------------------------------- decoding
def sample_logits(logits, key, temperature, top_k, top_p):
    """One token id per row of ``logits [B, V]``; every setting is a traced value.

    ``temperature <= 0``: greedy (argmax). Otherwise, as transformers' warpers in their order:
    divide by ``temperature``, keep the ``top_k`` largest (``<= 0``: all), then the smallest set
    whose probability reaches ``top_p`` (``>= 1``: all), and sample with ``key`` (one key per row, ``[B]``).
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    rank = jnp.arange(vocab)
    ordered = jnp.where(rank < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # the first token is always kept; top_p >= 1 keeps all (a cumulative sum may round past 1)
    keep = (rank < k) & ((mass_before < top_p) | (top_p >= 1.0) | (rank == 0))
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.vmap(jax.random.categorical)(key, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def generate(model: GPT2LMHeadModel, params, input_ids, prompt_mask, keys, *, max_new_tokens, temperature=1.0,
             top_k=0, top_p=1.0, eos_token_id=-1, max_new_limit: int):
    """Continue left-padded prompts; jit it with ``model`` and ``max_new_limit`` static.

    Args:
      input_ids: ``[B, P]`` int, each prompt right-aligned (left padding, any id).
      prompt_mask: ``[B, P]`` bool, True on the real tokens (every row needs at least one).
      keys: ``[B]`` PRNG keys, one per row: a row's tokens depend on its key and prompt alone.
      max_new_tokens, temperature, top_k, top_p, eos_token_id: traced scalars (see
        :func:`sample_logits`); decoding stops after ``max_new_tokens`` (at most ``max_new_limit``)
        or when every row has emitted ``eos_token_id``.
      max_new_limit: the cache holds ``P + max_new_limit`` slots (at most ``n_positions``).

    Returns:
      ``[B, max_new_limit]`` int32 new tokens; a row's tokens after its first EOS (which is kept)
      and past ``max_new_tokens`` are ``eos_token_id``.
    """
    b, p = input_ids.shape
    total = p + max_new_limit
    valid = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((b, max_new_limit), bool)], axis=1)
    pad = p - jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # a row's positions start at its first real token
    eos = jnp.asarray(eos_token_id, jnp.int32)

    def step(tokens, index, cache):
        positions = jnp.maximum(index + jnp.arange(tokens.shape[1])[None, :] - pad[:, None], 0)
        out = model.apply({"params": params}, tokens, attention_mask=valid, position_ids=positions, cache=cache,
                          cache_index=index)
        return out.logits[:, -1], out.cache

    def pick(logits, i):
        return sample_logits(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, i), temperature, top_k, top_p)

    logits, cache = step(input_ids, 0, init_cache(model, b, total))
    tokens = jnp.full((b, max_new_limit), eos, jnp.int32)
    state = (jnp.int32(0), pick(logits, 0), cache, jnp.zeros((b,), bool), tokens)

    def cond(state):
        i, _, _, done, _ = state
        return (i < jnp.minimum(max_new_tokens, max_new_limit)) & ~jnp.all(done)

    def body(state):
        i, token, cache, done, tokens = state
        token = jnp.where(done, eos, token)
        tokens = tokens.at[:, i].set(token)
        done = done | (token == eos)
        logits, cache = step(token[:, None], p + i, cache)
        return i + 1, pick(logits, i + 1), cache, done, tokens

    return lax.while_loop(cond, body, state)[-1]
