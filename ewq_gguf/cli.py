"""Command line: click parses, the API works, this module prints. Errors become one line and a non-zero exit."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Optional

import click

from .constants import (COMPUTE_DTYPES, DEFAULT_CALIBRATION_CTX, DEFAULT_CALIBRATION_TOKENS, DEFAULT_EVALUATION_CTX,
                        DEFAULT_GPTQ_TOKENS, DEFAULT_NOISE_LEVELS, DEFAULT_ROUNDING, DEFAULT_SENSITIVITY_METHOD,
                        DEFAULT_SENSITIVITY_TOKENS, DEVICE_CHOICES,
                        NOISE_SEQUENCE, ROUNDINGS, SENSITIVITY_METHODS)
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


class PlannerOptionsCommand(click.Command):
    """A command whose first options are made from the planner table (ewq_gguf.plan.registry) when the command is
    run or its help shown, not when this module is imported: the planners import torch, which `ewq-gguf inspect`
    and `perplexity` never load."""

    def __init__(self, *args: Any, planner_options: Callable[[], list[click.Option]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._planner_options: Optional[Callable[[], list[click.Option]]] = planner_options

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._planner_options is not None:
            self.params[:0] = self._planner_options()
            self._planner_options = None
        return super().get_params(ctx)


def _flag_type(option_field: dataclasses.Field) -> Any:
    """The click type of a planner option, from its option() metadata."""
    metadata = option_field.metadata
    if metadata["choices"]:
        return click.Choice(metadata["choices"])
    if metadata["file"]:
        return click.Path(dir_okay=False)
    return metadata["value_type"]


def _default_text(option_field: dataclasses.Field) -> Optional[str]:
    default = option_field.default
    return option_field.metadata["default_text"] if default is None else str(default)


def convert_planner_options() -> list[click.Option]:
    """--method and every planner's options. A flag several methods take has one help that names, per method, what
    it means there and its default; its value is None unless given, and the API refuses it for a method that does
    not take it."""
    from .plan.registry import DEFAULT_METHOD, TYPE_ONLY_METHOD, planners

    table = planners()
    method_help = "; ".join(f"{name}: {planner.help}" for name, planner in table.items())
    flags = [click.Option(["--method"], type=click.Choice(list(table)),
                          help=f"How types are decided. {method_help}. [default: {DEFAULT_METHOD}; "
                               f"{TYPE_ONLY_METHOD} when --type is given]")]
    uses: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name, planner in table.items():
        for option_field in planner.option_fields():
            uses.setdefault(option_field.name, []).append((name, option_field))
    for option_name, taken_by in uses.items():
        meanings: dict[tuple[str, Optional[str]], list[str]] = {}
        for method, option_field in taken_by:
            meanings.setdefault((option_field.metadata["help"], _default_text(option_field)), []).append(method)
        help_text = "; ".join(f"{', '.join(methods)}: {meaning}" + (f" [default: {default}]" if default else "")
                             for (meaning, default), methods in meanings.items())
        flags.append(click.Option(["--" + option_name.replace("_", "-"), option_name],
                                  type=_flag_type(taken_by[0][1]), help=help_text))
    return flags


def ewq_settings(*names: str) -> Callable[[], list[click.Option]]:
    """Flags for the EWQ settings `names` with EWQ's defaults, for the commands that rank blocks as EWQ does."""
    def flags() -> list[click.Option]:
        from .plan.ewq import EwqOptions

        return [click.Option(["--" + option_field.name], type=_flag_type(option_field), default=option_field.default,
                             show_default=True, help=option_field.metadata["help"])
                for option_field in dataclasses.fields(EwqOptions) if option_field.name in names]
    return flags


