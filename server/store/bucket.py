"""One bucket and prefix of S3-compatible object storage: the few object operations loraplex needs, and the
conditional JSON update that stands in for a file lock. boto3 is imported with this module, so import it only for an
object-store location."""

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

# Conditional writes that lose a race are retried; this many losses in a row means something else is wrong.
MAX_RACES = 64


class Precondition(Exception):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


def split_url(url: str) -> tuple[str, str]:
    """("BUCKET", "PREFIX/") of s3://BUCKET/PREFIX."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"registry URL {url!r} names no bucket: expected s3://BUCKET[/PREFIX]")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class Bucket:
    """The few object operations loraplex needs, on one bucket and prefix, with boto3's standard configuration."""

    def __init__(self, url: str, client: Any = None):
        self.bucket, self.prefix = split_url(url)
        self.url = url.rstrip("/")
        self.s3 = client or boto3.client("s3", config=Config(retries={"mode": "standard"}))

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            answer = self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        return answer["Body"].read(), answer["ETag"]

    def etag(self, key: str) -> str | None:
        """The ETag of `key`, None if it does not exist; reads no body."""
        try:
            return self.s3.head_object(Bucket=self.bucket, Key=self.prefix + key)["ETag"]
        except ClientError as e:
            if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def put(self, key: str, body: bytes, *, if_match: str | None = None, create: bool = False) -> str:
        """Writes `key`; with `create` only if absent, with `if_match` only if its ETag is still that."""
        conditions = {"IfNoneMatch": "*"} if create else {"IfMatch": if_match} if if_match else {}
        try:
            return self.s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body, **conditions)["ETag"]
        except ClientError as e:
            if e.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise Precondition(key) from None
            raise

    def update_json(self, key: str, change: Callable[[dict], None], *, absent: Callable[[], dict] = dict,
                    pause: float = 0.0) -> dict | None:
        """Applies `change` to the JSON object at `key` (to `absent()` if there is none) and writes it only if nobody
        wrote it meanwhile, else retries after `pause` seconds; what it wrote, or None if MAX_RACES tries all lost."""
        for _ in range(MAX_RACES):
            got = self.get(key)
            data, etag = (json.loads(got[0]), got[1]) if got else (absent(), None)
            change(data)
            try:
                self.put(key, json.dumps(data, sort_keys=True).encode(), if_match=etag, create=etag is None)
                return data
            except Precondition:
                time.sleep(pause)
        return None

    def upload(self, path: Path, key: str) -> None:
        self.s3.upload_file(str(path), self.bucket, self.prefix + key)

    def download(self, key: str, path: Path) -> None:
        self.s3.download_file(self.bucket, self.prefix + key, str(path))

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def keys(self, under: str = "") -> Iterator[tuple[str, int]]:
        """(key, size) of every object under `under`, relative to the prefix."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + under)
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):], obj["Size"]

    def ensure(self) -> None:
        """Creates the bucket if it does not exist (a fresh store, a test)."""
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.s3.create_bucket(Bucket=self.bucket)
