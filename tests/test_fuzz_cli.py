"""Fuzzing the command line: hypothesis builds argument lists for every command, mixing valid
and hostile flags and values (negative, zero, huge, NaN, junk strings, unicode, unknown names,
missing values, repeated flags), and runs them through typer's CliRunner and a real process.

Whatever comes in: no traceback, exit code 0, 1 or 2 (1 only where it means "does not fit"),
one "error:" line for a bad value, and exactly one JSON object on stdout for ``--json`` that
succeeds. The options are read from the commands themselves, so a new option is fuzzed with
junk at least. ``profile`` and ``validate`` really run models: their valid values are tiny, and
most of their cases carry one bad value (validate runs a one-row matrix).

MEMPLAN_FUZZ_SCALE=10 multiplies the cases (and draws them at random instead of from a fixed
seed): the way to search for new crashes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memplan.cli.app import load_commands
from memplan.spec import ATTENTIONS, OPTIMIZER_IMPLS, OPTIMIZERS, REGIMES, SHARDS

APP = load_commands()
GROUP = typer.main.get_command(APP)
COMMANDS = tuple(GROUP.commands)
SCALE = float(os.environ.get("MEMPLAN_FUZZ_SCALE", "1"))
CASES = {"estimate": 1400, "fits": 1100, "gpus": 150, "models": 150, "recipes": 300,
         "profile": 300, "validate": 80, "plot": 200, "scale": 300, "advise": 400, "serve": 400}
HEAVY = ("profile", "validate", "plot")  # commands whose valid cases run models or draw
EXIT_ONE = ("fits", "profile", "advise", "serve")  # exit 1 is their "does not fit"
COUNT = {"cases": 0}  # reported by test_fuzz_counts


def fuzz_settings(command: str):
    return settings(max_examples=max(1, int(CASES.get(command, 100) * SCALE)), deadline=None,
                    derandomize=SCALE <= 1, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- the files some values point at (made once, under a temporary folder) ----------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    tiny = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 2,
            "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 128}
    gpt = {"model_type": "gpt2", "n_embd": 32, "n_head": 2, "n_layer": 1, "vocab_size": 128,
           "n_positions": 64}
    paths = {}
    for name, content in (("tiny.json", json.dumps(tiny)), ("gpt.json", json.dumps(gpt)),
                          ("bad.json", '{"model_type": "llama", "hidden_size": NaN}'),
                          ("array.json", "[1, 2]"), ("empty.json", "")):
        (root / name).write_text(content)
        paths[name] = str(root / name)
    (root / "folder").mkdir()
    paths["folder"] = str(root / "folder")
    paths["missing"] = str(root / "missing" / "config.json")
    paths["root"] = str(root)
    report = {"device": "cpu", "summary": {}, "meta": {}, "rows": [
        {"model": "llama-tiny", "regime": "lora", "options": "", "predicted_bytes": 10,
         "measured_bytes": 11, "relative_error": -1 / 11, "peak_phase": "backward",
         "predicted_components": {}, "measured_components": {}}]}
    (root / "report.json").write_text(json.dumps(report))
    paths["report.json"] = str(root / "report.json")
    return paths


# ---- values ------------------------------------------------------------------------------------

JUNK = ["", " ", "-", "--", "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "-0", "abc",
        "None", "null", "true", "🚀", "ñame", "名前", "\u200b", "a" * 300, "'", '"', "%s",
        "$(echo hi)", "../../etc/passwd", "\t", "٣", "１２", "0x10", "1_000", "1,000", "1e-9"]
INT_BAD = ["0", "-1", "-0", "1.5", "1e3", "nan", "inf", "", "abc", "١٢", "１", "9" * 40,
           str(2**63), str(2**24 + 1), "0x10", "1_0"]
COUNTS_OK = ["1e6", "2.5M", "350M", "124,439,808", "1.5", "1_000_000", "7e9", "13b", "1e30"]
COUNTS_BAD = ["0", "-5", "0.4", "nan", "inf", "1e400", "abc", "", "7e9e9", "٣", "７B", "7 B",
              "7BB", "-7e9"]
SIZES_OK = ["24GiB", "80GB", "512MiB", "1GiB", "1B", "1KiB", "24 GiB", "24gib", "1e30GiB",
            "0.5GiB", "1,024MiB"]
SIZES_BAD = ["0.5B", "24", "-1GiB", "nanGiB", "infGiB", "1e400GiB", "24XB", "GiB", "",
             "1e-9GiB", "-0GiB"]
MODELS_CHEAP = ["llama-tiny", "gpt2-tiny", " Llama-Tiny "]
MODELS_BIG = ["gpt2", "qwen2.5-0.5b", "llama-2-7b"]
MODELS_BAD = ["nope", "llama-2-7", "", "LLAMA", "gpt-2", "../gpt2", "\x00", "gpt2-tiny\n"]


def pools(command: str, name: str, files: dict[str, str]) -> tuple[list[str], list[str]]:
    """(valid, bad) values of option ``name`` of ``command``; an unknown option gets junk."""
    heavy = command in HEAVY
    ints = ["1", "2"] if heavy else ["1", "2", "4", "8", "16", "32"]
    plot = command == "plot"
    table: dict[str, tuple[list[str], list[str]]] = {
        "params": (COUNTS_OK, COUNTS_BAD),
        "model": (MODELS_CHEAP + ([] if heavy else MODELS_BIG), MODELS_BAD),
        "config": ([files["tiny.json"], files["gpt.json"]],
                   [files["bad.json"], files["array.json"], files["empty.json"],
                    files["folder"], files["missing"], ""]),
        "rank": (["1", "2", "4", "8", "16"], ["0", "100000", *INT_BAD]),
        "alpha": (["16", "0.5", "32", "1e30"], ["0", "-1", "nan", "inf", "-inf", "1e400", ""]),
        "targets": (["all", "mlp", "attention", "mlp,attention"],
                    ["", ",", "nope", "c_prj", "ALL", "q_proj,,v_proj"]),
        "batch": (ints + ([] if heavy else ["1024", "16777216"]), INT_BAD),
        "seq": (["8", "16", "32"] + ([] if heavy else ["512", "2048", "16777216"]), INT_BAD),
        "gpus": (["1", "2", "8", "1024"], INT_BAD),
        "classes": (ints, INT_BAD),
        "prompt_tokens": (ints, INT_BAD),
        "optimizer": (list(OPTIMIZERS), ["adam", "", "SGD"]),
        "optimizer_impl": (list(OPTIMIZER_IMPLS), ["turbo", ""]),
        "attention": (list(ATTENTIONS), ["magic", ""]),
        "impl": (["memplan"] + ([] if heavy else ["hf"]), ["x", ""]),
        "lora_backend": (["memplan"] + ([] if heavy else ["peft"]), ["x", ""]),
        "regime": (list(REGIMES), ["nope", "", "LORA", "zero4"]),  # scale refuses some: exit 2
        "reserve": (SIZES_OK + ["0"], SIZES_BAD),
        "memory": (SIZES_OK, SIZES_BAD + ["0"]),
        "capacity": (SIZES_OK, SIZES_BAD + ["0"]),
        "gpu": (["t4", "a100-80gb", "h100-80gb", "rtx-4090", "H100-80GB", "h100", "a100",
                 "NVIDIA GeForce RTX 4090"], ["h1000", "nope", "", "nvidia", "[red]x"]),
        "device": (["cpu", "fake", "auto"], ["bogus", "", "gpu", "CPU", "cuda:0", "cdua"]),
        "steps": (["1", "2"], ["0", "-1", "101", "1000", "9" * 30, "x"]),
        "out": ([f"{files['root']}/plots/p.png", f"{files['root']}/p.svg", "p.png"]
                if plot else [f"{files['root']}/reports", "reports", ""],
                ["p.txt", files["folder"], f"{files['tiny.json']}/x.png", "", "/proc/nope/p.png"]
                if plot else [files["tiny.json"], f"{files['tiny.json']}/sub", "/proc/nope"]),
        "report": ([files["report.json"]], [files["missing"], files["bad.json"],
                                            files["array.json"], files["folder"], ""]),
        "axis": (["batch", "seq"], ["rank", ""]),
        # profile's ranks stay in this process (1: unsharded); scale searches up to max_gpus
        "nproc": (["1"], ["0", "-1", "100000", "x", ""]),
        "shard": ((["full-shard", "shard-grad-op"] if command == "scale" else list(SHARDS)),
                  ["x", "", "FULL", "none" if command == "scale" else "zero"]),
        "param_dtype": (["fp32", "bf16"], ["fp16", "", "BF16"]),
        "autocast": (["none", "bf16", "fp16"], ["fp8", "", "BF16"]),
        "grad_accum": (["1", "2", "4"], INT_BAD),
        "loop": (["manual", "trainer"], ["", "hf", "MANUAL"]),
        "max_gpus": (["8", "64", "1024"], INT_BAD),
        "per_node": (["1", "4", "8"], INT_BAD),
        "kind": (["regimes", "breakdown", "rank", "batch", "validation"],
                 ["nope", "", "REGIMES"]),
        # serve
        "dtype": (["fp32", "bf16", "fp16", "int8", "nf4"], ["int4", "", "BF16"]),
        **{name: (["1", "2", "16", "256", "8192"], INT_BAD) for name in (
            "concurrent", "max_batched_tokens", "block_size", "max_seqs", "adapters",
            "max_loras", "max_lora_rank", "max_cpu_loras")},
    }
    return table.get(name, ([], JUNK))


def values(command: str, name: str, files: dict[str, str]) -> st.SearchStrategy[str]:
    """Mostly a valid value; sometimes a bad one, junk, or any short unicode text."""
    valid, bad = pools(command, name, files)
    kinds = {"valid": st.sampled_from(valid or JUNK), "bad": st.sampled_from(bad or JUNK),
             "junk": st.sampled_from(JUNK), "text": st.text(max_size=8)}
    weights = ["valid"] * 16 + ["bad", "bad", "junk", "text"]  # (hypothesis' one_of would
    return st.sampled_from(weights).flatmap(kinds.__getitem__)  # weigh them alike)


MODEL_SOURCES = ("params", "model", "config")
REQUIRED = {"fits": [("gpu", "memory")], "scale": [("gpu", "memory")], "plot": [("out",)],
            "serve": [("gpu", "memory")]}


# Values that make a heavy command fail before it runs anything (appended last, so they win
# over an earlier valid value of the same flag).
BAD_LAST = {
    "profile": [["--batch", "0"], ["--seq", "-1"], ["--model", "nope"], ["--regime", "nope"],
                ["--steps", "0"], ["--capacity", "5"], ["--rank", "0"], ["--bogus"],
                ["--optimizer", "adam"], ["--alpha", "nan"], ["--classes", "0"],
                ["--device", "bogus"], ["--targets", ""], ["--batch"], ["extra"]],
    "validate": [["--device", "bogus"], ["--device", ""], ["--impl", "x"], ["--bogus"],
                 ["--out"], ["extra"], ["--device", "cdua"]],
    "plot": [["--rank", "0"], ["--bogus"], ["--out", "p.txt"], ["--gpus", "0"],
             ["--model", "nope"], ["--reserve", "5"], ["--alpha", "inf"]],
}
# The subset that fails before torch is imported (for the real processes).
BAD_EARLY = {**BAD_LAST,
             "profile": [b for b in BAD_LAST["profile"] if b[:2] != ["--device", "bogus"]],
             "validate": [["--bogus"], ["--out"], ["extra"], ["--impl", "x", "--quick", "-h"]]}


def usually(draw, n: int = 10) -> bool:
    """True n-1 times in n; hypothesis' simplest draw (0) gives True."""
    return draw(st.integers(0, n - 1)) < n - 1


