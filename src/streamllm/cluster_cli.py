"""`streamllm cluster`: what a site needs on its cluster, shipped with the package."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

cluster_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Files a site needs on its cluster (docs/federation.md).")

TEMPLATES = "streamllm.hpc.templates"


def _templates() -> list[Path]:
    root = Path(str(resources.files(TEMPLATES)))
    return sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".sh"))


@cluster_app.command()
def templates(
    out: Annotated[Path | None, typer.Option(
        help="Copy the templates into this directory (it is created; existing files are "
             "kept unless --force).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite files already in --out.")] = False,
) -> None:
    """List the cluster-side templates, or copy them to --out."""
    found = _templates()
    if out is None:
        for path in found:
            typer.echo(f"{path.name}\t{path}")
        return
    out.mkdir(parents=True, exist_ok=True)
    for path in found:
        target = out / path.name
        if target.exists() and not force:
            typer.echo(f"kept {target} (exists; --force to overwrite)", err=True)
            continue
        shutil.copy2(path, target)
        typer.echo(str(target))
