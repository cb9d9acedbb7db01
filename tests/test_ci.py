"""CI runs what the docs claim: optional test dependencies installed, skips limited to an allow-list."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from skips import ALLOWED, disallowed

ROOT = Path(__file__).resolve().parents[1]


def test_test_extra_installs_what_the_claimed_tests_need():
    """PyYAML (the fuzz test's YAML cases, the alias-bomb test) and TensorBoard (the scalars test) in
    ``[test]``: without them those tests skip in CI while docs/reliability.md counts them. Catches a
    ``[test]`` extra that lost one."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~\\[ ]", spec, maxsplit=1)[0].lower() for spec in extra}
    assert {"pytest", "hypothesis", "pyyaml", "tensorboard"} <= names, names


def test_ci_script_fails_when_chromium_is_missing():
    """``.ci/run`` exits non-zero when Chromium cannot be installed (the browser test would skip).
    Catches the old ``|| echo ... will skip``."""
    script = (ROOT / ".ci" / "run").read_text()
    assert "will skip" not in script
    assert re.search(r"command -v chromium .*\|\| \{ .*exit 1", script, re.S), script
    assert "PPL_VI_STRICT_SKIPS=1" in script


def test_allow_list_is_cuda_only_and_documented():
    assert all("CUDA" in pattern for pattern in ALLOWED)
    assert disallowed(["CUDA-graph capture needs a CUDA GPU"]) == []
    assert disallowed(["no chromium on PATH", "could not import 'yaml'"]) == ["no chromium on PATH",
                                                                             "could not import 'yaml'"]
    assert "PPL_VI_STRICT_SKIPS" in (ROOT / "docs" / "reliability.md").read_text()


def test_a_run_with_a_skip_off_the_allow_list_fails(pytester, monkeypatch):
    """An inner pytest session under PPL_VI_STRICT_SKIPS=1: a skip for a missing module fails the run
    (exit 1, listed as NOT ALLOWED), a CUDA skip alone does not. Catches a plugin that only prints."""
    monkeypatch.setenv("PPL_VI_STRICT_SKIPS", "1")
    pytester.makeconftest("from skips import StrictSkips\n"
                          "def pytest_configure(config):\n"
                          "    config.pluginmanager.register(StrictSkips(), 'strict')\n")
    pytester.syspathinsert(str(ROOT / "tests"))
    pytester.makepyfile(test_a="import pytest\n"
                               "def test_ok():\n    pass\n"
                               "def test_gpu():\n    pytest.skip('CUDA-graph capture needs a CUDA GPU')\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*ALLOWED*test_gpu*"])
    pytester.makepyfile(test_b="import pytest\n"
                               "def test_yaml():\n    pytest.importorskip('no_such_module_here')\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*NOT ALLOWED*test_yaml*"])