@st.composite
def argv(draw, command: str, files: dict[str, str], early: bool = False):
    """(args, json_mode): one command line. ``json_mode``: --json given as a flag, no help.

    ``early``: heavy commands always end in a bad value that fails before torch is imported.
    """
    params = [p for p in GROUP.commands[command].params]
    items: list[tuple[str, list[str]]] = []  # (kind, tokens)
    if command == "profile":  # its defaults (seq 128) are not tiny; drawn values may override
        items.append(("value", ["--batch", "1", "--seq", "16", "--steps", "1"]))
    sources = [p for p in params if p.name in MODEL_SOURCES]
    if sources and usually(draw):  # exactly one model
        p = draw(st.sampled_from(sources))
        items.append(("value", [draw(st.sampled_from(p.opts)),
                                draw(values(command, p.name, files))]))
    positional = [p for p in params if not p.opts[0].startswith("-")]
    if positional and usually(draw):  # the argument, first
        items.append(("value", [draw(values(command, positional[0].name, files))]))
    by_name = {p.name: p for p in params}
    for group in REQUIRED.get(command, ()):  # usually what the command needs
        if usually(draw):
            p = by_name[draw(st.sampled_from(group))]
            items.append(("value", [p.opts[0], draw(values(command, p.name, files))]))
    options = [p for p in params if p.name not in MODEL_SOURCES] or params
    if sources and not usually(draw):
        options = params  # and sometimes several models, or none
    chosen = [draw(st.sampled_from(options)) for _ in range(draw(st.integers(0, 6)))]
    for name, other in (("batch", "seq"), ("seq", "batch")):  # activations need both
        if name in {p.name for p in chosen} and other in by_name and usually(draw, 4):
            chosen.append(by_name[other])
    for p in chosen:
        if not p.opts[0].startswith("-"):  # a positional argument
            items.append(("value", [draw(values(command, p.name, files))]))
            continue
        flag = draw(st.sampled_from(p.opts))
        if getattr(p, "is_flag", False):
            items.append(("flag", [flag]))
        elif not usually(draw, 25):
            items.append(("missing", [flag]))  # the value left out
        else:
            items.append(("value", [flag, draw(values(command, p.name, files))]))
    extras = draw(st.sampled_from([None] * 30 + ["junk", "unknown", "help", "dash"]))
    if extras == "junk":
        items.insert(draw(st.integers(0, len(items))), ("junk", [draw(st.sampled_from(JUNK))]))
    elif extras == "unknown":
        items.append(("unknown", [draw(st.sampled_from(["--bogus", "-z", "--json=1",
                                                         "--params=", "--no-json"]))]))
    elif extras == "help":
        items.insert(draw(st.integers(0, len(items))), ("help", [draw(st.sampled_from(
            ["--help", "-h"]))]))
    elif extras == "dash":
        items.append(("junk", ["--"]))
    has_json = any(p.name == "json_out" for p in params)
    if has_json and draw(st.booleans()):
        at = draw(st.integers(0, len(items)))
        items.insert(at, ("json", ["--json"]))
    if command in HEAVY and (early or usually(draw, 30)):  # most carry a bad value, last
        while items and items[-1][0] == "missing":  # which must not become a flag's value
            items.pop()
        items.append(("bad", draw(st.sampled_from((BAD_EARLY if early else BAD_LAST)[command]))))
    json_mode = any(
        kind == "json" and (i == 0 or items[i - 1][0] != "missing")
        for i, (kind, _) in enumerate(items)
    ) and not any(kind == "help" or kind == "bad" and {"-h", "--help"} & set(tokens)
                  for kind, tokens in items)
    args = [command] + [token for _, tokens in items for token in tokens]
    return args, json_mode


