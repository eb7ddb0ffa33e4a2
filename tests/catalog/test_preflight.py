"""Input errors are errors: a missing folder or bucket, an unreadable bucket or refused credentials end the job
with exit 1 and one line naming the URI and the cause, before planning and before Ray or any model loads; an
existing but empty input is a success with 0 inputs. The job command's exit codes and its last lines. (An absent
input where input.example_catalog is set gets the example catalog, in the config's own folder only: the README's
first run, tests/test_readme.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import boto3
import pytest
import yaml
from support.catalog import JOB, REPO, Job, job_config, session_ray_address, small_catalog, write_catalog

from pipeline.config import validate_config
from pipeline.preflight import PreflightError
from pipeline.run import EXIT_INPUTS_FAILED, EXIT_JOB_FAILED, EXIT_OK, file_url, run_job


def refused(config: dict) -> str:
    """The one-line message run_job refuses ``config`` with."""
    with pytest.raises(PreflightError) as error:
        run_job(validate_config(config))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_mistyped_config_or_input_folder_exits_1_with_one_line_and_does_nothing(ray_local, tmp_path):
    """The job as operators run it (job processes joining the session's Ray): exit 1 for a config it cannot use,
    an unknown key or a mistyped input folder, with one line naming it, and nothing written."""
    env = {"RAY_ADDRESS": session_ray_address()}
    bad = Job({"input": {"uri": "x"}, "output": {"uri": "y"}, "upscale": {"scael": 2}}, tmp_path / "bad.yaml", env=env)
    assert bad.finish() == EXIT_JOB_FAILED, bad.log
    assert f"upscale_catalog: error: invalid config {tmp_path / 'bad.yaml'}:\n  upscale.scael: unknown key\n" in bad.log
    assert "Traceback" not in bad.log

    missing = tmp_path / "photos-typo"
    typo = Job(job_config(str(missing), str(tmp_path / "out")), tmp_path / "typo.yaml", env=env)
    assert typo.finish() == EXIT_JOB_FAILED, typo.log
    errors = [line for line in typo.lines if "error:" in line]
    assert errors == [f"upscale_catalog: error: input.uri {missing}: no such folder ({missing})\n"], typo.log
    assert "Traceback" not in typo.log and "progress" not in typo.log
    assert not (tmp_path / "out").exists()  # no lock, no manifest: nothing written


def test_a_mistyped_input_folder_on_the_embedded_default_is_an_error_not_a_demo(tmp_path):
    """configs/local.yaml lays out example photos in its own ./data/catalog; `--set input.uri=` names the user's
    own folder, so a typo there ends the job with one line, creating nothing. Checked before Ray or torch load."""
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    missing = tmp_path / "my-photoz"
    job = Job(config, tmp_path / "local.yaml", "--set", f"input.uri={missing}",
              "--set", f"output.uri={tmp_path / 'out'}")
    assert job.finish() == EXIT_JOB_FAILED, job.log
    assert job.lines == [f"upscale_catalog: error: input.uri {missing}: no such folder ({missing})\n"], job.log
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_errors_are_reported_before_ray_or_torch_is_imported(tmp_path, bucket, s3_options, s3_authentication):
    """A config typo, a missing folder or bucket, refused credentials: the job command reports each without
    importing Ray or torch (python -X importtime lists every module it imports)."""
    s3 = ["--set", f"input.storage_options={json.dumps(s3_options)}", "--set", f"output.uri={tmp_path / 'out'}"]
    cases = [(["--set", "upscale.scael=2"], "upscale.scael: unknown key"),
             (["--set", f"input.uri={tmp_path / 'nope'}"], "no such folder"),
             (["--set", "input.uri=s3://no-such-bucket/in", *s3], "no such bucket"),
             (["--set", f"input.uri=s3://{bucket}/in", *s3], "credentials refused")]
    for number, (args, expected) in enumerate(cases):
        if expected == "credentials refused":
            s3_authentication()  # the server checks signatures from now on: the key "testing" is unknown to it
        result = subprocess.run([sys.executable, "-X", "importtime", str(JOB), *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == EXIT_JOB_FAILED and "upscale_catalog: error: " in result.stderr, number
        assert expected in result.stderr, result.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "pipeline.config" in imported
        assert not {"torch", "ray", "diffusers"} & imported, sorted({"torch", "ray", "diffusers"} & imported)


@pytest.mark.slow
def test_the_job_exits_3_when_an_input_failed_and_0_once_nothing_is_left(ray_local, tmp_path):
    env = {"RAY_ADDRESS": session_ray_address()}
    write_catalog(tmp_path / "in", {"ok.png": small_catalog(1)["album0/photo 0.png"], "empty.png": b""})
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"))
    first = Job(config, tmp_path / "job.yaml", env=env)
    assert first.finish() == EXIT_INPUTS_FAILED, first.log
    assert "1 ok, 1 failed" in first.log and "failed empty_file: 1" in first.log
    assert "progress: 1 done, 1 failed, 0 remaining of 2 inputs" in first.log and "items/min" in first.log
    out = tmp_path / "out"
    (run,) = out.glob("_manifests/run=*/_report.html")
    assert first.lines[-4:] == [  # the last lines say where everything is and what the exit code means
        f"outputs:   {out}/\n", f"report:    {file_url(str(run))}\n",
        f"manifests: {out}/_manifests/*/*.parquet (this run: run_id = '{run.parent.name[4:]}'; one row per run: "
        f"{out}/_manifests/_index/runs/*.parquet)\n",
        "exit 3: some inputs failed, the others are done; their manifest rows say why (a re-run retries only them)\n"]
    assert not [line for line in first.lines if "Running Dataset" in line or "core_worker" in line]
    (tmp_path / "in" / "empty.png").unlink()  # failed inputs are retried on the next run; this one is gone
    second = Job(config, tmp_path / "job.yaml", env=env)
    assert second.finish() == EXIT_OK, second.log
    assert "0 ok, 0 failed, 1 skipped" in second.log


def test_local_input_and_output_errors_name_the_uri_and_cause(tmp_path):
    (tmp_path / "a-file").write_bytes(b"x")
    output = str(tmp_path / "out")
    assert refused(job_config(str(tmp_path / "nope"), output)) == \
        f"input.uri {tmp_path / 'nope'}: no such folder ({tmp_path / 'nope'})"
    assert refused(job_config(str(tmp_path / "a-file"), output)) == f"input.uri {tmp_path / 'a-file'}: not a folder"
    (tmp_path / "in").mkdir()
    assert refused(job_config(str(tmp_path / "in"), str(tmp_path / "a-file"))) == \
        f"output.uri {tmp_path / 'a-file'}: not a folder"
    with pytest.raises(PreflightError, match="no such folder"):  # a dry run checks too
        run_job(validate_config(job_config(str(tmp_path / "nope"), output)), dry_run=True)


def test_an_empty_input_is_a_success_with_0_inputs_and_says_where_its_results_are(ray_local, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert run_job(validate_config(job_config(str(tmp_path / "in"), str(tmp_path / "out")))) == EXIT_OK
    summary_path = next((tmp_path / "out").glob("_manifests/run=*/_summary.json"))
    summary = json.loads(summary_path.read_text())
    assert (summary["inputs"], summary["ok"], summary["failed"]) == (0, 0, 0)
    out = tmp_path / "out"
    assert capsys.readouterr().out.splitlines()[-3:] == [
        f"outputs:   {out}/", f"report:    {file_url(str(summary_path.parent / '_report.html'))}",
        f"manifests: {out}/_manifests/*/*.parquet (this run: run_id = '{summary['run_id']}'; one row per run: "
        f"{out}/_manifests/_index/runs/*.parquet)"]


def test_missing_buckets_are_named(bucket, s3_options):
    def s3(input_uri: str, output_uri: str) -> dict:
        config = job_config(input_uri, output_uri)
        config["input"]["storage_options"] = config["output"]["storage_options"] = s3_options
        return config

    assert refused(s3("s3://no-such-input/photos", f"s3://{bucket}/out")) == \
        "input.uri s3://no-such-input/photos: no such bucket (NoSuchBucket: The specified bucket does not exist)"
    assert refused(s3(f"s3://{bucket}/photos", "s3://no-such-output/x4")) == \
        "output.uri s3://no-such-output/x4: no such bucket (NoSuchBucket: The specified bucket does not exist)"


def test_an_unreadable_bucket_and_refused_credentials_are_named(s3_server, s3_authentication):
    """The server checking signatures and IAM policies: a user allowed on one bucket only."""
    photos, archive, user = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("photos", "archive", "catalog"))
    admin = {"endpoint_url": s3_server, "region_name": "us-east-1", "aws_access_key_id": "admin",
             "aws_secret_access_key": "admin"}
    s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
    for name in (photos, archive):
        s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=photos, Key="in/a.png", Body=small_catalog(1)["album0/photo 0.png"])
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="photos-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*",
                       "Resource": [f"arn:aws:s3:::{photos}", f"arn:aws:s3:::{photos}/*"]}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    s3_authentication()
    options = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "endpoint_url": s3_server,
               "client_kwargs": {"region_name": "us-east-1"}}

    def s3_config(input_uri: str, **overrides) -> dict:
        config = job_config(input_uri, f"s3://{photos}/out")
        config["input"]["storage_options"] = config["output"]["storage_options"] = {**options, **overrides}
        return config

    assert refused(s3_config(f"s3://{archive}/in")) == f"input.uri s3://{archive}/in: access denied " \
                                                        "(AccessDenied: Access Denied)"
    assert refused(s3_config(f"s3://{photos}/in", key="AKIAUNKNOWNKEY000000")).startswith(
        f"input.uri s3://{photos}/in: credentials refused (InvalidAccessKeyId: ")
    assert refused(s3_config(f"s3://{photos}/in", secret="not-the-secret")).startswith(
        f"input.uri s3://{photos}/in: credentials refused (SignatureDoesNotMatch: ")
    # the same user on its own bucket passes the checks (planning, which needs Ray, is not run here)
    from pipeline.preflight import check

    check(validate_config(s3_config(f"s3://{photos}/in")))
