"""Command line: click parses, the API works, this module prints. Errors become one line and a non-zero exit."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from .errors import EwqGgufError


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print an EwqGgufError as one line on stderr and exit with its code."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EwqGgufError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group()
@click.version_option(package_name="ewq-gguf")
def main() -> None:
    """ewq-gguf: Hugging Face checkpoints to mixed-precision GGUF files for llama.cpp and Ollama."""


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--method", default="uniform", show_default=True, help="How types are decided.")
@click.option("--type", "type_", default="Q8_0", show_default=True, help="Type for --method uniform.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="Reuse a plan: a plan JSON, or a GGUF file whose per-tensor types are copied.")
@click.option("--plan-out", type=click.Path(dir_okay=False),
              help="Save the plan: JSON, or FILE.txt as a llama-quantize --tensor-type-file recipe.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the size; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No plan table and no progress bars.")
@reports_errors
def convert(model_dir: str, out: str, method: str, type_: str, device: str, plan_file: str | None,
            plan_out: str | None, dry_run: bool, force: bool, quiet: bool) -> None:
    """Convert the checkpoint in MODEL_DIR to the GGUF file OUT."""
    from .api import convert as convert_api

    result = convert_api(model_dir, out, method, type=type_, device=device, force=force, plan=plan_file,
                         plan_out=plan_out, dry_run=dry_run, progress=not quiet)
    if not quiet or dry_run:
        click.echo(result.plan.table())
    if dry_run:
        click.echo(f"dry run: would write {result.bytes:,} bytes of tensor data ({result.bits_per_weight:.3f} bpw)")
    else:
        click.echo(f"wrote {result.path} ({result.bytes:,} bytes, {result.bits_per_weight:.3f} bits per weight, "
                   f"{result.seconds:.1f} s)")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@reports_errors
def inspect(file: str, as_json: bool) -> None:
    """Show a GGUF file's metadata, type histogram, bits per weight and recorded plan."""
    from .inspect import format_inspection, inspect_gguf

    summary = inspect_gguf(file)
    click.echo(json.dumps(summary, indent=1) if as_json else format_inspection(summary))


_TEXT_HELP = "UTF-8 text file (.gz ok). Default: real English text found on this machine (named in the output)."
_GPU_HELP = "Layers offloaded to the GPU, -1 for all. Default: all when llama-cpp-python was built with a GPU, else 0."


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--text", type=click.Path(dir_okay=False), help=_TEXT_HELP)
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk; the second half of each is scored.")
@click.option("--chunks", type=int, help="Score only the first N chunks. Default: the whole text.")
@click.option("--gpu-layers", type=int, help=_GPU_HELP)
@click.option("--threads", type=int, help="CPU threads. Default: every core this process may use.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@reports_errors
def perplexity(file: str, text: str | None, ctx: int, chunks: int | None, gpu_layers: int | None,
               threads: int | None, as_json: bool) -> None:
    """Perplexity of a GGUF FILE, computed as llama.cpp's llama-perplexity does."""
    from .validate import format_perplexity, perplexity as perplexity_api

    report = perplexity_api(file, text=text, ctx=ctx, chunks=chunks, gpu_layers=gpu_layers, threads=threads)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else format_perplexity(report))


@main.command()
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--text", type=click.Path(dir_okay=False), help=_TEXT_HELP)
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk; the second half of each is scored.")
@click.option("--chunks", type=int, help="Score only the first N chunks. Default: the whole text.")
@click.option("--gpu-layers", type=int, help=_GPU_HELP)
@click.option("--threads", type=int, help="CPU threads. Default: every core this process may use.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where the base logits are cached. Default: ~/.cache/ewq-gguf/base-logits.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Save a size-vs-KLD chart to this PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@reports_errors
def compare(base: str, candidates: tuple[str, ...], text: str | None, ctx: int, chunks: int | None,
            gpu_layers: int | None, threads: int | None, cache_dir: str | None, plot: str | None,
            as_json: bool) -> None:
    """KL divergence, top-1 agreement and perplexity of CANDIDATES against BASE (its logits are cached)."""
    from .validate import compare as compare_api, format_compare_table, plot_size_vs_kld

    reports = compare_api(base, list(candidates), text=text, ctx=ctx, chunks=chunks, gpu_layers=gpu_layers,
                          cache_dir=cache_dir, threads=threads)
    if plot:
        plot_size_vs_kld(reports, plot)
    if as_json:
        click.echo(json.dumps([report.to_dict() for report in reports], indent=1))
        return
    click.echo(f"text: {reports[0].text}; {reports[0].chunks} chunks x {reports[0].ctx} tokens, "
               f"{reports[0].tokens} scored tokens per file")
    click.echo(format_compare_table(reports))
    if plot:
        click.echo(f"plot: {plot}")


if __name__ == "__main__":
    main()
