"""An offline Hugging Face Hub for tests: olah serving local git repositories, optionally behind a small front."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from filelock import FileLock

from tests.helpers.polling import wait_until

OLAH_VENV = Path(__file__).parents[2] / ".venv-olah"
OLAH_VERSION = "0.5.4"
# A fixed identity, and no user or system git config, so nothing depends on the machine's git setup.
GIT_ENV = {"GIT_AUTHOR_NAME": "hub", "GIT_AUTHOR_EMAIL": "hub@test", "GIT_COMMITTER_NAME": "hub",
           "GIT_COMMITTER_EMAIL": "hub@test", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
# Headers that describe one hop, not the message: the front sets its own.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
REPO_PATH = re.compile(r"^/(?:api/)?(?:models/)?([^/?]+)/([^/?]+)")
INFO_PATH = re.compile(r"^/api/models/([^/?]+)/([^/?]+)(\?.*)?$")
# PREFIX (ORG, REPO) REV REST QUERY of the routes that name a revision.
REVISION_PATH = re.compile(
    r"^(/(?:api/)?(?:models/)?([^/?]+)/([^/?]+)/(?:revision|resolve|tree|paths-info)/)([^/?]+)(/[^?]*)?(\?.*)?$")


def olah_python() -> Path:
    """The python of olah's own venv (its pins conflict with the project's), created on first use."""
    python = OLAH_VENV / "bin" / "python"
    marker = OLAH_VENV / f".olah-{OLAH_VERSION}"
    if marker.exists():
        return python
    OLAH_VENV.mkdir(exist_ok=True)
    with FileLock(str(OLAH_VENV / ".lock")):
        if not marker.exists():
            subprocess.run([shutil.which("python3.11") or "python3", "-m", "venv", str(OLAH_VENV)],
                           check=True, capture_output=True)
            pip = subprocess.run([str(python), "-m", "pip", "install", "-q", f"olah=={OLAH_VERSION}"],
                                 capture_output=True, text=True)
            if pip.returncode:
                raise RuntimeError(f"installing olah failed:\n{pip.stdout}{pip.stderr}")
            marker.touch()
    return python


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HubMirror:
    """Git repositories at MIRRORS/models/ORG/REPO served as a Hub by olah (offline), at `endpoint`."""

    def __init__(self, root: Path, private: dict[str, str] | None = None, faithful: bool = False) -> None:
        """`private`: "org/repo" -> the token opening it; `faithful`: the front fixes olah's revision gaps."""
        self.root = root
        self.mirrors = root / "mirrors"
        self.private = dict(private or {})
        self.faithful = faithful
        self.olah_endpoint = ""
        self.endpoint = ""
        self._olah: subprocess.Popen | None = None
        self._front: ThreadingHTTPServer | None = None

    def path(self, org: str, repo: str) -> Path:
        """The bare git repository of org/repo."""
        return self.mirrors / "models" / org / repo

    def git(self, org: str, repo: str, *args: str, stdin: bytes | None = None) -> str:
        """Runs git in org/repo's repository; its stdout."""
        out = subprocess.run(["git", "-C", str(self.path(org, repo)), *args], input=stdin, check=True,
                             capture_output=True, env={**os.environ, **GIT_ENV})
        return out.stdout.decode().strip()

    def make_repo(self, org: str, repo: str, files: dict[str, bytes], message: str = "initial") -> str:
        """Creates org/repo with branch main holding `files`; the commit's SHA."""
        self.path(org, repo).mkdir(parents=True)
        self.git(org, repo, "init", "-q", "--bare", "-b", "main")
        return self._commit(org, repo, "refs/heads/main", None, files, message)

    def commit(self, org: str, repo: str, files: dict[str, bytes | None], branch: str = "main",
               message: str = "update") -> str:
        """Commits `files` (None deletes one) on `branch`, creating it from main; the SHA."""
        ref = f"refs/heads/{branch}"
        parent = self._sha(org, repo, ref) or self._sha(org, repo, "refs/heads/main")
        return self._commit(org, repo, ref, parent, files, message)

    def tag(self, org: str, repo: str, name: str, sha: str) -> None:
        """Points tag `name` at `sha`."""
        self.git(org, repo, "update-ref", f"refs/tags/{name}", sha)

    def pr_ref(self, org: str, repo: str, n: int, files: dict[str, bytes | None]) -> str:
        """Creates refs/pr/N: a commit on top of main that main does not contain; its SHA."""
        parent = self._sha(org, repo, "refs/heads/main")
        return self._commit(org, repo, f"refs/pr/{n}", parent, files, f"pull request {n}")

    def resolve(self, org: str, repo: str, revision: str) -> str | None:
        """The commit SHA `revision` (branch, tag, SHA, refs/pr/N) names, or None."""
        return self._sha(org, repo, f"{revision}^{{commit}}")

    def has_file(self, org: str, repo: str, sha: str, path: str) -> bool:
        """Whether `path` is a file at commit `sha`."""
        try:
            return self.git(org, repo, "cat-file", "-t", f"{sha}:{path}") == "blob"
        except subprocess.CalledProcessError:
            return False

    def _sha(self, org: str, repo: str, ref: str) -> str | None:
        try:
            return self.git(org, repo, "rev-parse", "--verify", "-q", ref)
        except subprocess.CalledProcessError:
            return None

    def _commit(self, org: str, repo: str, ref: str, parent: str | None, files: dict[str, bytes | None],
                message: str) -> str:
        # fast-import writes a commit of arbitrary bytes to any ref in one process, without a work tree.
        msg = message.encode()
        stream = [f"commit {ref}\ncommitter hub <hub@test> {int(time.time())} +0000\n".encode(),
                  b"data %d\n%s\n" % (len(msg), msg)]
        if parent:
            stream.append(f"from {parent}\n".encode())
        for name, data in files.items():
            stream.append(f"D {name}\n".encode() if data is None
                          else b"M 100644 inline %s\ndata %d\n%s\n" % (name.encode(), len(data), data))
        self.git(org, repo, "fast-import", "--quiet", "--force", stdin=b"".join(stream) + b"\n")
        return self.git(org, repo, "rev-parse", ref)

    def start(self, timeout: float = 60.0) -> None:
        """Starts olah (and the front when `private` or `faithful` is set) and waits until it answers."""
        self.mirrors.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = self.root / "olah.toml"
        # Offline: olah never contacts huggingface.co; ttl 0 so no repo metadata is reused between requests.
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\nmetadata-cache-ttl = 0\n'
            f'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\n\n[accessibility]\noffline = true\n')
        with (self.root / "olah.log").open("wb") as log:
            proc = self._olah = subprocess.Popen(
                [str(olah_python()), "-m", "olah.server", "-c", str(config),
                 "--log-path", str(self.root / "olah-logs")],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.olah_endpoint = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.poll() is not None or _answers(self.olah_endpoint), timeout)
        if not _answers(self.olah_endpoint):
            self.stop()
            raise RuntimeError(f"olah did not answer:\n{(self.root / 'olah.log').read_text()[-3000:]}")
        self.endpoint = self.olah_endpoint
        if self.private or self.faithful:
            self._front = ThreadingHTTPServer(("127.0.0.1", 0), _front_handler(port, self))
            self._front.daemon_threads = True
            threading.Thread(target=self._front.serve_forever, daemon=True).start()
            self.endpoint = f"http://127.0.0.1:{self._front.server_address[1]}"

    def stop(self) -> None:
        """Stops the front and olah's whole process group."""
        if self._front:
            self._front.shutdown()
            self._front.server_close()
            self._front = None
        if self._olah and self._olah.poll() is None:
            os.killpg(self._olah.pid, signal.SIGTERM)
            try:
                self._olah.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._olah.pid, signal.SIGKILL)
                self._olah.wait()
        self._olah = None

    def __enter__(self) -> "HubMirror":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(endpoint: str) -> bool:
    # Any HTTP answer will do: olah's "/" page fails under the Starlette it installs, and the rest is 404 or 401.
    try:
        urllib.request.urlopen(endpoint + "/api/models/-/-/refs", timeout=2).close()
    except urllib.error.HTTPError:
        pass
    except OSError:
        return False
    return True


