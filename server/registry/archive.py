"""Adapter archives: packing one for upload, and unpacking an untrusted one with every limit enforced while reading.

Python's tarfile and zipfile read a whole listing before anyone can count it, and tarfile loops for ever on a
negative size, so tar headers are read here one at a time and a zip's central directory is sized before zipfile
parses it: the work is bounded by the limits, not by the archive. The gateway runs `python -m server.registry.archive` in
a child process with an address-space limit and a deadline, because a thread doing this could not be stopped.
"""

import asyncio
import bz2
import gzip
import io
import lzma
import os
import resource
import stat
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.registry.validation import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, InvalidAdapter, shown

ALLOWED_FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md", MANIFEST_FILE}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
BLOCK = 512
MAX_EXTENDED_HEADER = 8192  # a pax record set or GNU long name; an adapter's names are short
MAX_EXTENDED_RUN = 4  # extended headers before one member
MAX_CENTRAL_ENTRY = 1024  # bytes of a zip's central directory allowed per member
# Exit codes of the child process.
OK, REFUSED, OUT_OF_MEMORY = 0, 2, 3


@dataclass(frozen=True)
class Limits:
    members: int
    unpacked_bytes: int


def pack_archive(directory: Path) -> bytes:
    """The adapter files of `directory` as the .tar.gz that `unpack_archive` (the admin upload) takes."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in sorted(ALLOWED_FILES):
            if (directory / name).is_file():
                tar.add(directory / name, arcname=name)
    return buf.getvalue()


def _member_name(raw: str) -> str:
    """The member's file name once a single top-level folder is allowed for; refuses unsafe paths."""
    if not raw or raw.startswith(("/", "\\")) or "\\" in raw or ":" in raw.split("/")[0]:
        raise InvalidAdapter(f"archive member {shown(raw)} has an absolute or unsafe path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidAdapter(f"archive member {shown(raw)} points outside the archive (..)")
    if len(parts) > 2:
        raise InvalidAdapter(f"archive member {shown(raw)} is nested too deep "
                             "(files must be at the top or in one folder)")
    return "/".join(parts)


class _Extractor:
    """Checks members one by one as the reader meets them and writes the adapter's files, counting real bytes."""

    def __init__(self, dest: Path, limits: Limits):
        self.dest, self.limits = dest, limits
        self.members, self.declared, self.written, self.seen = 0, 0, 0, set()
        self.duplicate: InvalidAdapter | None = None  # raised at the end, so the member limit is checked first

    def member(self, raw: str, kind: str, size: int) -> str | None:
        """Checks one member; returns the file to write it to, or None for one to skip (a folder)."""
        self.members += 1
        if self.members > self.limits.members:
            raise InvalidAdapter(f"archive has more than {self.limits.members} members; "
                                 f"at most {self.limits.members} are allowed")
        self.declared += size
        if size < 0 or self.declared > self.limits.unpacked_bytes:
            raise InvalidAdapter(f"archive unpacks to more than {self.limits.unpacked_bytes} bytes")
        name = _member_name(raw)
        if kind in ("link", "special"):
            raise InvalidAdapter(f"archive member {shown(raw)} is a {kind}; only regular files are accepted")
        if kind == "dir":
            return None
        base = name.rsplit("/", 1)[-1]
        if base.endswith(_PICKLE_SUFFIXES):
            raise InvalidAdapter(f"archive member {shown(raw)}: only safetensors weights are accepted, "
                                 "not pickled (.bin/.pt) ones")
        if base not in ALLOWED_FILES:
            raise InvalidAdapter(f"archive member {shown(raw)} is not part of a PEFT adapter "
                                 f"(allowed: {', '.join(sorted(ALLOWED_FILES))})")
        if base in self.seen:
            self.duplicate = self.duplicate or InvalidAdapter(f"archive holds {base} twice")
            return None
        self.seen.add(base)
        return base

    def finish(self) -> None:
        if self.duplicate is not None:
            raise self.duplicate

    def copy(self, src: BinaryIO, base: str, size: int | None) -> None:
        """Copies `size` bytes (or all, for None) of `src` into the file `base`; a short read is corruption."""
        left = size
        with open(self.dest / base, "xb") as out:
            while left is None or left > 0:
                block = src.read(1 << 20 if left is None else min(left, 1 << 20))
                if not block:
                    if left:
                        raise InvalidAdapter("archive is corrupt: it ends inside a member")
                    return
                self.written += len(block)
                if self.written > self.limits.unpacked_bytes:
                    raise InvalidAdapter(f"archive unpacks to more than {self.limits.unpacked_bytes} bytes")
                out.write(block)
                if left is not None:
                    left -= len(block)


def _tar_number(field: bytes) -> int:
    """A tar size field: octal text, or base-256 with the top bit set (a negative one is refused)."""
    if field[0] & 0x80:
        if field[0] != 0x80:
            raise InvalidAdapter("archive is corrupt: a member has a negative size")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise InvalidAdapter("archive is corrupt: a member has an unreadable size") from None


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"x", 8)
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = sum(struct.unpack("148b", header[:148])) + 8 * 32 + sum(struct.unpack("356b", header[156:]))
    return stored in (unsigned, signed)


