"""``ldm-jax serve`` on a tiny random SD folder: batched == alone, no compile after warm-up, the web UI's
API and its errors, limits, a load test on loopback, malformed requests, and the web page in a browser."""
import asyncio
import base64
import io
import json
import os

import numpy as np
import pytest

from ldm_jax.serve.app import SAMPLER_NAMES, Server, ServeConfig, create_app

WARMUP = ("16x16:4:DPM++ 2M", "16x16:3:Euler a")


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_png(side=16) -> bytes:
    return _png_bytes(np.zeros((side, side, 3), np.uint8))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from ldm_jax.reference import write_reference_folder

    return write_reference_folder(str(tmp_path_factory.mktemp("serve") / "model"))


@pytest.fixture(scope="module")
def server(model):
    from ldm_jax.pipeline import load_pipeline

    s = Server(load_pipeline(model), ServeConfig(buckets=(1, 2, 4, 8), max_wait_ms=30, max_queue=64,
                                                 warmup=WARMUP), model_name="tiny")
    s.warm_up()
    yield s
    s.close()


def _run(server, requests, concurrently=True, path="/sdapi/v1/txt2img", headers=None):
    """POST each body (dict, or raw bytes) to the in-process app -> [(status, json)]."""
    import httpx

    async def go():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            async def one(body):
                kw = dict(content=body) if isinstance(body, bytes) else dict(json=body)
                r = await client.post(path, headers=headers, **kw)
                return r.status_code, r.json()
            if concurrently:
                return await asyncio.gather(*(one(b) for b in requests))
            return [await one(b) for b in requests]

    return asyncio.run(go())


def _request(i, **kw):
    body = dict(prompt=f"a shape number {i}", negative_prompt="blurry" if i % 3 else "", steps=4, cfg_scale=2.0 + i % 5,
                seed=1000 + 7 * i, width=16, height=16, sampler_name="DPM++ 2M")
    body.update(kw)
    return body


def test_batched_requests_give_the_images_they_give_alone(server):
    bodies = [_request(i) for i in range(16)]
    alone = _run(server, bodies, concurrently=False)
    together = _run(server, bodies)
    again = _run(server, bodies[::-1])[::-1]  # other neighbours in each batch
    for (s1, a), (s2, b), (s3, c) in zip(alone, together, again):
        assert s1 == s2 == s3 == 200
        x, y, z = (np.stack([_png(im) for im in r["images"]]).astype(int) for r in (a, b, c))
        np.testing.assert_array_equal(y, z)  # the same bucket: bit-identical
        assert np.abs(x - y).max() <= 1  # alone (bucket 1) vs batched (bucket 8): within 1/255
        info = json.loads(b["info"])
        assert info["all_seeds"] == [b["parameters"]["seed"]] and b["parameters"]["cfg_scale"] == a["parameters"]["cfg_scale"]
    batches = {k: v for k, v in _metric_lines(server).items() if k.startswith("ldm_batch_images_count")}
    assert batches and sum(batches.values()) < 16 + 16 + 16  # the concurrent rounds ran in batches
    assert not np.array_equal(_png(together[0][1]["images"][0]), _png(together[1][1]["images"][0]))


def test_no_compile_after_warm_up(server):
    before = server.compiles
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(200):
        sampler, steps = (("DPM++ 2M", 4), ("Euler a", 3))[i % 2]
        bodies.append(_request(i, sampler_name=sampler, steps=steps, cfg_scale=float(rng.uniform(1.5, 12)),
                               batch_size=int(rng.integers(1, 4)), seed=int(rng.integers(0, 2**31))))
    statuses = []
    for k in range(0, 200, 25):  # waves of 25 concurrent requests
        statuses += [s for s, _ in _run(server, bodies[k:k + 25])]
    assert statuses == [200] * 200
    assert server.compiles == before
    assert before > 0  # the warm-up's compiles were counted
    (status, _), = _run(server, [_request(0, width=24, height=24)])  # a size the warm-up did not compile
    assert status == 200 and server.compiles > before
    text = _metrics_text(server)
    assert "ldm_compiles_total" in text and "ldm_images_served_total" in text and "ldm_queue_depth" in text


def _metrics_text(server) -> str:
    from prometheus_client import generate_latest

    return generate_latest(server.registry).decode()


