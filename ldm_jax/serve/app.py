"""``ldm-jax serve``: the sampling pipeline behind HTTP.

The endpoints are the de facto web API of the most used Stable Diffusion web UI (AUTOMATIC1111's
``/sdapi/v1``: ``txt2img``, ``img2img``, ``samplers``, ``sd-models``), so its clients work unchanged;
plus ``/healthz`` (ready after the warm-up compiles), ``/metrics`` (Prometheus text), ``/docs`` and
``/openapi.json`` (FastAPI's), and a web page at ``/``. Requests go through :class:`~ldm_jax.serve.
batcher.Batcher`: concurrent images that can share a jitted call run as one.

Every field is checked before a request joins a batch (a bad one is a 4xx naming the field and never
reaches the others); no field names a file or a model: the model is the server's, chosen at start.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import json
import logging
import os
import secrets
import threading
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ldm_jax.serve.batcher import DEFAULT_BUCKETS, Batcher, BatchKey, QueueFull, Row

__all__ = ["ServeConfig", "SAMPLER_NAMES", "create_app", "Server"]

# The web UI's sampler names -> ours and their options. Our own names are accepted too.
SAMPLER_NAMES: dict[str, tuple[str, dict]] = {
    "Euler a": ("euler_a", {}),
    "Euler": ("euler", {}),
    "Euler Karras": ("euler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("dpmpp_2m", {}),
    "DPM++ 2M Karras": ("dpmpp_2m", {"use_karras_sigmas": True}),
    "DDIM": ("ddim", {}),
    "PLMS": ("pndm", {}),
    "DDPM": ("ddpm", {}),
}
_SAMPLER_ALIASES = {"Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"],
                    "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ 2M Karras": ["k_dpmpp_2m_ka"], "DDIM": ["ddim"],
                    "PLMS": ["plms"]}


@dataclasses.dataclass
class ServeConfig:
    """The server's limits and batching (``ldm-jax serve --help`` names each)."""

    buckets: tuple = DEFAULT_BUCKETS  # batch sizes a jitted call is padded to
    max_wait_ms: float = 20.0  # how long a partial batch waits for more images
    max_queue: int = 64  # images waiting; more -> 429
    timeout_s: float = 120.0  # a request not answered by then -> 503 (its queued images dropped)
    max_side: int = 1024  # pixels, width and height
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter of one request
    max_body_mb: float = 32.0
    max_prompt_chars: int = 4000
    max_upload_side: int = 4096  # decoded init image / mask, pixels
    api_key: str = ""  # "": no key; else `Authorization: Bearer KEY` or `X-API-Key: KEY`
    warmup: tuple = ()  # ("WxH:STEPS:SAMPLER", ...): compiled for every bucket before /healthz says ready
    history: int = 12  # images the web page keeps


class RequestError(ValueError):
    """A request field that cannot be served: a 4xx naming it."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


def sampler_for(name: str) -> tuple[str, dict]:
    """The web UI's sampler name (or ours) -> (our sampler, its options); unknown: a 422 listing them."""
    from ldm_jax.diffusion import ALIASES, SAMPLERS

    if name in SAMPLER_NAMES:
        return SAMPLER_NAMES[name]
    for ui, aliases in _SAMPLER_ALIASES.items():
        if name in aliases:
            return SAMPLER_NAMES[ui]
    if name in SAMPLERS or name in ALIASES:
        return ALIASES.get(name, name), {}
    raise RequestError("sampler_name", f"unknown sampler {name!r}; valid: {', '.join(SAMPLER_NAMES)}")


