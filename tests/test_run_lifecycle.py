"""run_lifecycle.py: checkpoints survive a crash or a full disk mid-write. (Resume, SIGTERM, SIGKILL and
torchrun restarts drive train.py as a user does: tests/test_train.py.)"""
from pathlib import Path

import pytest
import torch

import model as M
import run_lifecycle as RL
from train_config import TrainConfig


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, tiny_qwen, monkeypatch):
    model = M.Transformer.from_pretrained(tiny_qwen)
    opt = torch.optim.AdamW([model.steering], lr=0.1)
    cfg = TrainConfig(task="toy")
    with torch.no_grad():
        model.steering.fill_(1.0)
    RL.save_checkpoint(tmp_path, model, opt, cfg, step=4, epoch=0, offset=16, data_fingerprint="abc")

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", dies_half_way)
    with torch.no_grad():
        model.steering.fill_(2.0)
    with pytest.raises(KeyboardInterrupt):
        RL.save_checkpoint(tmp_path, model, opt, cfg, step=6, epoch=0, offset=24, data_fingerprint="abc")
    assert (tmp_path / "checkpoint.pt.tmp").exists()  # the stray half-written file
    state = RL.load_checkpoint(tmp_path)
    assert state["step"] == 4 and torch.equal(state["trainable"][0], torch.ones_like(model.steering))
    assert state["config"]["task"] == "toy"


def test_a_full_disk_at_a_checkpoint_names_the_path_and_keeps_the_previous_one(tmp_path, tiny_qwen,
                                                                               monkeypatch):
    model = M.Transformer.from_pretrained(tiny_qwen)
    opt = torch.optim.AdamW([model.steering], lr=0.1)
    cfg = TrainConfig(task="toy")
    RL.save_checkpoint(tmp_path, model, opt, cfg, step=2, epoch=0, offset=8, data_fingerprint="abc")

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device", f.name)
    monkeypatch.setattr(torch, "save", disk_full)
    with torch.no_grad():
        model.steering.fill_(2.0)
    with pytest.raises(SystemExit) as e:
        RL.save_checkpoint(tmp_path, model, opt, cfg, step=4, epoch=0, offset=16, data_fingerprint="abc")
    assert "No space left on device" in str(e.value) and str(tmp_path / "checkpoint.pt.tmp") in str(e.value)
    assert "previous checkpoint" in str(e.value)
    assert not list(tmp_path.glob("*.tmp"))
    state = RL.load_checkpoint(tmp_path)
    assert state["step"] == 2 and torch.equal(state["trainable"][0], torch.zeros_like(model.steering))


def test_a_full_disk_during_the_vector_file_is_one_line_too(tmp_path, tiny_qwen, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError: atomic_write makes it the OSError
    every writer reports (the file named, no .tmp left), and the previous checkpoint stays."""
    from safetensors import SafetensorError
    import safetensors.torch
    model = M.Transformer.from_pretrained(tiny_qwen)
    opt = torch.optim.AdamW([model.steering], lr=0.1)
    cfg = TrainConfig(task="toy")
    RL.save_checkpoint(tmp_path, model, opt, cfg, step=2, epoch=0, offset=8, data_fingerprint="abc")

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with torch.no_grad():
        model.steering.fill_(2.0)
    with pytest.raises(SystemExit) as e:
        RL.save_checkpoint(tmp_path, model, opt, cfg, step=4, epoch=0, offset=16, data_fingerprint="abc")
    msg = str(e.value)
    assert "checkpoint of step 4 could not be written to" in msg and "steering-step4.safetensors.tmp" in msg, msg
    assert "No space left on device" in msg and "previous checkpoint" in msg and "\n" not in msg
    assert not list(tmp_path.glob("*.tmp"))
    state = RL.load_checkpoint(tmp_path)
    assert state["step"] == 2 and torch.equal(state["trainable"][0], torch.zeros_like(model.steering))


def test_an_option_added_later_changes_neither_a_runs_name_nor_its_resume():
    """A run saved before a field existed ran that field's default: resuming it finds no difference,
    and its default directory name hashes only the fields set away from their defaults."""
    cfg = TrainConfig(task="toy", lr=0.01)
    saved = {k: v for k, v in vars(cfg).items() if k != "overlong_filter"}  # a config.json from before the field
    assert RL.config_differences(saved, cfg) == []
    assert RL.config_differences(saved, TrainConfig(task="toy", lr=0.01, overlong_filter=True)) == [
        "--overlong-filter False (saved) != True (given)"]
    assert RL.default_run_dir(cfg) == RL.config_dir("toy", {"task": "toy", "lr": 0.01})
