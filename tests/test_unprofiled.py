"""A model_type with no profile is never planned as another family: measured by a dry run of
the real transformers model when the [hf] extra is there, refused otherwise, or approximated
with --as and labelled so."""

import json

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

RUN = CliRunner()
# StableLM: no memplan profile, and a causal LM transformers builds.
STABLELM = {"model_type": "stablelm", "hidden_size": 128, "intermediate_size": 344,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "vocab_size": 512, "tie_word_embeddings": False}


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(STABLELM))
    return str(path)


def test_estimate_measures_and_says_so(config) -> None:
    result = RUN.invoke(load_commands(), ["estimate", "--config", config, "--batch", "2",
                                          "--seq", "32", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["measured"] is True and "not planned" in data["note"]
    full, lora = data["regimes"]["full"], data["regimes"]["lora"]
    # the transformers model's own count (StableLM: LayerNorms with bias, untied head)
    assert full["params"] == full["trainable"] > lora["trainable"] > 0
    assert full["peak_bytes"] > lora["peak_bytes"] > data["regimes"]["lora-bf16"]["peak_bytes"]
    assert full["seconds"] >= 0 and "dry run" in full["method"]


def test_fits_answers_from_the_measurement(config) -> None:
    small = RUN.invoke(load_commands(), ["fits", "--config", config, "--regime", "full",
                                         "--memory", "1MiB", "--reserve", "0", "--json"])
    assert small.exit_code == 1, small.output
    assert json.loads(small.stdout)["measured"] is True
    big = RUN.invoke(load_commands(), ["fits", "--config", config, "--regime", "full",
                                       "--memory", "1GiB", "--reserve", "0"])
    assert big.exit_code == 0 and "measured" in big.stdout


def test_profile_gives_no_prediction(config) -> None:
    result = RUN.invoke(load_commands(), ["profile", "--config", config, "--device", "fake",
                                          "--batch", "1", "--seq", "16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["predicted"] is None and data["relative_error"] is None
    assert data["measured"]["peak_bytes"] > 0
    cpu = RUN.invoke(load_commands(), ["profile", "--config", config, "--device", "cpu"])
    assert cpu.exit_code == 2 and "fake" in cpu.stderr


def test_regimes_the_dry_run_cannot_apply_are_refused(config) -> None:
    result = RUN.invoke(load_commands(), ["fits", "--config", config, "--regime", "classifier",
                                          "--memory", "1GiB"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_without_the_extra_the_refusal_names_the_fix(config, monkeypatch) -> None:
    import memplan.profile.dryrun as dryrun

    monkeypatch.setattr(dryrun, "transformers_available", lambda: False)
    result = RUN.invoke(load_commands(), ["estimate", "--config", config])
    assert result.exit_code == 2
    assert "memplan[hf]" in result.stderr and "--as llama" in result.stderr