@main.command(cls=PlannerOptionsCommand, planner_options=convert_planner_options)
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--imatrix", "imatrix_file", type=click.Path(dir_okay=False),
              help="Importance-weighted quantization (any method) with the vectors of a calibration JSON or of a "
                   "llama-imatrix file (GGUF or legacy .dat); 'unit': equal importance for every column, no data "
                   "needed (ggml's error-minimizing search, lower error than plain encoding at the same size).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICE_CHOICES))
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="Reuse a plan: a plan JSON, or a GGUF file whose per-tensor types are copied.")
@click.option("--plan-out", type=click.Path(dir_okay=False),
              help="Save the plan: JSON, or FILE.txt as a recipe for `llama-quantize --tensor-type-file FILE.txt "
                   "F32.gguf OUT.gguf Q8_0` (any quantized base type; llama-quantize ignores the file for F16).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the exact output size; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--split-max-size", help="Split the output into llama.cpp's OUT-00001-of-0000N.gguf parts of at most "
                                       "this much tensor data each, e.g. 2G (K/M/G/T, decimal). llama.cpp loads "
                                       "the first part.")
@click.option("--allow-pickle", is_flag=True,
              help="Also read pytorch_model*.bin checkpoints (torch.load with weights_only=True). Off by default: "
                   "unpickling untrusted files can run code.")
@click.option("--quiet", is_flag=True, help="No plan table and no progress bars.")
@click.option("--validate", is_flag=True,
              help="After writing, compare with an F16 reference (or --base) through llama.cpp: KLD, top-1, PPL.")
@click.option("--base", "base_file", type=click.Path(dir_okay=False), help="--validate: the reference GGUF.")
@click.option("--text", "eval_text", type=click.Path(dir_okay=False),
              help="--validate: evaluation text (default: real text found on this machine).")
@click.option("--ollama-modelfile", is_flag=True, help="Write an Ollama Modelfile beside OUT.")
@click.option("--rounding", type=click.Choice(ROUNDINGS), default=DEFAULT_ROUNDING, show_default=True,
              help="How codes are chosen in each type: nearest (ggml's rounding, byte-identical to llama-quantize) "
                   "or gptq (error-compensating rounding that minimises each weight's output error on the "
                   "calibration text's inputs; needs --calibration; the file stays in the same types).")
@click.option("--gptq-tokens", type=int, default=None,
              help="--rounding gptq: calibration tokens the inputs are collected over "
                   f"[default: {DEFAULT_GPTQ_TOKENS}, at most the calibration's].")
@click.option("--gptq-sequential", is_flag=True,
              help="--rounding gptq: each block's inputs come from the blocks before it with their weights rounded "
                   "(as the file computes) instead of from the unquantized model.")
@reports_errors
def convert(model_dir: str, out: str, imatrix_file: str | None, device: str, plan_file: str | None,
            plan_out: str | None, dry_run: bool, force: bool, split_max_size: str | None, allow_pickle: bool,
            quiet: bool, validate: bool, base_file: str | None, eval_text: str | None, ollama_modelfile: bool,
            rounding: str, gptq_tokens: int | None, gptq_sequential: bool, method: str | None,
            **planner_options: Any) -> None:
    """Convert the checkpoint in MODEL_DIR to the GGUF file OUT."""
    from .api import convert as convert_api
    from .plan.display import format_plan

    result = convert_api(model_dir, out, method, device=device, force=force, plan=plan_file,
                         validate=validate, base=base_file, text=eval_text, ollama_modelfile=ollama_modelfile,
                         plan_out=plan_out, dry_run=dry_run, progress=not quiet, allow_pickle=allow_pickle,
                         split_max_size=split_max_size, imatrix=imatrix_file, rounding=rounding,
                         gptq_tokens=gptq_tokens, gptq_sequential=gptq_sequential, **{name: value for name, value in planner_options.items() if value is not None})
    if not quiet or dry_run:
        click.echo(format_plan(result.plan))
    if dry_run:
        click.echo(f"dry run: would write {result.bytes:,} bytes ({result.plan.tensor_bytes:,} of tensor data, "
                   f"{result.bits_per_weight:.3f} bits per weight)")
    else:
        click.echo(f"wrote {result.path} ({result.bytes:,} bytes, {result.bits_per_weight:.3f} bits per weight, "
                   f"{result.seconds:.1f} s)")
    if result.validation:
        from .validate import format_compare_table

        click.echo(format_compare_table(result.validation))
    if result.modelfile:
        click.echo(f"Ollama Modelfile: {result.modelfile} (ollama create NAME -f {result.modelfile})")


