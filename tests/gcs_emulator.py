"""Runs ``gcp-storage-emulator`` (the GCS JSON API on loopback) for the cloud-storage tests, with the
response headers of object downloads that real GCS sends and the emulator leaves out:
``x-goog-generation`` and ``x-goog-metageneration``. tensorstore's OCDBT checkpoints (orbax's default
format) read an object's generation from them. Usage: ``python tests/gcs_emulator.py PORT BUCKET``.
"""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    except Exception:  # noqa: BLE001 - a missing object: the emulator's own handler answers 404
        pass
    return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routes from it

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    port, bucket = sys.argv[1], sys.argv[2]
    main(["start", "--host=127.0.0.1", f"--port={port}", "--in-memory", f"--default-bucket={bucket}"])
