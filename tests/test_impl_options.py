"""--impl and --lora-backend, and configs of model types without an implementation profile."""

import json

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands
from memplan.config import spec_from_config
from memplan.params import count_params
from memplan.planner import plan
from memplan.presets import get_model
from memplan.spec import TrainSpec

RUN = CliRunner()
PHI3 = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32064, "tie_word_embeddings": False}


def test_unprofiled_model_type_is_planned_as_the_closest_family(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PHI3))
    result = RUN.invoke(load_commands(), ["estimate", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert "closest family, llama" in result.stderr
    data = json.loads(result.stdout)
    assert data["params"] == 3_821_079_552  # Phi-3-mini's published count
    spec = spec_from_config(PHI3)
    assert spec.family == "llama" and spec.model_type == "phi3"


def test_a_config_with_no_known_shape_is_still_refused(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    result = RUN.invoke(load_commands(), ["estimate", "--config", str(path)])
    assert result.exit_code == 2
    assert "not supported" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--impl", "tf"], "implementation"),
    (["--lora-backend", "peft"], "--impl hf"),
    (["--lora-backend", "loralib", "--impl", "hf"], "LoRA backend"),
])
def test_bad_impl_options_exit_2(args, message) -> None:
    result = RUN.invoke(load_commands(), ["estimate", "--model", "llama-tiny", *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_hf_plan_differs_where_the_code_differs() -> None:
    """Hugging Face's GPT-2 keeps four tensors for its GELU; Llama is the same code."""
    job = dict(regime="full", batch=2, seq=256)
    gpt2, llama = get_model("gpt2-tiny"), get_model("llama-tiny")
    assert plan(gpt2, TrainSpec(impl="hf", **job)).total_bytes > \
        plan(gpt2, TrainSpec(**job)).total_bytes
    hf, ours = plan(llama, TrainSpec(impl="hf", **job)), plan(llama, TrainSpec(**job))
    assert abs(hf.total_bytes - ours.total_bytes) < 0.01 * ours.total_bytes
    assert count_params(gpt2) > 0
