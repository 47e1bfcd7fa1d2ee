"""Where a deployment keeps what it shares: in the object store that holds an s3:// registry, else in local files."""

from pathlib import Path


def is_object_store(location: str | Path) -> bool:
    """Whether the registry `location` is s3://BUCKET/PREFIX on object storage rather than a directory."""
    return str(location).startswith("s3://")
