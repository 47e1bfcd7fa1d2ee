"""Generated hostile archives: each is refused or accepted within 2 s and 100 MB, in the gateway's own child process.

Tar structures are written header by header, so sizes, types, names and counts can be anything a file can hold;
zips are made well-formed and then have their header fields overwritten."""

import gzip
import io
import subprocess
import sys
import time
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.registry.archive import OK, REFUSED
from tests.helpers.archives import negative_base256, octal, tar_header

MEMORY = 100 << 20
MAX_BYTES = 16 << 20

names = st.one_of(
    st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "README.md", "d/README.md", "../x",
                     "/etc/passwd", "a/b/c", "", "run.sh", "x.bin"]),
    st.text(max_size=300),
    st.integers(100, 100_000).map(lambda n: "n" * n),
)
size_fields = st.one_of(
    st.integers(0, 4096).map(octal),
    st.integers(1, 2**40).map(negative_base256),
    st.integers(0, 2**62).map(lambda n: b"\x80" + n.to_bytes(11, "big")),
    st.sampled_from([b"77777777777\0", b"zzzz", b"", b"-1"]),
)
kinds = st.sampled_from([b"0", b"\0", b"1", b"2", b"3", b"5", b"6", b"7", b"L", b"K", b"x", b"g", b"S", b"V"])


@st.composite
def tar_archives(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 40))):
        name = draw(names).encode("utf-8", "replace")
        kind, size_field = draw(kinds), draw(size_fields)
        out += tar_header(name, size_field, kind)
        body = draw(st.one_of(st.binary(max_size=2048), st.integers(0, 200_000).map(bytes)))
        if kind == b"x" and draw(st.booleans()):
            body = draw(st.sampled_from([b"30 path=adapter_config.json\n", b"9999999 size=1\n", b"1 x\n",
                                         b"20 size=99999999999\n", b"18 path=" + b"../" * 4 + b"\n"]))
        out += body + bytes(-len(body) % 512)
    if draw(st.booleans()):
        out += bytes(1024)
    return gzip.compress(out, 1) if draw(st.booleans()) else out


@st.composite
def zip_archives(draw) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for _ in range(draw(st.integers(0, 20))):
            name = draw(names.filter(lambda n: len(n.encode()) < 60_000 and "\0" not in n)) or "x"
            zf.writestr(name, draw(st.one_of(st.binary(max_size=512), st.integers(0, 1 << 22).map(bytes))))
    raw = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 6))):
        sig = draw(st.sampled_from([b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"]))
        at = raw.rfind(sig)
        if at < 0:
            continue
        offset = draw(st.integers(4, 40))
        width = draw(st.sampled_from([1, 2, 4]))
        value = draw(st.integers(0, 256**width - 1))
        raw[at + offset:at + offset + width] = value.to_bytes(width, "little")
    return bytes(raw)


def run_child(archive: bytes, tmp_path) -> tuple[int, float, str]:
    dest = tmp_path / f"out{time.monotonic_ns()}"
    dest.mkdir()
    src = tmp_path / "archive"
    src.write_bytes(archive)
    start = time.monotonic()
    with open(src, "rb") as stdin:
        r = subprocess.run([sys.executable, "-m", "server.registry.archive", str(dest), "16", str(MAX_BYTES), str(MEMORY)],
                           stdin=stdin, capture_output=True, text=True, timeout=30)
    return r.returncode, time.monotonic() - start, r.stdout + r.stderr


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("archives", [tar_archives, zip_archives], ids=["tar", "zip"])
def test_generated_archives_are_answered_in_bounded_time_and_memory(archives, tmp_path_factory):
    @FUZZ
    @given(archive=archives())
    def answered(archive: bytes) -> None:
        code, elapsed, output = run_child(archive, tmp_path_factory.mktemp("archive"))
        assert code in (OK, REFUSED), output
        assert elapsed < 2, elapsed

    answered()


def test_the_memory_limit_is_enforced(tmp_path):
    """The limit the fuzz relies on is real: a child that allocates past it fails rather than growing."""
    r = subprocess.run([sys.executable, "-c", "from server.registry.archive import limit_memory; limit_memory(100 << 20); "
                        "b = bytearray(200 << 20)"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "MemoryError" in r.stderr
