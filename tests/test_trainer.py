"""The trainer: kill-and-resume equals an uninterrupted run, run outputs, overfitting one batch, and 2-process DDP."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from blip3o_next.fileio import InputError
from blip3o_next.training.recipes import Recipe, is_recipe, read_stage_file
from blip3o_next.training.checkpoints import latest_checkpoint
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.trainer import param_groups, train

from conftest import final_state, pretrain_config


def test_kill_and_resume_matches_uninterrupted(parts_dirs, tmp_path):
    train(pretrain_config(parts_dirs, tmp_path / "a"))
    train(pretrain_config(parts_dirs, tmp_path / "b"), stop_after=3)  # "killed" after step 3: step 3 is lost
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000002" and not (tmp_path / "b" / "final").exists()
    train(pretrain_config(parts_dirs, tmp_path / "b"))  # resumes at step 2
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_outputs(parts_dirs, tmp_path):
    out = train(pretrain_config(parts_dirs, tmp_path / "run", steps=2))
    names = {p.name for p in out.iterdir()}
    assert {"metrics.csv", "loss_curves.png", "samples-0000002.png", "tensorboard", "final", "config.json"} <= names
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3 and "ce" in rows[0] and "flow_matching" in rows[0]


def test_yaml_config_rejects_unknown_keys(tmp_path):

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"stage": "vae", "stepz": 3}))
    with pytest.raises(InputError, match="stepz"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def test_overfitting_one_batch(model_and_batch):
    import copy

    model = copy.deepcopy(model_and_batch[0]).train()
    model.config.condition_dropout = 0.0
    ids, mask, labels, latents = model_and_batch[1]
    params = [p for n, p in model.named_parameters() if not n.startswith(("image_tokenizer", "vae"))]
    opt = torch.optim.AdamW(params, lr=1e-2)
    probe = lambda: model(ids, mask, labels, latents, torch.Generator().manual_seed(7))  # noqa: E731
    with torch.no_grad():
        first = probe()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = model(ids, mask, labels, latents, g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = probe()
    assert last.ce_loss < 0.05, last.ce_loss
    assert last.flow_matching_loss < 0.6 * first.flow_matching_loss  # the 1-layer toy DiT halves it


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test")
def test_two_process_ddp_matches_single_process(parts_dirs, tmp_path):
    cfg = pretrain_config(parts_dirs, tmp_path / "ddp", steps=2, checkpoint_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.__dict__.items()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "blip3o_next.cli", "train", "--config", str(tmp_path / "c.yaml")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    train(pretrain_config(parts_dirs, tmp_path / "single", steps=2, checkpoint_every=2))
    replicas = json.loads((tmp_path / "ddp" / "replicas.json").read_text())
    assert replicas["identical"] and len(replicas["checksums"]) == 2
    a, b = final_state(tmp_path / "ddp"), final_state(tmp_path / "single")
    # Adam magnifies float-order noise in near-zero gradients (e.g. attention key biases): close, not bit-equal.
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a if a[k].is_floating_point())
    ddp_loss = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "ddp" / "metrics.csv"))]
    single_loss = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "single" / "metrics.csv"))]
    assert len(ddp_loss) == len(single_loss) == 2
    assert all(abs(x - y) < 1e-5 for x, y in zip(ddp_loss, single_loss)), (ddp_loss, single_loss)


def test_yaml_config_extends_another(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"stage": "vae", "steps": 7, "lr": 0.5, "model": {"ce_weight": 2.0}}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(yaml.safe_dump({"extends": "../base.yaml", "lr": 0.25, "model": {"condition_source": "prompt"}}))
    cfg = TrainConfig.from_yaml(tmp_path / "sub" / "c.yaml")
    assert (cfg.stage, cfg.steps, cfg.lr, cfg.model) == ("vae", 7, 0.25, {"condition_source": "prompt"})
    (tmp_path / "sub" / "d.yaml").write_text(yaml.safe_dump({"extends": "c.yaml", "steps": 3}))  # a chain of two
    cfg = TrainConfig.from_yaml(tmp_path / "sub" / "d.yaml")
    assert (cfg.stage, cfg.steps, cfg.lr, cfg.model) == ("vae", 3, 0.25, {"condition_source": "prompt"})
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"extends": "loop.yaml", "steps": 1}))
    with pytest.raises(InputError, match="leads back"):
        TrainConfig.from_yaml(tmp_path / "loop.yaml")


def test_recipe_runs_stages_in_order_and_reports(tmp_path, monkeypatch):
    from blip3o_next.training import recipes

    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"stage": "vae", "steps": 1, "output_dir": str(tmp_path / "runs" / name)}))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"stages": ["a.yaml", "b.yaml"], "docs_dir": str(tmp_path / "docs")}))
    seen = []

    def fake_train(cfg):
        seen.append(cfg.output_dir)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        (out / "loss_curves.png").write_bytes(b"png")
        return out

    monkeypatch.setattr(recipes, "train", fake_train)
    assert is_recipe(tmp_path / "recipe.yaml") and not is_recipe(tmp_path / "a.yaml")
    timings = recipes.run_recipe(Recipe.from_yaml(tmp_path / "recipe.yaml"))
    assert seen == [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")] and list(timings) == ["a", "b"]
    assert (tmp_path / "docs" / "b_loss_curves.png").is_file() and "total_minutes" in (tmp_path / "docs" / "timings.json").read_text()


def test_decoder_only_fine_tune_keeps_the_encoder(parts_dirs, tmp_path):
    from diffusers import AutoencoderDC

    root, _ = parts_dirs
    cfg = TrainConfig(stage="vae", output_dir=str(tmp_path / "dec"), init_from=str(root / "vae"), train_only=["decoder"], steps=2,
                      batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=2, log_every=1)
    before, after = AutoencoderDC.from_pretrained(root / "vae").state_dict(), AutoencoderDC.from_pretrained(train(cfg) / "final").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder"))
    with pytest.raises(ValueError, match="no parameter name starts with 'decodr'"):
        train(TrainConfig(**{**dataclasses.asdict(cfg), "train_only": ["decodr"], "output_dir": str(tmp_path / "typo")}))


def test_lr_scales_give_prefixed_parameters_their_own_learning_rate():
    module = torch.nn.ModuleDict({"old": torch.nn.Linear(2, 2), "new": torch.nn.Linear(2, 2)})
    module["old"].bias.requires_grad_(False)
    groups = param_groups(module, 1e-3, {"new": 10.0})
    assert [(g["lr"], len(g["params"])) for g in groups] == [(1e-3, 1), (1e-2, 2)]  # frozen parameters left out
    assert groups[0]["params"][0] is module["old"].weight
    with pytest.raises(ValueError, match="lr_scales: no parameter name starts with 'nwe'"):
        param_groups(module, 1e-3, {"nwe": 10.0})


CONFIGS = Path(__file__).parents[1] / "configs"
COMMITTED_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS / "accelerate")  # not accelerate's launch files


@pytest.mark.parametrize("path", COMMITTED_CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_committed_config_loads(path):
    """A recipe names stage files that exist; a stage file holds only known settings with valid values."""
    if is_recipe(path):
        recipe = Recipe.from_yaml(path)
        assert recipe.stages and all(Path(stage).is_file() for stage in recipe.stages)
    else:
        read_stage_file(path)
