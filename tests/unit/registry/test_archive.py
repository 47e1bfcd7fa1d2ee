import gzip
import io
import json
import tarfile
import zipfile

import pytest

from server.registry.archive import unpack_archive
from server.registry.validation import InvalidAdapter
from tests.helpers.archives import negative_base256, octal, tar_header

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


def test_negative_size_is_refused_at_once(tmp_path):
    """The 108-byte tar of the review: tarfile re-read the same header for ever inside getmembers()."""
    raw = tar_header(b"adapter_config.json", negative_base256(512))
    with pytest.raises(InvalidAdapter, match="negative size"):
        unpack(io.BytesIO(gzip.compress(raw)), tmp_path)


def test_a_zip_member_without_a_name_is_refused_with_a_message(tmp_path):
    """Found by the fuzz test: zipfile's is_dir() raised IndexError on it, and the unpacking child died."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x", b"")
        zf.infolist()[0].filename = ""  # the central directory, which is what is read first, names it ""
    buf.seek(0)
    with pytest.raises(InvalidAdapter, match="unsafe path"):
        unpack(buf, tmp_path)


def test_a_long_name_bomb_is_refused_at_its_header(tmp_path):
    """A GNU long-name header declaring 3 GB: refused on its size field, before any of it is read."""
    raw = tar_header(b"././@LongLink", octal(3 << 30), kind=b"L") + bytes(1 << 20)
    with pytest.raises(InvalidAdapter, match="extended header over"):
        unpack(io.BytesIO(gzip.compress(raw)), tmp_path)


def test_member_count_is_checked_as_members_are_read(tmp_path):
    """Two million folder entries: refused at the 17th, without listing the rest."""
    entry = tar_header(b"d/", octal(0), kind=b"5")
    archive = io.BytesIO(gzip.compress(entry * 200_000))
    read = []
    real_read = archive.read
    archive.read = lambda *a: read.append(1) or real_read(*a)
    with pytest.raises(InvalidAdapter, match="at most 16"):
        unpack(archive, tmp_path)
    assert len(read) < 10


def test_messages_do_not_repeat_long_names(tmp_path):
    name = "x" * 5000
    raw = tar_header(b"././@LongLink", octal(len(name)), kind=b"L") + name.encode().ljust(5120, b"\0")
    raw += tar_header(b"short", octal(0))
    with pytest.raises(InvalidAdapter) as e:
        unpack(io.BytesIO(raw), tmp_path)
    assert len(str(e.value)) < 300 and "x" * 80 in str(e.value)


@pytest.mark.parametrize("method", [9, 99])
def test_unsupported_zip_methods_are_refused(method, tmp_path):
    raw = bytearray(zip_of(GOOD).getvalue())
    # The method field of each local (offset 8) and central (offset 10) header.
    for sig, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = raw.find(sig)
        while at >= 0:
            raw[at + offset:at + offset + 2] = method.to_bytes(2, "little")
            at = raw.find(sig, at + 4)
    with pytest.raises(InvalidAdapter, match=f"compression method {method}"):
        unpack(io.BytesIO(bytes(raw)), tmp_path)


def test_encrypted_zip_entries_are_refused(tmp_path):
    raw = bytearray(zip_of(GOOD).getvalue())
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.find(sig)
        while at >= 0:
            raw[at + offset] |= 1
            at = raw.find(sig, at + 4)
    with pytest.raises(InvalidAdapter, match="encrypted"):
        unpack(io.BytesIO(bytes(raw)), tmp_path)


def test_zip_with_a_huge_directory_is_refused_before_parsing(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(2000):
            zf.writestr(f"d{i}/", b"")
    with pytest.raises(InvalidAdapter, match="at most 16"):
        unpack(io.BytesIO(buf.getvalue()), tmp_path)
