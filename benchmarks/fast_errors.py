"""How long a mistake takes to be reported, and `--help` to answer: wall time from starting the command to its
exit, as a user sees it (a fresh Python each time, median of --repeat runs).

The catalog job checks its config, its locations and their credentials before it imports torch or starts Ray, so
each of these should take about as long as starting Python and reading the config (the goal: 2 s or less on the
2-core dev machine): an unknown key, a missing input folder, a missing bucket and refused credentials (the last
two against a local moto S3 server, started here), and `--help` of the job, `dit4sr-upscale` and `dit4sr-train`.

    python benchmarks/fast_errors.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's moto server helper

JOB = str(REPO / "jobs" / "upscale_catalog.py")


def timed(command: list[str], env: dict[str, str], repeat: int) -> tuple[float, int, str]:
    """Median seconds, the exit code and the last line the command printed."""
    seconds, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
        seconds.append(time.perf_counter() - started)
    lines = (result.stdout + result.stderr).strip().splitlines()
    return statistics.median(seconds), result.returncode, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (the median is printed)")
    args = parser.parse_args()
    from support.s3_server import moto_server, set_authentication

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as folder, moto_server() as endpoint:
        s3 = json.dumps({"endpoint_url": endpoint, "key": "testing", "secret": "testing",
                         "client_kwargs": {"region_name": "us-east-1"}})
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="admin", aws_secret_access_key="admin",
                     region_name="us-east-1").create_bucket(Bucket="photos")
        cases = {
            "unknown key": [sys.executable, JOB, "--set", "upscale.scael=2"],
            "missing input folder": [sys.executable, JOB, "--set", f"input.uri={folder}/my-photoz",
                                     "--set", f"output.uri={folder}/out"],
            "missing bucket": [sys.executable, JOB, "--set", "input.uri=s3://no-such-bucket/in",
                               "--set", f"input.storage_options={s3}", "--set", f"output.uri={folder}/out"],
            "refused credentials": [sys.executable, JOB, "--set", "input.uri=s3://photos/in",
                                    "--set", f"input.storage_options={s3}", "--set", f"output.uri={folder}/out"],
            "upscale_catalog --help": [sys.executable, JOB, "--help"],
            "dit4sr-upscale --help": [sys.executable, "-m", "dit4sr.cli", "--help"],
            "dit4sr-train --help": [sys.executable, "-m", "dit4sr.train", "--help"],
        }
        print(f"{'case':24} {'seconds':>8}  exit  last line")
        for name, command in cases.items():
            if name == "refused credentials":
                set_authentication(endpoint, True)  # moto now checks signatures: key "testing" is unknown
            seconds, code, last = timed(command, env, args.repeat)
            if name == "refused credentials":
                set_authentication(endpoint, False)
            print(f"{name:24} {seconds:8.2f}  {code:4d}  {last[:110]}", flush=True)


if __name__ == "__main__":
    main()
