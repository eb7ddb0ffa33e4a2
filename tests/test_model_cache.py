"""dit4sr.files.local_copy: a remote model is downloaded once per machine into its node-local cache, even by
processes that ask for it at the same moment (the upscaling actors of one Ray node starting together)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections import Counter
from urllib.parse import urlsplit

import s3fs

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = {
    "model_index.json": b'{"_class_name": "DiT4SRPipeline"}',
    "transformer/config.json": b'{"patch_size": 2}',
    "transformer/diffusion_pytorch_model.safetensors": os.urandom(4 << 20),
    "vae/diffusion_pytorch_model.safetensors": os.urandom(1 << 20),
}
FILES = REPO / "dit4sr" / "files.py"
# Each process imports first, then waits for the start signal, so that all of them ask at once. The module is
# loaded from its file: importing the dit4sr package would load torch in every process, for nothing.
ASK = """
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("model_files", sys.argv[4])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.005)
print(files.local_copy(sys.argv[1], storage_options=json.loads(sys.argv[2])))
"""


def test_processes_starting_together_download_a_remote_model_once(tmp_path, bucket, s3_options, s3_requests):
    fs = s3fs.S3FileSystem(**s3_options)
    for key, data in MODEL.items():
        fs.pipe_file(f"{bucket}/tiny/{key}", data)
    go = tmp_path / "go"
    env = {**os.environ, "DIT4SR_CACHE": str(tmp_path / "cache")}
    askers = [subprocess.Popen([sys.executable, "-c", ASK, f"s3://{bucket}/tiny", json.dumps(s3_options), str(go),
                                str(FILES)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    go.touch()
    results = [asker.communicate(timeout=300) for asker in askers]
    requests = s3_requests()

    assert all(asker.returncode == 0 for asker in askers), [err for _, err in results]
    copies = {out.strip() for out, _ in results}
    assert len(copies) == 1
    copy = pathlib.Path(copies.pop())
    assert copy.parent == tmp_path / "cache"  # the node-local cache
    assert {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == MODEL
    downloads = Counter(urlsplit(request["url"]).path for request in requests
                        if request["method"] == "GET" and urlsplit(request["url"]).path.startswith(f"/{bucket}/")
                        and not urlsplit(request["url"]).query)  # object GETs, not listings
    assert downloads == {f"/{bucket}/tiny/{key}": 1 for key in MODEL}  # once each, though four processes asked
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".partial-")]