def decode_image(data: str, field: str, max_side: int) -> np.ndarray:
    """A base64 image (optionally a ``data:image/...;base64,`` URL) -> float32 [H, W, 3] in [0, 1]."""
    from PIL import Image

    if not isinstance(data, str) or not data:
        raise RequestError(field, "expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if max(im.size) > max_side:
                raise RequestError(field, f"image is {im.size[0]}x{im.size[1]}; at most {max_side} px a side",
                                   status=413)
            im.load()
            rgb = np.asarray(im.convert("RGB"), np.float32) / 255.0
    except RequestError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(field, f"not a readable image ({e})") from None
    return rgb


def encode_png(image: np.ndarray) -> str:
    """float [H, W, 3] in [0, 1] -> base64 PNG (rounded as the pipeline's PIL output)."""
    from ldm_jax.pipeline import to_pil

    buf = io.BytesIO()
    to_pil(np.clip(image, 0, 1)[None])[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Server:
    """The model, its batcher and metrics; :func:`create_app` puts HTTP in front of it.

    ``pipe``: a :class:`~ldm_jax.pipeline.StableDiffusionPipeline`; ``model_name``: what
    ``/sdapi/v1/sd-models`` reports.
    """

    def __init__(self, pipe, config: ServeConfig | None = None, model_name: str = "model"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.pipe, self.config, self.model_name = pipe, config or ServeConfig(), model_name
        c = self.config
        self.default_side = int(pipe.config.unet["sample_size"]) * pipe.vae_scale
        self.registry = r = CollectorRegistry()
        self.m_batch = Histogram("ldm_batch_images", "Images (real rows) per jitted call", registry=r,
                                 buckets=tuple(float(b) for b in sorted(c.buckets)))
        self.m_latency = Histogram("ldm_request_seconds", "Request latency, accepted to answered", registry=r,
                                   buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.m_images = Counter("ldm_images_served", "Images returned", registry=r)
        self.m_compiles = Counter("ldm_compiles", "XLA compilations in this process", registry=r)
        self.m_errors = Counter("ldm_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        self.m_ready = Gauge("ldm_ready", "1 once the warm-up compiles are done", registry=r)
        self.m_queue = Gauge("ldm_queue_depth", "Images waiting for a batch", registry=r)
        self._listen_to_compiles()
        self.batcher = Batcher(self._run, buckets=c.buckets, max_wait_s=c.max_wait_ms / 1000.0,
                               max_queue=c.max_queue, on_batch=lambda key, n, bucket, s: self.m_batch.observe(n))
        self.m_queue.set_function(lambda: self.batcher.queue_depth)
        self.ready = False
        self.history: list[dict] = []
        self._lock = threading.Lock()

    def _listen_to_compiles(self) -> None:
        import jax

        def on_event(event: str, duration: float, **kwargs) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                self.m_compiles.inc()

        self._on_compile = on_event
        jax.monitoring.register_event_duration_secs_listener(on_event)

    @property
    def compiles(self) -> int:
        """XLA compilations in this process since the server was made."""
        return int(self.registry.get_sample_value("ldm_compiles_total"))

    def close(self) -> None:
        """Stop the batcher and the compile counting."""
        import jax

        self.batcher.close()
        try:
            jax.monitoring.unregister_event_duration_listener(self._on_compile)
        except (AssertionError, ValueError):  # already removed
            pass

    # -- running ----------------------------------------------------------------------------

    def _run(self, key: BatchKey, rows) -> np.ndarray:
        """One jitted call for a batch (the batcher's worker thread)."""
        common = dict(negative_prompt=[r.negative_prompt for r in rows], num_inference_steps=key.steps,
                      guidance_scale=[r.guidance_scale for r in rows], sampler=key.sampler,
                      seed=[r.seed for r in rows], sampler_options=dict(key.sampler_options), output_type="np")
        prompts = [r.prompt for r in rows]
        if key.mode == "inpaint":
            images, masks = np.stack([r.init_image for r in rows]), np.stack([r.mask for r in rows])
            return self.pipe.inpaint(prompts, images, masks, strength=key.strength, **common)
        if key.mode == "img2img":
            images = np.stack([r.init_image for r in rows])
            return self.pipe.img2img(prompts, images, key.strength, **common)
        return self.pipe(prompts, height=key.height, width=key.width, **common)

    def warm_up(self) -> None:
        """Compile every bucket of every ``config.warmup`` entry (guided), then mark the server ready."""
        for spec in self.config.warmup:
            size, steps, sampler = parse_warmup(spec)
            name, options = sampler_for(sampler)
            key = BatchKey("txt2img", size[1], size[0], steps, name, True, tuple(sorted(options.items())))
            for bucket in self.batcher.buckets:
                rows = [Row("", "", i, 7.0) for i in range(bucket)]
                self._run(key, rows)
        if self.pipe.prompt_expander is not None:  # one compilation serves every prompt
            self.pipe.expand_prompts("", max_new_tokens=1)
        self.ready = True
        self.m_ready.set(1)

    async def generate(self, key: BatchKey, rows: list[Row]) -> np.ndarray:
        """Queue ``rows`` and wait for their images (429 when the queue is full, 503 after the timeout)."""
        try:
            future = self.batcher.submit(key, rows)
        except QueueFull as e:
            raise RequestError("queue", str(e), status=429) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.config.timeout_s)
        except asyncio.TimeoutError:
            self.batcher.cancel(future)
            raise RequestError("timeout", f"not answered within {self.config.timeout_s:g} s", status=503) from None

    # -- requests ---------------------------------------------------------------------------

    def rows_for(self, req: dict, mode: str) -> tuple[BatchKey, list[Row], dict]:
        """A web-UI request (validated JSON fields) -> its batch key, image rows and what it used."""
        c = self.config
        prompt, negative = _text(req, "prompt", c.max_prompt_chars), _text(req, "negative_prompt", c.max_prompt_chars)
        width = _int(req, "width", self.default_side, 8, c.max_side)
        height = _int(req, "height", self.default_side, 8, c.max_side)
        for name, v in (("width", width), ("height", height)):  # the pipeline's rule, checked before batching
            if v % self.pipe.size_multiple:
                raise RequestError(name, f"{v} is not a multiple of {self.pipe.size_multiple}")
        steps = _int(req, "steps", 20, 1, c.max_steps)
        cfg = _float(req, "cfg_scale", 7.0, 0.0, 50.0)
        batch_size, n_iter = _int(req, "batch_size", 1, 1, c.max_images), _int(req, "n_iter", 1, 1, c.max_images)
        if batch_size * n_iter > c.max_images:
            raise RequestError("batch_size", f"batch_size x n_iter = {batch_size * n_iter} images; at most {c.max_images}")
        seed = _int(req, "seed", -1, -1, 2**32 - 1)
        n = batch_size * n_iter
        if seed == -1:
            seed = secrets.randbelow(2**32 - n)
        elif seed + n > 2**32:
            raise RequestError("seed", f"seed + images ({seed} + {n}) must stay below 2**32")
        sampler_name = req.get("sampler_name") or req.get("sampler_index") or "DPM++ 2M"
        if not isinstance(sampler_name, str):
            raise RequestError("sampler_name", "must be a string")
        sampler, options = sampler_for(sampler_name)
        strength, init, mask = 1.0, None, None
        if mode == "img2img":
            strength = _float(req, "denoising_strength", 0.75, 0.0, 1.0)
            if strength <= 0.0:
                raise RequestError("denoising_strength", "must be > 0")
            images = req.get("init_images")
            if not isinstance(images, list) or not images:
                raise RequestError("init_images", "one or more base64 images")
            decoded = [decode_image(im, f"init_images[{i}]", c.max_upload_side) for i, im in enumerate(images)]
            if req.get("mask") is not None:  # inpainting: white = repaint
                raw_mask = decode_image(req["mask"], "mask", c.max_upload_side)
                for i, im in enumerate(decoded):
                    if im.shape[:2] != raw_mask.shape[:2]:
                        raise RequestError("mask", f"{raw_mask.shape[1]}x{raw_mask.shape[0]} but init_images[{i}] is "
                                                   f"{im.shape[1]}x{im.shape[0]}: they must be the same size")
                mask, mode = _resize(raw_mask, width, height), "inpaint"
            init = [_resize(im, width, height) for im in decoded]
        expand = req.get("expand_prompt")
        if expand is None:
            expand = self.pipe.prompt_expander is not None  # the server was started with --expand-prompt
        elif not isinstance(expand, bool):
            raise RequestError("expand_prompt", "must be true or false")
        elif expand and self.pipe.prompt_expander is None:
            raise RequestError("expand_prompt", "this server has no prompt expander "
                                                "(ldm-jax serve --expand-prompt SRC)")
        warnings = []
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            note = self.pipe.tokenizer.truncation(text)
            if note and not (expand and name == "prompt"):  # the expanded prompt is checked instead
                warnings.append(f"{name}: {note}")
        key = BatchKey(mode, height, width, steps, sampler, cfg > 1.0, tuple(sorted(options.items())),
                       strength if mode != "txt2img" else 1.0)
        rows = [Row(prompt, negative, seed + i, cfg, None if init is None else init[i % len(init)], mask)
                for i in range(n)]
        used = dict(prompt=prompt, negative_prompt=negative, width=width, height=height, steps=steps, cfg_scale=cfg,
                    seed=seed, sampler_name=sampler_name, batch_size=batch_size, n_iter=n_iter, expand_prompt=expand)
        if mode != "txt2img":
            used["denoising_strength"] = strength
        return key, rows, dict(used=used, warnings=warnings)

    def expand(self, rows: list[Row], info: dict) -> list[Row]:
        """``rows`` with the request's prompt expanded (seeded with its first image's seed), recorded in
        ``info`` as ``used["expanded_prompt"]``; blocking (GPT-2 decoding): call it off the event loop."""
        expanded = self.pipe.expand_prompts(rows[0].prompt, seed=rows[0].seed)[0]
        info["used"]["expanded_prompt"] = expanded
        note = self.pipe.tokenizer.truncation(expanded)
        if note:
            info["warnings"].insert(0, f"expanded prompt: {note}")
        return [dataclasses.replace(r, prompt=expanded) for r in rows]

    def remember(self, prompt: str, image_b64: str, seed: int) -> None:
        with self._lock:
            self.history.insert(0, {"prompt": prompt, "seed": seed, "image": image_b64})
            del self.history[self.config.history:]


def parse_warmup(spec: str) -> tuple[tuple[int, int], int, str]:
    """``"WxH:STEPS:SAMPLER"`` -> ((W, H), steps, sampler name)."""
    try:
        size, steps, sampler = spec.split(":", 2)
        w, h = (int(v) for v in size.lower().split("x"))
        return (w, h), int(steps), sampler
    except ValueError:
        raise ValueError(f"--warmup {spec!r}: expected WIDTHxHEIGHT:STEPS:SAMPLER, e.g. 512x512:20:DPM++ 2M") from None


def _text(req: dict, name: str, max_chars: int) -> str:
    v = req.get(name)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise RequestError(name, "must be a string")
    if len(v) > max_chars:
        raise RequestError(name, f"{len(v)} characters; at most {max_chars}", status=413)
    return v


def _int(req: dict, name: str, default: int, lo: int, hi: int) -> int:
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise RequestError(name, f"must be an integer, got {v!r}"[:200])
    if not lo <= v <= hi:
        raise RequestError(name, f"{v} is out of range [{lo}, {hi}]"[:200])
    return int(v)


def _float(req: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise RequestError(name, f"must be a finite number, got {v!r}"[:200])
    if not lo <= v <= hi:
        raise RequestError(name, f"{v} is out of range [{lo}, {hi}]")
    return float(v)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    im = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((width, height), Image.LANCZOS)
    return np.asarray(im, np.float32) / 255.0


def create_app(server: Server, warm_up: bool = False):
    """The FastAPI app of ``server`` (run it with uvicorn); ``warm_up``: start :meth:`Server.warm_up` in a
    thread when the app starts (``/healthz`` answers 503 until it is done)."""
    import contextlib

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if warm_up:
            threading.Thread(target=server.warm_up, name="ldm-jax-warmup", daemon=True).start()
        yield

    c = server.config
    app = FastAPI(title="ldm_jax", description="Stable Diffusion in JAX: the web UI's /sdapi/v1 API",
                  version=_version(), lifespan=lifespan)
    max_body = int(c.max_body_mb * 2**20)

    def error(status: int, message: str, kind: str, headers: dict | None = None):
        server.m_errors.labels(kind=kind).inc()
        return JSONResponse({"error": kind, "detail": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if c.api_key and request.url.path not in ("/healthz",):
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = auth[7:]
            if not hmac.compare_digest(given.encode(), c.api_key.encode()):
                return error(401, "a valid API key is needed (Authorization: Bearer KEY or X-API-Key)", "auth",
                             {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return error(413, f"request body over {c.max_body_mb:g} MB", "too_large")
        return await call_next(request)

    async def body_json(request: Request) -> dict:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise RequestError("body", f"over {c.max_body_mb:g} MB", status=413)
        try:
            data = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError("body", "not UTF-8 text", status=400) from None
        except json.JSONDecodeError as e:
            raise RequestError("body", f"not valid JSON ({e.msg} at {e.pos})", status=400) from None
        if not isinstance(data, dict):
            raise RequestError("body", "expected a JSON object", status=400)
        return data

    async def serve(request: Request, mode: str):
        t = time.monotonic()
        try:
            req = await body_json(request)
            key, rows, info = server.rows_for(req, mode)
            if info["used"]["expand_prompt"]:
                rows = await asyncio.to_thread(server.expand, rows, info)
            images = await server.generate(key, rows)
        except RequestError as e:
            headers = {"Retry-After": "1"} if e.status in (429, 503) else None
            kind = {429: "queue_full", 503: "timeout", 413: "too_large"}.get(e.status, "bad_request")
            return error(e.status, str(e), kind, headers)
        except (ValueError, FloatingPointError) as e:  # the pipeline's own checks
            return error(422, str(e), "bad_request")
        encoded = [encode_png(im) for im in images]
        server.m_images.inc(len(encoded))
        server.m_latency.observe(time.monotonic() - t)
        used = info["used"]
        seeds = [r.seed for r in rows]
        server.remember(used["prompt"], encoded[0], seeds[0])
        meta = dict(prompt=used["prompt"], negative_prompt=used["negative_prompt"], seed=seeds[0], all_seeds=seeds,
                    all_prompts=[r.prompt for r in rows], sampler_name=used["sampler_name"], steps=used["steps"],
                    cfg_scale=used["cfg_scale"], width=used["width"], height=used["height"],
                    sd_model_name=server.model_name, warnings=info["warnings"],
                    truncated=bool(info["warnings"]), expanded_prompt=used.get("expanded_prompt"))
        return {"images": encoded, "parameters": used, "info": json.dumps(meta)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        """Text to image: the web UI's fields (``prompt``, ``negative_prompt``, ``steps``, ``cfg_scale``,
        ``seed``, ``width``, ``height``, ``sampler_name``, ``batch_size``, ``n_iter``)."""
        return await serve(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        """Image to image: ``init_images`` (base64) and ``denoising_strength`` besides txt2img's fields; with a
        ``mask`` (base64, the init image's size, white = repaint), inpainting."""
        return await serve(request, "img2img")

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": n, "aliases": _SAMPLER_ALIASES.get(n, []), "options": {}} for n in SAMPLER_NAMES]

    @app.get("/sdapi/v1/sd-models")
    async def models():
        return [{"title": server.model_name, "model_name": os.path.basename(server.model_name.rstrip("/")),
                 "hash": None, "sha256": None, "filename": server.model_name, "config": None}]

    @app.get("/healthz")
    async def healthz():
        if not server.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ready", "queue": server.batcher.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/history")
    async def history():
        return server.history

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a stack trace to the client
        logging.exception("unexpected error on %s", request.url.path)
        return error(500, "internal error", "internal")

    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ldm_jax")
    except Exception:  # noqa: BLE001
        return "dev"


def _page() -> str:
    from importlib.resources import files

    return files("ldm_jax.serve").joinpath("page.html").read_text(encoding="utf-8")


def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
               dtype: str = "float32", lora=(), embeddings=(), allow_pickle: bool = False,
               log_level: str = "info", expand_prompt: str | None = None) -> None:
    """What ``ldm-jax serve`` does: load ``model``, start answering (``/healthz`` says 503 until the warm-up
    compiles are done), serve until interrupted. Binds ``host`` (loopback unless another is asked for).
    ``expand_prompt``: a GPT-2 folder or hub id expanding each request's prompt unless the request sets
    ``"expand_prompt": false``."""
    import uvicorn

    from ldm_jax.pipeline import load_pipeline
    from ldm_jax.runtime import enable_compilation_cache

    config = config or ServeConfig()
    for spec in config.warmup:  # a bad --warmup fails before the model loads
        sampler_for(parse_warmup(spec)[2])
    enable_compilation_cache()  # a restart skips the warm-up's compiles
    pipe = load_pipeline(model, dtype=dtype, lora=lora, embeddings=embeddings, allow_pickle=allow_pickle)
    if expand_prompt:
        pipe.load_prompt_expander(expand_prompt, allow_pickle=allow_pickle)
    server = Server(pipe, config, model_name=model)
    app = create_app(server, warm_up=True)

    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("serving on %s: reachable from other machines%s", host,
                        "" if config.api_key else " without an API key (--api-key)")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        server.close()


class BackgroundServer:
    """``server``'s app on uvicorn in a thread (tests, benchmarks): ``with BackgroundServer(s) as url: ...``;
    binds ``host`` on a free port unless ``port`` is given."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if not port:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self._uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                                                      timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._uvicorn.run, name="ldm-jax-http", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server at {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(10)