# ---- the checks --------------------------------------------------------------------------------

def check(command: str, args: list[str], json_mode: bool, code: int, out: str, err: str) -> None:
    where = f"args={args!r}\nexit={code}\nstdout={out[-2000:]}\nstderr={err[-2000:]}"
    COUNT[f"exit {code}"] = COUNT.get(f"exit {code}", 0) + 1
    assert "Traceback" not in out and "Traceback" not in err, where
    assert code in (0, 1, 2), where
    if code == 1:
        assert command in EXIT_ONE, where
    if code == 2 and err.lstrip().startswith("error:"):
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, where  # one clear line
    asked_help = "-h" in args or "--help" in args  # help wins over --json, as in click
    if json_mode and code in (0, 1) and not asked_help:  # fits/profile: JSON on "does not fit"
        doc = json.loads(out)  # the whole of stdout: exactly one JSON value...
        assert isinstance(doc, dict), where  # ...and it is an object


@pytest.fixture(scope="module")
def runner():
    """typer's CliRunner, minus rebuilding the click commands from the functions' signatures
    on every call (two thirds of the time of a short case)."""
    import typer.testing

    mp = pytest.MonkeyPatch()
    mp.setattr(typer.testing, "_get_command", lambda app: GROUP if app is APP else
               typer.main.get_command(app), raising=False)  # an older typer: just slower
    yield CliRunner(env={"COLUMNS": "100", "MEMPLAN_DEBUG": "", "NO_COLOR": "1"})
    mp.undo()


