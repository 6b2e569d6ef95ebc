"""Hostile config.json files through the command line: exit 2, one clear line, fast, small.

tests/test_config.py checks :func:`memplan.config.load_config` on malformed content; here each
hostile file goes through ``estimate``, ``fits`` and ``profile --config`` as a user would give
it, and each answer must come in well under two seconds and a few MiB of Python memory, with
the file refused by its size or kind before it is read where that is possible.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands
from memplan.config import MAX_CONFIG_BYTES

APP = load_commands()
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
COMMANDS = (("estimate",), ("fits", "--gpu", "t4"), ("profile", "--device", "fake"))
MEMORY = 32 * 2**20  # Python allocations while answering: a config is read at most once


def text(content: str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "config.json"
        path.write_text(content, encoding="utf-8")
        return path
    return write


def data(content: bytes) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "config.json"
        path.write_bytes(content)
        return path
    return write


def llama(**changes) -> Callable[[Path], Path]:
    return text(json.dumps(LLAMA | changes))


def raw_value(key: str, literal: str) -> Callable[[Path], Path]:
    """LLAMA with ``key`` set to a literal JSON token (NaN, 1e400...)."""
    body = json.dumps({k: v for k, v in LLAMA.items() if k != key})
    return text(body[:-1] + f', "{key}": {literal}}}')


def sparse(size: int) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "config.json"
        with path.open("wb") as handle:
            handle.write(json.dumps(LLAMA).encode())
            handle.truncate(size)  # a hole: no time, no disk, the size all the same
        return path
    return write


def folder(with_config_dir: bool) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "model"
        path.mkdir()
        (path / "weights.bin").write_bytes(b"\0" * 16)
        if with_config_dir:
            (path / "config.json").mkdir()
        return path
    return write


def missing(tmp: Path) -> Path:
    return tmp / "nowhere" / "config.json"


def long_name(tmp: Path) -> Path:
    return tmp / ("x" * 5000 + ".json")


def fifo(tmp: Path) -> Path:
    path = tmp / "config.json"
    os.mkfifo(path)  # nobody writes: opening it would block forever
    return path


def link_loop(tmp: Path) -> Path:
    a, b = tmp / "a.json", tmp / "b.json"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def device(tmp: Path) -> Path:
    return Path("/dev/zero")  # endless


GARBAGE = random.Random(8).randbytes(64 * 1024)

CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    # huge numbers
    ("hidden 10**30", llama(hidden_size=10**30), "out of range"),
    ("vocab 2**64", llama(vocab_size=2**64), "out of range"),
    ("layers 1e308", raw_value("num_hidden_layers", "1e308"), "out of range"),
    ("hidden -1e308", raw_value("hidden_size", "-1e308"), "out of range"),
    ("hidden 1e400", raw_value("hidden_size", "1e400"), "must be an integer"),
    ("5000-digit integer", raw_value("vocab_size", "9" * 5000), "not valid JSON"),
    ("intermediate 2**22+1", llama(intermediate_size=2**22 + 1), "out of range"),
    # NaN and infinities, even where memplan does not look
    ("NaN", raw_value("hidden_size", "NaN"), "NaN"),
    ("Infinity", raw_value("vocab_size", "Infinity"), "Infinity"),
    ("-Infinity", raw_value("intermediate_size", "-Infinity"), "Infinity"),
    ("NaN in an ignored key", raw_value("rope_theta", "NaN"), "NaN"),
    # strings and other types where numbers belong
    ("numeric string", llama(hidden_size="4096"), "hidden_size must be an integer"),
    ("empty string", llama(vocab_size=""), "vocab_size must be an integer"),
    ("list", llama(num_hidden_layers=[2]), "num_hidden_layers must be an integer"),
    ("object", llama(intermediate_size={"value": 128}), "intermediate_size must be an integer"),
    ("boolean", llama(num_attention_heads=True), "must be an integer"),
    ("fraction", llama(hidden_size=64.5), "must be an integer"),
    ("4 MB string", llama(hidden_size="9" * (MAX_CONFIG_BYTES - 300)), "must be an integer"),
    ("activation object", llama(hidden_act={"name": "silu"}), "hidden_act"),
    ("model_type list", llama(model_type=["llama"]), "model_type must be a name"),
    ("model_type huge", llama(model_type="l" * 100_000), "model_type must be a name"),
    ("model_type unknown, no shape", text('{"model_type": "t5", "d_model": 512}'),
     "not supported"),
    ("partial: no vocab", text(json.dumps({k: v for k, v in LLAMA.items()
                                           if k != "vocab_size"})), "missing 'vocab_size'"),
    ("partial: only model_type", text('{"model_type": "gpt2"}'),
     "missing 'n_embd'"),
    # deep nesting
    ("100k open brackets", text("[" * 100_000), "config.json"),
    ("50k nested objects", text('{"a":' * 50_000 + "1" + "}" * 50_000), "config.json"),
    ("deep value in an ignored key", text(json.dumps(LLAMA)[:-1] + ', "x": '
                                          + "[" * 20_000 + "]" * 20_000 + "}"), "config.json"),
    ("deep value where a number belongs", text(json.dumps(LLAMA)[:-1].replace(
        '"hidden_size": 64', '"hidden_size": ' + "[" * 500 + "]" * 500) + "}"),
     "hidden_size must be an integer"),
    # size
    ("100 MB file", sparse(100 * 2**20), "too large"),
    ("limit + 1 byte", sparse(MAX_CONFIG_BYTES + 1), "too large"),
    # not JSON at all
    ("prose", text("this is not a model config\n"), "not valid JSON"),
    ("python literal", text(repr(LLAMA)), "not valid JSON"),
    ("yaml", text("model_type: llama\nhidden_size: 64\n"), "not valid JSON"),
    ("trailing comma", text(json.dumps(LLAMA)[:-1] + ",}"), "not valid JSON"),
    ("truncated", text(json.dumps(LLAMA)[:40]), "not valid JSON"),
    ("binary garbage", data(GARBAGE), "not valid JSON"),
    ("NUL bytes", data(b"\0" * 1000), "not valid JSON"),
    ("UTF-16", data(json.dumps(LLAMA).encode("utf-16")), "not valid JSON"),
    ("empty file", text(""), "not valid JSON"),
    ("whitespace", text(" \n\t " * 100), "not valid JSON"),
    # valid JSON of the wrong shape
    ("JSON array", text(json.dumps([LLAMA])), "JSON object"),
    ("JSON string", text('"llama"'), "JSON object"),
    ("JSON number", text("7e9"), "JSON object"),
    ("JSON null", text("null"), "JSON object"),
    # not a file
    ("directory without config.json", folder(False), "directory without a config.json"),
    ("config.json that is a directory", folder(True), "config.json"),
    ("missing path", missing, "does not exist"),
    ("name too long", long_name, "File name too long"),
    ("symlink loop", link_loop, "a.json"),
    ("named pipe", fifo, "not a regular file"),
    ("/dev/zero", device, "not a regular file"),
]


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(APP, list(args))


@pytest.mark.parametrize(("writer", "needle"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hostile_config_is_one_clear_line_and_small(tmp_path: Path, writer, needle) -> None:
    path = writer(tmp_path)
    for i, command in enumerate(COMMANDS):
        if i == 0:  # the config is read the same way by every command: trace one
            tracemalloc.start()
        try:
            result = invoke(*command, "--config", str(path))
        finally:
            peak = tracemalloc.get_traced_memory()[1] if i == 0 else 0
            tracemalloc.stop()
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert result.stdout == ""
        assert "Traceback" not in result.output + result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error:") and needle in lines[0], lines[0]
        assert len(lines[0]) < 500 or "File name too long" in lines[0]
        assert peak < MEMORY, (command, peak)


def test_a_utf8_byte_order_mark_is_not_hostile(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(LLAMA).encode())
    result = invoke("estimate", "--config", str(path), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["architecture"]["hidden_size"] == 64


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = text(json.dumps(LLAMA))(tmp_path)
    path.chmod(0)
    result = invoke("estimate", "--config", str(path))
    assert result.exit_code == 2 and "Permission denied" in result.stderr


@pytest.mark.parametrize("case", ["100 MB file", "100k open brackets", "named pipe"])
def test_hostile_config_in_a_real_process(tmp_path: Path, case: str) -> None:
    """The same answers from ``python -m memplan``, where nothing catches a stray exception."""
    writer = {c[0]: c[1] for c in CASES}[case]
    path = writer(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "memplan", "estimate", "--config", str(path)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "MEMPLAN_DEBUG": "", "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
