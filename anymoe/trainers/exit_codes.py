"""Exit codes and one-line failures shared by the training CLIs (train, rlhf, parity run).

Scripts and CI rely on them (README, "Command-line contract"): 0 done, 2 bad input (nothing
started or nothing lost), 3 stopped by a policy (non-finite steps, rollbacks), 130 interrupted.
"""

from __future__ import annotations

import sys

EXIT_OK, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 2, 3, 130


def fail(prog: str, text: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``prog: text`` on stderr (one line) and return ``code``."""
    print(f"{prog}: {text}", file=sys.stderr, flush=True)
    return code


def fit_exit_code(prog: str, err: BaseException) -> int:
    """The exit code for what a trainer's ``fit()`` raised, with its one line; re-raises the rest."""
    from anymoe.core.config import ConfigError
    from anymoe.trainers.checkpoint import CheckpointError
    from anymoe.trainers.loop import TrainingStopped

    if isinstance(err, ConfigError):
        return fail(prog, f"config error: {err}")
    if isinstance(err, CheckpointError):
        return fail(prog, str(err))
    if isinstance(err, TrainingStopped):
        return EXIT_STOPPED
    if isinstance(err, KeyboardInterrupt):
        return fail(prog, "interrupted; resume with --resume", EXIT_INTERRUPTED)
    raise err


__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_STOPPED", "fail", "fit_exit_code"]
