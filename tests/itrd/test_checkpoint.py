"""Checkpoint files: atomic writes, sha256 verification, fallback to the previous one, safe loading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from itrd.engine.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    load_checkpoint,
    recorded_sha256,
    save_checkpoint,
    sha256_file,
)


def state(v: float) -> dict[str, object]:
    return {"format": 1, "epoch": int(v), "w": torch.full((4, 4), v), "nested": {"x": [1, 2.5, "s"]}}


def test_round_trip_and_recorded_sha256(tmp_path: Path) -> None:
    p = tmp_path / "last.pt"
    digest = save_checkpoint(state(1.0), p)
    assert recorded_sha256(p) == digest == sha256_file(p)
    loaded = load_checkpoint(p)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.full((4, 4), 1.0))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_second_save_keeps_previous_and_truncation_falls_back(tmp_path: Path) -> None:
    p = tmp_path / "last.pt"
    save_checkpoint(state(1.0), p)
    save_checkpoint(state(2.0), p)
    assert load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 1
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # a crash or full disk truncated the newest file
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(p)
    found = latest_valid_checkpoint(tmp_path)
    assert found is not None and found[0].name == "last.prev.pt" and found[1]["epoch"] == 1


def test_a_flipped_byte_is_detected(tmp_path: Path) -> None:
    p = tmp_path / "last.pt"
    save_checkpoint(state(3.0), p)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        latest_valid_checkpoint(tmp_path)  # no older one: a clear error, never a silent restart


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert latest_valid_checkpoint(tmp_path) is None


def test_failed_write_leaves_old_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "last.pt"
    save_checkpoint(state(1.0), p)
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(state(2.0), p)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert load_checkpoint(p)["epoch"] == 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": Evil()}, p, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(p, verify=False)
