"""``ldm-jax`` command line: a thin layer over the Python API.

Commands: sample, train, plan, convert, encode-dataset, eval, bench {sample,train,data}, demo.
Config overrides follow big_vision: ``ldm-jax train --config tiny_train --workdir w --config.train.lr=1e-4``
(a packaged recipe by name, or a config file by path).

As an entry point it opts into the process-level settings of :mod:`ldm_jax.runtime`: the
persistent compilation cache and, on the CPU backend only, the CPU tuning.

Errors are one line on stderr, ``ldm-jax: error: ...`` (a traceback only with ``--debug`` or
``LDM_JAX_DEBUG=1``). Exit codes: 0 done; 1 a failure while running (a checkpoint that cannot be
written, a diverged run, non-finite images); 2 bad input (arguments, config values, files, another
trainer on the workdir); 130 / 143 a training run stopped by SIGINT / SIGTERM after saving its
checkpoint (128 + the signal, the shell's convention), to be resumed.
"""
from __future__ import annotations

import argparse
import json
import os
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
        step=args.step,
        ema=args.ema,
        tokenizer=args.tokenizer,
        lora=args.lora or (),
        embeddings=args.textual_inversion or (),
        expand_prompt=args.expand_prompt,
        expansion_temperature=args.expansion_temperature,
    )


def cmd_serve(args) -> None:
    from ldm_jax.serve.app import ServeConfig, run_server

    config = ServeConfig(buckets=tuple(int(b) for b in args.buckets.split(",")), max_wait_ms=args.max_wait_ms,
                         max_queue=args.max_queue, timeout_s=args.timeout, max_side=args.max_side,
                         max_steps=args.max_steps, max_images=args.max_images, max_body_mb=args.max_body_mb,
                         api_key=args.api_key or os.environ.get("LDM_JAX_API_KEY", ""),
                         warmup=tuple(args.warmup or ()))
    run_server(args.model, host=args.host, port=args.port, config=config, dtype=args.dtype, lora=args.lora or (),
               embeddings=args.textual_inversion or (), allow_pickle=args.allow_pickle,
               expand_prompt=args.expand_prompt)


def cmd_train(args, overrides) -> int:
    from ldm_jax.config_utils import load_config
    from ldm_jax.train import train

    result = train(load_config(args.config, overrides), args.workdir)
    if result.stopped_by is not None:
        print(f"ldm-jax: stopped by signal {result.stopped_by} after saving a checkpoint at step "
              f"{int(result.state.step)}; rerun the same command to resume", file=sys.stderr)
        return 128 + int(result.stopped_by)
    return 0


def cmd_convert(args) -> None:
    if args.adapter:  # what a LoRA / textual-inversion run trained, as diffusers' files
        from ldm_jax.train.workdir import export_adapter

        out = export_adapter(args.src, args.out, step=args.step, ema=True if args.ema is None else args.ema)
    else:
        from ldm_jax.convert import convert_to_diffusers

        out = convert_to_diffusers(args.src, args.out, allow_pickle=args.allow_pickle, step=args.step, ema=args.ema)
    _print_json({"written": out})


def cmd_encode_dataset(args) -> None:
    from ldm_jax.train.encode import encode_dataset_with_model

    meta = encode_dataset_with_model(args.model, args.source, args.out, image_size=args.image_size,
                                     batch_size=args.batch_size, split=args.split, shard_size=args.shard_size,
                                     dtype=args.dtype, compute_dtype=args.compute_dtype, overwrite=args.overwrite)
    _print_json({k: meta[k] for k in ("num_examples", "num_skipped", "files", "features", "image_size")})


def cmd_bench(args, overrides) -> None:
    from ldm_jax import benchmarks

    fn = {"sample": benchmarks.bench_sample, "train": benchmarks.bench_train, "data": benchmarks.bench_data,
          "serve": benchmarks.bench_serve}[args.what]
    _print_json(fn(config=args.config, overrides=overrides, batch=args.batch, steps=args.steps,
                   peer=not args.no_peer))


