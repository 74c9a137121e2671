"""Test set-up: 8 simulated CPU devices (set before JAX initialises) and shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gcsfs (read when it is imported): the plain GCS client, no zonal/HNS bucket-type probe over gRPC (which
# an emulator does not serve) and no metadata-server credential probe
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

GCS_BUCKET = "ldm-jax-test"


@pytest.fixture(scope="session")
def gcs():
    """A real GCS API server (``gcp-storage-emulator``, in memory, through ``tests/gcs_emulator.py``) on
    loopback for the session, with
    bucket ``GCS_BUCKET``; gcsfs/epath (``STORAGE_EMULATOR_HOST``) and tensorstore/orbax
    (``TENSORSTORE_GCS_HTTP_URL``) in this process and its children talk to it. Yields the bucket URL
    (``gs://ldm-jax-test``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")
    proc = subprocess.Popen([sys.executable, launcher, str(port), GCS_BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("gcp-storage-emulator did not start")
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    # gcsfs without credentials (fsspec reads FSSPEC_GCS_* as its defaults), tensorstore with a test token
    env = {"STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon", "FSSPEC_GCS_PROJECT": "test",
           "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{GCS_BUCKET}"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


# The files with the longest total run time, longest first (`make test` lists the slowest tests). With
# `make test`'s workers (pytest-xdist, a file per worker, `--no-loadscope-reorder`) files start in
# collection order, so the long ones start first and the short ones fill the gaps at the end instead of
# one long file running alone.
LONG_FILES_FIRST = ("test_pod_path.py", "test_demo.py", "test_faces_demo.py", "test_autoencoder_task.py",
                    "test_faults.py", "test_train_diffusion.py", "test_plan.py", "test_train_resume.py",
                    "test_lora_train.py", "test_text_pretrain.py", "test_textual_inversion.py", "test_dreambooth.py",
                    "test_attributes.py", "test_encode_dataset.py", "test_unet.py", "test_lora.py", "test_notebooks.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept
