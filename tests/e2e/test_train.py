"""The trainer on the demo model: a real (short) QLoRA run, registered and served by the running server."""

import json
from pathlib import Path

from tests.helpers.calls import complete, same
from tests.helpers.training import write_job


def test_bad_rows_stop_the_job_before_training(server, tmp_path, base_model):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Q", "completion": "A"}\n{"prompt": "Q2", "completion": "A2"}\n{"prompt": 7}\n')
    job = write_job(tmp_path, base_model, "bad-rows", data=[str(data)])
    r = server.cli("train", str(job))
    assert r.returncode == 1
    assert f"{data}:3: 'prompt' must be a string" in r.stderr
    assert not (tmp_path / "bad-rows").exists()
    assert not (Path(server.env["LORAPLEX_REGISTRY"]) / "bad-rows").exists()


def test_job_errors_name_the_field(server, tmp_path, base_model):
    r = server.cli("train", str(write_job(tmp_path, base_model, "bad-job")), "--set", "lora.r=-1")
    assert r.returncode == 1 and "lora.r: Input should be greater than or equal to 1" in r.stderr


def test_qlora_run_beats_base_is_registered_and_served(server, client, reference, trained):
    r = trained
    assert "registered trained@1" in r.stdout and "held-out loss" in r.stdout and "evaluating through vLLM" in r.stdout
    m = json.loads((Path(server.env["LORAPLEX_REGISTRY"]) / "trained" / "1" / "manifest.json").read_text())
    metrics = m["metrics"]
    assert metrics["candidate"]["eval_loss"] < metrics["reference"]["eval_loss"] and metrics["passed"]
    for side in ("reference", "candidate"):
        assert {"eval_loss", "eval_perplexity", "exact_match", "rouge_l", "general_perplexity"} <= set(metrics[side])
    assert "forgetting" in metrics
    counts = m["training"]["data"]["counts"]
    assert counts["read"] == 241 and counts["read"] >= counts["after_exact_duplicates"] >= counts["after_length"]
    assert counts["train"] + counts["eval"] == counts["after_length"]
    assert m["training"]["data"]["files"][0]["sha256"] and m["training"]["steps"] == 30
    assert m["training"]["tokens_per_second"] > 0
    assert m["job"]["lora"]["r"] == 8 and m["job"]["quantization"] == "nf4"
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= set(m["libraries"])
    assert m["tenant"] == "nimbus" and m["rank"] == 8 and m["source"].startswith("train:")
    assert "promoted trained@1 to stable" in r.stdout
    audit = [json.loads(line) for line in server.cli("audit", "--tenant", "nimbus", "--since", "1h").stdout.split("\n")
             if line]
    by_trainer = [e for e in audit if e["adapter"] == "trained" and e["action"].startswith("train_")]
    assert [(e["action"], e["version"], e["result"]) for e in by_trainer] == [("train_register", 1, "ok"),
                                                                              ("train_promote", 1, "ok")]
    assert all(e["actor"].startswith("cli:") and e["sha256"] for e in by_trainer)
    # the running server serves it on the next request, as PEFT computes it
    adapter_dir = Path(server.env["LORAPLEX_REGISTRY"]) / "trained" / "1"
    got = complete(client, "How do I export my notes?", adapter="trained@stable")
    assert got["model"] == "trained@1"
    assert same(got["choices"][0], reference.complete(adapter_dir, "How do I export my notes?", 16))


def test_resume_continues_from_the_checkpoint(server, tmp_path, base_model):
    registry = tmp_path / "registry"
    job = write_job(tmp_path, base_model, "resumed", max_steps=4, save_steps=2, eval_generations=0)
    first = server.cli("train", str(job), "--registry", str(registry))
    assert first.returncode == 0, first.stderr[-3000:]
    second = server.cli("train", str(job), "--registry", str(registry), "--set", "max_steps=6", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "checkpoint-4" in second.stdout
    m = json.loads((registry / "resumed" / "2" / "manifest.json").read_text())
    assert m["training"]["steps"] == 6 and m["training"]["resumed_from"].endswith("checkpoint-4")


def test_resume_without_checkpoint_is_an_error(server, tmp_path, base_model):
    r = server.cli("train", str(write_job(tmp_path, base_model, "fresh")), "--resume")
    assert r.returncode == 1 and "--resume: no checkpoint in" in r.stderr
