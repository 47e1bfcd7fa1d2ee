import pytest
from pydantic import ValidationError

from server.core.config import Settings


def test_defaults_and_env(monkeypatch):
    monkeypatch.setenv("LORAPLEX_ENGINE_URLS", "http://a:1/, http://b:2")
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", "org/Some-Model")
    s = Settings()
    assert s.engine_urls == ["http://a:1", "http://b:2"]
    assert s.model_name == "Some-Model" and s.host == "127.0.0.1" and s.port == 8000


def test_unsupported_rank(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_LORA_RANK", "12")
    with pytest.raises(ValidationError, match="max_lora_rank"):
        Settings()


def test_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).parents[3] / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`LORAPLEX_{n.upper()}`" not in readme]
    assert not missing
