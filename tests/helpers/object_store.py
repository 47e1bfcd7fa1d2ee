"""The bucket of the session's object store (the object_store fixture in tests/conftest.py creates it)."""

BUCKET = "loraplex"
