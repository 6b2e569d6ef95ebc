"""``memplan validate``: the matrix of profiles, written to reports/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memplan.cli import options as o
from memplan.cli.app import command
from memplan.cli.profile import Device, need_torch


@command("validate")
def validate(
    device: Device = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="A few rows only.")] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for the report.")] = Path("reports"),
    impl: o.ModelImpl = "memplan",
    sharded: Annotated[bool, typer.Option(
        "--sharded", help="The FSDP2 rows instead: real gloo ranks (cpu) or 7B and 70B over "
        "8 to 1024 fake ranks (fake, which also writes reports/scaling.*).")] = False,
    serve: Annotated[bool, typer.Option(
        "--serve", help="The serving rows instead: Hugging Face inference with a KV cache "
        "(prefill, then decode steps); writes reports/validation-serve-<device>.*")] = False,
    json_out: o.Json = False,
) -> None:
    """Profile a matrix of jobs against their plans; write reports/validation-<device>.*"""
    need_torch()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from memplan.errors import MemplanError, unknown
    from memplan.profile.step import resolve_device
    from memplan.profile.validate import validate as run
    from memplan.report import print_json
    from memplan.spec import IMPLS

    if out.exists() and not out.is_dir():
        raise MemplanError(f"--out {str(out)!r} is a file; give a folder")
    impl = "memplan" if impl == "auto" else impl  # the matrices are per implementation
    if impl not in IMPLS:  # checked before the progress bar is drawn
        raise unknown("implementation", impl, IMPLS)
    if sharded and impl != "memplan":
        raise MemplanError("--sharded runs memplan's reference models; drop --impl hf")
    device = resolve_device(device)
    if serve:
        from memplan.profile.serve_measure import validate_serve

        paths, summary = validate_serve(device, out, quick)
        if json_out:
            print_json({"summary": summary, "files": [str(p) for p in paths]})
        else:
            typer.echo(f"{summary['rows']} rows; max |error| "
                       f"{100 * summary['max_abs_error']:.3f}%; wrote "
                       f"{', '.join(str(p) for p in paths)}")
        return
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=json_out, transient=False) as bar:
        task = bar.add_task("profiling", total=None)

        def on_row(i: int, n: int, row: dict) -> None:
            err = row["relative_error"]
            bar.update(task, completed=i, total=n,
                       description=f"{row['model']} {row['regime']} "
                                   f"{'n/a' if err is None else f'{100 * err:+.2f}%'}")
        try:
            paths, summary = run(device, quick=quick, out_dir=out, on_row=on_row, impl=impl,
                                 sharded=sharded)
        except KeyboardInterrupt:
            typer.echo("interrupted: the finished rows are in the report", err=True)
            raise typer.Exit(130) from None
    if json_out:
        print_json({"summary": summary, "files": [str(p) for p in paths]})
        return
    med, mx = summary.get("median_abs_error"), summary.get("max_abs_error")
    typer.echo(f"{summary['rows']} rows; median |error| {100 * (med or 0):.3f}%, max "
               f"{100 * (mx or 0):.3f}%; wrote {', '.join(str(p) for p in paths)}")
