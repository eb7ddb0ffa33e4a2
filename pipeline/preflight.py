"""Checks before planning and before any model loads: the input and output locations exist and accept the
credentials. Without them a mistyped folder lists as an empty catalog and a run "succeeds" with 0 inputs; here
it fails at once with one line naming the URI and the cause. An existing but empty input is fine (0 inputs).

Object stores have no folders: an absent prefix is an empty one, so there the bucket is what must exist.
"""

from __future__ import annotations

import os
from typing import Any

from .config import ConfigError, JobConfig
from .spec import InputSpec
from .storage import Location, glob_matcher, service_error, with_retries


class PreflightError(ConfigError):
    """A location the job cannot use; the message is one line: ``<key> <uri>: <cause>``."""


# Error codes (S3 and compatible stores) meaning the credentials themselves were refused, not a policy decision.
_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
            "InvalidClientTokenId", "UnrecognizedClientException", "AuthorizationHeaderMalformed"}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"}


def locations(cfg: JobConfig) -> tuple[Location, Location]:
    return (Location(cfg.input.uri, cfg.input.storage_options), Location(cfg.output.uri, cfg.output.storage_options))


def check_output_outside_input(inputs: InputSpec, output: Location) -> None:
    """Refuse an output.uri inside input.uri unless the input patterns leave it out (no job may eat its outputs)."""
    inner = inputs.location.contains(output)
    if inner is None:
        return
    from .manifest import MANIFEST_DIR  # pyarrow's dataset layer: not for the common case, before the job starts
    included, excluded = (glob_matcher(list(patterns), case_sensitive=inputs.case_sensitive)
                          for patterns in (inputs.include, inputs.exclude))
    probes = [f"{inner}/{name}".lstrip("/") for name in
              ("photo.png", "album/photo.jpg", f"{MANIFEST_DIR}/run=r/part-p.parquet")]
    if inner == "" or any(included(probe) and not excluded(probe) for probe in probes):
        raise ConfigError(
            f"output.uri {output.uri!r} lies inside input.uri {inputs.location.uri!r}: the job would read its own "
            f"outputs as inputs. Move the output elsewhere or add input.exclude: ['{inner or '<output>'}/**']")


def describe(exc: BaseException) -> str:
    """The cause of a storage error in a few words, with the store's own code and message where it has one."""
    code, message = service_error(exc)
    if code in _REFUSED:
        cause = "credentials refused"
    elif code in _DENIED or (not code and isinstance(exc, PermissionError)):
        cause = "access denied"
    elif code == "NoSuchBucket":
        cause = "no such bucket"
    elif "NoCredentials" in type(exc).__name__ or code == "NoCredentials":
        cause = "no credentials found"
    elif isinstance(exc, FileNotFoundError):
        cause = "not found"
    else:
        cause = type(exc).__name__
    detail = f"{code}: {message}" if code else str(exc)
    return " ".join(f"{cause} ({detail})".split()) if detail else cause


def location_error(key: str, uri: str, exc: BaseException) -> PreflightError:
    return PreflightError(f"{key} {uri}: {describe(exc)}")


def check(cfg: JobConfig) -> None:
    """Raise ConfigError (PreflightError for storage) when the job cannot run over these locations: the input
    cannot be listed, the output cannot be listed or created, or the output lies inside the input. Writes
    nothing."""
    source, output = locations(cfg)
    check_output_outside_input(InputSpec.of(cfg.input), output)
    _check_source(source, absent_ok=cfg.input.example_catalog)
    if cfg.input.inventory:  # its manifest readable, of the input's bucket, with the fields planning needs
        from . import listing  # pyarrow's readers: only for inventories, not on every job's way to its first check

        inventory = listing.read_manifest(cfg.input.inventory, source.storage_options)
        listing.check_bucket(inventory, source)
    _check_output(output)


def _check_source(source: Location, *, absent_ok: bool) -> None:
    uri = source.uri
    if source.is_local:
        root = source.root
        if not os.path.exists(root):
            if absent_ok:  # input.example_catalog lays one out here
                return
            raise PreflightError(f"input.uri {uri}: no such folder ({os.path.abspath(root)})")
        if not os.path.isdir(root):
            raise PreflightError(f"input.uri {uri}: not a folder")
        if not os.access(root, os.R_OK | os.X_OK):
            raise PreflightError(f"input.uri {uri}: access denied (cannot list {os.path.abspath(root)})")
        return
    _probe_bucket("input.uri", source)


def _check_output(output: Location) -> None:
    uri = output.uri
    if output.is_local:
        root = output.root
        if os.path.exists(root) and not os.path.isdir(root):
            raise PreflightError(f"output.uri {uri}: not a folder")
        existing = root
        while not os.path.exists(existing):
            existing = os.path.dirname(existing) or "."
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise PreflightError(f"output.uri {uri}: access denied (cannot write in {os.path.abspath(existing)})")
        return
    _probe_bucket("output.uri", output)


def _probe_bucket(key: str, location: Location) -> None:
    """List at most one object under the root: fails when the bucket is missing, the listing is denied or the
    credentials are refused; an absent prefix is an empty one."""
    fs, root = location.fs, location.root
    try:
        if hasattr(fs, "call_s3"):  # s3fs: one cheap request whose error carries S3's own code
            bucket, _, prefix = root.partition("/")
            request: dict[str, Any] = {"Bucket": bucket, "MaxKeys": 1, "Prefix": f"{prefix}/" if prefix else ""}
            with_retries(lambda: fs.call_s3("list_objects_v2", **request))
        else:
            bucket = root.split("/", 1)[0]
            if not with_retries(lambda: fs.exists(bucket)):
                raise FileNotFoundError(f"bucket {bucket!r} does not exist")
            if with_retries(lambda: fs.exists(root)):
                with_retries(lambda: fs.ls(root, detail=False))
    except Exception as exc:  # noqa: BLE001 - every storage failure here becomes one named line
        raise location_error(key, location.uri, exc) from exc
