"""Fixtures of the registry's tests."""

import pytest

from server.registry.directory import DirectoryRegistry
from server.registry.s3 import S3Registry


@pytest.fixture(params=["directory", "s3"])
def reg(request, tmp_path):
    """The registry on each backend: every test taking it holds for a directory and for object storage."""
    if request.param == "directory":
        return DirectoryRegistry(tmp_path / "reg")
    return S3Registry(request.getfixturevalue("s3_url"))