def _metric_lines(server) -> dict:
    out = {}
    for line in _metrics_text(server).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_web_ui_fields_seeds_and_lists(server):
    (s, r), = _run(server, [_request(1, batch_size=2, n_iter=2, seed=77)])
    assert s == 200 and len(r["images"]) == 4
    info = json.loads(r["info"])
    assert info["all_seeds"] == [77, 78, 79, 80] and info["seed"] == 77 and not info["truncated"]
    (s, r2), = _run(server, [_request(1, seed=79)])  # one image of the request: its seed alone
    np.testing.assert_array_equal(_png(r2["images"][0]), _png(r["images"][2]))
    (s, r3), = _run(server, [_request(1, seed=-1)])
    assert 0 <= json.loads(r3["info"])["seed"] < 2**32
    long = " ".join(["red"] * 100)
    (s, r4), = _run(server, [_request(1, prompt=long)])
    info = json.loads(r4["info"])
    assert s == 200 and info["truncated"] and "dropped" in info["warnings"][0]
    from fastapi.testclient import TestClient

    client = TestClient(create_app(server))
    names = [x["name"] for x in client.get("/sdapi/v1/samplers").json()]
    assert names == list(SAMPLER_NAMES) and {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS"} <= set(names)
    assert client.get("/sdapi/v1/sd-models").json()[0]["title"] == "tiny"
    assert client.get("/healthz").json()["status"] == "ready"
    schema = client.get("/openapi.json").json()
    assert "/sdapi/v1/txt2img" in schema["paths"] and "/sdapi/v1/img2img" in schema["paths"]
    assert "<button" in client.get("/").text


def test_img2img(server):
    init = _b64(_png_bytes(np.full((16, 16, 3), 200, np.uint8)))
    bodies = [_request(i, init_images=[init], denoising_strength=0.5) for i in range(3)]
    alone = _run(server, bodies, concurrently=False, path="/sdapi/v1/img2img")
    together = _run(server, bodies, path="/sdapi/v1/img2img")
    for (s1, a), (s2, b) in zip(alone, together):
        assert s1 == s2 == 200
        assert np.abs(_png(a["images"][0]).astype(int) - _png(b["images"][0])).max() <= 1
    assert np.abs(_png(alone[0][1]["images"][0]).astype(int) - 200).mean() < np.abs(
        _png(_run(server, [_request(0)])[0][1]["images"][0]).astype(int) - 200).mean()  # it starts from the image


def test_inpainting(server):
    """img2img with a ``mask``: batched == alone; the unmasked half stays near the init image, the masked half
    is repainted; a mask of another size is a 422 naming it."""
    def png(array):
        return _b64(_png_bytes(array))

    init = png(np.full((16, 16, 3), 200, np.uint8))
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[:, 8:] = 255  # repaint the right half
    bodies = [_request(i, init_images=[init], mask=png(mask), denoising_strength=1.0) for i in range(3)]
    alone = _run(server, bodies, concurrently=False, path="/sdapi/v1/img2img")
    together = _run(server, bodies, path="/sdapi/v1/img2img")
    for (s1, a), (s2, b) in zip(alone, together):
        assert s1 == s2 == 200, (a, b)
        x, y = _png(a["images"][0]).astype(int), _png(b["images"][0]).astype(int)
        assert np.abs(x - y).max() <= 1
        assert np.abs(x[:, :8] - 200).mean() < np.abs(x[:, 8:] - 200).mean()
    (status, out), = _run(server, [_request(0, init_images=[init], mask=png(mask[:8]))], path="/sdapi/v1/img2img")
    assert status == 422 and "mask" in out["detail"] and "same size" in out["detail"]


BAD = [
    (dict(steps="many"), 422, "steps"), (dict(steps=10**30), 422, "steps"), (dict(steps=0), 422, "steps"),
    (dict(width=20), 422, "width"), (dict(width=4096), 422, "width"), (dict(height=-16), 422, "height"),
    (dict(cfg_scale="x"), 422, "cfg_scale"),
    (dict(sampler_name="Heun++"), 422, "DPM++ 2M Karras"), (dict(seed=2**40), 422, "seed"),
    (dict(batch_size=100), 422, "batch_size"), (dict(batch_size=4, n_iter=5), 422, "batch_size"),
    (dict(prompt=["a", "b"]), 422, "prompt"), (dict(prompt="x" * 5000), 413, "prompt"),
    (dict(n_iter=True), 422, "n_iter"),
]


def test_bad_requests_are_4xx_naming_the_field(server):
    raw = [(b"{not json", 400, "JSON"), (b"\xff\xfe", 400, "UTF-8"), (b"[1, 2]", 400, "object"),
           (b'{"prompt": "a", "cfg_scale": Infinity}', 422, "cfg_scale")]
    answers = _run(server, [_request(0, **bad) for bad, _, _ in BAD] + [body for body, _, _ in raw])
    for (status, body), (bad, want, field) in zip(answers, BAD + raw):
        assert status == want, (bad, status, body)
        assert field in body["detail"], (bad, body)
    img = dict(init_images=["bm90IGFuIGltYWdl"], denoising_strength=0.5)
    trunc = _b64(_tiny_png()[:40])
    for body, want, field in ((img, 422, "init_images[0]"), (dict(init_images=[trunc]), 422, "init_images[0]"),
                              (dict(init_images=["***"]), 422, "base64"), (dict(init_images=[]), 422, "init_images"),
                              (dict(init_images=[_b64(_tiny_png())], denoising_strength=1.5), 422, "denoising_strength")):
        (status, out), = _run(server, [_request(0, **body)], path="/sdapi/v1/img2img")
        assert status == want and field in out["detail"], (body, status, out)
    # one bad request among good ones: the good ones are served
    mixed = [_request(1), _request(2, steps="x"), _request(3)]
    assert [s for s, _ in _run(server, mixed)] == [200, 422, 200]


def test_queue_limit_api_key_and_body_limit(model):
    from fastapi.testclient import TestClient

    from ldm_jax.pipeline import load_pipeline

    s = Server(load_pipeline(model), ServeConfig(buckets=(1,), max_wait_ms=0, max_queue=2, api_key="sesame",
                                                 max_body_mb=0.01))
    try:
        client = TestClient(create_app(s))
        assert client.post("/sdapi/v1/txt2img", json=_request(0)).status_code == 401
        assert client.post("/sdapi/v1/txt2img", json=_request(0), headers={"X-API-Key": "sesam"}).status_code == 401
        ok = client.post("/sdapi/v1/txt2img", json=_request(0), headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200
        big = client.post("/sdapi/v1/txt2img", json=_request(0, prompt="y" * 20000), headers={"X-API-Key": "sesame"})
        assert big.status_code == 413
        answers = _run(s, [_request(i) for i in range(8)], headers={"X-API-Key": "sesame"})
        codes = sorted(code for code, _ in answers)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert client.get("/healthz").status_code == 503  # never warmed up
    finally:
        s.close()


def test_live_server_under_load_malformed_requests_and_the_web_page(server, tmp_path):
    """On loopback (uvicorn): 32 clients for 8 s get only 200s and 429s (p50/p99, images/s printed);
    malformed requests (wrong types, huge numbers, multipart, truncated PNGs, a 10 MB prompt) each get a
    4xx and leave the server healthy; the web page in Debian's chromium: type a prompt, click, an image
    appears (screenshot: $LDM_JAX_TEST_ARTIFACTS or the test's tmp folder)."""
    import functools

    import httpx

    from ldm_jax.benchmarks.serve import load, txt2img_body
    from ldm_jax.serve.app import BackgroundServer

    with BackgroundServer(server) as url:
        body = functools.partial(txt2img_body, steps=4, cfg_scale=3.0, side=16, sampler="DPM++ 2M")
        out = load(url, body, clients=32, seconds=8)
        print("load:", {k: out[k] for k in ("statuses", "images_per_s", "p50_s", "p99_s", "requests")})
        assert out["requests"] > 32 and set(out["statuses"]) <= {"200", "429"} and out["statuses"].get("200")

        post = functools.partial(httpx.post, url + "/sdapi/v1/txt2img", timeout=60)
        trunc = _b64(_tiny_png()[:30])
        cases = [post(json=_request(0, steps=[4])), post(json=_request(0, width=10**100)),
                 post(json=_request(0, seed="seven")), post(json=_request(0, prompt={"a": 1})),
                 post(files={"prompt": ("p.txt", b"a red circle")}),  # multipart, not JSON
                 post(content=b"--xx\r\nContent-Disposition: form-data; name=prompt\r\n\r\nbroken",
                      headers={"Content-Type": "multipart/form-data; boundary=xx"}),
                 post(json=_request(0, prompt="z" * (10 * 2**20))),
                 httpx.post(url + "/sdapi/v1/img2img", json=_request(0, init_images=[trunc]), timeout=60),
                 post(content=b'{"prompt": "a", "steps": 1e400}'), post(json=[])]
        for r in cases:
            assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
            assert "detail" in r.json()
        assert httpx.get(url + "/healthz", timeout=10).json()["status"] == "ready"
        assert httpx.post(url + "/sdapi/v1/txt2img", json=_request(1), timeout=60).status_code == 200

        from selenium import webdriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        import shutil

        browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
        assert browser and driver_path, "needs Debian's chromium and chromium-driver (make test installs them)"
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=900,1100"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        try:
            driver.get(url + "/")
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sampler_name option"))
            prompt = driver.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys("a blue star at the top")
            for name, value in (("steps", "4"), ("width", "16"), ("height", "16"), ("seed", "5")):
                field = driver.find_element(By.ID, name)
                field.clear()
                field.send_keys(value)
            driver.find_element(By.ID, "generate").click()
            image = WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.ID, "image")))
            assert image.get_attribute("src").startswith("data:image/png;base64,")
            assert driver.execute_script("return arguments[0].naturalWidth", image) == 16
            assert "seed 5" in driver.find_element(By.ID, "status").text
            assert driver.find_elements(By.CSS_SELECTOR, "#history figure")
            folder = os.environ.get("LDM_JAX_TEST_ARTIFACTS", str(tmp_path))
            os.makedirs(folder, exist_ok=True)
            shot = os.path.join(folder, "serve_page.png")
            driver.save_screenshot(shot)
            assert os.path.getsize(shot) > 1000
        finally:
            driver.quit()