@pytest.fixture(scope="module")
def isolated(files):
    """cwd in the temporary folder (validate and plot write there by default), and validate's
    matrix cut to one tiny row."""
    import memplan.profile.validate as validate

    mp = pytest.MonkeyPatch()
    mp.chdir(files["root"])
    row = ("llama-tiny", {"regime": "lora", "batch": 1, "seq": 8},
           {"num_layers": 1, "vocab_size": 128})
    mp.setattr(validate, "matrix_for", lambda *args, **kwargs: [row])
    import memplan.profile.matrix as matrix  # validate --serve: one tiny row

    for name in ("SERVE_CPU_MATRIX", "SERVE_FAKE_MATRIX"):
        mp.setattr(matrix, name, [("llama-tiny", 1, 8, 1, "fp32")])
    yield
    mp.undo()


def run_in_process(runner, command: str, args: list[str], json_mode: bool) -> None:
    result = runner.invoke(APP, args)
    COUNT["cases"] += 1
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"args={args!r} raised:\n{tb}")
    check(command, args, json_mode, result.exit_code, result.stdout, result.stderr)


@pytest.mark.parametrize("command", [c for c in CASES if c in COMMANDS])
def test_fuzz_in_process(command: str, runner, files, isolated, monkeypatch) -> None:
    if command == "validate":  # its figure takes seconds to draw; plot's are fuzzed for real
        import memplan.plots as plots

        monkeypatch.setattr(plots, "validation_figure", lambda rows, title=None: None)
        monkeypatch.setattr(plots, "save_figure",
                            lambda fig, path: Path(path).write_bytes(b"\x89PNG\r\n"))
    @fuzz_settings(command)
    @given(argv(command, files))
    def fuzz(case) -> None:
        args, json_mode = case
        run_in_process(runner, command, args, json_mode)

    fuzz()


