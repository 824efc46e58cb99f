"""A tqdm progress bar over a training run, fed by the engine's callbacks."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from itrd.engine.callbacks import Callbacks


class TrainProgress(Callbacks):
    """One bar per epoch with the live loss terms; a line per finished epoch."""

    def __init__(self) -> None:
        self.bar: tqdm[Any] | None = None
        self.epochs = 0

    def on_start(self, info: dict[str, Any]) -> None:
        self.epochs = int(info["epochs"])
        parts = [f"device {info['device']}"]
        if "precision" in info:
            layout = ", channels_last" if info.get("channels_last") else ""
            parts.append(f"{info['precision']}{layout}")
        if info.get("compile"):
            parts.append("torch.compile: the first steps compile kernels (tens of seconds on a CPU)")
        if info.get("teacher_top1") is not None:
            parts.append(f"teacher top-1 {info['teacher_top1']:.2f}%")
        if info.get("resumed_from"):
            parts.append(f"resumed at epoch {info['start_epoch']} from {info['resumed_from']}")
        tqdm.write(", ".join(parts))

    def on_step(self, epoch: int, step: int, steps_per_epoch: int, live: dict[str, float] | None) -> None:
        if self.bar is None:
            self.bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{self.epochs}", leave=False,
                            dynamic_ncols=True, initial=step - 1)
        self.bar.update(1)
        if live:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in live.items()}, refresh=False)

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        self.close()
        terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
        acc = f" test top-1 {metrics['test_top1']:.2f}%" if "test_top1" in metrics else ""
        tqdm.write(f"epoch {metrics['epoch']}/{self.epochs} loss={metrics.get('loss', float('nan')):.4f} {terms}"
                   f"{acc} ({metrics.get('images_per_second', 0):.0f} img/s)")

    def close(self) -> None:
        """Close the current epoch's bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
