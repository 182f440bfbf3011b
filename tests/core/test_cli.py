import subprocess
import sys

import pytest
import torch

import cfpo_loss
from cfpo_loss.adapters._support import SUPPORTED, TESTED, is_supported, supported_range, version_key


def test_python_m_cfpo_loss_reports_versions():
    out = subprocess.run([sys.executable, "-m", "cfpo_loss"], capture_output=True, text=True, check=True).stdout
    assert f"cfpo_loss {cfpo_loss.__version__}" in out
    assert f"torch {torch.__version__}" in out
    for name in ("trl", "verl", "openrlhf", "areal"):
        (line,) = [line for line in out.splitlines() if line.startswith(f"{name}: ")]
        assert supported_range(name) in line and f"tested: {', '.join(TESTED[name])}" in line, line


def test_every_tested_version_is_supported_and_every_supported_minor_line_is_tested():
    for name, (low, high) in SUPPORTED.items():
        assert TESTED[name] and all(is_supported(name, v) for v in TESTED[name]), name
        assert low in TESTED[name], f"{name}: the lowest supported version {low} is not tested"
        minors = {version_key(v)[:2] for v in TESTED[name]}
        lo, hi = version_key(low)[:2], version_key(high)[:2]
        for minor in {(lo[0], m) for m in range(lo[1], hi[1])} if lo[0] == hi[0] else set():
            assert minor in minors, f"{name} {minor[0]}.{minor[1]}.x is supported but not tested"


def test_pyproject_torch_floor_is_the_tested_floor():
    import pathlib
    import re

    from cfpo_loss.adapters._support import TORCH_FLOOR, TORCH_TESTED

    pyproject = pathlib.Path(__file__).parents[2] / "pyproject.toml"
    if not pyproject.is_file():  # the package session runs these tests on the installed wheel, outside the repo
        pytest.skip("no source tree here")
    (floor,) = re.findall(r'"torch>=([0-9.]+)"', pyproject.read_text())
    assert version_key(floor) == version_key(TORCH_FLOOR) and TORCH_FLOOR in TORCH_TESTED


def test_version_ranges_are_half_open():
    assert is_supported("verl", "0.8.0") and is_supported("verl", "0.9.1") and not is_supported("verl", "0.10.0")
    assert not is_supported("verl", "0.7.1")
    assert is_supported("openrlhf", "0.10.4") and is_supported("openrlhf", "0.11.2")
    assert not is_supported("openrlhf", "0.10.3") and not is_supported("openrlhf", "0.12.0")
    assert is_supported("openrlhf", "0.10.1.post2") is False  # below the latest 0.10 patch
    assert not is_supported("trl", "1.15.0") and is_supported("trl", "1.16.0") and not is_supported("trl", "1.17.0")


def test_core_import_pulls_in_no_framework():
    code = "import sys, cfpo_loss; print(sorted({'trl','verl','openrlhf','transformers','ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_one_range_warning(caplog):
    """adapters/_support.warn_if_unsupported, the range warning verl's and OpenRLHF's adapters share: silent in range
    and for an absent framework; otherwise one RuntimeWarning (and log record) naming version, range and tested."""
    import logging
    import warnings

    from cfpo_loss.adapters._support import tested_versions, warn_if_unsupported

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_unsupported("verl", "0.9.1", "x") is None and warn_if_unsupported("verl", None, "x") is None
    logger = logging.getLogger("cfpo_loss.test_range_warning")
    with pytest.warns(RuntimeWarning) as caught, caplog.at_level(logging.WARNING, logger=logger.name):
        msg = warn_if_unsupported("openrlhf", "0.12.0", "the consequence.", logger=logger, stacklevel=1)
    assert [str(w.message) for w in caught] == [msg] and caplog.messages == [msg]
    assert msg == (
        f"cfpo_loss: openrlhf 0.12.0 is outside the supported range: the openrlhf adapter supports "
        f"openrlhf>=0.10.4,<0.12 (tested: {tested_versions('openrlhf')}), found 0.12.0; the consequence."
    )
    assert caught[0].filename == __file__  # stacklevel 1: this line, as warnings.warn's own stacklevel counts


def test_python_m_cfpo_loss_prints_no_warning():
    """The README's first command runs clean: without numpy, `import torch` warns "Failed to initialize NumPy",
    which is why numpy is a core dependency (pyproject.toml) although cfpo_loss never imports it."""
    out = subprocess.run([sys.executable, "-m", "cfpo_loss"], capture_output=True, text=True, check=True)
    assert out.stderr == "", out.stderr


def test_numpy_is_a_core_dependency():
    import pathlib
    import re

    pyproject = pathlib.Path(__file__).parents[2] / "pyproject.toml"
    if not pyproject.is_file():  # the package session runs these tests on the installed wheel, outside the repo
        pytest.skip("no source tree here")
    (dependencies,) = re.findall(r"^dependencies = \[(.*)\]", pyproject.read_text(), re.M)
    assert '"numpy"' in dependencies, dependencies
