"""The exit-code mapping every training CLI shares (train, rlhf, parity run)."""

import pytest

from anymoe.core.config import ConfigError
from anymoe.trainers.checkpoint import CheckpointError
from anymoe.trainers.exit_codes import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_STOPPED, fit_exit_code
from anymoe.trainers.loop import TrainingStopped


@pytest.mark.parametrize("err, code, line", [
    (ConfigError("train.steps", "must be >= 1"), EXIT_BAD_INPUT, "prog: config error: "),
    (CheckpointError("disk full at runs/x"), EXIT_BAD_INPUT, "prog: disk full at runs/x"),
    (TrainingStopped("5 non-finite steps"), EXIT_STOPPED, ""),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "prog: interrupted; resume with --resume"),
])
def test_each_failure_maps_to_its_code_and_one_line(err, code, line, capsys):
    assert fit_exit_code("prog", err) == code
    err_text = capsys.readouterr().err
    assert err_text.startswith(line) and err_text.count("\n") == (1 if line else 0)


def test_anything_else_is_re_raised():
    with pytest.raises(ZeroDivisionError):
        fit_exit_code("prog", ZeroDivisionError("a bug"))
