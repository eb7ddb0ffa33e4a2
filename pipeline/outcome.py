"""The catalog job's exit codes and what each means, in one place: the job prints the meaning as its last line,
and the README, ``infra/`` and the runs index use the same codes. Light on purpose: the job reads it before Ray
or torch is imported."""

from __future__ import annotations

EXIT_OK = 0  # every input ok (or already done)
EXIT_JOB_FAILED = 1  # the job itself failed: bad config, a location it cannot use, cluster trouble
EXIT_USAGE = 2  # a bad command line (argparse's own code)
EXIT_INPUTS_FAILED = 3  # the job finished, but some inputs have `failed` rows
EXIT_LOCKED = 4  # another run holds the output's run lock (pipeline.run_lock); nothing was done

MEANINGS = {
    EXIT_OK: "every input ok (or already done)",
    EXIT_JOB_FAILED: "the job failed (see the error above); nothing more was done",
    EXIT_USAGE: "a bad command line",
    EXIT_INPUTS_FAILED: "some inputs failed, the others are done; their manifest rows say why "
                        "(a re-run retries only them)",
    EXIT_LOCKED: "another run holds the output's run lock; nothing was done",
}


def describe(code: int) -> str:
    """``exit <code>: <meaning>``, the job's last line."""
    return f"exit {code}: {MEANINGS.get(code, 'interrupted')}"
