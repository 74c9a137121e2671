"""Stable Diffusion sampling: text-to-image, img2img (SDEdit) and inpainting in one jitted loop.

>>> pipe = StableDiffusionPipeline.from_pretrained("path/or/hub-id", dtype=jnp.bfloat16)
>>> images = pipe("a red circle on a blue background", num_inference_steps=25, seed=0)

The whole denoising loop (:func:`ldm_jax.diffusion.denoise` with classifier-free guidance on each
sample's (unconditional, conditional) context pair, the sampler step, inpainting blending) is one
``lax.fori_loop`` under ``jax.jit``. Guidance scale, guidance rescale, seed, prompts and img2img
strength are traced values: changing them never recompiles. Image size, batch size, sampler and
step count compile once per value (:class:`LoopSpec`). LoRA adapters (:meth:`StableDiffusionPipeline.
load_lora_weights`) are merged into a copy of the weights the loop takes as arguments: a new scale or
another adapter never recompiles it. With the persistent compilation cache on
(:func:`ldm_jax.runtime.enable_compilation_cache`, as the ``ldm-jax`` command does) a second process
reuses those compilations. Batches are sharded over the ``data`` axis of a mesh of all devices.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.convert.loading import load_model
from ldm_jax.diffusion.samplers import Sampler, get_sampler_from_config, sampler_class
from ldm_jax.diffusion.sampling import denoise, guided, per_row_keys, row_normal
from ldm_jax.models.attention import on_mesh
from ldm_jax.models import lora as lora_lib
from ldm_jax.models.autoencoder import AutoencoderKL, vae_from_config
from ldm_jax.models.text_encoder import check_padding, text_encoder_from_config
from ldm_jax.models.tokenizer import PromptTokenizer
from ldm_jax.models.unet import unet_from_config
from ldm_jax.prompt_expansion import PromptExpander
from ldm_jax.runtime import jit_compiler_options

# ----------------------------------------------------------------------------- images in and out


def _as_float_image(image: Any, what: str) -> np.ndarray:
    """PIL image / uint8 or float array ``[H,W,C]`` or ``[B,H,W,C]`` -> float32 ``[B,H,W,C]`` in [0, 1]."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = np.asarray(image)
    if isinstance(image, (list, tuple)):
        return np.concatenate([_as_float_image(im, what) for im in image])
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool):
        raise ValueError(f"{what}: expected a PIL image, uint8 (0-255) or float (0-1) array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{what}: holds NaN or infinite values")
    if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
        raise ValueError(f"{what}: float values must be in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}] "
                         f"(a 0-255 image must be uint8)")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{what}: expected an image [H,W,C] or batch [B,H,W,C], got shape {arr.shape}")
    return arr