def cmd_plan(args, overrides) -> None:
    from ldm_jax import plan
    from ldm_jax.config_utils import load_config

    config = load_config(args.config, overrides)
    if args.search:
        _print_json(plan.search(config, args.topology, finalists=args.finalists, inputs=args.inputs,
                                stage=-1 if args.stage is None else args.stage, global_batch=args.global_batch))
    elif args.what == "sample":
        _print_json(plan.plan_sample(config, args.topology, batch=args.batch, height=args.height, width=args.width,
                                     steps=args.steps, sampler=args.sampler, guidance=not args.no_guidance,
                                     dtype=args.dtype, attention_impl=args.attention))
    else:
        for report in plan.plan_train(config, args.topology, inputs=args.inputs, global_batch=args.global_batch,
                                      attention_impl=None if args.attention == "auto" else args.attention,
                                      stages=None if args.stage is None else [args.stage]):
            _print_json(report)


def cmd_demo(args, overrides) -> None:
    if args.recipe == "faces":
        from ldm_jax.examples.faces_demo import run_faces_demo as run
    else:
        from ldm_jax.examples.shapes_demo import run_demo as run

    run(out_dir=args.out or _DEMO_OUT[args.recipe], config_path=args.config, overrides=overrides,
        rebuild=args.rebuild, seed=args.seed)


_DEMO_OUT = {"shapes": "demo_out", "faces": "demo_faces_out"}