def _pax(data: bytes) -> dict[str, str]:
    """Pax records, "LEN key=value\\n" each."""
    records, pos = {}, 0
    malformed = InvalidAdapter("archive is corrupt: a pax header is malformed")
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        length = data[pos:space]
        if space < 0 or not length.isdigit() or int(length) <= space - pos:
            raise malformed
        record = data[space + 1:pos + int(length)]
        if not record.endswith(b"\n") or b"=" not in record:
            raise malformed
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += int(length)
    return records


_TAR_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"5": "dir", b"1": "link", b"2": "link",
              b"3": "special", b"4": "special", b"6": "special"}


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise InvalidAdapter("archive is corrupt: it ends inside a header or member")
    return data


def _skip(stream: BinaryIO, n: int) -> None:
    while n > 0:
        n -= len(_read_exact(stream, min(n, 1 << 20)))


def _padding(size: int) -> int:
    return -size % BLOCK


def _unpack_tar(stream: BinaryIO, out: _Extractor) -> None:
    """Reads tar headers one at a time (ustar, GNU long names, pax), stopping at the first limit passed."""
    overrides: dict[str, object] = {}
    extended, first = 0, True
    while True:
        header = stream.read(BLOCK)
        if (not header and not first) or header == bytes(BLOCK):
            return  # end of archive; anything after it is never read
        if len(header) != BLOCK or not _checksum_ok(header):
            if first:
                raise InvalidAdapter("file must be a .tar.gz, .tgz or .zip archive")
            raise InvalidAdapter("archive is corrupt: a header is damaged")
        first = False
        kind, size = header[156:157], _tar_number(header[124:136])
        if kind in (b"L", b"K", b"x", b"g"):
            extended += 1
            if extended > MAX_EXTENDED_RUN or size > MAX_EXTENDED_HEADER:
                raise InvalidAdapter(f"archive has an extended header over {MAX_EXTENDED_HEADER} bytes "
                                     f"or more than {MAX_EXTENDED_RUN} in a row")
            data = _read_exact(stream, size + _padding(size))[:size]
            if kind == b"L":
                overrides["path"] = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                overrides.update(_pax(data))
            continue  # a GNU long link name and pax global headers change nothing an adapter uses
        extended = 0
        name = _ustar_name(header)
        name, size = str(overrides.pop("path", name)), _pax_size(overrides.pop("size", None), size)
        overrides.clear()
        _tar_member(stream, out, name, _TAR_KINDS.get(kind, "special"), size)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0" and header[345]:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_size(value: object, size: int) -> int:
    if value is None:
        return size
    if not str(value).isascii() or not str(value).isdigit():
        raise InvalidAdapter("archive is corrupt: a pax size is not a number")
    return int(str(value)[:20])


def _tar_member(stream: BinaryIO, out: _Extractor, name: str, kind: str, size: int) -> None:
    target = out.member(name, kind, size)
    if target is None:
        _skip(stream, size + _padding(size))
        return
    out.copy(stream, target, size)
    _skip(stream, _padding(size))


