"""``memplan gpus`` and ``memplan models``: the catalogues."""

from __future__ import annotations

from memplan.cli import options as o
from memplan.cli.app import command


@command("gpus")
def gpus(json_out: o.Json = False) -> None:
    """List the GPUs memplan knows, with their capacities in bytes and GiB."""
    from rich.table import Table

    from memplan.presets import gpus as catalogue
    from memplan.report import console, print_json

    rows = list(catalogue().values())
    if json_out:
        print_json({"gpus": [vars(g) for g in rows]})
        return
    table = Table(title="GPUs", title_justify="left")
    for col in ("name", "label", "capacity (GiB)", "bytes", "source"):
        table.add_column(col, justify="right" if col in ("capacity (GiB)", "bytes") else "left")
    for g in rows:
        table.add_row(g.name, g.label, f"{g.capacity_bytes / 2**30:.2f}",
                      f"{g.capacity_bytes:,}", g.source)
    console().print(table)


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