def cmd_eval(args) -> None:
    from ldm_jax.eval.protocol import run_eval

    metrics = run_eval(args.model, args.captions, args.real_images, args.out, guidance_scales=args.guidance,
                       num_inference_steps=args.steps, sampler=args.sampler, num=args.num,
                       inception=args.inception, clip=args.clip, seed=args.seed, batch_size=args.batch_size,
                       save_images=args.save_images)
    _print_json(metrics["results"])


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", type=int, default=None,
                   help="training workdir: checkpoint step (default: the latest complete one)")
    p.add_argument("--no-ema", dest="ema", action="store_const", const=False, default=None,
                   help="training workdir (or single file): the raw UNet weights instead of the EMA ones")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-jax", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or LDM_JAX_DEBUG=1)")
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
    s.add_argument("--strength", type=float, default=None,
                   help="how much of --init-image to repaint, in (0, 1] (default 0.75; 1.0 with --mask)")
    s.add_argument("--mask", default=None, help="inpainting: white = repaint (needs --init-image)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .ckpt/.bin (runs code!)")
    s.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (a workdir trained without one)")
    s.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="a LoRA (.safetensors, folder or hub id; diffusers/PEFT or kohya) at SCALE (default 1); "
                        "repeat for several")
    s.add_argument("--textual-inversion", action="append", metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (learned_embeds.safetensors or its folder; A1111 "
                        ".safetensors), optionally renamed to TOKEN; repeat for several")
    s.add_argument("--expand-prompt", default=None, metavar="SRC",
                   help="continue each prompt with this GPT-2 (a transformers GPT2LMHeadModel folder or hub id) "
                        "first; prompts.json lists each image's prompt and expanded prompt")
    s.add_argument("--expansion-temperature", type=float, default=1.0,
                   help="sampling temperature of --expand-prompt (0: greedy)")
    _add_checkpoint_args(s)
    s.add_argument("--out", required=True)

    v = sub.add_parser("serve", help="an HTTP API (the SD web UI's /sdapi/v1), a web page and metrics, batching "
                       "concurrent requests on the jitted loop")
    v.add_argument("--model", required=True, help="diffusers folder, hub id, single-file checkpoint or training workdir")
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="as for `sample`; repeat for several")
    v.add_argument("--textual-inversion", action="append", metavar="FILE[:TOKEN]", help="as for `sample`")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    v.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .ckpt/.bin (runs code!)")
    v.add_argument("--warmup", action="append", metavar="WxH:STEPS:SAMPLER",
                   help="compile every batch bucket for these settings before /healthz says ready "
                        "(e.g. '512x512:20:DPM++ 2M'); repeat for several")
    v.add_argument("--buckets", default="1,2,4,8", help="batch sizes a call is padded to (comma-separated)")
    v.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a partial batch waits for more images")
    v.add_argument("--max-queue", type=int, default=64, help="images waiting before requests get 429")
    v.add_argument("--timeout", type=float, default=120.0, help="seconds before a request gets 503")
    v.add_argument("--max-side", type=int, default=1024, help="largest width / height, pixels")
    v.add_argument("--max-steps", type=int, default=150)
    v.add_argument("--max-images", type=int, default=16, help="largest batch_size x n_iter of one request")
    v.add_argument("--max-body-mb", type=float, default=32.0)
    v.add_argument("--api-key", default=None, help="require this key (or set LDM_JAX_API_KEY)")
    v.add_argument("--expand-prompt", default=None, metavar="SRC",
                   help="continue prompts with this GPT-2 (folder or hub id) unless a request sets "
                        "\"expand_prompt\": false; the response's info holds the expanded prompt")

    t = sub.add_parser("train", help="train the task of a config (diffusion UNet, KL/VQ autoencoder)")
    t.add_argument("--config", required=True, help="a packaged recipe (sd_v1_train, sd_autoencoder, tiny_train, ...) "
                   "or a config file, optionally NAME:ARG")
    t.add_argument("--workdir", required=True)

    c = sub.add_parser("convert", help="single-file SD checkpoint, training workdir (any loadable model) "
                                       "-> diffusers folder")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--allow-pickle", action="store_true")
    c.add_argument("--adapter", action="store_true", help="a LoRA / textual-inversion training workdir -> its "
                   "pytorch_lora_weights.safetensors / learned_embeds.safetensors (OUT: a file or a folder)")
    _add_checkpoint_args(c)

    x = sub.add_parser("encode-dataset", help="cache VAE posterior moments + text-encoder context as ArrayRecord "
                       "shards (train with --config.data.cached_latents=OUT)")
    x.add_argument("--model", required=True, help="diffusers folder, hub id, single-file checkpoint or training workdir")
    x.add_argument("--source", required=True, help="image folder, shards.tar glob, folder:DIR, tar:GLOB, "
                   "tfds:NAME[@DATA_DIR] or shapes:DATA_DIR")
    x.add_argument("--out", required=True, help="output folder; rerunning resumes an interrupted run")
    x.add_argument("--image-size", type=int, default=None, help="default: the VAE's sample_size")
    x.add_argument("--batch-size", type=int, default=32, help="per host")
    x.add_argument("--split", default="train", help="tfds/shapes split")
    x.add_argument("--shard-size", type=int, default=2048, help="examples per shard (the unit of resumption)")
    x.add_argument("--dtype", default=None, choices=["float32", "float16"], help="stored float dtype (default float32)")
    x.add_argument("--compute-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="encoders' compute dtype (default float32)")
    x.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")

    b = sub.add_parser("bench", help="benchmarks, printed as JSON, with the peer in the same run (PyTorch; for "
                       "serve: one image per call)")
    b.add_argument("what", choices=["sample", "train", "data", "serve"])
    b.add_argument("--config", default=None)
    b.add_argument("--batch", type=int, default=None)
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--no-peer", action="store_true", help="skip the PyTorch/diffusers peer")

    n = sub.add_parser("plan", help="compile the training step (or sampling loop) for a TPU topology without a TPU; "
                       "memory, cost and images/s per chip as JSON")
    n.add_argument("--config", required=True, help="a packaged recipe (sd_v1_train, sd_v2_train, ...) or a config file")
    n.add_argument("--topology", required=True, help="GENERATION:AxB[xC], e.g. v5e:2x2, v5p:2x2x2, v4:8x8x8")
    n.add_argument("--what", choices=["train", "sample"], default="train")
    n.add_argument("--inputs", choices=["images", "cached", "latents"], default=None,
                   help="train: the batch's form (default: what config.data gives)")
    n.add_argument("--stage", type=int, default=None, help="train: compile only this stage (default: every stage; "
                   "--search: the last)")
    n.add_argument("--global-batch", type=int, default=None, help="train: every stage's global batch (default: the config's)")
    n.add_argument("--search", action="store_true", help="train: rank mesh splits, remat policies and micro-batches")
    n.add_argument("--finalists", type=int, default=2, help="--search: candidates compiled in full")
    n.add_argument("--batch", type=int, default=1, help="sample: images per call")
    n.add_argument("--height", type=int, default=None)
    n.add_argument("--width", type=int, default=None)
    n.add_argument("--steps", type=int, default=50, help="sample: denoising steps")
    n.add_argument("--sampler", default="ddim")
    n.add_argument("--no-guidance", action="store_true", help="sample: without classifier-free guidance")
    n.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="sample: compute dtype")
    n.add_argument("--attention", default="auto", help="the UNet's attention implementation (auto, pallas, xla, ...)")

    d = sub.add_parser("demo", help="end to end: data, autoencoder, diffusion, samples, evaluation, report")
    d.add_argument("--recipe", choices=sorted(_DEMO_OUT), default="shapes",
                   help="shapes: text-to-image on shapes_captions (make demo); faces: text-to-face with a jointly "
                        "trained BERT encoder on cartoon faces (the celebahq_text2face recipe's twin)")
    d.add_argument("--out", default=None, help="default: demo_out (shapes), demo_faces_out (faces)")
    d.add_argument("--config", default=None)
    d.add_argument("--rebuild", action="store_true", help="redo every stage instead of reusing outputs")
    d.add_argument("--seed", type=int, default=None,
                   help="seeds the whole run: dataset, initialisations, data order, sampling (default: the config's)")
    e = sub.add_parser("eval", help="SD protocol: FID and CLIP score over guidance scales; metrics.json + plot")
    e.add_argument("--model", required=True, help="diffusers folder, hub id, single-file checkpoint or training workdir")
    e.add_argument("--captions", required=True, help=".txt (one caption per line) or .jsonl ({\"caption\": ...})")
    e.add_argument("--real-images", required=True, help="folder of reference images (FID)")
    e.add_argument("--out", required=True)
    def guidance_list(v: str) -> tuple[float, ...]:
        return tuple(float(x) for x in v.split(",") if x.strip())

    e.add_argument("--guidance", type=guidance_list, default=(1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0),
                   help="comma-separated guidance scales")
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--sampler", default="pndm", help="default: PLMS, as the SD paper")
    e.add_argument("--num", type=int, default=None, help="use the first N captions (default: all)")
    e.add_argument("--inception", default=None, help="pytorch-fid Inception weights (default: $LDM_JAX_INCEPTION "
                   "or ~/.cache/ldm_jax/pt_inception-2015-12-05-6726825d.pth)")
    e.add_argument("--clip", default="openai/clip-vit-large-patch14",
                   help="CLIPModel folder or hub id for the CLIP score; 'none' to skip")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=8, help="images per generation call")
    e.add_argument("--save-images", action="store_true", help="also write the samples as PNGs")
    return p


