"""One version helper serves the CPU backend (IPEX check), the NPU backend (torch_npu check)
and `anymoe env` (package table)."""

import torch

from anymoe.backends import cpu, env, npu, versions


def test_one_helper_serves_every_caller():
    assert cpu.major_minor is npu.major_minor is versions.major_minor
    assert cpu.installed_version is npu.installed_version is versions.installed_version


def test_major_minor_and_installed_version():
    assert versions.major_minor("2.13.0+cpu") == (2, 13)
    assert versions.major_minor("2.8.0.post2") == (2, 8) and versions.major_minor("2.11.0a0+git1") == (2, 11)
    assert versions.installed_version("torch").split("+")[0] == torch.__version__.split("+")[0]
    assert versions.installed_version("surely-not-an-installed-dist-xyz") is None


def test_callers_agree_on_the_version_rule():
    t = "2.13.0+cpu"
    assert cpu.ipex_status("2.13.1", t).ok and npu.version_mismatch("2.13.1", t) is None
    assert not cpu.ipex_status("2.8.0", t).ok and npu.version_mismatch("2.8.0", t) is not None
    assert not cpu.ipex_status(None, t).ok


def test_env_package_table_uses_installed_version():
    table = env.package_versions()
    assert table["torch"] == versions.installed_version("torch")
    missing = [name for name in env.PACKAGES if versions.installed_version(name) is None]
    assert all(table[name] is None for name in missing if name != "anymoe")
