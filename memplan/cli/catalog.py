"""``memplan gpus`` and ``memplan models``: the catalogues."""

from __future__ import annotations

from memplan.cli import options as o
from memplan.cli.app import command


@command("gpus")
def gpus(json_out: o.Json = False) -> None:
    """List the GPUs memplan knows: the capacity each card reports, its source, and its peak bf16.

    A capacity marked "bound" is the vendor's gigabytes × 10⁹ (no reported total was found), a
    lower bound on the real one. --gpu takes any name here, an alias, or the name nvidia-smi
    prints (case, spaces and dashes do not matter; h100 is the 80 GB SXM card).
    """
    from rich.table import Table
    from rich.text import Text

    from memplan.presets import gpus as catalogue
    from memplan.report import console, print_json

    rows = list(catalogue().values())
    if json_out:
        print_json({"gpus": [vars(g) | {"aliases": list(g.aliases),
                                        "device_names": list(g.device_names)} for g in rows]})
        return
    table = Table(title="GPUs", title_justify="left")
    for col in ("name", "label", "capacity (GiB)", "as reported", "bf16 TFLOPS"):
        table.add_column(col, justify="left" if col in ("name", "label") else "right")
    for g in rows:
        reported = "bound: vendor GB" if g.bound else f"{g.reported_mib:,} MiB"
        flops = "n/a" if g.bf16_tflops is None else f"{g.bf16_tflops:g}"
        table.add_row(Text(g.name), Text(g.label), f"{g.capacity_bytes / 2**30:.2f}", reported,
                      flops)
    out = console()
    out.print(table)
    out.print("bound: the vendor's GB × 10⁹, a lower bound (no reported total was found). "
              "Sources of the capacities:", markup=False)
    for g in rows:
        out.print(f"  {g.name}: {g.source}" + (f" <{g.source_url}>" if g.source_url else ""),
                  markup=False, highlight=False)
    out.print("`memplan gpus --json` adds the aliases and the datasheet of each TFLOPS figure.",
              markup=False)


@command("models")
def models(json_out: o.Json = False) -> None:
    """List the model presets with their exact parameter counts."""
    from rich.table import Table

    from memplan.params import count_params
    from memplan.presets import get_model, model_names
    from memplan.report import console, print_json

    specs = [get_model(n) for n in model_names()]
    if json_out:
        print_json({"models": [{"name": s.name, "family": s.family, "params": count_params(s),
                                "hidden_size": s.hidden_size, "num_layers": s.num_layers,
                                "vocab_size": s.vocab_size} for s in specs]})
        return
    table = Table(title="model presets", title_justify="left")
    for col in ("name", "family", "parameters", "hidden", "layers", "heads (kv)", "vocab"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for s in specs:
        table.add_row(s.name, s.model_type or s.family, f"{count_params(s):,}",
                      str(s.hidden_size), str(s.num_layers), f"{s.num_heads} ({s.num_kv_heads})",
                      f"{s.vocab_size:,}")
    console().print(table)


@command("recipes")
def recipes(
    params: o.Params = None, model: o.Model = None, config: o.Config = None,
    batch: o.Batch = None, seq: o.Seq = None, rank: o.Rank = 8,
    json_out: o.Json = False,
) -> None:
    """The recipes people run, by the names they know them by, each as memplan's choices:
    its flags, its bytes per parameter (the model states' formula) and, with --batch and
    --seq, its peak on the model (default llama-3-8b).

    N is the model's parameters, M the LoRA parameters. Use the flags with `estimate`,
    `fits`, `advise` or `profile`.
    """
    from dataclasses import replace

    from rich.table import Table
    from rich.text import Text

    from memplan.planner import plan
    from memplan.recipe import NAMED_RECIPES
    from memplan.report import console, print_json

    if params is None and model is None and config is None:
        model = "llama-3-8b"
    job = o.make_job(params, model, config, rank=rank, batch=batch, seq=seq)
    rows = []
    for named in NAMED_RECIPES:
        train = replace(job.train, **dict(named.choices))
        p = plan(job.spec, train, job.params)
        rows.append((named, p))
    if json_out:
        print_json({"model": job.spec.name, "assumed": job.assumed, "recipes": [
            {"name": n.name, "how": n.how, "choices": dict(n.choices), "flags": n.flags,
             "plan": p.to_dict()} for n, p in rows]})
        return
    table = Table(title=f"{job.spec.name}: the recipes people run", title_justify="left")
    for col in ("recipe", "memplan flags", "model states", "peak"):
        table.add_column(col, justify="right" if col == "peak" else "left")
    for named, p in rows:
        table.add_row(Text(f"{named.name}\n{named.how}"), Text(named.flags), Text(p.formula),
                      f"{p.total_bytes / 2**30:.2f} GiB")
    out = console()
    out.print(table)
    what = f"batch {batch} × seq {seq}" if job.train.has_activations else \
        "model states only (add --batch and --seq for activations)"
    out.print(f"peak: {what}, per GPU, without the runtime reserve", markup=False)
