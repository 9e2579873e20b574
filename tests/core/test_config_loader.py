"""The generic YAML -> dataclass loader: unknown keys, types, bounds, nesting, overrides."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from anymoe.core.config import ConfigError, apply_overrides, load_config, load_yaml, param, to_dict


@dataclass(frozen=True)
class Inner:
    kind: Literal["topk", "hash"] = "topk"
    k: int = param(2, ge=1, doc="experts per token")
    coef: float = param(0.01, ge=0.0, le=1.0)


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str | None = None
    sizes: tuple[int, ...] = (1, 2)
    flag: bool = False
    lr: float = 1e-3

    def validate(self) -> None:
        if self.flag and self.name is None:
            raise ConfigError("name", "is required when flag is true; set name: <something>")


def test_round_trip_and_defaults():
    cfg = load_config(Outer, {"inner": {"k": 3}, "lr": "3e-4", "sizes": [4, 5]})
    assert cfg.inner == Inner(k=3) and cfg.lr == 3e-4 and cfg.sizes == (4, 5)
    assert load_config(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, field_path, words",
    [
        ({"inner": {"kk": 3}}, "inner.kk", "did you mean 'k'"),
        ({"lrr": 1}, "lrr", "did you mean 'lr'"),
        ({"inner": {"k": 0}}, "inner.k", "must be >= 1"),
        ({"inner": {"coef": 2}}, "inner.coef", "must be <= 1.0"),
        ({"inner": {"kind": "x"}}, "inner.kind", "one of 'topk', 'hash'"),
        ({"inner": 5}, "inner", "expected a mapping"),
        ({"name": 3}, "name", "expected a string"),
        ({"flag": "yes"}, "flag", "true or false"),
        ({"inner": {"k": 2.5}}, "inner.k", "expected an integer"),
        ({"inner": {"k": True}}, "inner.k", "expected an integer"),
        ({"sizes": "abc"}, "sizes", "expected a list"),
        ({"sizes": [1, "x"]}, "sizes[1]", "expected an integer"),
        ({"flag": True}, "name", "required when flag is true"),
    ],
)
def test_errors_name_the_field(data, field_path, words):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, data)
    assert info.value.field == field_path
    assert words in str(info.value)
    assert str(info.value).startswith(field_path)


def test_nested_validate_error_is_rooted_at_its_parent():
    @dataclass(frozen=True)
    class Root:
        outer: Outer = field(default_factory=Outer)

    with pytest.raises(ConfigError) as info:
        load_config(Root, {"outer": {"flag": True}})
    assert info.value.field == "outer.name"


def test_overrides_parse_values_as_yaml():
    data = apply_overrides({"inner": {"k": 2}}, ["inner.k=4", "lr=0.5", "name=run1", "new.deep=true"])
    assert data == {"inner": {"k": 4}, "lr": 0.5, "name": "run1", "new": {"deep": True}}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nothing"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of settings at the top level"):
        load_yaml(listy)
