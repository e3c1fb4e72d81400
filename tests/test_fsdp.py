"""FSDP (blip3o_next.training.fsdp): a 2-process sharded run (accelerate launch, gloo on the CPU) against one process on the
same global batch, its sharded checkpoints resumed, and the one-line errors of a damaged checkpoint."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from blip3o_next.fileio import InputError
from blip3o_next.training.fsdp import check_shards, shard_name
from blip3o_next.training.grpo_config import GRPOConfig
from blip3o_next.training.checkpoints import latest_checkpoint
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.trainer import train

from conftest import final_state, pretrain_config

ROOT = Path(__file__).parents[1]
LAUNCH_CONFIG = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
STOP_AFTER = """import sys
from blip3o_next.runtime import end_process_group
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.trainer import train
train(TrainConfig.from_yaml(sys.argv[1]), stop_after=int(sys.argv[2]))
end_process_group()  # as the CLI does at exit
"""


def launch(tmp_path: Path, cfg: TrainConfig, port: int, stop_after: int | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of `cfg` on 2 CPU processes: the CLI's train, or (stop_after) a run that stops early."""
    config = tmp_path / f"{Path(cfg.output_dir).name}.yaml"
    config.write_text(yaml.safe_dump(dict(cfg.__dict__)))
    if stop_after is None:
        target = ["-m", "blip3o_next.cli", "train", "--config", str(config)]
    else:
        script = tmp_path / "stop_after.py"
        script.write_text(STOP_AFTER)
        target = [str(script), str(config), str(stop_after)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIG)]
    launcher += ["--main_process_port", str(port)]
    return subprocess.run([*launcher, *target], env=env, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test")
def test_two_process_fsdp_matches_one_process_and_resumes_exactly(parts_dirs, tmp_path):
    # 4 steps at global batch 2, checkpoints after steps 2 and 4
    config = lambda name: pretrain_config(parts_dirs, tmp_path / name, fsdp=True)  # noqa: E731
    train(config("single"))  # one process: fsdp has nothing to shard over, so this is the plain run
    r = launch(tmp_path, config("fsdp"), 29531)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoint-0000004").iterdir())
    assert shards == [shard_name(0, 2), shard_name(1, 2), "trainer_state.json"]

    # (a) Same global batch, same losses: each process's loss is the mean over its half of the batch (the CE is a mean
    # per sequence), so only float summation order differs.
    single, sharded = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(single) == len(sharded) == 4
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(sharded, single)), (sharded, single)
    a, b = final_state(tmp_path / "fsdp"), final_state(tmp_path / "single")  # final/ is the whole model
    assert a.keys() == b.keys()
    # Adam magnifies float-order noise in near-zero gradients (as with DDP): close, not bit-equal.
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a if a[k].is_floating_point())

    # (b) Stopped after step 3 (checkpoint-2 is the last complete one), then resumed: exactly the uninterrupted run.
    r = launch(tmp_path, config("resumed"), 29532, stop_after=3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-0000002" and not (tmp_path / "resumed" / "final").exists()
    shutil.copytree(tmp_path / "resumed", tmp_path / "damaged")
    r = launch(tmp_path, config("resumed"), 29533)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "resumed") == sharded
    c = final_state(tmp_path / "resumed")
    assert all(torch.equal(a[k], c[k]) for k in a)

    # (c) A damaged shard stops every process with one line naming the file.
    damaged = tmp_path / "damaged" / "checkpoint-0000002" / shard_name(1, 2)
    damaged.write_bytes(damaged.read_bytes()[:100])
    r = launch(tmp_path, config("damaged"), 29534)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("blip3o: error:")]
    assert errors and all(f"{damaged}: unreadable shard" in line for line in errors), r.stderr[-3000:]


def test_check_shards_names_the_missing_file_and_the_process_count(tmp_path):
    for rank in range(2):
        (tmp_path / shard_name(rank, 2)).write_bytes(b"")
    with pytest.raises(InputError, match="written by 2 processes; resume it with 2 \\(this run has 4\\)"):
        check_shards(tmp_path, 4, 2)
    (tmp_path / shard_name(1, 2)).unlink()
    with pytest.raises(InputError, match=f"{shard_name(0, 2)}: unreadable shard"):
        check_shards(tmp_path, 2, 2)
    (tmp_path / shard_name(0, 2)).unlink()
    with pytest.raises(InputError, match=f"{shard_name(0, 2)}: missing shard"):
        check_shards(tmp_path, 2, 2)


def test_fsdp_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError, match="not the vae stage"):
        TrainConfig(stage="vae", fsdp=True)
    with pytest.raises(ValueError, match="lora or ema_decay"):
        TrainConfig(stage="sft", init_from="tiny", fsdp=True, ema_decay=0.99)
    with pytest.raises(ValueError, match="float32 or bf16"):
        TrainConfig(stage="sft", init_from="tiny", fsdp=True, mixed_precision="fp16")


NEXT3B = ROOT / "configs" / "next-3b"


def test_next3b_configs_hold_the_official_recipe():
    """The official recipe (docs/design.md#official-recipe, #official-grpo); the files load into their dataclasses."""
    pretrain, sft = TrainConfig.from_yaml(NEXT3B / "pretrain.yaml"), TrainConfig.from_yaml(NEXT3B / "sft.yaml")
    assert (pretrain.lr, pretrain.steps, pretrain.batch_size, pretrain.fsdp) == (1e-4, 336_000, 512, True)
    assert (sft.lr, sft.steps, sft.batch_size, sft.fsdp) == (5e-5, 7_000, 128, True)
    grpo = {name: GRPOConfig.from_yaml(NEXT3B / f"{name}.yaml") for name in ("grpo", "grpo_text")}
    assert all((g.beta, g.num_generations) == (0.001, 16) for g in grpo.values())
    assert (grpo["grpo"].lr, grpo["grpo_text"].lr) == (5e-6, 1e-6)
