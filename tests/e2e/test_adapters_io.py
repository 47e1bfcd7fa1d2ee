"""Adapters out of the registry and composed, on the session's engine: a version merged into the base and served as
the base answers as the adapter did; a composition named per request answers as PEFT's own `cat` combination."""

import io
import tarfile

import httpx
from safetensors.numpy import load, load_file

from loadtest.adapters import AdapterFactory
from loadtest.servers import Gateway
from tests.helpers.calls import CHATS, MAX_TOKENS, PROMPTS, chat, complete, same, streamed_text

RECIPE = [{"name": "alpha@1", "weight": 0.7}, {"name": "beta@1", "weight": 0.3}]


def test_a_merged_version_served_as_the_base_answers_as_the_adapter_did(server, client, admin, base_model, tmp_path):
    # A quiet adapter, as trained ones are, with a fixed seed: the session's loud random ones can amplify float32
    # rounding past the default bound on some seeds.
    source = AdapterFactory(base_model, 8, scale=0.1).write(tmp_path / "to-merge", 11)
    assert server.cli("adapters", "add", "to-merge", str(source)).returncode == 0
    merged = tmp_path / "merged"
    r = server.cli("adapters", "merge", "to-merge@1", "--out", str(merged), timeout=600)
    assert r.returncode == 0 and "largest logit difference" in r.stdout and "(bound 0.0001, float32)" in r.stdout, \
        r.stdout + r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= {
        p.name for p in merged.iterdir()}
    card = (merged / "README.md").read_text()
    assert "to-merge, version 1" in card and server.cli("registry", "check").returncode == 0
    expected = ([complete(client, p, adapter="to-merge@1")["choices"][0] for p in PROMPTS]
                + [chat(client, m, adapter="to-merge@1")["choices"][0] for m in CHATS])

    answer = admin.post("/admin/adapters/to-merge/versions/1/merge", json={"dtype": "float32"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-tar", answer.text[:300]
    with tarfile.open(fileobj=io.BytesIO(answer.content)) as tar:
        weights = load(tar.extractfile("model.safetensors").read())
    for name, tensor in load_file(merged / "model.safetensors").items():
        assert (weights[name] == tensor).all(), name

    env = {**server.env, "LORAPLEX_PORT": "", "LORAPLEX_BASE_MODEL": str(merged),
           "LORAPLEX_REGISTRY": str(tmp_path / "registry"), "LORAPLEX_STATE_DIR": str(tmp_path / "state")}
    gateway = Gateway(env, tmp_path / "merged.log", timeout=300)
    try:
        with httpx.Client(base_url=gateway.url, timeout=120) as merged_client:
            got = ([complete(merged_client, p)["choices"][0] for p in PROMPTS]
                   + [chat(merged_client, m)["choices"][0] for m in CHATS])
    finally:
        gateway.stop()
    for mine, theirs in zip(got, expected):
        assert mine["token_ids"] == theirs["token_ids"], (mine, theirs)


def test_a_composition_per_request_answers_as_peft_cat_combination(server, client, reference, base_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32),
                                     server.adapter_dirs["alpha"], adapter_name="alpha")
    peft.load_adapter(server.adapter_dirs["beta"], adapter_name="beta")
    peft.add_weighted_adapter(["alpha", "beta"], [0.7, 0.3], "cat", combination_type="cat")
    peft.save_pretrained(tmp_path / "peft", selected_adapters=["cat"])
    cat = tmp_path / "peft" / "cat"
    served = None
    for prompt in PROMPTS:
        answer = complete(client, prompt, adapter=RECIPE)
        served = served or answer["model"]
        assert answer["model"] == served and served.startswith("composed.")
        assert same(answer["choices"][0], reference.complete(cat, prompt, MAX_TOKENS)), prompt
    for messages in CHATS:
        assert same(chat(client, messages, adapter=RECIPE)["choices"][0], reference.chat(cat, messages, MAX_TOKENS))
    body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "adapter": RECIPE}
    text, expected = streamed_text(client, "/v1/completions", body), reference.complete(cat, PROMPTS[0], MAX_TOKENS)
    # A stream holds back a partial UTF-8 character at its end, which the reference decodes as U+FFFD.
    assert text == expected.text or expected.text.endswith("\ufffd") and expected.text.startswith(text)