def _exit_code(e: BaseException) -> int | None:
    """1 for failures while running, 2 for bad input, None for errors that are bugs (traceback)."""
    from ldm_jax.convert.torch_flax import WeightsError
    from ldm_jax.errors import CheckpointRestoreError, CheckpointSaveError, TrainingDiverged, WorkdirLocked
    from ldm_jax.storage import StorageError

    if isinstance(e, (CheckpointSaveError, TrainingDiverged, StorageError, FloatingPointError, OSError)) \
            and not isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return 1
    if isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                      WeightsError, CheckpointRestoreError, WorkdirLocked, UnicodeError)):
        return 2
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0, or 128 + a signal for a stopped training run).
    Errors raise (the console entry point, :func:`cli`, turns them into one line and an exit code)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    rest = [a for a in rest if a != "--debug"]  # accepted anywhere on the line (see cli)
    parser = build_parser()
    args = parser.parse_args(rest)  # bad arguments: argparse's one-line usage error, exit 2
    if overrides and args.command not in ("train", "bench", "demo", "plan"):
        parser.error(f"--config.* overrides are not accepted by `{args.command}`")
    handlers = {
        "sample": lambda: cmd_sample(args),
        "serve": lambda: cmd_serve(args),
        "train": lambda: cmd_train(args, overrides),
        "convert": lambda: cmd_convert(args),
        "bench": lambda: cmd_bench(args, overrides),
        "demo": lambda: cmd_demo(args, overrides),
        "plan": lambda: cmd_plan(args, overrides),
        "eval": lambda: cmd_eval(args),
        "encode-dataset": lambda: cmd_encode_dataset(args),
    }
    return int(handlers[args.command]() or 0)


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` as the command line runs it: an error of a known kind is one line on stderr and
    its exit code (see the module doc); ``--debug`` or ``LDM_JAX_DEBUG=1`` shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LDM_JAX_DEBUG", "") not in ("", "0")
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("ldm-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - mapped to one line and an exit code below
        code = _exit_code(e)
        if debug or code is None:
            raise
        print(f"ldm-jax: error: {_one_line(e)}", file=sys.stderr)
        return code


def run() -> None:
    """The ``ldm-jax`` console entry point: on the CPU backend, re-executes itself under the CPU
    malloc settings and enables the CPU tuning; on every backend, the persistent compilation cache;
    then :func:`main`."""
    from ldm_jax import runtime

    backend = runtime.backend_name()
    runtime.reexec_with_cpu_tuning("ldm_jax.cli", sys.argv[1:], backend)
    runtime.enable_cpu_tuning(backend)
    runtime.enable_compilation_cache()
    sys.exit(cli())


if __name__ == "__main__":
    run()