def test_every_command_is_fuzzed() -> None:
    assert set(COMMANDS) <= set(CASES), f"add {set(COMMANDS) - set(CASES)} to CASES"


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"], ["nope"], ["--json"], ["estimate"],
                                  ["ESTIMATE"], ["--version"], ["estimate", "--help", "--bogus"],
                                  ["fits", "-h"], ["models", "--json", "--json"]])
def test_top_level(args, runner) -> None:
    result = runner.invoke(APP, args)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    check(args[0] if args else "", args, False, result.exit_code, result.stdout, result.stderr)


def test_profile_and_validate_really_run(runner, files, isolated) -> None:
    """A few valid heavy cases on purpose, so that the fuzz of their outputs is not vacuous."""
    cases = [
        (["profile", "--config", files["tiny.json"], "--batch", "2", "--seq", "16",
          "--device", "cpu", "--steps", "1", "--json"], 0),
        (["profile", "--model", "gpt2-tiny", "--batch", "1", "--seq", "8", "--device", "fake",
          "--regime", "bitfit", "--steps", "1"], 0),
        (["profile", "--config", files["gpt.json"], "--batch", "1", "--seq", "8",
          "--device", "cpu", "--capacity", "1KiB", "--json"], 1),
        (["validate", "--device", "fake", "--out", f"{files['root']}/v", "--json"], 0),
    ]
    for args, code in cases:
        result = runner.invoke(APP, args)
        check(args[0], args, "--json" in args, result.exit_code, result.stdout, result.stderr)
        assert result.exit_code == code, result.output


# ---- real processes ----------------------------------------------------------------------------

def run_process(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMPLAN_DEBUG": "", "COLUMNS": "100", "PYTHONIOENCODING": "ascii"}
    return subprocess.run([sys.executable, "-m", "memplan", *args], capture_output=True,
                          timeout=60, env=env, cwd=cwd)


def safe_for_argv(args: list[str]) -> bool:
    """An operating system's argv holds no NUL (and Python's no lone surrogate)."""
    return all("\x00" not in a and a.encode("utf-8", "surrogateescape") for a in args[:1]) \
        and all("\x00" not in a for a in args)


@settings(max_examples=max(1, int(5 * SCALE)), deadline=None, derandomize=SCALE <= 1,
          database=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.generate])  # shrinking processes takes minutes
@given(data=st.data())
def test_fuzz_real_processes(tmp_path_factory, data) -> None:
    """Ten command lines per example, run as real processes four at a time, with an ASCII
    stdout (the harshest terminal): nothing catches a stray exception there."""
    root = tmp_path_factory.mktemp("proc")
    files = {k: str(root / k) for k in ("tiny.json", "gpt.json", "bad.json", "array.json",
                                        "empty.json", "folder", "missing", "report.json")}
    files["root"] = str(root)
    cases = []
    for _ in range(10):
        command = data.draw(st.sampled_from([c for c in CASES if c in COMMANDS]))
        args, json_mode = data.draw(argv(command, files, early=True))
        if safe_for_argv(args):
            cases.append((command, args, json_mode))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run_process(c[1], str(root)), cases))
    for (command, args, json_mode), proc in zip(cases, results, strict=True):
        COUNT["cases"] += 1
        check(command, args, json_mode, proc.returncode,
              proc.stdout.decode("ascii", "replace"), proc.stderr.decode("ascii", "replace"))


def test_fuzz_counts() -> None:
    """Runs last in this file: how many command lines were tried (see README, Reliability)."""
    print(f"\nfuzzed command lines: {COUNT['cases']} ({COUNT})")
