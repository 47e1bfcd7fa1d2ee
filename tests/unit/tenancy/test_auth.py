import stat

import pytest

from server.core.config import Settings
from server.store.documents import FileDocument, StoreDocument
from server.tenancy.keys import (
    ADMIN_TOKEN_CALLER,
    KEYS_FILE,
    Caller,
    KeyStore,
    admin_token,
    hash_key,
    identify,
    same_secret,
)


def tenant_of(store: KeyStore, key: str) -> str | None:
    caller = store.caller_for(key)
    return caller and caller.tenant


def test_keys_are_stored_hashed_and_resolve_to_tenants(tmp_path):
    store = KeyStore(FileDocument(tmp_path / KEYS_FILE))
    assert not store.enabled()
    key_id, key = store.create("acme")
    _, other = store.create("globex")
    raw = (tmp_path / "keys.json").read_text()
    assert key not in raw and hash_key(key) in raw
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert store.enabled() and tenant_of(store, key) == "acme" and tenant_of(store, other) == "globex"
    assert tenant_of(store, key + "x") is None
    assert [k["tenant"] for k in store.list()] == ["acme", "globex"]
    assert all("sha256" not in k for k in store.list())


def test_changes_by_another_process_are_seen(tmp_path):
    server_view, cli_view = KeyStore(FileDocument(tmp_path / KEYS_FILE)), KeyStore(FileDocument(tmp_path / KEYS_FILE))
    assert not server_view.enabled()
    key_id, key = cli_view.create("acme")
    assert tenant_of(server_view, key) == "acme"
    assert cli_view.revoke(key_id) and not cli_view.revoke(key_id)
    # Revoking the last key keeps keys required (finding 6 of the hardening review: it used to open /v1).
    assert tenant_of(server_view, key) is None and server_view.enabled()


@pytest.mark.parametrize("mode,before,after", [("auto", False, True), ("open", False, False), ("keys", True, True)])
def test_auth_mode_fails_closed_once_a_key_existed(tmp_path, mode, before, after):
    store = KeyStore(FileDocument(tmp_path / KEYS_FILE), mode)
    assert store.enabled() is before
    assert not store.revoke("key_unknown") and store.enabled() is before  # revoking nothing creates nothing
    key_id, _ = store.create("acme")
    store.revoke(key_id)
    assert store.list() == [] and store.enabled() is after
    assert KeyStore(FileDocument(tmp_path / KEYS_FILE), mode).enabled() is after  # and after a restart


def test_generated_admin_token_is_private_and_stable(tmp_path):
    settings = Settings(state_dir=tmp_path / "state")
    token = admin_token(settings)
    path = tmp_path / "state" / "admin_token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert admin_token(settings) == token
    assert admin_token(Settings(state_dir=tmp_path / "state", admin_token="configured")) == "configured"


@pytest.mark.parametrize("given,expected,ok", [("abc", "abc", True), ("abd", "abc", False), (None, "abc", False),
                                               ("", "abc", False), ("abcd", "abc", False)])
def test_same_secret(given, expected, ok):
    assert same_secret(given, expected) is ok

def test_keys_beside_an_object_store_registry_are_shared_by_every_replica(s3_url):
    """Two gateways and the CLI over one store: a key created or revoked anywhere holds on each replica at its next
    refresh (every REGISTRY_POLL), and whether keys ever existed is the store's too."""
    replicas = [KeyStore(StoreDocument(s3_url, KEYS_FILE), follow=True) for _ in range(2)]
    cli = KeyStore(StoreDocument(s3_url, KEYS_FILE))
    assert not any(r.enabled() for r in replicas)
    key_id, key = cli.create("acme")
    assert tenant_of(replicas[0], key) is None  # not before its refresh: the request path never calls the store
    for r in replicas:
        r.refresh()
        assert r.enabled() and tenant_of(r, key) == "acme"
    assert cli.revoke(key_id)
    for r in replicas:
        r.refresh()
        assert tenant_of(r, key) is None and r.enabled()


def test_keys_have_roles_and_operator_keys_have_names(tmp_path):
    store = KeyStore(FileDocument(tmp_path / KEYS_FILE))
    inference_id, inference = store.create("acme")
    tenant_admin_id, tenant_admin = store.create("acme", role="tenant-admin")
    alice_id, alice = store.create(None, role="admin", name="alice")
    assert store.caller_for(inference) == Caller(inference_id, "inference", "acme")
    assert store.caller_for(tenant_admin) == Caller(tenant_admin_id, "tenant-admin", "acme")
    assert store.caller_for(alice) == Caller(alice_id, "admin", None, "alice")
    assert store.caller_for(alice).actor == f"{alice_id} (alice)"
    assert identify("root-token", "root-token", store) is ADMIN_TOKEN_CALLER
    assert identify(alice, "root-token", store).role == "admin" and identify(None, "root-token", store) is None
    assert [(k["role"], k["name"]) for k in store.list()] == [("inference", None), ("tenant-admin", None),
                                                               ("admin", "alice")]
    assert store.revoke("alice") == alice_id and store.caller_for(alice) is None  # revoked by name


@pytest.mark.parametrize("tenant,role,name,field", [(None, "inference", None, "tenant"),
                                                    ("acme", "admin", "bob", "tenant"),
                                                    (None, "admin", None, "name"),
                                                    ("acme", "owner", None, "role")])
def test_key_creation_refuses_what_its_role_forbids(tmp_path, tenant, role, name, field):
    store = KeyStore(FileDocument(tmp_path / KEYS_FILE))
    with pytest.raises(ValueError, match=f"^{field}: "):
        store.create(tenant, role=role, name=name)
    assert store.list() == []


def test_operator_names_are_unique(tmp_path):
    store = KeyStore(FileDocument(tmp_path / KEYS_FILE))
    store.create(None, role="admin", name="alice")
    with pytest.raises(ValueError, match="^name: a key named 'alice' exists"):
        store.create(None, role="admin", name="alice")
    assert len(store.list()) == 1
