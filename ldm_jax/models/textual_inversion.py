"""Textual inversion: new token embeddings for placeholder tokens, the text encoder otherwise frozen.

A placeholder of ``n`` vectors (diffusers' ``num_vectors``) is the tokens ``<tok>``, ``<tok>_1``, ...,
``<tok>_{n-1}``, added to the tokenizer after its vocabulary; the CLIP token embedding table grows by
``n`` rows (:func:`extend_embeddings`) and a prompt's ``<tok>`` becomes the ``n`` tokens
(:func:`expand_prompt`). Training changes only those rows (:func:`with_rows`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

__all__ = ["TABLE", "placeholder_tokens", "expand_prompt", "embedding_table", "extend_embeddings", "with_rows", "init_rows"]

TABLE = ("text_model", "embeddings", "token_embedding", "embedding")  # the CLIP token embedding table's path


def placeholder_tokens(token: str, num_vectors: int = 1) -> list[str]:
    """``"<tok>", 3`` -> ``["<tok>", "<tok>_1", "<tok>_2"]`` (diffusers' multi-vector naming)."""
    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
        raise ValueError(f"a placeholder token must be one word without spaces, got {token!r}")
    if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or num_vectors < 1:
        raise ValueError(f"num_vectors must be an integer >= 1, got {num_vectors!r}")
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, tokens: Mapping[str, Sequence[str]]) -> str:
    """Each placeholder word of ``prompt`` replaced by all its tokens (``{"<tok>": ["<tok>", "<tok>_1"]}``)."""
    for token, parts in tokens.items():
        if len(parts) > 1:
            prompt = prompt.replace(token, " ".join(parts))
    return prompt


def embedding_table(text_params: Mapping[str, Any]):
    node = text_params
    for k in TABLE:
        node = node[k]
    return node


def _replace_table(text_params, table):
    def rebuild(node, path):
        if not path:
            return table
        out = dict(node)
        out[path[0]] = rebuild(node[path[0]], path[1:])
        return out

    return rebuild(text_params, TABLE)


def extend_embeddings(text_params: Mapping[str, Any], rows) -> dict:
    """The text encoder's params with ``rows [n, D]`` appended to the token embedding table."""
    table = embedding_table(text_params)
    rows = jnp.asarray(rows, table.dtype).reshape(-1, table.shape[1])
    return _replace_table(text_params, jnp.concatenate([table, rows], axis=0))


def with_rows(text_params: Mapping[str, Any], ids, rows) -> dict:
    """The params with the table's rows ``ids [n]`` set to ``rows [n, D]`` (differentiable in ``rows``)."""
    table = jnp.asarray(embedding_table(text_params))
    return _replace_table(text_params, table.at[jnp.asarray(ids)].set(jnp.asarray(rows).astype(table.dtype)))


def init_rows(text_params: Mapping[str, Any], init_ids: Sequence[int], n: int) -> jax.Array:
    """``[n, D]`` rows to start from: the embeddings of ``init_ids`` (the initializer word's tokens), cycled."""
    table = embedding_table(text_params)
    ids = [int(init_ids[i % len(init_ids)]) for i in range(n)]
    return jnp.asarray(table)[jnp.asarray(ids)].astype(jnp.float32)