@main.command(cls=PlannerOptionsCommand, planner_options=ewq_settings("entropy", "k", "direction", "types"))
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICE_CHOICES))
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Save the analysis as JSON (for convert --analysis and fastewq train).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Save a per-block chart to this PNG (needs matplotlib).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def analyze(model_dir: str, entropy: str, k: float, direction: str, types: str, device: str, json_out: str | None,
            plot: str | None, quiet: bool) -> None:
    """Per-block weight entropy and ZD of the checkpoint in MODEL_DIR, with the EWQ tier each block would get (the
    z-score and tier columns rank by --entropy; both entropies are computed and saved)."""
    from .analyse.report import format_analysis, plot_analysis
    from .live_api import analyze as analyze_api
    from .plan.ewq import ewq_tiers, z_scores
    from .plan.tiers import TierTypes

    tier_types = TierTypes.parse(types)
    result = analyze_api(model_dir, device=device, progress=not quiet)
    scores = result.scores(entropy)
    tiers = ewq_tiers(scores, k, direction)
    click.echo(format_analysis(result, entropy, z_scores(scores), tiers, [tier_types.of(t).name for t in tiers]))
    if json_out:
        result.save(json_out)
        click.echo(f"analysis: {json_out}")
    if plot:
        plot_analysis(result, plot, entropy, tiers)
        click.echo(f"plot: {plot}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--text", type=click.Path(dir_okay=False),
              help="Calibration text, UTF-8 (.gz ok). Default: real English text found on this machine.")
@click.option("--tokens", default=DEFAULT_CALIBRATION_TOKENS, show_default=True,
              help="Tokens the activations (imatrix, LIM) are collected over.")
@click.option("--ctx", default=DEFAULT_CALIBRATION_CTX, show_default=True, help="Tokens per chunk.")
@click.option("--sensitivity", "sensitivity_method", default=DEFAULT_SENSITIVITY_METHOD, show_default=True,
              type=click.Choice(SENSITIVITY_METHODS),
              help="How each weight's sensitivity is measured: fisher (gradients, one block in memory at a time) or "
                   "noise (noise injection into each weight, the whole model in float32 in memory; the reference).")
@click.option("--sensitivity-tokens", type=int,
              help="Tokens the sensitivities rest on. [default: " + ", ".join(
                  f"{tokens} for {method}" for method, tokens in DEFAULT_SENSITIVITY_TOKENS.items())
                   + f" (noise: in sequences of {NOISE_SEQUENCE})]")
@click.option("--noise-levels", default=",".join(str(level) for level in DEFAULT_NOISE_LEVELS), show_default=True,
              help="Relative noise sizes t (||noise|| / ||W||) the sensitivity slope is fitted over.")
