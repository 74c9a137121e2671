"""Starting a training run from released weights (``config.init``).

:func:`resolve_diffusion` turns a diffusion config and ``init.pretrained`` (any model source
:func:`ldm_jax.convert.load_model` reads: a diffusers folder, a hub id, an original single file, a
training workdir) into the config the run trains with and the weights it starts from: the
tokenizer, the frozen CLIP text encoder and VAE (architecture, weights, scaling factor) and the
scheduler come from the source; with ``init.unet="pretrained"`` the UNet (and, from a training
workdir, its EMA) too. :func:`resolve_autoencoder` does the same for the first stage's VAE. Every
mismatch between the config's networks and the source's is a one-line error before any compile.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections

__all__ = ["Pretrained", "resolve_diffusion", "resolve_autoencoder", "check_compatible"]

_UNET_CHOICES = ("random", "pretrained")


@dataclasses.dataclass
class Pretrained:
    """What a run starts from: its resolved ``config`` and the loaded weights (numpy trees, or None)."""

    config: ml_collections.ConfigDict
    frozen: dict | None = None  # {"text": ..., "vae": ...}: the frozen encoders
    unet: Any = None  # the UNet to fine-tune
    unet_ema: Any = None  # its EMA (a training workdir's; else the same weights)
    vae: Any = None  # the autoencoder task's starting VAE


def _load(init) -> Any:
    """The source's :class:`~ldm_jax.convert.LoadedModel`; its errors name ``config.init.pretrained``."""
    from ldm_jax.convert import WeightsError, load_model

    try:
        return load_model(init.pretrained, allow_pickle=bool(init.allow_pickle))
    except WeightsError as e:
        raise WeightsError(f"config.init.pretrained={init.pretrained!r}: {e}") from None
    except (OSError, ValueError) as e:  # missing, unreachable, not a model
        raise ValueError(f"config.init.pretrained={init.pretrained!r}: {e}") from None


def check_compatible(config) -> None:
    """The UNet must read the text encoder's conditioning and the VAE's latents: ValueError naming the
    keys otherwise."""
    from ldm_jax.models.text_encoder import context_width, context_width_key

    width = context_width(config.text_encoder)
    key = context_width_key(config.text_encoder)
    cross = config.unet.get("cross_attention_dim", 1280)
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if int(cross) != width:
        raise ValueError(f"config.unet.cross_attention_dim ({cross}) does not fit the text encoder's "
                         f"config.text_encoder.{key} ({width}): the UNet cannot read this conditioning")
    latent = int(config.vae.get("latent_channels", 4))
    unet_in, unet_out = int(config.unet.get("in_channels", 4)), int(config.unet.get("out_channels", 4))
    if unet_in not in (latent, 2 * latent + 1) or unet_out != latent:
        raise ValueError(f"config.unet.in_channels/out_channels ({unet_in}/{unet_out}) do not fit the VAE's "
                         f"config.vae.latent_channels ({latent})")


def resolve_diffusion(config) -> Pretrained:
    """The diffusion run's config and starting weights from ``config.init`` (see the module docstring).

    Without ``init.pretrained`` the frozen encoders are random: allowed only with
    ``init.random_encoders=True`` (tests), an error naming the key otherwise.
    """
    init = config.init
    if init.unet not in _UNET_CHOICES:
        raise ValueError(f"config.init.unet must be one of {_UNET_CHOICES}, got {init.unet!r}")
    config = config.copy_and_resolve_references()
    if not init.pretrained:
        if init.unet == "pretrained":
            raise ValueError("config.init.unet='pretrained' needs config.init.pretrained (the weights to start from)")
        joint = bool(config.train.train_text_encoder)  # a random text encoder that trains is the recipe
        if not init.random_encoders and not (init.vae and joint):
            random = " and ".join(([] if joint else ["text encoder"]) + ([] if init.vae else ["VAE"]))
            raise ValueError(f"config.init.pretrained is empty: the frozen {random} would be random. Name released "
                             f"weights (--config.init.pretrained=DIR, a hub id, a checkpoint file or a training "
                             f"workdir{'' if init.vae else '; --config.init.vae=AUTOENCODER_WORKDIR for the VAE alone'}) "
                             f"or set --config.init.random_encoders=True on purpose")
        out = Pretrained(config)
        if init.vae:
            out.frozen = {"vae": _vae_source(init, config)}
        check_compatible(config)
        return out
    loaded = _load(init)
    source = loaded.config
    for key in ("text_encoder", "vae", "scheduler"):
        config[key] = ml_collections.ConfigDict(dict(source[key]))
    config.tokenizer = loaded.tokenizer_path or source.get("tokenizer")
    out = Pretrained(config, frozen={"text": loaded.params["text_encoder"], "vae": loaded.params["vae"]})
    if init.vae:
        out.frozen["vae"] = _vae_source(init, config)
    if init.unet == "pretrained":
        config.unet = ml_collections.ConfigDict(dict(source.unet))
        out.unet, out.unet_ema = _unet_and_ema(init, loaded)
    check_compatible(config)
    logging.info("init: frozen encoders%s from %s", " and the UNet" if out.unet is not None else "", init.pretrained)
    return out


def _vae_source(init, config) -> Any:
    """``config.init.vae``'s VAE params; its architecture (and scaling factor) replaces ``config.vae``."""
    from ldm_jax.convert import WeightsError, load_model
    from ldm_jax.train.workdir import is_autoencoder_workdir, load_autoencoder_workdir

    try:
        if is_autoencoder_workdir(init.vae):
            vae_cfg, params, _ = load_autoencoder_workdir(init.vae)
        else:
            loaded = load_model(init.vae, allow_pickle=bool(init.allow_pickle))
            vae_cfg, params = dict(loaded.config.vae), loaded.params["vae"]
    except WeightsError as e:
        raise WeightsError(f"config.init.vae={init.vae!r}: {e}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"config.init.vae={init.vae!r}: {e}") from None
    config.vae = ml_collections.ConfigDict(vae_cfg)
    if float(init.vae_scaling_factor) > 0:
        config.vae.scaling_factor = float(init.vae_scaling_factor)
    logging.info("init: frozen VAE from %s", init.vae)
    return params


def _unet_and_ema(init, loaded) -> tuple[Any, Any]:
    """A training workdir gives its raw UNet and its EMA; any other source one set of weights for both."""
    from ldm_jax.train.workdir import is_training_workdir, restore_unet_params

    if is_training_workdir(init.pretrained):
        step = loaded.config.checkpoint.step
        return restore_unet_params(init.pretrained, step, ema=False)[0], loaded.params["unet"]
    return loaded.params["unet"], loaded.params["unet"]


def resolve_autoencoder(config) -> Pretrained:
    """The autoencoder run's config and starting VAE from ``config.init.pretrained`` (if set): the
    source's VAE architecture replaces ``config.vae``."""
    init = config.init
    if not init.pretrained:
        return Pretrained(config)
    if config.loss.kind != "kl":
        raise ValueError(f"config.init.pretrained gives a KL autoencoder; config.loss.kind is {config.loss.kind!r}")
    loaded = _load(init)
    config = config.copy_and_resolve_references()
    config.vae = ml_collections.ConfigDict(dict(loaded.config.vae))
    return Pretrained(config, vae=loaded.params["vae"])
