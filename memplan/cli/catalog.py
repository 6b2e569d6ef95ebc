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
