"""Adapters from the Hugging Face Hub, pinned: the revision asked for is resolved to its commit once, and only the
adapter's two files are downloaded at that commit (safetensors only: a pickled `adapter_model.bin` is refused)."""

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from server.registry.validation import CONFIG_FILE, WEIGHTS_FILE

SCHEME = "hf://"
PICKLED_WEIGHTS = "adapter_model.bin"


class HubError(ValueError):
    """The Hub source cannot be registered; the message says why in one line, never with a token."""

    def __init__(self, message: str, too_large: bool = False, not_allowed: bool = False):
        super().__init__(message)
        self.too_large, self.not_allowed = too_large, not_allowed


@dataclass(frozen=True)
class HubSource:
    """hf://ORG/REPO, the revision asked for (branch, tag, commit or refs/pr/N) and the adapter's folder in it."""

    repo: str
    revision: str = "main"
    subfolder: str | None = None

    @classmethod
    def parse(cls, url: str, revision: str | None = None, subfolder: str | None = None) -> "HubSource":
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo = url.removeprefix(SCHEME).strip("/")
        try:
            validate_repo_id(repo)
        except HFValidationError as e:
            raise HubError(f"{url}: not a Hub repository ({str(e).splitlines()[0]})") from None
        if "/" not in repo:
            raise HubError(f"{url}: name the repository as hf://ORG/REPO")
        folder = (subfolder or "").strip("/") or None
        if folder and any(part in ("", ".", "..") for part in folder.split("/")):
            raise HubError(f"--subfolder {subfolder!r}: a relative path inside the repository, without . or ..")
        return cls(repo, revision or "main", folder)

    def path(self, fname: str) -> str:
        return f"{self.subfolder}/{fname}" if self.subfolder else fname

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo}@{self.revision}" + (f" ({self.subfolder})" if self.subfolder else "")


def allowed(repo: str, patterns: list[str]) -> bool:
    """Whether a tenant's allow-list (ORG/REPO or patterns such as ORG/*) names the repository."""
    return any(fnmatch.fnmatchcase(repo, pattern) for pattern in patterns)


def fetch(source: HubSource, dest: Path, *, token: str | bool | None, max_bytes: int,
          allow: list[str] | None = None) -> tuple[Path, dict]:
    """Downloads the adapter at the commit its revision names now into `dest`; returns the folder holding its files
    and the manifest's record of where they came from. `token`: False for none at all, None for HF_TOKEN's;
    `allow`: patterns the repository's own name must match too (a renamed repository answers under a new one)."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    try:
        api = HfApi(endpoint=constants.ENDPOINT, token=token)  # HF_ENDPOINT, as read when huggingface_hub loaded
        info = api.model_info(source.repo, revision=source.revision)
        if allow is not None and info.id and not allowed(info.id, allow):
            raise HubError(f"{source}: the repository answers as {info.id}, which the allow-list does not name",
                           not_allowed=True)
        _check_files(source, {s.rfilename for s in info.siblings or []}, info.sha)
        wanted = [source.path(f) for f in (CONFIG_FILE, WEIGHTS_FILE)]
        _check_size(source, info.sha, [p.size for p in api.get_paths_info(source.repo, wanted, revision=info.sha)],
                    max_bytes)
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            hf_hub_download(source.repo, fname, subfolder=source.subfolder, revision=info.sha, local_dir=dest,
                            token=token, endpoint=api.endpoint)
    except HubError:
        raise
    except Exception as e:  # huggingface_hub's HTTP, validation and connection errors alike
        raise HubError(f"{source}: {_reason(e)}") from None
    record = {"repo": source.repo, "revision": source.revision, "sha": info.sha, "subfolder": source.subfolder,
              "answered_as": info.id}
    return dest / (source.subfolder or ""), record


def _check_files(source: HubSource, names: set[str], sha: str) -> None:
    at = f"{SCHEME}{source.repo}@{sha[:12]}"
    if source.path(WEIGHTS_FILE) not in names:
        if source.path(PICKLED_WEIGHTS) in names:
            raise HubError(f"{at}: only {source.path(PICKLED_WEIGHTS)} (a pickle, which can run code when loaded); "
                           f"publish {WEIGHTS_FILE}")
        raise HubError(f"{at}: no {source.path(WEIGHTS_FILE)} (use --subfolder for an adapter in a folder)")
    if source.path(CONFIG_FILE) not in names:
        raise HubError(f"{at}: no {source.path(CONFIG_FILE)}")


def _check_size(source: HubSource, sha: str, sizes: list[int | None], max_bytes: int) -> None:
    """Refuses before downloading an adapter larger than an upload may unpack to, or of a size the Hub won't tell."""
    if None in sizes:
        raise HubError(f"{SCHEME}{source.repo}@{sha[:12]}: the Hub did not tell the adapter's file sizes")
    if sum(sizes) > max_bytes:
        raise HubError(f"{SCHEME}{source.repo}@{sha[:12]}: the adapter's files are {sum(sizes)} bytes, more than "
                       f"the {max_bytes} allowed", too_large=True)


def _reason(error: Exception) -> str:
    """huggingface_hub's error in one line, named by its kind."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kinds = [(GatedRepoError, "gated repository: a token with access is needed"),
             (RepositoryNotFoundError, "repository not found, or private and the token (if any) has no access"),
             (RevisionNotFoundError, "no such revision"), (EntryNotFoundError, "file not found")]
    for kind, reason in kinds:
        if isinstance(error, kind):
            return reason
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {first[:300]}"
