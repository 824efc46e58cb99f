"""Entry point: the `itrd` command group and its local commands (train, eval, convert, models, presets, spec)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from itrd.cli.jobs import register as register_client_commands
from itrd.cli.progress import TrainProgress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="itrd-service")
def cli() -> None:
    """ITRD knowledge distillation: train and distill locally, or submit jobs to the service."""


def _fail(message: str, code: int = 2) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


@cli.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory: spec, metrics.jsonl, checkpoints, student.safetensors, summary.json.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last valid checkpoint.")
@click.option("--device", default=None, help="Override the spec's device (auto, cpu, cuda, cuda:N).")
def train(spec_file: Path, out_dir: Path, resume: bool, device: str | None) -> None:
    """Train a teacher or distill a student from SPEC_FILE (YAML or JSON)."""
    from pydantic import ValidationError

    from itrd.engine import StopRequested
    from itrd.engine import train as run_training
    from itrd.spec import load_spec

    try:
        spec = load_spec(spec_file)
        if device:
            spec = spec.model_copy(update={"device": device})
    except (ValidationError, ValueError, yaml.YAMLError, json.JSONDecodeError) as exc:
        _fail(f"{spec_file}: invalid spec\n{exc}")
        return
    progress = TrainProgress()
    try:
        summary = run_training(spec, out_dir, callbacks=progress, resume=resume)
    except KeyboardInterrupt:
        progress.close()
        _fail(f"interrupted; resume with: itrd train {spec_file} --out {out_dir} --resume", 130)
        return
    except StopRequested as exc:
        progress.close()
        _fail(str(exc), 3)
        return
    except Exception as exc:
        progress.close()
        _fail(str(exc), 1)
        return
    progress.close()
    click.echo(json.dumps(summary, indent=2))


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--arch", default=None, help="Architecture (read from model_card.json or the checkpoint if omitted).")
@click.option("--dataset", "dataset_name", default=None, help="Dataset name (default: the one it was trained on).")
@click.option("--root", default=None, help="Dataset root directory.")
@click.option("--device", default="auto")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_command(checkpoint: Path, arch: str | None, dataset_name: str | None, root: str | None,
                 device: str, as_json: bool) -> None:
    """Evaluate a student checkpoint (.safetensors or .pt) on a dataset's test split."""
    from itrd.cli.evaluate import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(checkpoint, arch=arch, dataset=dataset_name, root=root, device=device)
    except Exception as exc:
        _fail(str(exc), 1)
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{result['architecture']} on {result['dataset']}: top-1 {result['top1']:.2f}%  "
                   f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  ({result['images']} images)")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def models(as_json: bool) -> None:
    """List the architectures a spec can name."""
    from itrd.models import model_family, model_names

    names = model_names()
    if as_json:
        click.echo(json.dumps([{"name": n, "family": model_family(n)} for n in names], indent=2))
        return
    for n in names:
        click.echo(f"{n:28s} {model_family(n)}")


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--arch", required=True, help="The checkpoint's architecture, e.g. resnet32x4 (see `itrd models`).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .safetensors file to write, in itrd's layout.")
def convert(checkpoint: Path, arch: str, out_file: Path) -> None:
    """Convert a RepDistiller (CRD) checkpoint, e.g. ckpt_epoch_240.pth, to itrd's layout as safetensors.

    Teacher specs and uploads accept RepDistiller files as they are; a converted file is for sharing
    the weights without the pickle format, or for other tools that expect itrd's key names.
    """
    from safetensors.torch import save

    from itrd.engine.checkpoint import write_atomic
    from itrd.engine.weights import WeightsError, read_state_dict
    from itrd.models.convert import from_repdistiller

    if out_file.suffix != ".safetensors":
        _fail(f"--out must name a .safetensors file (itrd reads weights by their suffix), got {out_file.name}")
        return
    try:
        state = from_repdistiller(read_state_dict(checkpoint), arch)
    except WeightsError as exc:
        _fail(f"{checkpoint}: {exc}")
        return
    num_classes = int(state["classifier.weight"].shape[0])
    # Clones: tensors that share storage cannot be saved as safetensors.
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_file, save(tensors, metadata={"architecture": arch, "num_classes": str(num_classes),
                                                   "converted_from": "RepDistiller"}))
    click.echo(f"wrote {out_file}: {arch}, {num_classes} classes, {len(tensors)} tensors")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def presets(as_json: bool) -> None:
    """List the built-in presets (the paper's teacher -> student pairs and a CPU demo)."""
    from itrd.spec import preset_names, preset_spec

    rows = []
    for name in preset_names():
        s = preset_spec(name)
        assert s.teacher is not None
        rows.append({"name": name, "teacher": s.teacher.architecture, "student": s.model,
                     "dataset": s.dataset.name, "epochs": s.optim.epochs})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:30s} {r['teacher']:>12s} -> {r['student']:<12s} {r['dataset']:12s} "
                   f"{r['epochs']} epochs")


@cli.command()
@click.argument("preset")
@click.option("--kind", type=click.Choice(["distill", "train"]), default="distill",
              help="'train' prints the teacher-training job of the pair.")
@click.option("--teacher-path", default=None, help="Teacher weights file to put in the spec.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml")
def spec(preset: str, kind: str, teacher_path: str | None, fmt: str) -> None:
    """Print PRESET as a complete spec file to edit and pass to `itrd train`."""
    from itrd.spec import preset_spec

    try:
        s = preset_spec(preset, kind=kind, teacher_path=teacher_path)  # type: ignore[arg-type]
    except ValueError as exc:
        _fail(str(exc))
        return
    data: Any = json.loads(s.model_dump_json(exclude_none=True))
    click.echo(json.dumps(data, indent=2) if fmt == "json" else yaml.safe_dump(data, sort_keys=False), nl=False)


def _register_optional_commands() -> None:
    # Service-side commands live with the service; the library works without them.
    try:
        from service.cli import register
    except ImportError:
        return
    register(cli)


def main() -> None:
    """Console-script entry point."""
    _register_optional_commands()
    register_client_commands(cli)
    cli()
