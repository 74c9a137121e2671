"""Prompt expansion: a GPT-2 language model continues a short prompt into a longer, more detailed one.

>>> expander = PromptExpander.from_pretrained("path/or/hub-id")  # any transformers GPT2LMHeadModel
>>> expander.expand(["a cat"], temperature=0.9, top_k=50, seed=0)
['a cat sitting on a chair, highly detailed, digital art']

The model is :mod:`ldm_jax.models.gpt2` (its decode loop jitted once: prompts are left-padded to
``max_prompt_tokens``, batches to a power of two up to ``max_batch``, and every sampling setting is a
traced value); weights come from a transformers folder or hub id through the shared key table
(:func:`ldm_jax.convert.torch_flax.gpt2_params_from_torch`).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import storage
from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.torch_flax import WeightsError, gpt2_params_from_torch
from ldm_jax.models.gpt2 import GPT2LMHeadModel, generate, gpt2_from_config

__all__ = ["PromptExpander", "load_gpt2"]

_TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json"]
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin",)


def _resolve(src: str, allow_pickle: bool) -> str:
    """A local folder for ``src``: itself, a local copy of a ``gs://`` folder, or a hub download."""
    if storage.is_remote(src):
        if not storage.isdir(src):
            raise FileNotFoundError(f"prompt expander {src!r} does not exist")
        return storage.local_copy(src)
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise ValueError(f"prompt expander {src!r} is a file; expected a transformers GPT-2 folder or hub id")
    if not storage.looks_like_hub_id(src):
        raise FileNotFoundError(f"prompt expander {src!r} does not exist (not a folder or a hub id owner/name)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", *_TOKENIZER_FILES]
        folder = snapshot_download(src, allow_patterns=patterns + ["*.safetensors", "*.safetensors.index.json"])
        if allow_pickle and not any(os.path.isfile(os.path.join(folder, f)) for f in _SAFE_WEIGHTS):
            folder = snapshot_download(src, allow_patterns=patterns + list(_PICKLE_WEIGHTS))
        return folder
    except Exception as e:  # noqa: BLE001 - hub errors have many types (offline, 404, auth)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set, and the model is not in the local cache)" if offline else ""
        raise WeightsError(f"prompt expander {src!r} is not a local folder and could not be downloaded from the "
                           f"Hugging Face Hub{hint}: {type(e).__name__}: {e}") from None


def load_gpt2(src: str | os.PathLike, *, allow_pickle: bool = False,
              dtype: Any = jnp.float32) -> tuple[GPT2LMHeadModel, dict, str]:
    """A transformers ``GPT2LMHeadModel`` folder (local, ``gs://``) or hub id -> (model, params, local folder).

    Weights: ``model.safetensors`` (or its shard index), else ``pytorch_model.bin`` with ``allow_pickle``.
    Raises FileNotFoundError (no such folder), ValueError (not a GPT-2 folder, naming what it holds),
    WeightsError (weights missing or not fitting the config).
    """
    src = os.fspath(src)
    folder = _resolve(src, allow_pickle)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        found = sorted(os.listdir(folder))
        raise ValueError(f"{src!r} is not a GPT-2 model folder: no config.json (it holds "
                         f"{', '.join(found[:8]) or 'nothing'}{', ...' if len(found) > 8 else ''})")
    model = gpt2_from_config(folder, dtype=jnp.dtype(dtype))
    names = [f for f in _SAFE_WEIGHTS + _PICKLE_WEIGHTS if os.path.isfile(os.path.join(folder, f))]
    if not names:
        hint = " (a sharded pytorch_model.bin is not supported: convert it to safetensors)" \
            if os.path.isfile(os.path.join(folder, "pytorch_model.bin.index.json")) else ""
        raise WeightsError(f"{src!r} holds no GPT-2 weights: expected "
                           f"{' or '.join(_SAFE_WEIGHTS + _PICKLE_WEIGHTS)}{hint}")
    path = os.path.join(folder, names[0])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = gpt2_params_from_torch(load_state_dict(path, allow_pickle=allow_pickle), shapes, source=path)
    return model, params, folder


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _printable(text: str) -> str:
    """Without control characters and U+FFFD (what a byte-level BPE decodes a split UTF-8 sequence to)."""
    return "".join(c for c in text if (c.isprintable() or c == "\n") and c != "\ufffd")