def _guidance_values(guidance_scale, num_prompts: int) -> list[float]:
    """The guidance scale of each prompt: one number for all, or one per prompt."""
    many = isinstance(guidance_scale, (list, tuple, np.ndarray))
    values = list(guidance_scale) if many else [guidance_scale]
    if many and len(values) != num_prompts:
        raise ValueError(f"guidance_scale: one number for all prompts or one per prompt ({num_prompts}), got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
            raise ValueError(f"guidance_scale must be a finite number (or one per prompt), got {v!r}")
    return [float(v) for v in values]


def _guidance_rows(guidance_scale, rows: int) -> jax.Array:
    """The loop's guidance argument: a scalar, or one scale per image row (each prompt's, repeated for its
    images)."""
    if not isinstance(guidance_scale, (list, tuple, np.ndarray)):
        return jnp.float32(guidance_scale)
    values = np.asarray(guidance_scale, np.float32)
    return jnp.asarray(np.repeat(values, rows // len(values)))


def preprocess_image(image: Any, height: int, width: int) -> np.ndarray:
    """An RGB image (PIL, uint8 or [0,1] float, HWC) -> float32 ``[B, height, width, 3]`` in [-1, 1].

    Images of another size are resized with Lanczos, as diffusers' ``VaeImageProcessor``.
    """
    arr = _as_float_image(image, "image")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.shape[-1] != 3:
        raise ValueError(f"image: expected 3 (RGB) channels, got {arr.shape[-1]}")
    if arr.shape[1:3] != (height, width):
        from PIL import Image

        arr = np.stack([
            np.asarray(Image.fromarray(np.round(a * 255).astype(np.uint8)).resize((width, height), Image.LANCZOS),
                       np.float32) / 255.0
            for a in arr
        ])
    return arr * 2.0 - 1.0


def preprocess_mask(mask: Any, height: int, width: int) -> np.ndarray:
    """A mask (white/1 = repaint) -> binary float32 ``[B, height, width, 1]`` (threshold 0.5).

    The mask must already be ``height x width``: a silently resized mask repaints the wrong pixels.
    """
    arr = _as_float_image(mask, "mask")
    if arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(-1, keepdims=True) if arr.shape[-1] == 3 else arr[..., :1]
    if arr.shape[1:3] != (height, width):
        raise ValueError(f"mask is {arr.shape[2]}x{arr.shape[1]} (WxH) but the image is {width}x{height}")
    return (arr >= 0.5).astype(np.float32)


def _bad_rows(x: np.ndarray) -> str:
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(-1))
    return f"{len(bad)} of {len(x)} images (rows {', '.join(map(str, bad[:8]))}{', ...' if len(bad) > 8 else ''})"


def to_pil(images: np.ndarray) -> list:
    """Float ``[B,H,W,3]`` in [0, 1] -> list of PIL images (rounded as diffusers' ``numpy_to_pil``)."""
    from PIL import Image

    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in np.asarray(images)]


def make_grid(images: Sequence, cols: int | None = None):
    """Paste PIL images into one grid image (``cols`` defaults to a near-square layout)."""
    from PIL import Image

    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What a compiled denoising loop depends on statically (one compile per distinct value)."""

    sampler: str
    steps: int
    cfg: bool
    mode: str  # "txt2img" | "inpaint_unet" (9-channel UNet) | "inpaint_blend" (latent blending)


@dataclasses.dataclass
class DenoiseInputs:
    """One run of the jitted denoising loop (:meth:`StableDiffusionPipeline.denoise`).

    ``context`` holds each sample's ``(unconditional, conditional)`` rows in turn when
    ``spec.cfg``; ``cond`` holds the inpainting inputs. Every array is a traced argument: new
    prompts, guidance, seed or strength reuse the compiled loop.
    """

    spec: LoopSpec
    sampler: Sampler
    latents: jax.Array  # initial latents [B, h, w, C] (noise * init_noise_sigma, or a noised image)
    context: jax.Array
    guidance_scale: jax.Array
    guidance_rescale: jax.Array
    rng: jax.Array
    start: jax.Array
    cond: dict


def denoise_loop(unet, spec: LoopSpec) -> Callable:
    """The pipeline's denoising loop for ``spec``, to jit: ``run(unet_params, sampler, x, context,
    guidance_scale, guidance_rescale, rng, start, cond) -> latents`` (see :class:`DenoiseInputs`)."""

    def run(unet_params, sampler: Sampler, x, context, guidance_scale, guidance_rescale, rng, start, cond):
        def apply(x_in, t_b):
            if spec.mode == "inpaint_unet":
                x_in = jnp.concatenate([x_in, cond["mask"], cond["masked_latents"]], axis=-1)
            return unet.apply({"params": unet_params}, x_in.astype(unet.dtype), t_b, context).astype(jnp.float32)

        model_fn = guided(apply, guidance_scale, guidance_rescale) if spec.cfg else \
            lambda x_in, t: apply(x_in, jnp.broadcast_to(t, (x_in.shape[0],)))

        def blend(i, x):  # keep the known region on the noise level of the next step (exact at the end)
            nxt = jnp.minimum(i + 1, sampler.num_steps - 1)
            known = jnp.where(i + 1 < sampler.num_steps,
                              sampler.add_noise(cond["image_latents"], cond["noise"], nxt), cond["image_latents"])
            return (1 - cond["latent_mask"]) * known + cond["latent_mask"] * x

        return denoise(sampler, model_fn, x, rng, start, blend if spec.mode == "inpaint_blend" else None)

    return run


_NO_EXPANDER = ("no prompt expander loaded: load_prompt_expander(SRC) first (a GPT-2 folder or hub id; "
                "`ldm-jax sample/serve --expand-prompt SRC`)")


class StableDiffusionPipeline:
    """Text-to-image / img2img / inpainting with a UNet, a KL autoencoder and a CLIP text encoder.

    Each call runs in three public steps: ``prepare_*`` (text encoding, initial latents) ->
    :meth:`denoise` (the jitted loop) -> :meth:`decode` (the VAE).

    Args:
      config: ConfigDict with ``unet``, ``vae``, ``text_encoder``, ``scheduler`` sub-configs
        (diffusers config.json field names, as ``configs/sd_v1.py``).
      params: ``{"unet": ..., "vae": ..., "text_encoder": ...}`` Flax parameter trees (each the
        ``params`` collection, without the ``{"params": ...}`` wrapper).
      tokenizer: a :class:`PromptTokenizer`.
      dtype: compute dtype (and parameter dtype for inference), e.g. ``jnp.bfloat16``.
      mesh: device mesh with a ``data`` axis; default: all devices.
      compiler_options: XLA options of the pipeline's jitted functions; None: the backend's
        defaults (plus the CPU tuning when the process opted into it, :mod:`ldm_jax.runtime`).
    """

    def __init__(self, config, params: dict, tokenizer: PromptTokenizer, *, dtype=jnp.float32,
                 attention_impl: str = "auto", mesh: Mesh | None = None, compiler_options: dict | None = None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.tokenizer = tokenizer
        kw = dict(dtype=self.dtype, attention_impl=attention_impl)
        self.unet = unet_from_config(dict(config.unet), **kw)
        self.vae = vae_from_config(dict(config.vae), **kw)
        self.text_encoder = text_encoder_from_config(dict(config.text_encoder), **kw)
        if tokenizer is not None and tokenizer.vocab_size > self.text_encoder.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder's embedding "
                             f"table {self.text_encoder.vocab_size} rows: its higher ids would embed as NaN (the "
                             f"tokenizer of another model?)")
        check_padding(self.text_encoder, tokenizer)
        self.scaling_factor = float(dict(config.vae).get("scaling_factor", 0.18215))
        self.vae_scale = 2 ** (len(tuple(config.vae["block_out_channels"])) - 1)
        self.latent_channels = int(dict(config.vae).get("latent_channels", 4))
        self.mesh = mesh or Mesh(np.array(jax.devices()), ("data",))
        self.compiler_options = jit_compiler_options(self.mesh.devices.flat[0].platform, compiler_options)
        replicated = NamedSharding(self.mesh, P())
        cast = lambda x: jnp.asarray(x, self.dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
        self.params = jax.device_put(jax.tree.map(cast, params), replicated)
        self._base_params = self.params  # without adapters; self.params = with the active ones merged
        self._adapters: dict[str, dict] = {}  # name -> {"unet": tree, "text_encoder": tree} (fp32)
        self._scales: dict[str, float] = {}  # the active adapters and their scales
        self._lora_enabled = True
        self._unfused: list[tuple[dict, dict]] = []  # (params, scales) before each fuse_lora
        self._merge = jax.jit(lambda base, trees, scales: lora_lib.merge(base, zip(trees, scales)))
        self._loops: dict[LoopSpec, Callable] = {}
        jit = functools.partial(jax.jit, compiler_options=self.compiler_options)
        self._encode_text = jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids).context)
        self._decode = jit(self._decode_latents)
        self._encode_image = jit(self._encode_pixels, static_argnames=("sample",))
        self.prompt_expander = None  # a PromptExpander (load_prompt_expander)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str, *, dtype=jnp.float32, allow_pickle: bool = False,
                        step: int | None = None, ema: bool | None = None,
                        tokenizer: "str | PromptTokenizer | None" = None, **kwargs):
        """Load a diffusers folder or hub id, an original single-file checkpoint, or a training workdir.

        ``step``/``ema``: which checkpoint of a training workdir (default: the latest complete one)
        and whether its EMA UNet weights (default) or the raw ones; see :func:`load_model`.
        ``tokenizer``: a tokenizer folder / hub id / :class:`PromptTokenizer` replacing the model's
        own (needed for a workdir trained without ``config.tokenizer``).
        """
        loaded = load_model(path_or_id, allow_pickle=allow_pickle, step=step, ema=ema)
        if not isinstance(tokenizer, PromptTokenizer):
            source = tokenizer or loaded.tokenizer_path or loaded.config.get("tokenizer")
            if not source:
                raise ValueError(f"{path_or_id!r} names no tokenizer (its config.tokenizer is empty): pass one "
                                 f"(a folder or hub id; `ldm-jax sample --tokenizer`, from_pretrained(tokenizer=))")
            tokenizer = PromptTokenizer.from_pretrained(source)
        return cls(loaded.config, loaded.params, tokenizer, dtype=dtype, **kwargs)

    # -- LoRA adapters ---------------------------------------------------------------------

    def load_lora_weights(self, path_or_id: str, adapter_name: str | None = None, *, scale: float = 1.0,
                          weight_name: str | None = None, allow_pickle: bool = False) -> str:
        """Load a LoRA (a ``.safetensors`` file, a folder with ``pytorch_lora_weights.safetensors`` or
        ``weight_name``, or a hub repo; diffusers/PEFT or kohya layout, :mod:`ldm_jax.convert.lora`) for
        the UNet and/or the text encoder and activate it with ``scale`` beside the active ones.
        Returns its name (default ``adapter_<n>``). Raises WeightsError naming the keys that do not fit."""
        from ldm_jax.convert.lora import read_lora

        name = adapter_name or f"adapter_{len(self._adapters)}"
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is loaded already (delete_adapters() it, or pick a name)")
        self._check_scale(name, scale)
        trees = read_lora(path_or_id, self._base_params, weight_name=weight_name, allow_pickle=allow_pickle)
        self._adapters[name] = jax.device_put(trees, NamedSharding(self.mesh, P()))
        self._scales[name] = float(scale)
        self._refresh()
        return name

    def load_textual_inversion(self, path: str, token: str | None = None, *, weight_name: str | None = None,
                               allow_pickle: bool = False) -> str:
        """Load a textual-inversion embedding (diffusers' ``learned_embeds.safetensors``, or an A1111
        ``.safetensors``; a file or a folder): its placeholder joins the tokenizer and its vectors the
        text encoder's token table. ``token`` renames the placeholder. Returns the placeholder."""
        from ldm_jax.convert.textual_inversion import read_learned_embeds
        from ldm_jax.models.textual_inversion import embedding_table, extend_embeddings

        name, vectors = read_learned_embeds(path, token=token, weight_name=weight_name, allow_pickle=allow_pickle)
        table = embedding_table(self._base_params["text_encoder"])
        if vectors.shape[1] != table.shape[1]:
            raise ValueError(f"textual-inversion {path!r}: vectors of width {vectors.shape[1]}; this text encoder's "
                             f"embeddings have {table.shape[1]} (an embedding for another model?)")
        if len(self.tokenizer.tokenizer) != table.shape[0]:
            raise ValueError(f"the tokenizer ({len(self.tokenizer.tokenizer)} tokens) and the text encoder's table "
                             f"({table.shape[0]} rows) differ: new tokens would not get their rows")
        self.tokenizer.add_placeholder(name, vectors.shape[0])
        grow = lambda p: dict(p, text_encoder=extend_embeddings(p["text_encoder"], vectors))  # noqa: E731
        self._base_params = grow(self._base_params)
        self._unfused = [(grow(p), s) for p, s in self._unfused]
        self.text_encoder = self.text_encoder.clone(vocab_size=table.shape[0] + vectors.shape[0])
        self._refresh()
        return name

    # -- prompt expansion ------------------------------------------------------------------

    def load_prompt_expander(self, src: str | PromptExpander, *, allow_pickle: bool = False,
                             **kwargs) -> PromptExpander:
        """Expand prompts with a GPT-2 (a transformers ``GPT2LMHeadModel`` folder or hub id, or a
        :class:`~ldm_jax.prompt_expansion.PromptExpander`): :meth:`expand_prompts`, ``expand_prompt=True``.
        ``kwargs`` go to ``PromptExpander.from_pretrained``. Returns the expander."""
        if not isinstance(src, PromptExpander):
            src = PromptExpander.from_pretrained(src, allow_pickle=allow_pickle, **kwargs)
        self.prompt_expander = src
        return src

    def expand_prompts(self, prompts: str | Sequence[str], *, temperature: float = 1.0, top_k: int = 50,
                       top_p: float = 1.0, max_new_tokens: int | None = None,
                       seed: int | Sequence[int] = 0) -> list[str]:
        """Each prompt continued by the loaded expander (:meth:`PromptExpander.expand
        <ldm_jax.prompt_expansion.PromptExpander.expand>`): pass the result as the prompts to keep
        them with the images."""
        if self.prompt_expander is None:
            raise ValueError(_NO_EXPANDER)
        return self.prompt_expander.expand(prompts, temperature=temperature, top_k=top_k, top_p=top_p,
                                           max_new_tokens=max_new_tokens, seed=seed)

    def _expanded(self, prompt, expand_prompt, temperature: float, seed, num_images_per_prompt: int) -> list[str]:
        """``__call__``'s prompts expanded: each with its first image's seed."""
        expander = self.prompt_expander
        if isinstance(expand_prompt, PromptExpander):
            expander = expand_prompt
        elif expand_prompt is True:
            if expander is None:
                raise ValueError(_NO_EXPANDER)
        elif expander is None or expander.source != expand_prompt:
            expander = self.load_prompt_expander(expand_prompt)  # a source: loaded once, kept
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(seed, (list, tuple, np.ndarray)):
            if len(seed) != len(prompts) * num_images_per_prompt:
                raise ValueError(f"seed: one for the batch or one per image ({len(prompts) * num_images_per_prompt}), "
                                 f"got {len(seed)}")
            seed = [int(s) for s in seed[::num_images_per_prompt]]
        return expander.expand(prompts, temperature=temperature, seed=seed)

    @staticmethod
    def _check_scale(name, scale):
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
                or not np.isfinite(scale):
            raise ValueError(f"LoRA scale of {name!r} must be a finite number, got {scale!r}")

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None):
        """Activate exactly ``adapter_names`` with their scales (default 1.0 each); the others stay
        loaded, inactive. Changing scales or adapters of the same shapes compiles nothing."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if adapter_weights is not None else 1.0
        weights = [weights] * len(names) if np.ndim(weights) == 0 else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: {sorted(self._adapters)}")
        for n, w in zip(names, weights):
            self._check_scale(n, w)
        self._scales = {n: float(w) for n, w in zip(names, weights)}
        self._refresh()

    def get_active_adapters(self) -> dict[str, float]:
        """``{name: scale}`` of the adapters in use (empty while LoRA is disabled)."""
        return dict(self._scales) if self._lora_enabled else {}

    def disable_lora(self):
        self._lora_enabled = False
        self._refresh()

    def enable_lora(self):
        self._lora_enabled = True
        self._refresh()

    def delete_adapters(self, adapter_names: str | Sequence[str]):
        for n in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if n not in self._adapters:
                raise ValueError(f"no adapter named {n!r}; loaded: {sorted(self._adapters)}")
            del self._adapters[n]
            self._scales.pop(n, None)
        self._refresh()

    def unload_lora_weights(self):
        """Drop every adapter that is not fused: the weights are the base ones (plus fused adapters)."""
        self._adapters.clear()
        self._scales.clear()
        self._refresh()

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None):
        """Merge the active adapters (or ``adapter_names``), times ``lora_scale``, into the base weights;
        they are no longer active. :meth:`unfuse_lora` restores the weights from before, exactly (a copy
        is kept, not a subtraction)."""
        names = list(adapter_names) if adapter_names is not None else list(self.get_active_adapters())
        if not names:
            raise ValueError("no adapter to fuse: load one (load_lora_weights) or name it")
        scales = {n: self._scales.get(n, 1.0) * float(lora_scale) for n in names}
        self._unfused.append((self._base_params, dict(self._scales)))
        self._base_params = self._merged(self._base_params, scales)
        for n in names:
            self._scales.pop(n, None)
        self._refresh()

    def unfuse_lora(self):
        """Undo the last :meth:`fuse_lora`: its base weights back, its adapters active again."""
        if not self._unfused:
            raise ValueError("no fused LoRA to unfuse")
        self._base_params, scales = self._unfused.pop()
        self._scales = {n: s for n, s in scales.items() if n in self._adapters}
        self._refresh()

    def _merged(self, params: dict, scales: dict[str, float]) -> dict:
        out = dict(params)
        for model in ("unet", "text_encoder"):
            trees = [self._adapters[n][model] for n in scales if self._adapters[n][model]]
            if trees:
                values = [jnp.float32(scales[n]) for n in scales if self._adapters[n][model]]
                out[model] = self._merge(params[model], trees, values)
        return out

    def _refresh(self):
        self.params = self._merged(self._base_params, self.get_active_adapters())

    # -- building blocks (each jitted once per shape) --------------------------------------

    def _decode_latents(self, vae_params, latents):
        images = self.vae.apply({"params": vae_params}, latents / self.scaling_factor, method=AutoencoderKL.decode)
        return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    def _encode_pixels(self, vae_params, images, key, sample: bool):
        post = self.vae.apply({"params": vae_params}, images.astype(self.dtype), method=AutoencoderKL.encode)
        if not sample:
            z = post.mode()
        elif per_row_keys(key):  # one key per image: each row's posterior noise its own
            z = post.mean + post.std * row_normal(key, post.mean.shape).astype(post.mean.dtype)
        else:
            z = post.sample(key)
        return z.astype(jnp.float32) * self.scaling_factor

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> text conditioning ``[B, 77, D]`` (the configured CLIP layer)."""
        ids = self.tokenizer(list(prompts))
        return self._encode_text(self.params["text_encoder"], self._shard(ids))

    def _shard(self, x):
        """Shard the batch axis over ``data`` when it divides evenly, else replicate."""
        n = self.mesh.shape["data"]
        spec = P("data") if np.shape(x)[0] % n == 0 else P()
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _loop(self, spec: LoopSpec) -> Callable:
        if spec not in self._loops:
            self._loops[spec] = jax.jit(on_mesh(self._make_loop(spec), self.mesh), compiler_options=self.compiler_options)
        return self._loops[spec]

    def _make_loop(self, spec: LoopSpec):
        return denoise_loop(self.unet, spec)

    # -- the three steps -------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Image widths and heights must be multiples of this (8, or the VAE's downsampling if larger)."""
        return max(8, self.vae_scale)

    def _validate(self, prompts, height, width, steps, sampler, guidance_scale, num_images_per_prompt=1,
                  guidance_rescale=0.0):
        if not prompts:
            raise ValueError("prompt list is empty")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt must be a string or a list of strings, got {type(p).__name__} "
                                 f"({'prompt' if len(prompts) == 1 else f'item {i}'})")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt {i} is not valid UTF-8 text ({e.reason} at character {e.start})") from None
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an integer number of pixels, got {v!r}")
            if v <= 0 or v % self.size_multiple:
                raise ValueError(f"{name}={v} must be a positive multiple of {self.size_multiple}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        n = num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
        sampler_class(sampler)  # unknown sampler -> ValueError listing the valid ones
        scales = _guidance_values(guidance_scale, len(prompts))
        if not isinstance(guidance_rescale, (int, float, np.number)) or not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        self._check_fits(len(prompts) * n * (2 if max(scales) > 1.0 else 1), int(height), int(width))
        return scales

    def _check_fits(self, rows: int, height: int, width: int) -> None:
        """Refuse, before tracing, a size whose UNet activations alone cannot fit the device's memory
        (a lower bound: ~50 live tensors of the first level's width at the latents' resolution)."""
        tokens = (height // self.vae_scale) * (width // self.vae_scale)
        need = 50 * rows * tokens * int(self.config.unet["block_out_channels"][0]) * 4
        device = jax.local_devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
        have = (stats or {}).get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > have:
            raise ValueError(f"{width}x{height} px for {rows} rows needs at least {need / 2**30:.0f} GiB of "
                             f"activations; this {device.platform} device has {have / 2**30:.0f} GiB")

    def _conditioning(self, prompt, negative_prompt, num_images_per_prompt, height, width, steps, sampler,
                      guidance_scale, sampler_options, guidance_rescale=0.0):
        """-> (context, sampler, latent shape, cfg): prompts encoded (with each negative prompt, in
        (negative, prompt) pairs, when guided) and the sampler built."""
        prompts = [prompt] if isinstance(prompt, str) or not isinstance(prompt, (list, tuple)) else list(prompt)
        cfg = self.config
        default = int(cfg.unet["sample_size"]) * self.vae_scale
        height = default if height is None else height
        width = default if width is None else width
        scales = self._validate(prompts, height, width, steps, sampler, guidance_scale, num_images_per_prompt,
                                guidance_rescale)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) not in (1, len(prompts) // num_images_per_prompt):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts) // num_images_per_prompt} prompts")
            negatives = (negatives * len(prompts))[: len(prompts)] if len(negatives) == 1 else \
                [n for n in negatives for _ in range(num_images_per_prompt)]
        use_cfg = max(scales) > 1.0
        rows = [r for pair in zip(negatives, prompts) for r in pair] if use_cfg else prompts
        context = self.encode_prompt(rows)
        smp = get_sampler_from_config(sampler, dict(cfg.scheduler), int(steps), **(sampler_options or {}))
        shape = (len(prompts), height // self.vae_scale, width // self.vae_scale, self.latent_channels)
        return context, smp, shape, use_cfg

    @staticmethod
    def _keys(seed, rows: int, parts: int):
        """``parts`` keys from ``seed``: one key each for the whole batch (an int seed), or ``[rows]``
        keys each (a sequence: one seed per image, so an image depends on its own seed only)."""
        if isinstance(seed, (list, tuple, np.ndarray)):
            seeds = [int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None for v in seed]
            if len(seeds) != rows or any(v is None or not 0 <= v < 2**32 for v in seeds):
                raise ValueError(f"seed: one integer in [0, 2**32) per image ({rows}), got {list(seed)!r}")
            keys = jax.vmap(lambda v: jax.random.split(jax.random.key(v), parts))(jnp.asarray(seeds, jnp.uint32))
            return tuple(keys[:, i] for i in range(parts))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer or one integer per image, got {seed!r}")
        return tuple(jax.random.split(jax.random.key(seed), parts))

    def _initial_noise(self, latents, shape, rng):
        if latents is None:
            return row_normal(rng, shape)
        lat = np.asarray(latents, np.float32)
        if not np.isfinite(lat).all():
            raise ValueError("latents hold NaN or infinite values")
        if lat.ndim == 4 and lat.shape[-1] != shape[-1] and lat.shape[1] == shape[-1]:
            lat = lat.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        if lat.shape != shape:
            raise ValueError(f"latents have shape {np.shape(latents)}; expected {shape} (NHWC) "
                             f"or {(shape[0], shape[3], shape[1], shape[2])} (NCHW)")
        return jnp.asarray(lat)

    def _inputs(self, mode, steps, context, smp, use_cfg, x, guidance_scale, guidance_rescale, rng, start=0,
                cond=None) -> DenoiseInputs:
        return DenoiseInputs(LoopSpec(type(smp).__name__, int(steps), use_cfg, mode), smp, self._shard(x), context,
                             _guidance_rows(guidance_scale, x.shape[0]), jnp.float32(guidance_rescale), rng,
                             jnp.int32(start),
                             jax.tree.map(self._shard, cond or {}))

    def denoise(self, inputs: DenoiseInputs) -> jax.Array:
        """Run the jitted denoising loop (compiled once per :class:`LoopSpec`) -> final latents."""
        return self._loop(inputs.spec)(self.params["unet"], inputs.sampler, inputs.latents, inputs.context,
                                       inputs.guidance_scale, inputs.guidance_rescale, inputs.rng, inputs.start,
                                       inputs.cond)

    def decode(self, latents: jax.Array, output_type: str = "pil"):
        """Latents -> ``"pil"`` (list of images), ``"np"`` (float ``[B,H,W,3]`` in [0,1]) or ``"latent"``."""
        if output_type == "latent":
            return np.asarray(latents)  # raw latents as asked: a caller may want to inspect non-finite ones
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        lat = np.asarray(latents)
        if not np.isfinite(lat).all():
            raise FloatingPointError(f"the sampled latents hold NaN or infinite values in {_bad_rows(lat)}: "
                                     f"non-finite model weights (check the model files), or an extreme guidance")
        images = np.asarray(self._decode(self.params["vae"], latents))
        if not np.isfinite(images).all():
            raise FloatingPointError(f"the decoded images hold NaN or infinite values in {_bad_rows(images)}: "
                                     f"non-finite VAE weights (check the model files)")
        return to_pil(images) if output_type == "pil" else images

    def prepare_txt2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                        height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                        guidance_scale: float | Sequence[float] = 7.5, guidance_rescale: float = 0.0,
                        sampler: str = "ddim", seed: int | Sequence[int] = 0, latents: Any = None,
                        num_images_per_prompt: int = 1,
                        sampler_options: dict | None = None) -> DenoiseInputs:
        """The :class:`DenoiseInputs` of a text-to-image call (see :meth:`__call__`)."""
        context, smp, shape, use_cfg = self._conditioning(
            prompt, negative_prompt, num_images_per_prompt, height, width, num_inference_steps, sampler,
            guidance_scale, sampler_options, guidance_rescale)
        rng_noise, rng_loop = self._keys(seed, shape[0], 2)
        x = self._initial_noise(latents, shape, rng_noise) * smp.init_noise_sigma
        return self._inputs("txt2img", num_inference_steps, context, smp, use_cfg, x, guidance_scale,
                            guidance_rescale, rng_loop)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | Sequence[float] = 7.5, guidance_rescale: float = 0.0,
                 sampler: str = "ddim", seed: int | Sequence[int] = 0, latents: Any = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", sampler_options: dict | None = None,
                 expand_prompt: bool | str | PromptExpander | None = None, expansion_temperature: float = 1.0):
        """Text-to-image.

        Args:
          guidance_scale: one scale, or one per prompt (> 1 for any: every row runs guided).
          seed: one seed for the batch, or one per image (``len(prompts) * num_images_per_prompt``): then
            each image's noise comes from its own seed alone, whatever else is in the batch.
          latents: optional initial noise, unit Gaussian, ``[B, h, w, C]`` (NHWC) or ``[B, C, h, w]``
            (NCHW, as diffusers); it is multiplied by the sampler's ``init_noise_sigma``.
          sampler: one of ``ldm_jax.diffusion.SAMPLERS`` (or an alias: plms, dpm++).
          output_type: ``"pil"`` (list of images), ``"np"`` (float ``[B,H,W,3]`` in [0,1]) or ``"latent"``.
          expand_prompt: continue each prompt with a GPT-2 first: True (the :meth:`load_prompt_expander`
            one), a :class:`~ldm_jax.prompt_expansion.PromptExpander`, or a GPT-2 folder / hub id (loaded
            once and kept); sampled at ``expansion_temperature`` with each prompt's (first image's) seed.
            To keep the expanded prompts, call :meth:`expand_prompts` and pass its result instead.
        Returns:
          Images as selected by ``output_type``.
        """
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if expand_prompt is not None and expand_prompt is not False:
            prompt = self._expanded(prompt, expand_prompt, expansion_temperature, seed, num_images_per_prompt)
        inputs = self.prepare_txt2img(prompt, negative_prompt, height=height, width=width,
                                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                      guidance_rescale=guidance_rescale, sampler=sampler, seed=seed, latents=latents,
                                      num_images_per_prompt=num_images_per_prompt, sampler_options=sampler_options)
        return self.decode(self.denoise(inputs), output_type)

    def img2img(self, prompt, image, strength: float = 0.75, negative_prompt=None, *, num_inference_steps: int = 50,
                guidance_scale: float | Sequence[float] = 7.5, guidance_rescale: float = 0.0, sampler: str = "ddim",
                seed: int | Sequence[int] = 0,
                noise: Any = None, num_images_per_prompt: int = 1, output_type: str = "pil",
                posterior: str = "sample", sampler_options: dict | None = None):
        """SDEdit: encode ``image``, noise it to ``strength``, denoise the remaining steps.

        ``noise`` optionally fixes the Gaussian noise added to the image latents (NHWC or NCHW);
        ``posterior`` is ``"sample"`` (as the reference) or ``"mode"`` (deterministic encoding).
        ``image``: one image for every prompt, or a batch (one per prompt); ``seed`` and ``guidance_scale``
        as in :meth:`__call__` (one per image: an image depends on its own alone).
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        height, width = _as_float_image(image, "image").shape[1:3]
        context, smp, shape, use_cfg = self._conditioning(
            prompt, negative_prompt, num_images_per_prompt, height, width, num_inference_steps, sampler,
            guidance_scale, sampler_options, guidance_rescale)
        start = smp.start_index(strength)
        rng_enc, rng_noise, rng_loop = self._keys(seed, shape[0], 3)
        image_latents = self._image_latents(image, height, width, shape[0], rng_enc, posterior)
        x = smp.add_noise(image_latents, self._initial_noise(noise, shape, rng_noise), start)
        inputs = self._inputs("txt2img", num_inference_steps, context, smp, use_cfg, x, guidance_scale,
                              guidance_rescale, rng_loop, start)
        return self.decode(self.denoise(inputs), output_type)

    def _image_latents(self, image, height, width, batch, rng, posterior, pixels=None):
        """Latents of ``image`` (or of ``pixels``, already preprocessed to [-1, 1]), repeated to ``batch``."""
        if posterior not in ("sample", "mode"):
            raise ValueError(f"posterior must be 'sample' or 'mode', got {posterior!r}")
        pixels = preprocess_image(image, height, width) if pixels is None else pixels
        if batch % pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for a batch of {batch}")
        if per_row_keys(rng):  # one key per image: encode each row of the batch with its own
            pixels = np.repeat(pixels, batch // pixels.shape[0], axis=0)
        lat = self._encode_image(self.params["vae"], jnp.asarray(pixels), rng, sample=posterior == "sample")
        return jnp.repeat(lat, batch // pixels.shape[0], axis=0)

    def inpaint(self, prompt, image, mask_image, negative_prompt=None, *, strength: float = 1.0,
                num_inference_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                sampler: str = "ddim", seed: int | Sequence[int] = 0, latents: Any = None,
                num_images_per_prompt: int = 1, output_type: str = "pil", posterior: str = "sample",
                sampler_options: dict | None = None):
        """Repaint the white (>= 0.5) region of ``mask_image``.

        With a 9-channel inpainting UNet the mask and the masked-image latents are extra UNet inputs;
        with an ordinary UNet the known region is blended back into the latents after every step.
        ``latents`` optionally fixes the initial noise (NHWC or NCHW). ``image`` and ``mask_image``: one
        for every prompt or a batch (one per prompt); ``seed`` and ``guidance_scale`` as in
        :meth:`__call__`.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        height, width = _as_float_image(image, "image").shape[1:3]
        mask = preprocess_mask(mask_image, height, width)
        context, smp, shape, use_cfg = self._conditioning(
            prompt, negative_prompt, num_images_per_prompt, height, width, num_inference_steps, sampler,
            guidance_scale, sampler_options, guidance_rescale)
        in_channels = int(self.config.unet["in_channels"])
        mode = "inpaint_unet" if in_channels == 2 * self.latent_channels + 1 else "inpaint_blend"
        if mode == "inpaint_blend" and in_channels != self.latent_channels:
            raise ValueError(f"a UNet with {in_channels} input channels cannot inpaint")
        start = smp.start_index(strength)
        rng_enc, rng_mask, rng_noise, rng_loop = self._keys(seed, shape[0], 4)
        b = shape[0]
        pixels = preprocess_image(image, height, width)
        image_latents = self._image_latents(None, height, width, b, rng_enc, posterior, pixels=pixels)
        s = self.vae_scale
        latent_mask = jnp.repeat(jnp.asarray(mask[:, ::s, ::s]), b // mask.shape[0], axis=0)  # torch "nearest"
        eps = self._initial_noise(latents, shape, rng_noise)
        x = eps * smp.init_noise_sigma if strength == 1.0 else smp.add_noise(image_latents, eps, start)
        if mode == "inpaint_unet":
            masked = pixels * (mask < 0.5)
            masked_latents = self._image_latents(None, height, width, b, rng_mask, posterior, pixels=masked)
            cond = {"mask": latent_mask, "masked_latents": masked_latents}
        else:
            cond = {"image_latents": image_latents, "noise": eps, "latent_mask": latent_mask}
        inputs = self._inputs(mode, num_inference_steps, context, smp, use_cfg, x, guidance_scale, guidance_rescale,
                              rng_loop, start, cond)
        return self.decode(self.denoise(inputs), output_type)


def _open_image(path: str, mode: str, what: str):
    """``path`` as a PIL image in ``mode``, decoded now: a missing, truncated or non-image file is a
    one-line error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, "image file is truncated"
        raise ValueError(f"{what} {path!r} cannot be read as an image: {' '.join(str(e).split())}") from None


def _save_png(image, path: str) -> None:
    """Write whole or not at all: a full disk never leaves a 0-byte or partial PNG at ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def parse_lora_arg(item: str) -> tuple[str, float]:
    """``"FILE[:SCALE]"`` -> ``(FILE, SCALE)`` (scale 1.0 when the part after the last ``:`` is not a number,
    so ``gs://b/lora.safetensors`` is a path)."""
    path, sep, tail = item.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            if re.fullmatch(r"[-+.\deE]+", tail):
                raise ValueError(f"--lora {item!r}: the scale {tail!r} is not a number") from None
    return item, 1.0


def load_pipeline(model: str, *, dtype: str = "float32", allow_pickle: bool = False, step: int | None = None,
                  ema: bool | None = None, tokenizer: str | None = None, lora: Sequence[str] = (),
                  embeddings: Sequence[str] = ()) -> StableDiffusionPipeline:
    """A pipeline as ``ldm-jax sample`` and ``serve`` load it: ``model`` (a diffusers folder, hub id, single
    file or training workdir) with the ``lora`` ``"FILE[:SCALE]"`` adapters active and the ``embeddings``
    ``"FILE[:TOKEN]"`` textual-inversion words loaded."""
    loras = [parse_lora_arg(item) for item in lora]
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=jnp.dtype(dtype), allow_pickle=allow_pickle,
                                                   step=step, ema=ema, tokenizer=tokenizer)
    for path, scale in loras:
        pipe.load_lora_weights(path, scale=scale, allow_pickle=allow_pickle)
    for item in embeddings:
        path, sep, token = item.rpartition(":")
        if not sep or not path or "/" in token or token.endswith(".safetensors"):  # no TOKEN (or a gs:// path)
            path, token = item, None
        pipe.load_textual_inversion(path, token, allow_pickle=allow_pickle)
    return pipe


def sample_to_dir(model: str, prompt, out_dir: str, *, negative_prompt=None, num_images: int = 1,
                  height=None, width=None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                  sampler: str = "ddim", seed: int = 0, init_image=None, strength: float | None = None, mask=None,
                  dtype: str = "float32", allow_pickle: bool = False, step: int | None = None,
                  ema: bool | None = None, tokenizer: str | None = None, lora: Sequence[str] = (),
                  embeddings: Sequence[str] = (), expand_prompt: str | None = None,
                  expansion_temperature: float = 1.0) -> list[str]:
    """What ``ldm-jax sample`` does: load, sample (txt2img / img2img / inpaint), write PNGs and a grid.

    ``lora``: ``"FILE[:SCALE]"`` items (:func:`parse_lora_arg`), each loaded and active at its scale;
    ``embeddings``: ``"FILE[:TOKEN]"`` textual-inversion embeddings (the file's token, or TOKEN).
    ``strength``: img2img and inpainting (default 0.75 and 1.0, as their methods). ``step``/``ema``:
    checkpoint and EMA/raw weights when ``model`` is a training workdir; ``tokenizer`` replaces the
    model's own. Images are written atomically (a temporary file renamed). ``expand_prompt``: a GPT-2
    folder or hub id continuing each prompt first (seed ``seed + k`` for prompt k, as its images);
    ``prompts.json`` then lists each image with its prompt and expanded prompt."""
    from tqdm.auto import tqdm

    prompts = [prompt] if isinstance(prompt, str) or not isinstance(prompt, (list, tuple)) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    if mask is not None and init_image is None:
        raise ValueError("--mask needs --init-image (the image to inpaint)")
    if strength is not None and init_image is None:
        raise ValueError("--strength needs --init-image (img2img or inpainting)")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images!r}")
    img = _open_image(init_image, "RGB", "--init-image") if init_image is not None else None
    mask_img = _open_image(mask, "L", "--mask") if mask is not None else None
    pipe = load_pipeline(model, dtype=dtype, allow_pickle=allow_pickle, step=step, ema=ema, tokenizer=tokenizer,
                         lora=lora, embeddings=embeddings)
    if expand_prompt:
        pipe.load_prompt_expander(expand_prompt, allow_pickle=allow_pickle)
    common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                  num_images_per_prompt=num_images)
    os.makedirs(out_dir, exist_ok=True)
    written, images, records = [], [], []
    for k, original in enumerate(tqdm(prompts, desc="prompts", unit="prompt")):
        p = original
        if expand_prompt:
            p = pipe.expand_prompts(original, temperature=expansion_temperature, seed=seed + k)[0]
        if mask_img is not None:
            out = pipe.inpaint(p, img, mask_img, negative_prompt, seed=seed + k,
                               strength=1.0 if strength is None else strength, **common)
        elif img is not None:
            out = pipe.img2img(p, img, 0.75 if strength is None else strength, negative_prompt, seed=seed + k,
                               **common)
        else:
            out = pipe(p, negative_prompt, height=height, width=width, seed=seed + k, **common)
        for j, im in enumerate(out):
            path = os.path.join(out_dir, f"{k:03d}_{j:02d}.png")
            _save_png(im, path)
            written.append(path)
            records.append(dict(image=os.path.basename(path), prompt=original, expanded_prompt=p, seed=seed + k))
        images.extend(out)
    grid = os.path.join(out_dir, "grid.png")
    _save_png(make_grid(images, cols=num_images if len(prompts) > 1 else None), grid)
    if expand_prompt:
        meta = os.path.join(out_dir, "prompts.json")
        with open(meta, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
        return written + [grid, meta]
    return written + [grid]