@click.option("--no-errors", is_flag=True, help="Skip the quantization error tables (the optimal planner then "
                                                "measures them at every conversion).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICE_CHOICES))
@click.option("--threads", type=int, help="CPU threads for torch. [default: torch's choice]")
@click.option("--compute-dtype", default="auto", show_default=True, type=click.Choice(COMPUTE_DTYPES),
              help="The blocks' arithmetic; auto: bfloat16 for a bfloat16 checkpoint on a GPU or a CPU with "
                   "AVX512-BF16/AMX (about 3x float32's rate), else float32.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Calibration JSON; its importance matrix is written beside it as STEM.imatrix.gguf "
                   "(llama-imatrix's format).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_errors
def calibrate(model_dir: str, text: str | None, tokens: int, ctx: int, sensitivity_method: str,
              sensitivity_tokens: int | None, noise_levels: str, no_errors: bool, device: str, threads: int | None,
              compute_dtype: str, out: str, force: bool, quiet: bool) -> None:
    """Run the checkpoint in MODEL_DIR on real text, one block at a time: LIM scores, importance vectors,
    sensitivities and quantization errors, for --method lim / optimal and --imatrix. An interrupted run continues
    from its last finished block when started again with the same arguments (its files wait in OUT.work/)."""
    from .api import calibrate as calibrate_api
    from .errors import InputError

    try:
        levels = [float(level) for level in noise_levels.split(",")]
    except ValueError:
        raise InputError(f"--noise-levels: not a comma-separated list of numbers: {noise_levels!r}") from None
    options = {"error_types": ()} if no_errors else {}
    result = calibrate_api(model_dir, out, force=force, text=text, tokens=tokens, ctx=ctx, device=device,
                           sensitivity=sensitivity_method, sensitivity_tokens=sensitivity_tokens,
                           noise_levels=levels, threads=threads, compute_dtype=compute_dtype,
                           progress=not quiet, **options)
    click.echo(format_calibration(result))
    click.echo(f"calibration: {out}")


def format_calibration(calibration) -> str:
    """LIM per block, the most and least sensitive weights, and where the time went."""
    lines = [f"{calibration.model}: {calibration.tokens} tokens of {calibration.text} ({calibration.device}); "
             f"sensitivities on {calibration.sensitivity_tokens} tokens"]
    lines.append("block  LIM")
    lines += [f"{index:5d}  {score:.4f}" for index, score in enumerate(calibration.lim)]
    ranked = sorted(calibration.sensitivity.items(), key=lambda item: -item[1].alpha)
    shown = ranked if len(ranked) <= 10 else ranked[:5] + ranked[-5:]
    lines.append("weight                              alpha (KL nats per unit t^2)")
    lines += [f"{name:34}  {measured.alpha:.4g}" for name, measured in shown]
    lines.append("seconds: " + ", ".join(f"{phase} {value:.1f}" for phase, value in calibration.seconds.items()))
    return "\n".join(lines)


@main.group()
def fastewq() -> None:
    """FastEWQ: predict EWQ's block tiers from metadata only."""


@fastewq.command("train", cls=PlannerOptionsCommand, planner_options=ewq_settings("entropy", "k", "direction"))
@click.argument("analyses", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to save the classifier JSON.")
@reports_errors
def fastewq_train(analyses: tuple[str, ...], out: str, entropy: str, k: float, direction: str) -> None:
    """Train a FastEWQ classifier on ANALYSES (JSON files from `ewq-gguf analyze --json`) to predict the EWQ tiers of
    --entropy, --k and --direction."""
    from .analyse import Analysis
    from .plan.fastewq import format_evaluation, train

    classifier = train([Analysis.load(path) for path in analyses], entropy=entropy, k=k, direction=direction)
    classifier.save(out)
    click.echo(format_evaluation(classifier))
    click.echo(f"classifier: {out}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@reports_errors
def inspect(file: str, as_json: bool) -> None:
    """Show a GGUF file's metadata, type histogram, bits per weight and recorded plan."""
    from .gguf_file.inspect import format_inspection, inspect_gguf

    summary = inspect_gguf(file)
    click.echo(json.dumps(summary, indent=1) if as_json else format_inspection(summary))


_TEXT_HELP = "UTF-8 text file (.gz ok). Default: real English text found on this machine (named in the output)."
_GPU_HELP = "Layers offloaded to the GPU, -1 for all. Default: all when llama-cpp-python was built with a GPU, else 0."


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--text", type=click.Path(dir_okay=False), help=_TEXT_HELP)
@click.option("--ctx", default=DEFAULT_EVALUATION_CTX, show_default=True,
              help="Tokens per chunk; the second half of each is scored.")
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
@click.option("--ctx", default=DEFAULT_EVALUATION_CTX, show_default=True,
              help="Tokens per chunk; the second half of each is scored.")
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
    from .validate import compare as compare_api, format_compare_table, plot_size_vs_kld, require_matplotlib

    if plot:
        require_matplotlib()
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


def run() -> None:
    """The ewq-gguf program: main(), except that an exit caused by a signal (code 128 + N) is immediate."""
    try:
        main()
    except SystemExit as exit_request:
        if isinstance(exit_request.code, int) and exit_request.code > 128:
            # the work's temporary files are already gone; finalizing the interpreter around worker threads that
            # are still inside native code (an encoder, a reader) can abort the process instead of exiting
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_request.code)
        raise


if __name__ == "__main__":
    run()
