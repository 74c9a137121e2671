"""``ldm-jax`` command line: a thin layer over the Python API.

Commands: sample, train, train-autoencoder, convert, encode-dataset, eval, bench {sample,train,data}, demo.
Config overrides follow big_vision: ``ldm-jax train --config configs/tiny_train.py --workdir w
--config.train.lr=1e-4``.
"""
from __future__ import annotations

import argparse
import json
import sys


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.a.b=v`` overrides (any order) from the other arguments."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=True, default=str))


def cmd_sample(args) -> None:
    from ldm_jax.pipeline import sample_to_dir

    sample_to_dir(
        model=args.model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        out_dir=args.out,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        seed=args.seed,
        init_image=args.init_image,
        strength=args.strength,
        mask=args.mask,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
    )


def cmd_train(args, overrides) -> None:
    from ldm_jax.config_utils import load_config
    from ldm_jax.train.diffusion import train

    train(load_config(args.config, overrides), args.workdir)


def cmd_train_autoencoder(args, overrides) -> None:
    from ldm_jax.config_utils import load_config
    from ldm_jax.train.vae_trainer import train_autoencoder

    train_autoencoder(load_config(args.config, overrides), args.workdir)


def cmd_convert(args) -> None:
    from ldm_jax.convert import convert_to_diffusers

    out = convert_to_diffusers(args.src, args.out, allow_pickle=args.allow_pickle)
    _print_json({"written": out})


def cmd_bench(args, overrides) -> None:
    from ldm_jax import bench

    fn = {"sample": bench.bench_sample, "train": bench.bench_train, "data": bench.bench_data}[args.what]
    _print_json(fn(config=args.config, overrides=overrides, batch=args.batch, steps=args.steps,
                   peer=not args.no_peer))


def cmd_demo(args, overrides) -> None:
    from ldm_jax.demo import run_demo

    run_demo(out_dir=args.out, config_path=args.config, overrides=overrides, rebuild=args.rebuild)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-jax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="text-to-image, img2img or inpainting; writes PNGs and a grid")
    s.add_argument("--model", required=True, help="diffusers folder, hub id, single-file checkpoint or training workdir")
    s.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--sampler", default="ddim")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-images", type=int, default=1, help="images per prompt")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--init-image", default=None, help="img2img: start from this image")
    s.add_argument("--strength", type=float, default=0.75)
    s.add_argument("--mask", default=None, help="inpainting: white = repaint (needs --init-image)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .ckpt/.bin (runs code!)")
    s.add_argument("--out", required=True)

    for name, help_ in (("train", "train the latent diffusion model"),
                        ("train-autoencoder", "train the KL/VQ autoencoder")):
        t = sub.add_parser(name, help=help_)
        t.add_argument("--config", required=True, help="configs/X.py[:arg]")
        t.add_argument("--workdir", required=True)

    c = sub.add_parser("convert", help="single-file SD checkpoint (or any loadable model) -> diffusers folder")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--allow-pickle", action="store_true")

    b = sub.add_parser("bench", help="benchmarks, printed as JSON, with the PyTorch peer in the same run")
    b.add_argument("what", choices=["sample", "train", "data"])
    b.add_argument("--config", default=None)
    b.add_argument("--batch", type=int, default=None)
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--no-peer", action="store_true", help="skip the PyTorch/diffusers peer")

    d = sub.add_parser("demo", help="end to end: data, autoencoder, diffusion, samples, evaluation, report")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--config", default=None)
    d.add_argument("--rebuild", action="store_true", help="redo every stage instead of reusing outputs")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    if overrides and args.command not in ("train", "train-autoencoder", "bench", "demo"):
        raise SystemExit(f"--config.* overrides are not accepted by `{args.command}`")
    handlers = {
        "sample": lambda: cmd_sample(args),
        "train": lambda: cmd_train(args, overrides),
        "train-autoencoder": lambda: cmd_train_autoencoder(args, overrides),
        "convert": lambda: cmd_convert(args),
        "bench": lambda: cmd_bench(args, overrides),
        "demo": lambda: cmd_demo(args, overrides),
    }
    handlers[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
