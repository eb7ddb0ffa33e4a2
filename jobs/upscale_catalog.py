"""Upscale a catalog of photos, videos and frame sequences on Ray Data.

  python jobs/upscale_catalog.py [--config FILE] [--set key=value ...] [--dry-run]

What can be checked without Ray is checked first: the config (unknown keys and wrong types are named), the input
and output locations and their credentials. A mistake ends the job within a second or two with one error line;
only then do Ray and the model start. Under `ray job submit` the job joins that cluster; run directly, it starts a
local Ray (with Ray's token authentication) or joins the one `ray start` runs on this machine.

Exit codes: 0 every input ok (or already done), 1 the job failed, 2 a bad command line, 3 some inputs failed
(their manifest rows say why), 4 another run holds the output's run lock (nothing was done).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "local.yaml"
PROG = "upscale_catalog"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML job config (default: configs/local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set upscale.steps=20 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be processed or skipped and the estimated cost; loads no model")
    parser.add_argument("--break-lock", action="store_true",
                        help="take the output's run lock over from the run holding it, at once (for a holder you "
                             "know is dead; one on this machine or this Ray cluster that died is taken over anyway)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"],
                        help="the pipeline's log level; DEBUG adds one JSON line per finished input")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and Ray Data's own logs (at Ray's usual levels) and Ray Data's "
                             "progress bars (default: the job's progress line only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(args.log_level)

    # Light imports only until the checks have passed: no Ray, no torch.
    from pipeline import outcome, preflight
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        preflight.check(cfg)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return outcome.EXIT_JOB_FAILED
    code = _run(cfg, args)
    print(outcome.describe(code), flush=True)
    return code


def _run(cfg, args: argparse.Namespace) -> int:
    from pipeline import outcome
    from pipeline.config import ConfigError

    try:
        if not args.dry_run:
            _start_ray(verbose=args.verbose)
        from pipeline.run import run_job

        # `ray job stop` and Kubernetes send SIGTERM: unwind, releasing the run lock, rather than die on the spot
        # (set after ray.init, whose own handler would abort the process).
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        return run_job(cfg, dry_run=args.dry_run, break_lock=args.break_lock)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return outcome.EXIT_JOB_FAILED
    except Exception:
        logging.getLogger("pipeline").exception("the job failed")
        return outcome.EXIT_JOB_FAILED


class _Without(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def _start_ray(*, verbose: bool) -> None:
    if "RAY_ADDRESS" not in os.environ:  # run directly: our own local Ray, or the one `ray start` runs here
        # Token auth, Ray's default for a new local cluster, chosen explicitly so that Ray does not warn about it
        # on every run. (A cluster the job is submitted to passes its own RAY_AUTH_MODE, left alone.)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    import ray.data

    # The test-only fault hooks (pipeline.manifest.kill_point) reach the job's workers on a running cluster too,
    # as they do on a local Ray started here, whose workers inherit this environment.
    hooks = {name: value for name, value in os.environ.items() if name.startswith("DIT4SR_TEST_KILL")}
    ray.init(logging_level=logging.INFO if verbose else logging.WARNING,
             runtime_env={"env_vars": hooks} if hooks else None)
    # One progress display, the job's own: Ray Data's bars (a block of lines every few seconds when not on a
    # terminal) and its informational lines only with --verbose.
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").addFilter(_Without("Progress bars disabled"))
        _spend_the_actor_argument_warning()


def _spend_the_actor_argument_warning() -> None:
    """Ray's core logs an error, once per process, when an actor that may restart gets an argument from the object
    store (ray-project/ray#53727) — which every Ray Data actor pool does (#57733), harmlessly: its arguments stay
    referenced for the whole run. That one line is spent here, on a throwaway actor, with stderr pointed at
    /dev/null for the call (nothing else writes to it yet)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class Throwaway:
        def __init__(self, argument: bytes):
            pass

    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        actor = Throwaway.remote(ray.put(b""))  # creation logs synchronously, in this thread
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(actor)


if __name__ == "__main__":
    sys.exit(main())
