"""The package metadata installs without setuptools' deprecation warnings (issue 37)."""
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_setuptools_warnings():
    # `pip install -e .` printed "`project.license` as a TOML table is deprecated" three times;
    # applying the configuration the way the build backend does must now be silent.
    pytest.importorskip("setuptools", minversion="77")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"
