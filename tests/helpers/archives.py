"""Adapter uploads as archives: a well-formed one from an adapter directory, and raw tar headers for hostile ones."""

import io
import tarfile
from pathlib import Path


def archive(src: Path, extra: dict[str, bytes] | None = None, skip: tuple = ()) -> bytes:
    """An adapter directory as a .tar.gz upload, with `extra` members added and the files in `skip` left out."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            if f not in skip:
                tar.add(src / f, arcname=f)
        for name, content in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def tar_header(name: bytes, size_field: bytes, kind: bytes = b"0", magic: bytes = b"ustar\x0000") -> bytes:
    """One raw 512-byte tar header with any size field, so hostile values can be written as they are."""
    header = bytearray(512)
    header[:len(name[:100])] = name[:100]
    header[100:108] = b"0000644\0"
    header[124:136] = size_field.ljust(12, b"\0")[:12]
    header[156:157] = kind
    header[257:265] = magic
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def octal(n: int) -> bytes:
    return b"%011o\0" % n


def negative_base256(n: int) -> bytes:
    return (256**12 - n).to_bytes(12, "big")  # two's complement, top byte 0xff
