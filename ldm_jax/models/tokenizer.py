"""Prompt tokenization for the text encoder (wraps transformers' ``CLIPTokenizer``, or a BERT tokenizer
for LDM's BERT text encoder)."""
from __future__ import annotations

import json
import os
import threading
import warnings
from typing import Sequence

import numpy as np

__all__ = ["PromptTokenizer"]

_DEFAULT_MAX_LENGTH = 77


def _tokenizer_class(path_or_id: str, subfolder: str | None) -> str:
    """The ``tokenizer_class`` a tokenizer folder (local, or on the hub when reachable) names; "" if none."""
    local = os.path.join(path_or_id, subfolder or "", "tokenizer_config.json")
    try:
        if not os.path.isfile(local):
            if os.path.isdir(path_or_id):
                return ""
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(path_or_id, "tokenizer_config.json", subfolder=subfolder)
        with open(local, encoding="utf-8") as f:
            return str(json.load(f).get("tokenizer_class") or "")
    except Exception:  # noqa: BLE001 - offline, no such file: the loader below says what is wrong
        return ""


class PromptTokenizer:
    """``tokenizer(prompts) -> int32 [B, max_length]``, as diffusers' ``StableDiffusionPipeline``.

    Pads to ``max_length`` (77) with the tokenizer's pad token (``<|endoftext|>`` for SD v1, ``!``
    = id 0 for SD v2) and truncates longer prompts to ``BOS + (max_length - 2) tokens + EOS`` with a
    warning naming the number of dropped tokens. ``""`` -> ``[BOS, EOS, pad, ...]``. BERT's ``[CLS]``
    and ``[SEP]`` play BOS and EOS.
    """

    def __init__(self, tokenizer, max_length: int | None = None):
        """``tokenizer``: a transformers ``CLIPTokenizer``; ``max_length``: default its ``model_max_length``."""
        if max_length is None:
            max_length = getattr(tokenizer, "model_max_length", None)
            # transformers uses a huge sentinel when the folder does not set model_max_length.
            if not isinstance(max_length, int) or max_length > 100_000:
                max_length = _DEFAULT_MAX_LENGTH
        if max_length < 2:
            raise ValueError(f"PromptTokenizer: max_length must be >= 2 (BOS and EOS), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.placeholders: dict[str, list[str]] = {}  # textual inversion: word -> its tokens
        # a fast tokenizer sets its padding / truncation on the shared Rust object at every call: calls
        # from two threads (a server's request handler and its batch worker) must not interleave
        self._lock = threading.Lock()

    def add_placeholder(self, token: str, num_vectors: int = 1) -> list[int]:
        """Add a textual-inversion placeholder (``num_vectors`` tokens ``token``, ``token_1``, ...) after the
        vocabulary; prompts containing ``token`` then use all of them. Returns their ids. ValueError
        when ``token`` (or one of its tokens) is already in the vocabulary."""
        from ldm_jax.models.textual_inversion import placeholder_tokens

        tokens = placeholder_tokens(token, num_vectors)
        vocab = self.tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab or t + "</w>" in vocab]
        if taken:
            raise ValueError(f"placeholder token(s) {taken} are already in the tokenizer's vocabulary: pick another word")
        self.tokenizer.add_tokens(tokens)
        self.placeholders[token] = tokens
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(tokens)]

    def save_pretrained(self, path: str) -> None:
        """The tokenizer folder, placeholders included (they are added tokens of the folder)."""
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, "ldm_jax_placeholders.json"), "w") as f:
            json.dump(self.placeholders, f)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None,
                        max_length: int | None = None, **kwargs) -> "PromptTokenizer":
        """Load a tokenizer from a folder or hub id (e.g. an SD repo with ``subfolder="tokenizer"``): the
        slow ``CLIPTokenizer`` (the SD pipelines' own) unless its ``tokenizer_config.json`` names another
        class (``BertTokenizer`` for LDM's BERT), then transformers' ``AutoTokenizer``."""
        from transformers import AutoTokenizer, CLIPTokenizer

        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        named = _tokenizer_class(os.fspath(path_or_id), subfolder)
        loader = CLIPTokenizer if not named or named.startswith("CLIP") else AutoTokenizer
        tok = cls(loader.from_pretrained(os.fspath(path_or_id), **kwargs), max_length=max_length)
        saved = os.path.join(os.fspath(path_or_id), subfolder or "", "ldm_jax_placeholders.json")
        if os.path.isfile(saved):  # the multi-vector placeholders of a textual-inversion run
            with open(saved) as f:
                tok.placeholders = {k: list(v) for k, v in json.load(f).items()}
        return tok

    @property
    def bos_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.tokenizer.cls_token_id if bos is None else bos

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.sep_token_id if eos is None else eos

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __getstate__(self):  # data-loader processes get a copy: without the lock, which does not pickle
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _dropped(self, full_ids: Sequence[int]) -> str | None:
        dropped = len(full_ids) - self.max_length
        if dropped <= 0:
            return None
        removed = self.tokenizer.decode(full_ids[self.max_length - 1:-1], skip_special_tokens=True)
        return (f"is {len(full_ids)} tokens long (BOS and EOS included); the text encoder takes {self.max_length}, "
                f"so {dropped} token(s) were dropped: {removed!r}")

    def truncation(self, prompt: str) -> str | None:
        """What encoding ``prompt`` drops, in words ("is N tokens long ... dropped: '...'"), or None."""
        if self.placeholders:
            from ldm_jax.models.textual_inversion import expand_prompt

            prompt = expand_prompt(prompt, self.placeholders)
        with self._lock:
            full = self.tokenizer([prompt], padding=False, truncation=False).input_ids[0]
        return self._dropped(full)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """``prompts``: one string or a sequence of strings -> ``int32 [B, max_length]`` token ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"PromptTokenizer expects a string or a list of strings, got "
                             f"{[type(p).__name__ for p in prompts]}")
        if not prompts:
            return np.zeros((0, self.max_length), np.int32)
        if self.placeholders:
            from ldm_jax.models.textual_inversion import expand_prompt

            prompts = [expand_prompt(p, self.placeholders) for p in prompts]
        with self._lock:
            full = self.tokenizer(prompts, padding=False, truncation=False).input_ids
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                                 truncation=True).input_ids
        for i, f in enumerate(full):
            note = self._dropped(f)
            if note:
                warnings.warn(f"prompt {i} {note}", stacklevel=2)
        out = np.asarray(ids, dtype=np.int32)
        if out.shape != (len(prompts), self.max_length):
            raise ValueError(f"PromptTokenizer: tokenizer returned shape {out.shape}, expected "
                             f"{(len(prompts), self.max_length)}")
        return out
