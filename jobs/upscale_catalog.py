"""Upscale a photo catalog: ``python jobs/upscale_catalog.py --config FILE [--set key=value ...] [--dry-run]``.

Under ``ray job submit`` the plain ``ray.init()`` joins the cluster; run directly, it starts a local Ray.
Exit codes: 0 every input ok, 3 some inputs failed (see the manifests), 1 the job itself failed, 4 another run
holds the output's run lock (nothing was done).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML job config (default: configs/local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set upscale.steps=20 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be processed or skipped and the estimated cost; loads no model")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"],
                        help="the pipeline's log level; DEBUG adds one JSON line per finished input")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(args.log_level)

    from pipeline.config import ConfigError, load_config
    from pipeline.run import EXIT_JOB_FAILED, run_job

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    import ray

    try:
        if not args.dry_run:
            ray.init()
        # `ray job stop` and Kubernetes send SIGTERM: unwind, releasing the run lock, rather than die on the spot
        # (set after ray.init, whose own handler would abort the process).
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        return run_job(cfg, dry_run=args.dry_run)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except Exception:
        logging.getLogger("pipeline").exception("the job failed")
        return EXIT_JOB_FAILED


if __name__ == "__main__":
    sys.exit(main())