class PromptExpander:
    """Continue prompts with a GPT-2 model; :meth:`expand` returns each prompt with its continuation.

    Args:
      model, params: a :class:`~ldm_jax.models.gpt2.GPT2LMHeadModel` and its params.
      tokenizer: a transformers GPT-2 tokenizer (``AutoTokenizer``).
      max_prompt_tokens: the padded prompt length (longer prompts keep their last tokens, with a warning);
        default 64, or half of a smaller ``n_positions``.
      max_new_limit: the most tokens :meth:`expand` may add (default 64, or what ``n_positions`` leaves);
        ``max_prompt_tokens + max_new_limit`` must fit the model's ``n_positions``.
      max_batch: prompts decoded together; a batch is padded to a power of two up to it, so at most
        ``log2(max_batch) + 1`` compilations serve every call.
    """

    def __init__(self, model: GPT2LMHeadModel, params: dict, tokenizer, *, max_prompt_tokens: int | None = None,
                 max_new_limit: int | None = None, max_batch: int = 8, source: str = ""):
        if max_prompt_tokens is None:
            max_prompt_tokens = min(64, model.n_positions // 2)
        if max_new_limit is None:
            max_new_limit = min(64, model.n_positions - max_prompt_tokens)
        if max_prompt_tokens < 1 or max_new_limit < 1 or max_batch < 1:
            raise ValueError(f"max_prompt_tokens ({max_prompt_tokens}), max_new_limit ({max_new_limit}) and "
                             f"max_batch ({max_batch}) must be >= 1")
        if max_prompt_tokens + max_new_limit > model.n_positions:
            raise ValueError(f"max_prompt_tokens + max_new_limit = {max_prompt_tokens + max_new_limit} exceeds the "
                             f"model's n_positions {model.n_positions}")
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.params = jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), params)
        self.max_prompt_tokens, self.max_new_limit, self.max_batch = max_prompt_tokens, max_new_limit, max_batch
        eos = model.eos_token_id if model.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = -1 if eos is None else int(eos)
        bos = model.bos_token_id if model.bos_token_id is not None else tokenizer.bos_token_id
        self.bos_token_id = self.eos_token_id if bos is None else int(bos)
        self._lock = threading.Lock()  # one decode at a time (a server's request threads share the expander)

        def run(params, ids, mask, seeds, max_new_tokens, temperature, top_k, top_p, eos):
            keys = jax.vmap(jax.random.key)(seeds)
            return generate(model, params, ids, mask, keys, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, eos_token_id=eos, max_new_limit=max_new_limit)

        self._generate = jax.jit(run)

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, *, allow_pickle: bool = False, dtype: Any = jnp.float32,
                        tokenizer: str | None = None, **kwargs) -> "PromptExpander":
        """Load a transformers ``GPT2LMHeadModel`` folder or hub id (:func:`load_gpt2`) and its tokenizer
        (``tokenizer``: another folder or hub id); ``kwargs`` go to the constructor."""
        from transformers import AutoTokenizer

        model, params, folder = load_gpt2(src, allow_pickle=allow_pickle, dtype=dtype)
        try:
            tok = AutoTokenizer.from_pretrained(tokenizer or folder)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"prompt expander {os.fspath(src)!r}: no usable GPT-2 tokenizer in "
                             f"{tokenizer or folder!r} ({type(e).__name__}: {_one_line(str(e))[:300]})") from None
        return cls(model, params, tok, source=os.fspath(src), **kwargs)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> left-padded ``ids [B, max_prompt_tokens]`` and their ``mask`` (True on real tokens).
        An empty prompt is BOS alone."""
        p = self.max_prompt_tokens
        ids, mask = np.zeros((len(prompts), p), np.int32), np.zeros((len(prompts), p), bool)
        for row, prompt in enumerate(prompts):
            tokens = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.bos_token_id]
            if len(tokens) > p:
                warnings.warn(f"prompt expansion: the prompt has {len(tokens)} tokens; the model continues its "
                              f"last {p} (max_prompt_tokens)", stacklevel=3)
                tokens = tokens[-p:]
            ids[row, p - len(tokens):] = tokens
            mask[row, p - len(tokens):] = True
        return ids, mask

    def generate_ids(self, prompts: Sequence[str], *, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                     max_new_tokens: int | None = None, seed: int | Sequence[int] = 0) -> list[list[int]]:
        """The new token ids of each prompt (up to and with the first EOS). Settings as :meth:`expand`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_new_tokens = self.max_new_limit if max_new_tokens is None else max_new_tokens
        seeds = _check(prompts, temperature, top_k, top_p, max_new_tokens, seed, self.max_new_limit)
        ids, mask = self.encode(prompts)
        out = []
        with self._lock:
            for start in range(0, len(prompts), self.max_batch):
                n = min(self.max_batch, len(prompts) - start)
                rows = min(1 << (n - 1).bit_length(), self.max_batch)
                take = np.minimum(np.arange(rows) + start, start + n - 1)  # pad rows repeat the last prompt
                tokens = self._generate(self.params, ids[take], mask[take], np.asarray(seeds, np.uint32)[take],
                                        np.int32(max_new_tokens), np.float32(temperature), np.int32(top_k),
                                        np.float32(top_p), np.int32(self.eos_token_id))
                out.extend(np.asarray(tokens)[:n].tolist())
        result = []
        for row in out:
            row = row[:max_new_tokens]
            if self.eos_token_id in row:
                row = row[:row.index(self.eos_token_id) + 1]
            result.append(row)
        return result

    def expand(self, prompts: str | Sequence[str], *, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
               max_new_tokens: int | None = None, seed: int | Sequence[int] = 0) -> list[str]:
        """Each prompt followed by its sampled continuation, on one line (the continuation ends at the
        first EOS or line break).

        Args:
          temperature: 0 decodes greedily; top_k: keep the k likeliest tokens (0: all); top_p: nucleus
            sampling (1: off); max_new_tokens: at most (and by default) ``max_new_limit``.
          seed: one for every prompt, or one per prompt: a prompt's expansion depends on its text and
            seed alone, whatever else is in the batch.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cleaned = [_one_line(p) for p in prompts]
        new = self.generate_ids(cleaned, temperature=temperature, top_k=top_k, top_p=top_p,
                                max_new_tokens=max_new_tokens, seed=seed)
        out = []
        for prompt, tokens in zip(cleaned, new):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            text = _printable(text.replace("\r", "\n")).split("\n", 1)[0]
            out.append(_one_line(prompt + text))
        return out


def _check(prompts, temperature, top_k, top_p, max_new_tokens, seed, limit) -> list[int]:
    """Validate :meth:`PromptExpander.expand`'s settings; returns one seed per prompt."""
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt expansion: prompts must be strings")

    def number(name, v, lo, hi, integer=False):
        kinds = (int, np.integer) if integer else (int, float, np.number)
        if isinstance(v, bool) or not isinstance(v, kinds) or not np.isfinite(v) or not lo <= v <= hi:
            raise ValueError(f"prompt expansion: {name} must be {'an integer' if integer else 'a number'} in "
                             f"[{lo}, {hi}], got {v!r}")

    number("temperature", temperature, 0.0, 100.0)
    number("top_k", top_k, 0, 2**31 - 1, integer=True)
    number("top_p", top_p, 0.0, 1.0)
    number("max_new_tokens", max_new_tokens, 1, limit, integer=True)
    seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"prompt expansion: one seed for all prompts or one per prompt ({len(prompts)}), "
                         f"got {len(seeds)}")
    for s in seeds:
        number("seed", s, 0, 2**32 - 1, integer=True)
    return [int(s) for s in seeds]
