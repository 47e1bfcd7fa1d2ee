"""Evaluation through the serving engine: agreement with the transformers reference on the demo job, evaluation on
upload with `promote: auto`, the forgetting gate on real measurements, and the rollout's evaluation gate."""

import json
from pathlib import Path

import pytest

from loadtest.adapters import ALL_LINEAR, AdapterFactory
from server.core.examples import read_rows
from server.rollout.evaluation import verdict
from server.trainer.data import in_eval
from tests.helpers import eval_reference
from tests.helpers.archives import archive
from tests.helpers.calls import upload
from tests.helpers.training import DEMO_DATA

GENERAL = DEMO_DATA / "general.txt"
GENERATIONS = 8


@pytest.fixture(scope="module")
def held_out(workdir) -> Path:
    """The demo job's held-out rows (its stable 15% split) as an eval file."""
    examples, _ = read_rows([DEMO_DATA / "support.jsonl"])
    path = workdir / "held-out.jsonl"
    rows = [{"messages": ex.conversation()} for ex in examples if in_eval(ex, 0.15)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_eval_through_the_engine_agrees_with_transformers(server, admin, trained, held_out, base_model):
    """`loraplex eval` scores trained@1 in vLLM (prompt logprobs, batched); the transformers reference scores the
    same rows one at a time: losses and perplexities within 1%, exact match and ROUGE-L within one example."""
    r = server.cli("eval", "trained@1", "--data", str(held_out), "--general", str(GENERAL), "--max-seq-len", "256",
                   "--generations", str(GENERATIONS), "--max-new-tokens", "8", "--max-forgetting", "10", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    engine = json.loads(r.stdout)
    assert engine["candidate_model"] == "trained@1" and "@" not in engine["reference_model"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples, _ = read_rows([held_out])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model),
                                      str(Path(server.env["LORAPLEX_REGISTRY"]) / "trained" / "1")).eval()
    ref = eval_reference.compare(model, AutoTokenizer.from_pretrained(base_model), examples, GENERAL.read_text(), 256,
                                 GENERATIONS, 8)
    for side in ("reference", "candidate"):
        for key in ("eval_loss", "eval_perplexity", "general_perplexity"):
            print(f"{side} {key}: engine {engine[side][key]:.4f} transformers {ref[side][key]:.4f} "
                  f"({_relative(engine[side][key], ref[side][key]):.3%})")
            assert _relative(engine[side][key], ref[side][key]) < 0.01, (side, key)
        for key in ("exact_match", "rouge_l"):
            print(f"{side} {key}: engine {engine[side][key]:.3f} transformers {ref[side][key]:.3f}")
            assert abs(engine[side][key] - ref[side][key]) <= 1 / GENERATIONS, (side, key)
    assert engine["examples"] == len(examples) and engine["passed"]
    shown = admin.get("/admin/adapters/trained").json()["evaluations"]["1"]
    assert shown["passed"] and shown["candidate"]["eval_loss"] == pytest.approx(engine["candidate"]["eval_loss"])
    assert "samples" not in shown["candidate"]


def test_an_upload_with_eval_data_is_scored_on_arrival_and_promoted_only_if_it_passes(
        server, admin, trained, held_out, base_model, tmp_path):
    trained_dir = Path(server.env["LORAPLEX_REGISTRY"]) / "trained" / "1"
    files = {"eval_data": ("held-out.jsonl", held_out.read_bytes()), "general_text": ("general.txt", GENERAL.read_bytes())}
    form = {"name": "arrival", "tenant": "nimbus", "promote": "auto", "max_forgetting": "10"}
    good = admin.post("/admin/adapters", data=form, files={"file": ("a.tar.gz", archive(trained_dir)), **files})
    assert good.status_code == 201, good.text
    assert good.json()["evaluation"]["passed"] and good.json()["version"] == 1
    assert admin.get("/admin/adapters/arrival").json()["aliases"]["stable"] == 1

    noise = AdapterFactory(base_model, 8, ALL_LINEAR).write(tmp_path / "noise", seed=3)
    bad = admin.post("/admin/adapters", data=form, files={"file": ("n.tar.gz", archive(noise)), **files})
    assert bad.status_code == 201, bad.text
    evaluation = bad.json()["evaluation"]
    assert not evaluation["passed"], evaluation["verdict"]  # noise: its general perplexity soars
    shown = admin.get("/admin/adapters/arrival").json()
    assert shown["aliases"]["stable"] == 1 and shown["evaluations"]["2"]["passed"] is False
    audit = [json.loads(line) for line in server.cli("audit", "--tenant", "nimbus").stdout.splitlines() if line]
    decisions = [(e["version"], e["result"].split(":")[0]) for e in audit
                 if e["adapter"] == "arrival" and e["action"] == "promote_auto"]
    assert decisions == [(1, "ok"), (2, "refused")]

    # the rollout gate: a version whose evaluation failed does not roll out
    refused = admin.post("/admin/adapters/arrival/aliases/stable/rollout", json={"to": 2, "interval": 1})
    assert refused.status_code == 409 and "failed its evaluation" in refused.json()["error"]["message"]

    # bad eval data is refused before anything is stored
    broken = {"eval_data": ("e.jsonl", b'{"prompt": "Q", "completion": "A"}\n{"prompt": 7}\n')}
    r = admin.post("/admin/adapters", data=form, files={"file": ("a.tar.gz", archive(trained_dir)), **broken})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("eval_data[1]: 'prompt' must be a string")
    assert admin.get("/admin/adapters/arrival").json()["aliases"]["latest"] == 2


def test_the_forgetting_gate_refuses_an_adapter_that_raises_general_perplexity(admin, base_model, tmp_path):
    """The gate on the engine's measurements of the demo model with and without an adapter: one that distorts every
    layer raises general perplexity past max_forgetting and is refused; a near-zero one passes. (Both are given a
    held-out loss below the base's, so that only the forgetting gate decides.)"""
    row = {"prompt": "How do I export my notes?", "completion": "Open Settings, then Export."}
    decisions = {}
    for scale in (1.0, 1e-4):
        name = f"gate-{'far' if scale == 1.0 else 'near'}"
        adapter = AdapterFactory(base_model, 8, ALL_LINEAR, scale=scale).write(tmp_path / name, seed=1)
        assert upload(admin, name, archive(adapter)).status_code == 201
        r = admin.post(f"/admin/adapters/{name}/versions/1/eval",
                       json={"rows": [row], "general_text": GENERAL.read_text()[:3000], "max_seq_len": 256,
                             "generations": 0})
        assert r.status_code == 200, r.text
        metrics = r.json()
        metrics["candidate"]["eval_loss"] = metrics["reference"]["eval_loss"] - 0.1
        decisions[scale] = (metrics["forgetting"], *verdict(metrics, 0.05))
    forgetting, ok, why = decisions[1.0]
    assert forgetting > 0.05 and not ok and why.startswith("general perplexity rose"), decisions
    forgetting, ok, why = decisions[1e-4]
    assert abs(forgetting) < 0.05 and ok, decisions


def test_eval_errors_name_the_field(admin, server):
    r = admin.post("/admin/adapters/alpha/versions/1/eval", json={"rows": [{"prompt": "Q"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rows"
    assert r.json()["error"]["message"] == "rows[0]: 'completion' must be a string"
    r = admin.post("/admin/adapters/alpha/versions/1/eval",
                   json={"rows": [{"prompt": "Q", "completion": "A"}], "against": "nosuch"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "against"
    r = server.cli("eval", "alpha", "--data", "/nonexistent.jsonl")
    assert r.returncode == 1 and "NAME@VERSION" in r.stderr
