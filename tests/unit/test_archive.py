import io
import json
import tarfile
import zipfile

import pytest

from server.validation import InvalidAdapter, unpack_archive

CONFIG = json.dumps({"peft_type": "LORA", "r": 4}).encode()
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "


class Special:
    """A tar member that is not a regular file, of the given tarfile type."""

    def __init__(self, type_: bytes):
        self.type = type_


def tar_gz(entries) -> io.BytesIO:
    """entries: (name, bytes) for files, or (name, Special(tarfile type)) for other members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.type = content.type
                info.linkname = "/etc/passwd"
                tar.addfile(info)
    buf.seek(0)
    return buf


def zip_of(entries, symlink: str | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries:
            zf.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    buf.seek(0)
    return buf


GOOD = [("adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS), ("README.md", b"hi")]


def unpack(archive, tmp_path, max_members=16, max_bytes=1 << 20):
    dest = tmp_path / "out"
    dest.mkdir(exist_ok=True)
    unpack_archive(archive, dest, max_members, max_bytes)
    return sorted(p.name for p in dest.iterdir())


@pytest.mark.parametrize("archive", [
    tar_gz(GOOD), zip_of(GOOD), tar_gz([(f"my-adapter/{n}", c) for n, c in GOOD]),
    tar_gz([("./adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)]),
])
def test_good_archives(archive, tmp_path):
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(unpack(archive, tmp_path))
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == CONFIG


@pytest.mark.parametrize("archive,message", [
    (tar_gz([("/etc/adapter_config.json", CONFIG)]), "absolute or unsafe"),
    (tar_gz([("../adapter_config.json", CONFIG)]), r"outside the archive \(\.\.\)"),
    (tar_gz([("a/../../adapter_config.json", CONFIG)]), r"outside the archive"),
    (zip_of([("../../adapter_config.json", CONFIG)]), "outside the archive"),
    (zip_of([("C:/adapter_config.json", CONFIG)]), "absolute or unsafe"),
    (tar_gz([("adapter_model.safetensors", Special(tarfile.SYMTYPE))]), "is a link"),
    (tar_gz([("adapter_model.safetensors", Special(tarfile.LNKTYPE))]), "is a link"),
    (tar_gz([("adapter_model.safetensors", Special(tarfile.CHRTYPE))]), "is a special"),
    (tar_gz([("adapter_model.safetensors", Special(tarfile.FIFOTYPE))]), "is a special"),
    (zip_of(GOOD[:1], symlink="adapter_model.safetensors"), "is a link"),
    (tar_gz([*GOOD[:1], ("adapter_model.bin", b"pickle")]), "only safetensors"),
    (zip_of([*GOOD[:1], ("pytorch_model.pt", b"pickle")]), "only safetensors"),
    (tar_gz([*GOOD, ("run.sh", b"#!/bin/sh")]), "not part of a PEFT adapter"),
    (tar_gz([*GOOD, ("loader.py", b"import os")]), "not part of a PEFT adapter"),
    (tar_gz([("a/b/adapter_config.json", CONFIG)]), "nested too deep"),
    (tar_gz([("adapter_config.json", CONFIG), ("x/adapter_config.json", CONFIG)]), "twice"),
    (tar_gz([(f"d{i}/README.md", b"") for i in range(20)]), "at most 16"),
    (io.BytesIO(b"just some bytes, not an archive"), "must be a .tar.gz, .tgz or .zip"),
    (io.BytesIO(tar_gz(GOOD).getvalue()[:60]), "corrupt|must be"),
])
def test_rejected_archives(archive, message, tmp_path):
    with pytest.raises(InvalidAdapter, match=message):
        unpack(archive, tmp_path)


def test_bombs_are_refused_by_size(tmp_path):
    zeros = b"\0" * (4 << 20)
    for archive in (tar_gz([("adapter_model.safetensors", zeros)]), zip_of([("adapter_model.safetensors", zeros)])):
        assert len(archive.getvalue()) < 64 << 10  # tiny on the wire
        with pytest.raises(InvalidAdapter, match="unpacks to more than"):
            (tmp_path / str(id(archive))).mkdir()
            unpack(archive, tmp_path / str(id(archive)), max_bytes=1 << 20)


def test_lying_zip_sizes_are_caught_while_extracting(tmp_path):
    """A zip whose headers declare a small file but whose data inflates past the limit."""
    archive = zip_of([("adapter_model.safetensors", b"\0" * (2 << 20))])
    raw = bytearray(archive.getvalue())
    small = (100).to_bytes(4, "little")
    real = (2 << 20).to_bytes(4, "little")
    raw = raw.replace(real, small)  # uncompressed size in both the local and the central header
    with pytest.raises(InvalidAdapter, match="more than|corrupt"):
        unpack(io.BytesIO(bytes(raw)), tmp_path, max_bytes=1 << 20)
