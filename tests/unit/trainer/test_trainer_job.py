import pytest

from server.trainer.job import JobError, load_job

GOOD = """
base_model: some/model
data: rows.jsonl
adapter: {name: acme-support, tenant: acme}
lora: {r: 8}
max_steps: 10
"""


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    assert job.lora.r == 8 and job.lora.alpha == 32 and job.lora.target_modules == "all-linear"
    assert job.quantization == "nf4" and job.promote == "never" and job.max_steps == 10
    assert job.data == [tmp_path / "rows.jsonl"]
    assert job.output_dir == tmp_path / "runs" / "acme-support"
    assert job.base_model == "some/model"


def test_epochs_default_when_no_length_given(tmp_path):
    assert load_job(write(tmp_path, GOOD.replace("max_steps: 10", ""))).epochs == 3


def test_overrides(tmp_path):
    job = load_job(write(tmp_path, GOOD), ["lora.r=4", "learning_rate=1e-3", "lora.target_modules=[q_proj]",
                                          "promote=auto"])
    assert (job.lora.r, job.learning_rate, job.lora.target_modules, job.promote) == (4, 1e-3, ["q_proj"], "auto")


@pytest.mark.parametrize("text,overrides,message", [
    (GOOD.replace("base_model: some/model", ""), [], "job.yaml: base_model: Field required"),
    (GOOD, ["lora.r=0"], "lora.r: Input should be greater than or equal to 1"),
    (GOOD, ["quantization=int3"], "quantization: Input should be 'nf4' or 'none'"),
    (GOOD, ["adapter.name=Bad Name"], "adapter.name: String should match pattern"),
    (GOOD, ["lora.rank=4"], "lora.rank: Extra inputs are not permitted"),
    (GOOD, ["eval_fraction=0.7"], "eval_fraction: Input should be less than 0.5"),
    (GOOD, ["max_steps"], "--set 'max_steps': expected key=value"),
    (GOOD, ["max_steps.x=1"], "--set max_steps.x: max_steps is not a section"),
    ("base_model: [unclosed", [], "not valid YAML"),
    ("- a list", [], "must be a mapping"),
])
def test_errors_name_the_field(tmp_path, text, overrides, message):
    with pytest.raises(JobError) as e:
        load_job(write(tmp_path, text), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(JobError, match="no such file"):
        load_job(tmp_path / "nope.yaml")


def test_absolute_paths_are_kept(tmp_path):
    job = load_job(write(tmp_path, GOOD.replace("rows.jsonl", "/data/rows.jsonl") + "output_dir: /out\n"))
    assert job.data == [__import__("pathlib").Path("/data/rows.jsonl")]
    assert str(job.output_dir) == "/out"
