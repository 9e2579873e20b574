"""Reward callables and their weighted combination."""

import pytest
import torch

from anymoe.core.config import ConfigError
from anymoe.trainers.rlhf.rewards import REWARDS, WeightedReward, register_reward, resolve_reward


def test_builtin_rewards_on_addition():
    s = {"answer": "68"}
    assert REWARDS["exact_answer"]("23+45=", "68", s) == 1.0
    assert REWARDS["exact_answer"]("23+45=", " 68 ", s) == 1.0
    assert REWARDS["exact_answer"]("23+45=", "67", s) == 0.0
    assert REWARDS["digit_match"]("23+45=", "61", s) == 0.5
    assert REWARDS["digit_match"]("23+45=", "681", s) == pytest.approx(2 / 3)
    assert REWARDS["numeric_format"]("", "123", s) == 1.0
    assert REWARDS["numeric_format"]("", "1a", s) == 0.0
    assert REWARDS["length_penalty"]("", "6812", s) == pytest.approx(-0.2)
    with pytest.raises(ConfigError, match="answer"):
        REWARDS["exact_answer"]("", "1", {})


def plus_one(prompt, response, sample):  # importable by "module:function"
    return 1.0


def test_weighted_combination_and_parts():
    class Term:
        def __init__(self, name, weight):
            self.name, self.weight = name, weight

    wr = WeightedReward.from_config([Term("exact_answer", 1.0), Term("numeric_format", 0.25),
                                     Term("tests.trainers.rlhf.test_rewards:plus_one", -0.5)])
    total, parts = wr(["1+1=", "2+2="], ["2", "x"], [{"answer": "2"}, {"answer": "4"}])
    torch.testing.assert_close(total, torch.tensor([1.0 + 0.25 - 0.5, -0.5]))
    torch.testing.assert_close(parts["numeric_format"], torch.tensor([1.0, 0.0]))


def test_resolve_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"rewards\[0\].name: unknown reward 'nope'"):
        resolve_reward("nope", "rewards[0].name")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_reward("no_such_module_x:f")
    with pytest.raises(ValueError, match="twice"):
        register_reward("exact_answer")(plus_one)
