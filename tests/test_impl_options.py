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
# StableLM has no profile: Llama's keys, its own layout (LayerNorms, partial rotary).
STABLELM = {"model_type": "stablelm", "hidden_size": 2560, "intermediate_size": 6912,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 50304, "tie_word_embeddings": False}


def test_as_family_plans_an_approximation_and_says_so_everywhere(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(STABLELM))
    result = RUN.invoke(load_commands(), ["estimate", "--config", str(path), "--as", "llama",
                                          "--json"])
    assert result.exit_code == 0, result.output
    assert "approximation" in result.stderr
    data = json.loads(result.stdout)
    assert "approximation" in data["assumed"]
    assert data["architecture"]["approximation"].startswith("approximation")
    assert all("approximation" in r["notes"][0] for r in data["regimes"].values())
    spec = spec_from_config(STABLELM, as_family="llama")
    assert spec.family == "llama" and spec.model_type == "stablelm" and spec.approximation


def test_as_needs_a_known_family_and_a_config(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(STABLELM))
    bad = RUN.invoke(load_commands(), ["estimate", "--config", str(path), "--as", "lama"])
    assert bad.exit_code == 2 and "--as 'lama'" in bad.stderr
    no_config = RUN.invoke(load_commands(), ["estimate", "--model", "llama-tiny", "--as", "llama"])
    assert no_config.exit_code == 2 and "drop --as" in no_config.stderr


def test_a_config_with_no_known_shape_is_still_refused(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    result = RUN.invoke(load_commands(), ["estimate", "--config", str(path)])
    assert result.exit_code == 2
    assert "not supported" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--impl", "tf"], "implementation"),
    (["--lora-backend", "peft", "--impl", "memplan"], "--impl hf"),
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
