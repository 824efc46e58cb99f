"""`itrd eval`: evaluate a saved student on a dataset's test split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from itrd.data import load_dataset, make_loader
from itrd.engine.evaluate import evaluate
from itrd.engine.hardware import resolve_device
from itrd.engine.weights import load_weights_strict, read_state_dict
from itrd.models import create_model


def _card_for(checkpoint: Path) -> dict[str, Any]:
    card = checkpoint.parent / "model_card.json"
    if card.exists():
        data: dict[str, Any] = json.loads(card.read_text())
        return data
    if checkpoint.suffix == ".pt":
        from itrd.engine.checkpoint import load_checkpoint

        spec = load_checkpoint(checkpoint, verify=False)["spec"]
        return {"architecture": spec["model"], "dataset": spec["dataset"]["name"],
                "dataset_root": spec["dataset"].get("root")}
    return {}


def evaluate_checkpoint(checkpoint: Path, *, arch: str | None = None, dataset: str | None = None,
                        root: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Top-1/top-5/loss of a student checkpoint; architecture and dataset default to its model card."""
    card = _card_for(checkpoint)
    arch = arch or card.get("architecture")
    dataset = dataset or card.get("dataset")
    if not arch or not dataset:
        raise ValueError(f"{checkpoint}: no model_card.json beside it; pass --arch and --dataset")
    root = root or card.get("dataset_root") or (card.get("spec") or {}).get("dataset", {}).get("root")
    data = load_dataset(dataset, Path(root) if root else None)
    model = create_model(arch, data.info.num_classes)
    load_weights_strict(model, read_state_dict(checkpoint), arch, checkpoint.name)
    dev = resolve_device(device)
    model.to(dev)
    loader = make_loader(data.test, data.info, batch_size=256, train=False, device=dev, seed=0, epoch=0)
    result = evaluate(model, loader, dev)
    return {"architecture": arch, "dataset": dataset, "images": len(data.test), **result}
