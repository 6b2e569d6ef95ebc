"""Models by their Hugging Face names: the hub cache, a local folder, a download, a refusal.

Every test lays out its own hub cache under tmp_path and points the environment at it; none
reaches the network (the download is a stand-in for ``hf_hub_download``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan import hub
from memplan.cli.app import load_commands
from memplan.errors import ConfigError, MemplanError
from memplan.params import count_params
from memplan.presets import find_model, get_model

APP = load_commands()
REPO = "meta-llama/Llama-3.1-8B"
PRESET = Path(__file__).resolve().parents[1] / "memplan" / "presets" / "models"
ENV_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME",
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY",
            "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No hub variable of the machine leaks in; the home is empty."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def lay_out(cache: Path, repo: str, cfg: dict, commit: str = "a1b2c3d4e5",
            main: bool = True) -> Path:
    """A hub cache entry as huggingface_hub writes it: a blob, a snapshot link, refs/main."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    blob = folder / "blobs" / f"blob-{commit}"
    blob.write_text(json.dumps(cfg))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(Path("..") / ".." / "blobs" / blob.name)
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
    return snapshot / "config.json"


def preset_cfg(name: str) -> dict:
    return json.loads((PRESET / f"{name}.json").read_text())


def run(*args: str):
    return CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(APP, list(args))