def _front_handler(olah_port: int, hub: HubMirror) -> type[BaseHTTPRequestHandler]:
    """A handler forwarding every request to olah, answering first what olah cannot (see HubMirror)."""

    class Front(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, message: str, code: str | None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response_only(status)
            for name, value in [("X-Error-Message", message), ("X-Error-Code", code),
                                ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]:
                if value:
                    self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _refusal(self) -> tuple[int, str, str | None] | None:
            match = REPO_PATH.match(self.path)
            token = hub.private.get(f"{match[1]}/{match[2]}") if match else None
            auth = self.headers.get("Authorization")
            if token is None or auth == f"Bearer {token}":
                return None
            # The Hub's two answers: no credentials reads as a missing repo, wrong ones as bad credentials.
            if auth is None:
                return 401, "Invalid username or password.", "RepoNotFound"
            return 401, "Invalid credentials in Authorization header", None

        def _revision_error(self) -> tuple[int, str, str | None] | None:
            # olah (offline) answers model_info without a revision from its cache only, so never for a mirror.
            if match := INFO_PATH.match(self.path):
                self.path = f"/api/models/{match[1]}/{match[2]}/revision/main{match[3] or ''}"
            match = REVISION_PATH.match(self.path)
            if not match or not hub.path(match[2], match[3]).exists():
                return None
            revision = urllib.parse.unquote(match[4])
            sha = hub.resolve(match[2], match[3], revision)
            # olah answers a missing revision as a missing repo, and an unknown SHA with a 500.
            if sha is None:
                return 404, f"Invalid rev id: {revision}", "RevisionNotFound"
            # olah's routes take no slash in a revision, and Starlette decodes the %2F of refs/pr/N.
            if "/" in revision:
                self.path = f"{match[1]}{sha}{match[5] or ''}{match[6] or ''}"
            path = urllib.parse.unquote(match[5] or "").lstrip("/")
            if "/resolve/" in match[1] and not hub.has_file(match[2], match[3], sha, path):
                return 404, f"{path} does not exist on {revision}", "EntryNotFound"
            return None

        def _forward(self) -> None:
            error = self._refusal() or (self._revision_error() if hub.faithful else None)
            if error:
                return self._answer(*error)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"host"}}
            upstream = http.client.HTTPConnection("127.0.0.1", olah_port, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                has_body = self.command != "HEAD" and response.status >= 200 and response.status not in (204, 304)
                chunked = has_body and response.getheader("Content-Length") is None
                self.send_response_only(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_HEADERS:
                        self.send_header(name, value)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while has_body and (chunk := response.read1(1 << 16)):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            finally:
                upstream.close()

        do_GET = do_HEAD = do_POST = _forward

    return Front
