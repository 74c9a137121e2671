"""THE table between the original CompVis/Stability single-file layout and diffusers key names.

An original SD checkpoint holds three networks under three prefixes:

* ``model.diffusion_model.*`` - the UNet (``input_blocks``/``middle_block``/``output_blocks``),
  optionally with EMA copies ``model_ema.<UNet key without "model." and without dots>``;
* ``first_stage_model.*`` - the KL autoencoder (``encoder.down.{i}.block.{j}``, ``mid.attn_1``
  with 1x1-conv ``q/k/v/proj_out``; the decoder's ``up.{i}`` run in reverse order);
* ``cond_stage_model.transformer.text_model.*`` (SD v1, transformers CLIP names) or
  ``cond_stage_model.model.*`` (SD v2, OpenCLIP names with a fused attention ``in_proj``).

The table is a list of ``(diffusers prefix, original prefix, renames of the next component)``
built from the UNet/VAE config; :func:`original_to_diffusers` and :func:`diffusers_to_original`
read it in opposite directions, so one table serves both. It was checked against
``diffusers.loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``).
:func:`infer_configs` reads the diffusers-style configs off the tensor shapes.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ldm_jax.convert.torch_flax import WeightsError

__all__ = [
    "UNET_PREFIX", "VAE_PREFIX", "CLIP_PREFIX", "OPEN_CLIP_PREFIX",
    "unet_table", "vae_table", "original_to_diffusers", "diffusers_to_original",
    "detect_model", "infer_configs", "ema_key",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
EMA_MIN_KEYS = 100  # as the original and diffusers: more than this many model_ema.* keys = an EMA checkpoint

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# (diffusers prefix, original prefix, {diffusers sub-name: original sub-name})
Table = list[tuple[str, str, dict[str, str]]]


def _has_attention(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def unet_table(config: Mapping[str, Any]) -> Table:
    """Diffusers UNet prefixes <-> ``input_blocks``/``middle_block``/``output_blocks`` prefixes.

    ``config``: diffusers UNet config (``block_out_channels``, ``layers_per_block``,
    ``down_block_types``, ``up_block_types``).
    """
    levels = len(config["block_out_channels"])
    lpb = int(config["layers_per_block"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    table: Table = [
        ("time_embedding.linear_1", "time_embed.0", {}), ("time_embedding.linear_2", "time_embed.2", {}),
        ("conv_in", "input_blocks.0.0", {}), ("conv_norm_out", "out.0", {}), ("conv_out", "out.2", {}),
        ("mid_block.resnets.0", "middle_block.0", _RESNET_UNET), ("mid_block.attentions.0", "middle_block.1", {}),
        ("mid_block.resnets.1", "middle_block.2", _RESNET_UNET),
    ]
    for i in range(levels):
        for j in range(lpb):
            n = i * (lpb + 1) + j + 1
            table.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", _RESNET_UNET))
            if _has_attention(down[i]):
                table.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", {}))
        if i < levels - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op", {}))
        for j in range(lpb + 1):
            n = i * (lpb + 1) + j
            table.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", _RESNET_UNET))
            if _has_attention(up[i]):
                table.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", {}))
        if i < levels - 1:
            slot = 2 if _has_attention(up[i]) else 1
            table.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv", {}))
    return table


def vae_table(config: Mapping[str, Any]) -> Table:
    """Diffusers ``AutoencoderKL`` prefixes <-> ``encoder.down.{i}``/``decoder.up.{i}``/``mid`` prefixes."""
    levels = len(config["block_out_channels"])
    lpb = int(config["layers_per_block"])
    table: Table = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.conv_out", f"{part}.conv_out", {}),
                  (f"{part}.conv_norm_out", f"{part}.norm_out", {}),
                  (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _RESNET_VAE),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _RESNET_VAE),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _ATTN_VAE)]
    for i in range(levels):
        for j in range(lpb):
            table.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _RESNET_VAE))
        if i < levels - 1:
            table.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {}))
        rev = levels - 1 - i  # the original decoder counts levels from the lowest resolution up
        for j in range(lpb + 1):
            table.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{rev}.block.{j}", _RESNET_VAE))
        if i < levels - 1:
            table.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{rev}.upsample.conv", {}))
    return table


def _rename(key: str, table: Table, reverse: bool, what: str) -> str:
    """Map one key through ``table`` (longest matching prefix wins)."""
    best = None
    for dif, orig, sub in table:
        src, dst = (orig, dif) if reverse else (dif, orig)
        if key.startswith(src + ".") and (best is None or len(src) > len(best[0])):
            best = (src, dst, sub)
    if best is None:
        raise WeightsError(f"{what}: key {key!r} has no counterpart in the original<->diffusers table "
                           f"(unexpected key, or a config that does not match the checkpoint)")
    src, dst, sub = best
    rest = key[len(src) + 1:]
    for a, b in sub.items():
        s, d = (b, a) if reverse else (a, b)
        if rest.startswith(s + "."):
            rest = d + rest[len(s):]
            break
    return f"{dst}.{rest}"


def _is_vae_attn_matrix(key: str) -> bool:
    return ".mid_block.attentions.0.to_" in key and key.endswith(".weight")


# --------------------------------------------------------------------------------------- text encoders
_OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
# OpenCLIP entries with no counterpart in a diffusers CLIPTextModel.
_OPEN_CLIP_DROP = ("text_projection", "logit_scale", "attn_mask")


def _open_clip_to_hf(sd: Mapping[str, np.ndarray], drop_last_layer: bool) -> dict[str, np.ndarray]:
    inv_top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    layer_ids = sorted({int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks.")})
    if layer_ids != list(range(len(layer_ids))):
        raise WeightsError(f"OpenCLIP text encoder: resblocks are not numbered 0..n-1: {layer_ids}")
    skip = len(layer_ids) - 1 if drop_last_layer else None
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if key in inv_top:
            out[inv_top[key]] = value
            continue
        if key in _OPEN_CLIP_DROP:
            continue
        parts = key.split(".")
        if parts[:2] != ["transformer", "resblocks"]:
            raise WeightsError(f"OpenCLIP text encoder: unexpected key {OPEN_CLIP_PREFIX + key!r}")
        layer, rest = int(parts[2]), ".".join(parts[3:])
        if layer == skip:
            continue
        base = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            if value.shape[0] % 3:
                raise WeightsError(f"OpenCLIP text encoder: {key} has first dim {value.shape[0]}, not 3 x width")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"{base}self_attn.{name}.{kind}"] = part
            continue
        for hf, oc in _OPEN_CLIP_LAYER.items():
            if rest.startswith(oc + "."):
                out[base + hf + rest[len(oc):]] = value
                break
        else:
            raise WeightsError(f"OpenCLIP text encoder: unexpected key {OPEN_CLIP_PREFIX + key!r}")
    return out


def _hf_to_open_clip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    fused: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
            continue
        prefix = "text_model.encoder.layers."
        if not key.startswith(prefix):
            raise WeightsError(f"CLIP text encoder: key {key!r} has no OpenCLIP counterpart")
        layer, rest = key[len(prefix):].split(".", 1)
        base = f"transformer.resblocks.{layer}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            _, name, kind = rest.split(".")
            fused.setdefault((int(layer), kind), {})[name] = value
            continue
        for hf, oc in _OPEN_CLIP_LAYER.items():
            if rest.startswith(hf + "."):
                out[base + oc + rest[len(hf):]] = value
                break
        else:
            raise WeightsError(f"CLIP text encoder: key {key!r} has no OpenCLIP counterpart")
    for (layer, kind), parts in fused.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise WeightsError(f"CLIP text encoder layer {layer}: q/k/v {kind} incomplete: {sorted(parts)}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = np.concatenate(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], axis=0)
    return out


# --------------------------------------------------------------------------------------- whole checkpoints
def ema_key(unet_key: str) -> str:
    """``'model.diffusion_model.out.0.weight'`` -> ``'model_ema.diffusion_modelout0weight'``."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: np.asarray(v) for k, v in sd.items() if k.startswith(prefix)}


