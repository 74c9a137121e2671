"""Tiny, valid CLIP and GPT-2 BPE tokenizer folders, built offline (tests, benchmarks, the demo).

Same layout and vocab order as ``openai/clip-vit-large-patch14`` (256 byte symbols, the same 256
with ``</w>``, merged symbols in merge order, then ``<|startoftext|>``, ``<|endoftext|>``), so BOS
and EOS are the two highest ids as in the real vocab, but with a few hundred merges learned from a
short list of prompt words: ``VOCAB_SIZE`` ids in all, small enough for tiny text encoders.
Any UTF-8 text tokenizes (unmerged words fall back to byte symbols).

:func:`write_tiny_gpt2_tokenizer` writes GPT-2's layout from the same words: byte-level symbols
(a leading space is the symbol ``Ġ``, no end-of-word marker), merges, then ``<|endoftext|>`` last.
"""
from __future__ import annotations

import collections
import json
import os

__all__ = ["VOCAB_SIZE", "BOS_TOKEN_ID", "EOS_TOKEN_ID", "write_tiny_clip_tokenizer", "write_tiny_gpt2_tokenizer",
           "write_tiny_bert_tokenizer"]

_WORDS = """
a an the of in on at with and or to by for from over under near into photo photograph picture
painting drawing portrait image render illustration sketch cat dog horse bird fish cow sheep
astronaut riding mars moon sun sky cloud clouds tree trees forest mountain mountains river lake
sea ocean beach city street house castle car bike boat train man woman child people girl boy
red green blue yellow black white orange purple pink brown gold silver dark light bright
beautiful cute small large big old new happy sad highly detailed digital art artstation
trending style oil watercolor cinematic lighting sunset night day winter summer snow rain
sitting standing running flying eating playing wearing hat glasses table chair flower flowers
garden field grass road bridge tower robot dragon fantasy space planet stars galaxy
circle square triangle star diamond hexagon shape shapes round top bottom left right center middle
background corner upper lower two one tiny huge medium
""".split()

NUM_MERGES = 350


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(words: list[str], num_merges: int, end: str = "</w>") -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (each weighted by frequency), ties broken lexicographically; ``end``
    marks a word's last symbol (CLIP's ``</w>``; GPT-2 has none)."""
    corpus = collections.Counter(tuple(w[:-1]) + (w[-1] + end,) for w in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: collections.Counter = collections.Counter()
        for word, freq in corpus.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_corpus: collections.Counter = collections.Counter()
        for word, freq in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_corpus[tuple(out)] += freq
        corpus = new_corpus
    return merges


def _build(words: list[str] = _WORDS, num_merges: int = NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(words, num_merges)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(set(vocab_list)) != len(vocab_list):
        raise AssertionError("tiny CLIP vocab has duplicate entries")
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


_VOCAB, _MERGES = _build()
VOCAB_SIZE = len(_VOCAB)
BOS_TOKEN_ID = _VOCAB["<|startoftext|>"]
EOS_TOKEN_ID = _VOCAB["<|endoftext|>"]


def write_tiny_clip_tokenizer(dirpath, pad_token: str = "<|endoftext|>", model_max_length: int = 77,
                              words: list[str] | None = None) -> str:
    """Write ``vocab.json``, ``merges.txt``, ``special_tokens_map.json``, ``tokenizer_config.json``.

    ``pad_token="<|endoftext|>"`` is SD v1's tokenizer; ``pad_token="!"`` (id 0) is SD v2's.
    ``words``: learn merges from this word list until every word is one token (a word-level vocab,
    e.g. the demo's caption words; ``len(vocab.json)`` is then the text encoder's ``vocab_size``);
    default: the fixed ``VOCAB_SIZE`` vocab.
    Returns ``dirpath`` as a string; ``CLIPTokenizer.from_pretrained(dirpath)`` then works offline.
    """
    vocab, merges = (_VOCAB, _MERGES) if words is None else _build(sorted(set(words)), 10 ** 6)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the tiny CLIP vocab")
    dirpath = os.fspath(dirpath)
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(dirpath, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    with open(os.path.join(dirpath, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length,
                  do_lower_case=True, errors="replace", add_prefix_space=False)
    with open(os.path.join(dirpath, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return dirpath


GPT2_NUM_MERGES = 300


def write_tiny_gpt2_tokenizer(dirpath, model_max_length: int = 64, num_merges: int = GPT2_NUM_MERGES) -> str:
    """Write a GPT-2 byte-level BPE tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) with merges learned from the prompt words, each also with its leading
    space. ``<|endoftext|>`` (BOS, EOS and UNK, as GPT-2's) is the last id; ``len(vocab.json)`` is the
    model's ``vocab_size``. Returns ``dirpath``; ``AutoTokenizer.from_pretrained(dirpath)`` then works offline.
    """
    to_unicode = _bytes_to_unicode()
    words = ["".join(to_unicode[b] for b in w.encode("utf-8")) for w in _WORDS]
    words += [to_unicode[ord(" ")] + w for w in words]
    merges = _learn_merges(words, num_merges, end="")
    vocab_list = list(to_unicode.values()) + ["".join(m) for m in merges] + ["<|endoftext|>"]
    if len(set(vocab_list)) != len(vocab_list):
        raise AssertionError("tiny GPT-2 vocab has duplicate entries")
    dirpath = os.fspath(dirpath)
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab_list)}, f, ensure_ascii=False)
    with open(os.path.join(dirpath, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    with open(os.path.join(dirpath, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    config = dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=model_max_length,
                  add_prefix_space=False, errors="replace")
    with open(os.path.join(dirpath, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return dirpath


_BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert_tokenizer(dirpath, words: list[str] | None = None, model_max_length: int = 77) -> str:
    """Write a BERT WordPiece tokenizer (``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``),
    uncased as ``bert-base-uncased``: ``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, then
    ``words`` (default the prompt words) as whole tokens, punctuation, and the letters and digits alone
    and as ``##`` continuations, so any ASCII word tokenizes. ``len(vocab.txt)`` is the text encoder's
    ``vocab_size``. Returns ``dirpath``; ``AutoTokenizer.from_pretrained(dirpath)`` then works offline."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punct = list(".,;:!?'\"()-/&")
    whole = sorted({w.lower() for w in (words if words is not None else _WORDS)} - set(chars))
    vocab = _BERT_SPECIAL + punct + chars + ["##" + c for c in chars] + whole
    dirpath = os.fspath(dirpath)
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in vocab))
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    with open(os.path.join(dirpath, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    config = dict(special, tokenizer_class="BertTokenizer", do_lower_case=True, model_max_length=model_max_length)
    with open(os.path.join(dirpath, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return dirpath
