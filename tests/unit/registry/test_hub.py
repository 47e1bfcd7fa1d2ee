"""Adapters from the Hub, pinned, against a real Hub server: olah (a self-hosted Hub mirror) serving local git
repositories offline, behind the helper's front for private repositories and refs/pr/N (see tests/helpers/hub.py)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from loadtest.servers import LOADER
from loadtest.stub_engine import StubEngine
from server.core.digest import sha256_file
from server.store.documents import FileDocument
from server.tenancy.keys import KEYS_FILE, KeyStore
from tests.helpers.hub import HubMirror
from tests.helpers.in_process import gateway_over

SECRET = "hf_private_reader_token"
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubMirror(tmp_path_factory.mktemp("hub"), private={"acme-org/secret": SECRET}, faithful=True) as mirror:
        yield mirror


@pytest.fixture
def endpoint(hub, monkeypatch) -> str:
    """huggingface_hub in this process and the CLI's pointed at the mirror, with no token of the machine's."""
    from huggingface_hub import constants

    # What HF_ENDPOINT sets when huggingface_hub is imported, set again for this process, which imported it already.
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(hub.root / "hf-home"))
    return hub.endpoint


def files_of(directory: Path, folder: str = "") -> dict[str, bytes]:
    return {f"{folder}{name}": (directory / name).read_bytes() for name in FILES}


def cli(base, tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOADER, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LORAPLEX_BASE_MODEL": str(base.path),
                               "LORAPLEX_REGISTRY": str(tmp_path / "reg"),
                               "LORAPLEX_STATE_DIR": str(tmp_path / "state"), **env})


def manifest(tmp_path, name: str, version: int) -> dict:
    return json.loads((tmp_path / "reg" / name / str(version) / "manifest.json").read_text())


def test_a_revision_is_pinned_to_its_commit_and_a_moved_branch_changes_nothing(hub, endpoint, base, adapter_factory,
                                                                                tmp_path):
    first, second = adapter_factory(seed=1), adapter_factory(seed=2)
    old = hub.make_repo("org-a", "bot", {"README.md": b"x", **files_of(first, "lora/")})
    r = cli(base, tmp_path, "adapters", "add", "bot", "hf://org-a/bot", "--subfolder", "lora", "--tenant", "acme")
    assert r.returncode == 0 and f"registered bot@1 (latest) rank 4 from hf://org-a/bot at commit {old}" in r.stdout, \
        r.stderr
    assert manifest(tmp_path, "bot", 1)["hub"] == {"repo": "org-a/bot", "revision": "main", "sha": old,
                                                   "subfolder": "lora", "answered_as": "org-a/bot"}
    new = hub.commit("org-a", "bot", files_of(second, "lora/"))
    weights = tmp_path / "reg" / "bot" / "1" / "adapter_model.safetensors"
    assert weights.read_bytes() == (first / "adapter_model.safetensors").read_bytes()
    assert cli(base, tmp_path, "adapters", "add", "bot", "hf://org-a/bot", "--subfolder", "lora",
               "--tenant", "acme").returncode == 0
    assert manifest(tmp_path, "bot", 2)["hub"]["sha"] == new
    assert sha256_file(tmp_path / "reg" / "bot" / "2" / "adapter_model.safetensors") == sha256_file(
        second / "adapter_model.safetensors")
    assert weights.read_bytes() == (first / "adapter_model.safetensors").read_bytes(), "version 1 is immutable"


def test_tags_commits_and_pull_request_refs_name_their_commit(hub, endpoint, base, adapter_factory, tmp_path):
    shas = {"main": hub.make_repo("org-b", "bot", files_of(adapter_factory(seed=1)))}
    shas["v1"] = shas["main"]
    hub.tag("org-b", "bot", "v1", shas["v1"])
    shas["refs/pr/1"] = hub.pr_ref("org-b", "bot", 1, files_of(adapter_factory(seed=3)))
    shas[shas["main"]] = shas["main"]
    hub.commit("org-b", "bot", files_of(adapter_factory(seed=2)))
    for version, (revision, sha) in enumerate(shas.items(), start=1):
        if revision == "main":
            continue
        r = cli(base, tmp_path, "adapters", "add", "bot", "hf://org-b/bot", "--revision", revision)
        assert r.returncode == 0, (revision, r.stderr)
    recorded = [manifest(tmp_path, "bot", v)["hub"] for v in (1, 2, 3)]
    assert [(h["revision"], h["sha"]) for h in recorded] == [(rev, sha) for rev, sha in shas.items() if rev != "main"]


@pytest.mark.parametrize("files, args, words", [
    ({"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"}, (), "only adapter_model.bin (a pickle"),
    ({"README.md": b"x"}, (), "no adapter_model.safetensors (use --subfolder"),
    (None, ("--revision", "nope"), "no such revision"),
    (None, ("--subfolder", "../x"), "--subfolder '../x': a relative path"),
])
def test_bad_sources_are_refused_in_one_line_and_register_nothing(hub, endpoint, base, adapter_factory, tmp_path,
                                                                  files, args, words):
    repo = f"r{abs(hash((words, str(tmp_path)))) % 10**8}"
    hub.make_repo("org-c", repo, files or files_of(adapter_factory()))
    r = cli(base, tmp_path, "adapters", "add", "bot", f"hf://org-c/{repo}", *args)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "reg" / "bot" / "1").exists()


def test_the_upload_validation_runs_on_hub_files(hub, endpoint, base, adapter_factory, tmp_path):
    hub.make_repo("org-d", "wide", files_of(adapter_factory(rank=16)))
    r = cli(base, tmp_path, "adapters", "add", "wide", "hf://org-d/wide", LORAPLEX_MAX_LORA_RANK="8")
    assert r.returncode == 1 and "LoRA rank 16 exceeds the engine's limit of 8" in r.stderr


def test_a_private_repository_needs_a_token_and_the_cli_may_use_hf_token(hub, endpoint, base, adapter_factory,
                                                                         tmp_path):
    hub.make_repo("acme-org", "secret", files_of(adapter_factory()))
    r = cli(base, tmp_path, "adapters", "add", "s", "hf://acme-org/secret")
    assert r.returncode == 1 and "repository not found, or private" in r.stderr
    r = cli(base, tmp_path, "adapters", "add", "s", "hf://acme-org/secret", HF_TOKEN=SECRET)
    assert r.returncode == 0, r.stderr
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert stored == [], "the token is used, never stored"


async def test_admin_upload_from_the_hub_lends_a_tenant_admin_no_access_of_the_gateways(
        hub, endpoint, base, adapter_factory, tmp_path, monkeypatch):
    hub.make_repo("acme-org", "public-bot", files_of(adapter_factory(seed=1)))
    if not (hub.path("acme-org", "secret")).exists():
        hub.make_repo("acme-org", "secret", files_of(adapter_factory(seed=2)))
    hub.make_repo("other-org", "bot", files_of(adapter_factory(seed=3)))
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the gateway's own access: operators may use it, tenant-admins never
    store = KeyStore(FileDocument(tmp_path / "state" / KEYS_FILE))
    acme, operator = store.create("acme", "tenant-admin")[1], store.create(None, "admin", "ops")[1]

    async def upload(key: str, name: str, source: str, **headers: str):
        return await client.post("/admin/adapters", data={"name": name, "source": source},
                                 headers={"Authorization": f"Bearer {key}", **headers})

    engine = await StubEngine().start()
    async with gateway_over([engine.url], str(base.path), tmp_path, hub_allow={"acme": ["acme-org/*"]}) as client:
        ok = await upload(acme, "pub", "hf://acme-org/public-bot")
        assert ok.status_code == 201 and ok.json()["hub"]["repo"] == "acme-org/public-bot", ok.text
        denied = await upload(acme, "other", "hf://other-org/bot")
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "source_not_allowed"
        no_token = await upload(acme, "sec", "hf://acme-org/secret")
        assert no_token.status_code == 400 and "private" in no_token.json()["error"]["message"], no_token.text
        own = await upload(acme, "sec", "hf://acme-org/secret", **{"X-Hub-Token": SECRET})
        assert own.status_code == 201 and own.json()["version"] == 1
        assert (await upload(operator, "ops-bot", "hf://other-org/bot?")).status_code == 400
        ops = await client.post("/admin/adapters", data={"name": "ops", "source": "hf://acme-org/secret",
                                                         "tenant": "globex"},
                                headers={"Authorization": f"Bearer {operator}"})
        assert ops.status_code == 201, ops.text
        both = await client.post("/admin/adapters", data={"name": "x", "source": "hf://acme-org/public-bot"},
                                 files={"file": ("a.tar.gz", b"x")}, headers={"Authorization": f"Bearer {acme}"})
        assert both.status_code == 400 and both.json()["error"]["param"] == "file"
    await engine.stop()
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert stored == [], "the token is used, never stored or logged"