def test_serve_command(model, tmp_path):
    """``ldm-jax serve`` in its own process: /healthz is 503 until the warm-up compiles are done, then a
    curl-style request is answered; SIGINT stops it cleanly; bad arguments are one-line errors."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "ldm_jax.cli", "serve", "--model", model, "--port", str(port), "--buckets", "1,2",
           "--warmup", "16x16:4:DPM++ 2M"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        seen, deadline = [], time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(httpx.get(url + "/healthz", timeout=5).status_code)
                if seen[-1] == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert seen and seen[-1] == 200, (seen, proc.poll())
        assert 503 in seen or len(seen) == 1  # warming up answered 503 (unless it was done at the first poll)
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 4, "width": 16,
                                                       "height": 16, "seed": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode in (0, -signal.SIGINT), out[-2000:]
    bad = subprocess.run(cmd[:-2] + ["--warmup", "16:4"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "WIDTHxHEIGHT:STEPS:SAMPLER" in bad.stderr.strip().splitlines()[-1]


def test_bench_serve_ceiling_counts_the_unet_flops(model):
    """The FLOPs behind the bench's ``ceiling``: XLA's count of one forward agrees with the matmuls and
    convolutions of its jaxpr, doubles when guided (to a percent: a few ops do not scale with the batch) and
    scales with the steps."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.benchmarks.serve import unet_gflop_per_image
    from ldm_jax.pipeline import load_pipeline
    from ldm_jax.plan import count_flops

    pipe = load_pipeline(model)
    side = int(pipe.config.unet["sample_size"]) * pipe.vae_scale
    one = unet_gflop_per_image(pipe, side, 1, guided=False)
    assert unet_gflop_per_image(pipe, side, 10, guided=True) == pytest.approx(20 * one, rel=0.01)
    lat = int(pipe.config.unet["sample_size"])
    args = (jnp.zeros((1, lat, lat, int(pipe.config.unet["in_channels"]))), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1,) + pipe.encode_prompt([""]).shape[1:]))
    jaxpr = jax.make_jaxpr(lambda p, *a: pipe.unet.apply({"params": p}, *a))(pipe.params["unet"], *args)
    assert one * 1e9 == pytest.approx(count_flops(jaxpr), rel=0.25)
