"""Session-wide test resources: one local Ray, one moto S3 server (over HTTP), the tiny models; and, under
``CI=true``, skips that mean CI lacks what it is meant to have turned into failures."""

import os

# Nothing in the test suite may reach a model hub or need Ray's token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib
import shutil
import tempfile
import uuid

# Ray state of this test session only: a job's plain ray.init() joins the cluster recorded under Ray's temp
# folder, which must be this session's Ray, never another test session's on the same machine. Kept short: Ray's
# socket paths live below it.
_RAY_TMPDIR = None
if "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = _RAY_TMPDIR = tempfile.mkdtemp(prefix="ray-", dir="/tmp")

# Imported after the environment above is set: what they import (Ray among it) reads it at import.
import pytest  # noqa: E402
from support import CI, REPO  # noqa: E402
from support.tiny_components import TINY_SETTINGS, TINY_TEXT_RECOMMENDED, TINY_TRANSFORMER  # noqa: E402

# Ray workers and job subprocesses import the test engines (support.engines) and dit4sr/pipeline from the checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO),
                                                         os.environ.get("PYTHONPATH")]))

RAY_CPUS = 4
RAY_FAKE_GPUS = 2
GOLDEN = REPO / "tests" / "data" / "golden"


# -- CI fails what a newcomer's clone may skip ----------------------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test skipped because ../shared, chromium or the activated venv is missing (support.missing's
    skips, or a parameter list read from ../shared that came out empty) fails: CI has the means to run it."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if reason.startswith(("Skipped: missing: ", "missing: ")) or "got empty parameter set" in reason:
            report.outcome = "failed"
            report.longrepr = f"CI=true, so this skip is a failure: {reason}"


# -- one worker for everything that runs Ray, under pytest-xdist (.ci/run: -n 2 --dist loadgroup) -------------------
RAY_FILES = {"test_readme.py", "test_train_distributed.py"}  # Ray heads and jobs of their own, no session fixture


def pytest_itemcollected(item):
    """Tests that run Ray (the session's, or a head or a job of their own) share ports, the session's cluster and
    its 4 CPUs: they stay on one xdist worker, in order; the rest, mostly torch on the CPU, spread beside them.
    (Marked as each is collected: xdist reads the groups in its own pytest_collection_modifyitems.)"""
    if "ray_session" in item.fixturenames or "catalog" in item.path.parts or item.path.name in RAY_FILES:
        item.add_marker(pytest.mark.xdist_group("ray"))


# -- files and models -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory) -> pathlib.Path:
    """A complete x4 pipeline root with a tiny from-scratch transformer (residual x0, output layer zero: its
    one-step result is exactly the bicubic-upscaled input) and the pixel-unshuffle autoencoder."""
    import torch

    from dit4sr.training import build_model, write_pipeline_root
    from dit4sr.training.config import ModelConfig

    root = tmp_path_factory.mktemp("tiny-model")
    transformer, vae, null_prompt, _ = build_model(ModelConfig(transformer=TINY_TRANSFORMER), seed=0)
    write_pipeline_root(root, transformer, vae, null_prompt, torch.float32, TINY_SETTINGS)
    return root


@pytest.fixture(scope="session")
def tiny_text_model_root(tmp_path_factory) -> pathlib.Path:
    """A random tiny pixel-space model root with text encoders and recommended settings (TINY_TEXT_RECOMMENDED:
    2 steps, guidance, 8-latent tiles, AdaIN), for prompts, guidance and the official arrangement."""
    from support.tiny_components import null_embedding, pixel_pipeline, save_model_root, tiny_text_components

    root = tmp_path_factory.mktemp("models") / "tiny-dit4sr"
    pipe = pixel_pipeline()
    for name, component in tiny_text_components().items():
        setattr(pipe, name, component)
    # as in real models, the stored null prompt has the encoders' sequence length (2 x 77 tokens)
    pipe.null_prompt_embedding = null_embedding(tokens=154)
    save_model_root(pipe, root, recommended=TINY_TEXT_RECOMMENDED, text_encoders=True)
    return root


@pytest.fixture(scope="session")
def tiny_caption_model_root(tmp_path_factory) -> pathlib.Path:
    """A random tiny LLaVA in the Hugging Face layout (support.tiny_components.save_tiny_caption_model): loads with
    AutoProcessor + AutoModelForImageTextToText, answers in a few words, no hub."""
    from support.tiny_components import save_tiny_caption_model

    root = tmp_path_factory.mktemp("models") / "tiny-llava"
    save_tiny_caption_model(root)
    return root


@pytest.fixture
def few_torch_threads():
    """Two torch threads: the test machine is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# -- one local Ray ----------------------------------------------------------------------------------------------------
def start_local_ray() -> None:
    import ray

    for attempt in range(3):
        try:
            ray.init(num_cpus=RAY_CPUS, num_gpus=RAY_FAKE_GPUS, object_store_memory=200 * 1024**2,
                     include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:  # Ray gives its raylet a fixed 30 s to register: too short on a busy machine
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="session")
def marker_dir(tmp_path_factory) -> pathlib.Path:
    """A folder shared with Ray workers (through the environment) for test engines' one-shot markers."""
    path = tmp_path_factory.mktemp("markers")
    os.environ["CATALOG_TEST_MARKERS"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_session(marker_dir):
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """The session's local Ray (restarted if a multi-node test replaced it)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()


# -- one S3 API (moto over HTTP, a process of its own) ---------------------------------------------------------------
@pytest.fixture(scope="session")
def _moto(tmp_path_factory):
    from support.s3_server import moto_server

    recording = tmp_path_factory.mktemp("moto") / "requests.jsonl"
    with moto_server(MOTO_RECORDER_FILEPATH=str(recording)) as url:
        yield url, recording


@pytest.fixture(scope="session")
def s3_server(_moto) -> str:
    """The session's S3 endpoint URL. Buckets are per test (``bucket``); any key and secret are accepted unless a
    test asks for ``s3_authentication``."""
    return _moto[0]


@pytest.fixture
def s3_options(s3_server) -> dict:
    return {"key": "testing", "secret": "testing", "endpoint_url": s3_server,
            "client_kwargs": {"region_name": "us-east-1"}}


@pytest.fixture
def bucket(s3_server) -> str:
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_authentication(s3_server):
    """A function that makes the server check every request's signature and IAM policies from then on (moto's
    reset-auth; set up users and policies first); switched off again however the test ends."""
    from support.s3_server import set_authentication

    yield lambda: set_authentication(s3_server, True)
    set_authentication(s3_server, False)


@pytest.fixture
def s3_requests(_moto):
    """Records the requests the server receives during this test; call it for those recorded so far."""
    from support.s3_server import recorded_requests, recorder

    url, recording = _moto
    recorder(url, "reset-recording")
    recorder(url, "start-recording")
    yield lambda: recorded_requests(str(recording))
    recorder(url, "stop-recording")


def pytest_unconfigure(config):
    if _RAY_TMPDIR:
        shutil.rmtree(_RAY_TMPDIR, ignore_errors=True)