def error_line(result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    try:
        err = result.stderr
    except (ValueError, AttributeError):
        err = result.output
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    return lines[0]


# ---- where the cache is ----------------------------------------------------------------------

def test_cache_dir_follows_huggingface_hub_variables(monkeypatch, tmp_path) -> None:
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub.cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub.cache_dir() == tmp_path / "new"


def test_cached_config_is_the_main_revision(tmp_path) -> None:
    old = lay_out(tmp_path, REPO, {"model_type": "llama"}, commit="0000old")
    new = lay_out(tmp_path, REPO, preset_cfg("llama-3.1-8b"), commit="1111new")
    (tmp_path / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text("1111new\n")
    assert hub.cached_config(REPO, tmp_path) == new != old
    assert hub.cached_config("meta-llama/Other", tmp_path) is None


def test_no_refs_main_or_a_strange_ref_is_not_cached(tmp_path) -> None:
    lay_out(tmp_path, REPO, {"model_type": "llama"}, main=False)
    assert hub.cached_config(REPO, tmp_path) is None
    refs = tmp_path / f"models--{REPO.replace('/', '--')}" / "refs"
    refs.mkdir()
    (refs / "main").write_text("../../../etc")
    assert hub.cached_config(REPO, tmp_path) is None


def test_the_layout_is_the_one_huggingface_hub_reads(tmp_path) -> None:
    hf = pytest.importorskip("huggingface_hub")
    path = lay_out(tmp_path, REPO, preset_cfg("llama-3.1-8b"))
    theirs = hf.try_to_load_from_cache(REPO, "config.json", cache_dir=tmp_path)
    assert Path(theirs) == hub.cached_config(REPO, tmp_path) == path


@pytest.mark.parametrize(("name", "ok"), [
    ("meta-llama/Llama-3.1-8B", True), ("gpt2", True), ("Qwen/Qwen2.5-7B-Instruct", True),
    ("a/b/c", False), ("meta-llama/", False), ("/abs/path", False), ("x--y/z", False),
    ("x/y..z", False), ("x/-y", False), ("x/y.git", False), ("x/" + "y" * 97, False),
    ("llama 3", False), ("", False)])
def test_repo_ids_as_huggingface_hub_validates_them(name: str, ok: bool) -> None:
    assert hub.is_repo_id(name) is ok


# ---- the model from the cache, a folder, or a preset -----------------------------------------

def test_hub_name_reads_the_cached_config(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    lay_out(tmp_path / "cache", REPO, preset_cfg("llama-3.1-8b"))
    result = run("estimate", "--model", REPO, "--regime", "lora", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    preset = get_model("llama-3.1-8b")
    assert data["params"] == count_params(preset)
    assert data["architecture"]["name"] == REPO
    assert data["architecture"]["hidden_size"] == preset.hidden_size
    assert f"config.json of {REPO}" in data["assumed"]


def test_hf_home_cache_and_a_plan_equal_to_the_preset(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    lay_out(tmp_path / "hf" / "hub", REPO, preset_cfg("llama-3.1-8b"))
    args = ("fits", "--regime", "qlora", "--memory", "24GiB", "--batch", "1", "--seq", "1024",
            "--json")
    mine = json.loads(run(*args[:1], "--model", REPO, *args[1:]).stdout)
    theirs = json.loads(run(*args[:1], "--model", "llama-3.1-8b", *args[1:]).stdout)
    assert mine["required_bytes"] == theirs["required_bytes"] > 0


def test_a_local_model_folder(tmp_path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset_cfg("qwen2.5-0.5b")))
    spec, where = find_model(str(folder))
    assert count_params(spec) == count_params(get_model("qwen2.5-0.5b"))
    assert str(folder) in where
    spec, _ = find_model(str(folder / "config.json"))
    assert count_params(spec) == count_params(get_model("qwen2.5-0.5b"))


def test_presets_win(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    lay_out(tmp_path, "gpt2", preset_cfg("llama-2-7b"))  # a cached gpt2 that is not GPT-2
    spec, where = find_model("gpt2")
    assert spec == get_model("gpt2") and where == "preset gpt2"
    spec, _ = find_model("LLAMA-2-7B")
    assert spec == get_model("llama-2-7b")


def test_a_cached_name_without_owner(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    lay_out(tmp_path, "distilgpt2", preset_cfg("gpt2") | {"n_layer": 6})
    spec, _ = find_model("distilgpt2")
    assert spec.name == "distilgpt2" and spec.num_layers == 6


def test_as_approximates_a_hub_config_and_not_a_preset(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    lay_out(tmp_path, "acme/new-7b", preset_cfg("llama-2-7b") | {"model_type": "acme"})
    spec, _ = find_model("acme/new-7b", as_family="llama")
    assert spec.name == "acme/new-7b" and spec.model_type == "acme" and spec.approximation
    result = run("estimate", "--model", "acme/new-7b", "--as", "llama", "--json")
    assert result.exit_code == 0, result.output
    assert "approximation" in json.loads(result.stdout)["assumed"]
    with pytest.raises(MemplanError, match="drop --as"):
        find_model("llama-2-7b", as_family="llama")


# ---- when the config is not there: download, or one line ---------------------------------------

def test_offline_and_not_cached_is_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = error_line(run("fits", "--model", REPO, "--regime", "qlora", "--gpu", "rtx-4090"))
    assert REPO in line and str(tmp_path) in line and "--config" in line
    assert f"https://huggingface.co/{REPO}/resolve/main/config.json" in line
    assert "--model llama-3.1-8b" in line  # the preset of the same model is offered, not used


def test_without_huggingface_hub_says_how(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    line = error_line(run("estimate", "--model", "acme/unknown-3b"))
    assert "pip install huggingface_hub" in line and "--config" in line
    assert "did you mean" not in line


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fake = types.ModuleType("huggingface_hub")
    fake.hf_hub_download = lambda *a, **k: pytest.fail("no download without a route")
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)

    def refuse(address, timeout):
        assert address == ("huggingface.co", 443) and timeout <= 5
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    line = error_line(run("estimate", "--model", REPO))
    assert "cannot be reached" in line and "Network is unreachable" in line
    assert "--config" in line


def test_a_proxy_skips_the_probe(monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    assert hub.no_route() is None


def test_download_fetches_config_json_alone(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "no_route", lambda: None)
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(lay_out(Path(kwargs["cache_dir"]), repo_id, preset_cfg("llama-3.1-8b")))

    fake = types.ModuleType("huggingface_hub")
    fake.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    spec, where = find_model(REPO)
    assert [(r, f) for r, f, _ in calls] == [(REPO, "config.json")]
    assert calls[0][2]["cache_dir"] == tmp_path
    assert count_params(spec) == count_params(get_model("llama-3.1-8b"))
    find_model(REPO)  # now cached: no second download
    assert len(calls) == 1


def _raising(name: str, bases: tuple = (Exception,)):
    cls = type(name, bases, {})

    def hf_hub_download(*args, **kwargs):
        raise cls("401 Client Error\nmore detail")
    return cls, hf_hub_download


@pytest.mark.parametrize(("chain", "needle"), [
    (("RepositoryNotFoundError", "GatedRepoError"), "is gated"),
    (("RepositoryNotFoundError",), "check the name"),
    (("EntryNotFoundError", "RemoteEntryNotFoundError"), "has no config.json"),
    (("EntryNotFoundError", "LocalEntryNotFoundError"), "cannot be reached"),
    (("ConnectTimeout",), "ConnectTimeout: 401 Client Error"),
])
def test_download_failures_are_one_line(monkeypatch, tmp_path, chain, needle) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "no_route", lambda: None)
    cls = Exception
    for name in chain:
        cls, download = _raising(name, (cls,))
    fake = types.ModuleType("huggingface_hub")
    fake.hf_hub_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    with pytest.raises(ConfigError) as info:
        hub.config_path("acme/model-7b")
    message = str(info.value)
    assert needle in message and "\n" not in message and "acme/model-7b" in message


def test_an_unknown_plain_name_is_still_the_preset_error(tmp_path) -> None:
    line = error_line(run("estimate", "--model", "llama-2-7"))
    assert "unknown model preset 'llama-2-7'" in line and "did you mean 'llama-2-7b'" in line
    assert "Hugging Face name" in line


def test_the_cache_path_imports_neither_torch_nor_huggingface_hub(tmp_path) -> None:
    lay_out(tmp_path, REPO, preset_cfg("llama-3.1-8b"))
    code = ("import sys; from memplan.presets import find_model; "
            f"spec, _ = find_model({REPO!r}); "
            "print(spec.hidden_size, 'torch' in sys.modules, 'huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"HF_HUB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         check=True).stdout.split()
    assert out == ["4096", "False", "False"]
