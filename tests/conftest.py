"""Fixtures shared by unit and end-to-end tests: one real S3 object store (SeaweedFS) per session."""

import os
import uuid
from collections.abc import Iterator

import pytest

from loadtest.servers import ObjectStore
from tests.helpers.object_store import BUCKET


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """SeaweedFS for the session; boto3 in this process (and the servers it starts) is pointed at it."""
    root = tmp_path_factory.mktemp("seaweedfs")
    store = ObjectStore(root / "data", root / "weed.log")
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield store
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        store.stop()


@pytest.fixture
def s3_url(object_store: ObjectStore) -> str:
    """A registry location of its own for one test: a fresh prefix in the session's bucket."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