def original_to_diffusers(
    state_dict: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    use_ema: bool | None = None,
    drop_last_open_clip_layer: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Split an original single-file state dict into diffusers/transformers state dicts.

    Args:
      state_dict: the flat original checkpoint (``model.diffusion_model.*`` ...).
      unet_config, vae_config: diffusers configs (see :func:`infer_configs`), needed for block indices.
      use_ema: take the UNet from the ``model_ema.*`` copies; default: when there are more than 100
        such keys (as the original and diffusers do).
      drop_last_open_clip_layer: SD v2 conditions on OpenCLIP's penultimate layer, so the diffusers
        text encoder omits the last resblock (23 of 24 layers); False keeps every layer.

    Returns:
      ``{"unet": ..., "vae": ..., "text_encoder": ...}`` with diffusers / transformers ``CLIPTextModel``
      key names (``text_model.*``); VAE attention projections as matrices. A network absent from
      the checkpoint gives an empty dict.
    """
    n_ema = sum(k.startswith(EMA_PREFIX) for k in state_dict)
    if use_ema is None:
        use_ema = n_ema > EMA_MIN_KEYS
    unet_src: dict[str, np.ndarray] = {}
    missing_ema = []
    for key, value in state_dict.items():
        if not key.startswith(UNET_PREFIX):
            continue
        if use_ema:
            ek = ema_key(key)
            if ek not in state_dict:
                missing_ema.append(ek)
                continue
            value = state_dict[ek]
        unet_src[key[len(UNET_PREFIX):]] = np.asarray(value)
    if missing_ema:
        raise WeightsError(f"use_ema: {len(missing_ema)} UNet key(s) have no EMA copy, e.g. {missing_ema[:4]}")

    table = unet_table(unet_config)
    unet = {_rename(k, table, True, "UNet"): v for k, v in unet_src.items()}

    table = vae_table(vae_config)
    vae = {}
    for key, value in _strip(state_dict, VAE_PREFIX).items():
        if key.startswith("loss."):  # LPIPS/discriminator of the autoencoder's training, not the VAE
            continue
        new = _rename(key, table, True, "VAE")
        if _is_vae_attn_matrix(new) and value.ndim > 2:
            value = value.reshape(value.shape[:2])  # 1x1 conv -> linear
        vae[new] = value

    clip = _strip(state_dict, CLIP_PREFIX)
    open_clip = _strip(state_dict, OPEN_CLIP_PREFIX)
    if clip and open_clip:
        raise WeightsError("checkpoint holds both a CLIP (SD v1) and an OpenCLIP (SD v2) text encoder")
    if clip:
        text = {k: v for k, v in clip.items() if not k.endswith("position_ids")}
    else:
        text = _open_clip_to_hf(open_clip, drop_last_open_clip_layer) if open_clip else {}
    return {"unet": unet, "vae": vae, "text_encoder": text}


def diffusers_to_original(
    unet: Mapping[str, Any] | None = None,
    vae: Mapping[str, Any] | None = None,
    text_encoder: Mapping[str, Any] | None = None,
    *,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
    text_encoder_format: str = "clip",
    ema_unet: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Inverse of :func:`original_to_diffusers`: diffusers state dicts -> one original-layout dict.

    ``text_encoder``: a transformers ``CLIPTextModel`` state dict (``text_model.*``) written as SD v1
    CLIP (``text_encoder_format="clip"``) or SD v2 OpenCLIP (``"open_clip"``, q/k/v fused; it holds
    the layers given, the caller adds any unused final layer). ``ema_unet``: a second UNet state dict
    written as the ``model_ema.*`` copies.
    """
    out: dict[str, np.ndarray] = {}
    if unet is not None or ema_unet is not None:
        if unet_config is None:
            raise ValueError("diffusers_to_original: unet_config is needed to write a UNet")
        table = unet_table(unet_config)
        for sd, ema in ((unet, False), (ema_unet, True)):
            for key, value in (sd or {}).items():
                new = UNET_PREFIX + _rename(key, table, False, "UNet")
                out[ema_key(new) if ema else new] = np.asarray(value)
    if vae is not None:
        if vae_config is None:
            raise ValueError("diffusers_to_original: vae_config is needed to write a VAE")
        table = vae_table(vae_config)
        for key, value in vae.items():
            value = np.asarray(value)
            if _is_vae_attn_matrix(key) and value.ndim == 2:
                value = value[:, :, None, None]  # linear -> 1x1 conv
            out[VAE_PREFIX + _rename(key, table, False, "VAE")] = value
    if text_encoder is not None:
        text = {k if k.startswith("text_model.") else f"text_model.{k}": np.asarray(v)
                for k, v in text_encoder.items() if not k.endswith("position_ids")}
        if text_encoder_format == "clip":
            out.update({CLIP_PREFIX + k: v for k, v in text.items()})
        elif text_encoder_format == "open_clip":
            out.update({OPEN_CLIP_PREFIX + k: v for k, v in _hf_to_open_clip(text).items()})
        else:
            raise ValueError(f"text_encoder_format must be 'clip' or 'open_clip', got {text_encoder_format!r}")
    return out


# --------------------------------------------------------------------------------------- detection
def detect_model(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``{"version": "v1"|"v2", "inpainting": bool, "ema": bool}`` from an original state dict.

    v2 = cross-attention context width 1024 (or an OpenCLIP text encoder); inpainting = 9 UNet input channels.
    """
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise WeightsError("not an original Stable Diffusion checkpoint: no "
                           f"{UNET_PREFIX}input_blocks.0.0.weight (found e.g. {list(state_dict)[:4]})")
    ctx = [np.shape(v)[1] for k, v in state_dict.items()
           if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    is_v2 = (bool(ctx) and ctx[0] == 1024) or any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict)
    return {"version": "v2" if is_v2 else "v1", "inpainting": np.shape(conv_in)[1] == 9,
            "ema": sum(k.startswith(EMA_PREFIX) for k in state_dict) > EMA_MIN_KEYS}


def _count(keys: Sequence[str], prefix: str) -> int:
    """Number of distinct integer components right after ``prefix`` (``prefix{i}.``)."""
    ids = {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return len({int(i) for i in ids if i.isdigit()})


def infer_configs(state_dict: Mapping[str, Any], *, prediction_type: str | None = None) -> dict[str, dict]:
    """Diffusers-style ``unet``/``vae``/``text_encoder``/``scheduler`` configs read off tensor shapes,
    plus ``kind`` (:func:`detect_model`).

    Heads are not visible in the shapes: SD conventions are used (v1: 8 heads per level, v2: 64-d
    heads; text encoder 64-d heads) - override them when loading other models. ``prediction_type``
    defaults to ``"epsilon"`` for v1 and ``"v_prediction"`` for v2 (SD 2.x 768-v; 2-base is epsilon).
    """
    kind = detect_model(state_dict)
    shape = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    keys = list(shape)
    u = UNET_PREFIX
    n_out = _count(keys, u + "output_blocks.")
    n_down = sum(k.startswith(u + "input_blocks.") and k.endswith(".0.op.weight") for k in keys)
    levels = n_down + 1
    if n_out == 0 or n_out % levels:
        raise WeightsError(f"cannot infer the UNet layout: {n_out} output blocks for {levels} levels")
    lpb = n_out // levels - 1
    channels, down_types, up_types = [], [], []
    for i in range(levels):
        n = i * (lpb + 1) + 1
        channels.append(shape[f"{u}input_blocks.{n}.0.out_layers.3.weight"][0])
        down_types.append("CrossAttnDownBlock2D" if f"{u}input_blocks.{n}.1.proj_in.weight" in shape
                          else "DownBlock2D")
        up_types.append("CrossAttnUpBlock2D" if f"{u}output_blocks.{i * (lpb + 1)}.1.proj_in.weight" in shape
                        else "UpBlock2D")
    attn = [k for k in keys if k.startswith(u) and k.endswith("attn2.to_k.weight")]
    context = shape[attn[0]][1] if attn else None
    proj_in = [k for k in keys if k.startswith(u) and k.endswith(".proj_in.weight")]
    linear = bool(proj_in) and len(shape[proj_in[0]]) == 2
    first_attn = next((f"{u}input_blocks.{i * (lpb + 1) + 1}.1." for i in range(levels)
                       if down_types[i].startswith("CrossAttn")), None)
    depth = _count(keys, first_attn + "transformer_blocks.") if first_attn else 1
    v2 = kind["version"] == "v2"
    unet = dict(
        sample_size=96 if v2 and prediction_type != "epsilon" else 64,
        in_channels=shape[u + "input_blocks.0.0.weight"][1],
        out_channels=shape[u + "out.2.weight"][0],
        block_out_channels=tuple(channels),
        layers_per_block=lpb,
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        attention_head_dim=tuple(c // 64 for c in channels) if v2 else 8,
        cross_attention_dim=context,
        use_linear_projection=linear,
        upcast_attention=v2,
        transformer_layers_per_block=depth,
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    v = VAE_PREFIX
    vae = {}
    if v + "encoder.conv_in.weight" in shape:
        vlevels = _count(keys, v + "encoder.down.")
        vlpb = _count(keys, v + "encoder.down.0.block.")
        vae = dict(
            in_channels=shape[v + "encoder.conv_in.weight"][1],
            out_channels=shape[v + "decoder.conv_out.weight"][0],
            latent_channels=shape[v + "decoder.conv_in.weight"][1],
            block_out_channels=tuple(shape[f"{v}encoder.down.{i}.block.{vlpb - 1}.conv2.weight"][0]
                                     for i in range(vlevels)),
            layers_per_block=vlpb,
            norm_num_groups=32,
            sample_size=768 if unet["sample_size"] == 96 else 512,
            scaling_factor=0.18215,
        )
    text = {}
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        t = CLIP_PREFIX + "text_model."
        hidden = shape[t + "embeddings.token_embedding.weight"][1]
        text = dict(vocab_size=shape[t + "embeddings.token_embedding.weight"][0], hidden_size=hidden,
                    intermediate_size=shape[t + "encoder.layers.0.mlp.fc1.weight"][0],
                    num_hidden_layers=_count(keys, t + "encoder.layers."),
                    num_attention_heads=max(1, hidden // 64),
                    max_position_embeddings=shape[t + "embeddings.position_embedding.weight"][0],
                    hidden_act="quick_gelu", layer_norm_eps=1e-5, hidden_layer="last")
    elif any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        t = OPEN_CLIP_PREFIX
        hidden = shape[t + "token_embedding.weight"][1]
        text = dict(vocab_size=shape[t + "token_embedding.weight"][0], hidden_size=hidden,
                    intermediate_size=shape[t + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                    # the last resblock is dropped: SD v2 uses the penultimate layer (see original_to_diffusers)
                    num_hidden_layers=_count(keys, t + "transformer.resblocks.") - 1,
                    num_attention_heads=max(1, hidden // 64),
                    max_position_embeddings=shape[t + "positional_embedding"][0],
                    hidden_act="gelu", layer_norm_eps=1e-5, hidden_layer="last", pad_token_id=0)
    scheduler = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                     beta_end=0.012, prediction_type=prediction_type or ("v_prediction" if v2 else "epsilon"),
                     steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler, "kind": kind}