def _zip_directory_ok(archive: BinaryIO, limits: Limits) -> None:
    """Sizes the central directory from the end record before zipfile reads it, and refuses zip64."""
    archive.seek(0, io.SEEK_END)
    size = archive.tell()
    tail_start = max(0, size - (22 + 65535))
    archive.seek(tail_start)
    tail = archive.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise InvalidAdapter("archive is corrupt: the zip end record is missing")
    _, _, _, _, entries, cd_size, _, _ = struct.unpack("<4s4H2LH", tail[at:at + 22])
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF or (at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07"):
        raise InvalidAdapter("zip64 archives are not accepted; use .tar.gz")
    if entries > limits.members:
        raise InvalidAdapter(f"archive has {entries} members; at most {limits.members} are allowed")
    if cd_size > limits.members * MAX_CENTRAL_ENTRY:
        raise InvalidAdapter(f"archive's zip directory is larger than {limits.members * MAX_CENTRAL_ENTRY} bytes")
    archive.seek(0)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if not info.filename:  # zipfile's is_dir() fails on it; refused with a message as a member name
        return "file"
    # Zips made off Unix carry no file type bits; those entries are plain files.
    if info.is_dir():
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "special" if stat.S_IFMT(mode) and not stat.S_ISREG(mode) else "file"


def _unpack_zip(archive: BinaryIO, out: _Extractor) -> None:
    _zip_directory_ok(archive, out.limits)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        targets = []
        for info in infos:
            target = out.member(info.filename, _zip_kind(info), info.file_size)
            if target is None:
                continue
            if info.flag_bits & 0x1:
                raise InvalidAdapter(f"archive member {shown(info.filename)} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise InvalidAdapter(f"archive member {shown(info.filename)} uses compression method "
                                     f"{info.compress_type}; only stored and deflated are accepted")
            targets.append((info, target))
        for info, target in targets:
            with zf.open(info) as src:
                out.copy(src, target, None)  # a zip's declared sizes can lie: count what inflates


def _decompressed(archive: BinaryIO) -> BinaryIO:
    magic = archive.read(6)
    archive.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=archive)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(archive)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(archive)
    return archive


def unpack_archive(archive: BinaryIO, dest: Path, max_members: int, max_bytes: int) -> None:
    """Extracts a .tar.gz/.tgz/.zip adapter archive (a seekable binary file) into `dest`, refusing anything unsafe.

    On a refusal `dest` may hold part of the files; the caller removes it."""
    out = _Extractor(Path(dest), Limits(max_members, max_bytes))
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, out)
        else:
            archive.seek(0)
            _unpack_tar(_decompressed(archive), out)
        out.finish()
    except (zipfile.BadZipFile, zlib.error, EOFError, gzip.BadGzipFile, lzma.LZMAError, OSError,
            RuntimeError, NotImplementedError, ValueError, struct.error) as e:
        if isinstance(e, InvalidAdapter):
            raise
        raise InvalidAdapter(f"archive is corrupt: {type(e).__name__}") from None


async def unpack_isolated(archive: BinaryIO, dest: Path, limits: Limits, timeout: float, memory: int) -> None:
    """Runs `unpack_archive` in a child process with `memory` bytes of headroom and `timeout` seconds."""
    archive.seek(0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.registry.archive", str(dest), str(limits.members), str(limits.unpacked_bytes),
        str(memory), stdin=archive, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        raise InvalidAdapter(f"archive took longer than {timeout:g} s to unpack") from None
    finally:
        if proc.returncode is None:  # timed out, or the upload was cancelled
            proc.kill()
            await proc.wait()
    if proc.returncode == REFUSED:
        raise InvalidAdapter(output.decode(errors="replace").strip()[:500])
    if proc.returncode == OUT_OF_MEMORY:
        raise InvalidAdapter("archive needs more memory to unpack than is allowed")
    if proc.returncode != OK:
        raise InvalidAdapter(f"archive could not be unpacked (exit code {proc.returncode})")


def limit_memory(headroom: int) -> None:
    """Caps this process's address space at what it uses now plus `headroom` bytes."""
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom, used + headroom))


def main(argv: list[str]) -> int:
    """`python -m server.registry.archive DEST MAX_MEMBERS MAX_BYTES MEMORY` with the archive on standard input."""
    dest, members, max_bytes, memory = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    limit_memory(memory)
    try:
        unpack_archive(sys.stdin.buffer, dest, members, max_bytes)
    except InvalidAdapter as e:
        print(str(e)[:500], flush=True)
        return REFUSED
    except MemoryError:
        return OUT_OF_MEMORY
    return OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
