"""LoRA fine-tuning (lora.py and the trainer's `lora` setting): only the adapters learn, they save as safetensors and
reload to the same outputs, merging changes nothing, the merged model loads as any other, and a killed run resumes."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from blip3o_next.fileio import InputError
from blip3o_next.training.lora import (
    DEFAULT_TARGETS,
    LoraSettings,
    add_adapters,
    apply_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from blip3o_next.models.modeling import PICKLE_SUFFIXES, Blip3oNext
from blip3o_next.training.checkpoints import latest_checkpoint
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.trainer import train

LORA = {"rank": 4, "alpha": 8, "parts": ["ar", "transformer"]}


def batch_loss(model: Blip3oNext, batch) -> torch.Tensor:
    """CE + flow matching on the fixture batch, with fixed noise: equal losses mean equal AR and DiT outputs."""
    ids, mask, labels, latents = batch
    return model(ids, mask, labels, latents, torch.Generator().manual_seed(7)).loss


def sft_config(base_dir: Path, out: Path, **kw) -> TrainConfig:
    base = {"stage": "sft", "output_dir": str(out), "init_from": str(base_dir), "steps": 4, "batch_size": 2, "lr": 1e-2,
            "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1, "lora": LORA}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory) -> Path:
    return train(sft_config(base_dir, tmp_path_factory.mktemp("runs") / "lora"))


def test_adapters_alone_learn_reload_and_merge_to_the_same_model(model_and_batch, tmp_path):
    base, batch = model_and_batch
    model = copy.deepcopy(base)
    adapters = add_adapters(model, LoraSettings(**LORA))
    assert torch.equal(batch_loss(model, batch), batch_loss(base, batch))  # B starts at zero
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        loss = model(*batch, g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        before, adapted = batch_loss(base, batch), batch_loss(model, batch)
        assert adapted < 0.9 * before, (before, adapted)
        weights = {n.replace(".base_layer", ""): p for n, p in model.state_dict().items() if ".lora_" not in n}
        assert weights.keys() == base.state_dict().keys()
        assert all(torch.equal(p, base.state_dict()[n]) for n, p in weights.items())  # the base weights, bit for bit
        save_adapters(adapters, tmp_path / "adapters")
        reloaded = copy.deepcopy(base)
        load_adapters(reloaded, tmp_path / "adapters")
        assert torch.equal(batch_loss(reloaded, batch), adapted)
        merged = batch_loss(merge_adapters(model, adapters), batch)
    assert not any(".lora_" in n or ".base_layer" in n for n in model.state_dict())
    assert torch.allclose(merged, adapted, atol=1e-5), (merged, adapted)


def test_lora_sft_saves_adapters_and_a_merged_model(lora_run, base_dir, model_and_batch):
    final = lora_run / "final"
    for part in LORA["parts"]:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (final / "adapters" / part).iterdir()}
        assert all(".lora_" in k for k in load_file(str(final / "adapters" / part / "adapter_model.safetensors")))
    assert sorted(p.name for p in (latest_checkpoint(lora_run) / "model").iterdir()) == sorted(LORA["parts"])  # adapters only
    assert not [p for p in lora_run.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    batch = model_and_batch[1]
    with torch.no_grad():
        merged_model = Blip3oNext.from_pretrained(final)
        merged = batch_loss(merged_model, batch)
        reloaded = Blip3oNext.from_pretrained(base_dir)
        load_adapters(reloaded, final / "adapters")
        assert torch.allclose(batch_loss(reloaded, batch), merged, atol=1e-5)
        assert torch.equal(batch_loss(apply_adapters(Blip3oNext.from_pretrained(base_dir), final / "adapters"), batch), merged)
        assert not torch.allclose(batch_loss(model_and_batch[0], batch), merged)
    base, after = model_and_batch[0].state_dict(), merged_model.state_dict()
    changed = {n for n in base if not torch.equal(base[n], after[n])}
    assert changed and all(n.startswith(("ar.model.layers.", "transformer.transformer_blocks.")) for n in changed)
    targets = [*DEFAULT_TARGETS["ar"], *DEFAULT_TARGETS["transformer"]]
    assert all(any(n.endswith(f".{t}.weight") for t in targets) for n in changed), changed  # the targeted layers only


def test_lora_kill_and_resume_matches_uninterrupted(lora_run, base_dir, tmp_path):
    train(sft_config(base_dir, tmp_path / "b"), stop_after=3)  # "killed" after step 3: step 3 is lost
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000002" and not (tmp_path / "b" / "final").exists()
    train(sft_config(base_dir, tmp_path / "b"))
    for part in LORA["parts"]:
        a, b = (load_file(str(run / "final" / "adapters" / part / "adapter_model.safetensors")) for run in (lora_run, tmp_path / "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, message", [
    ({"lora": {**LORA, "parts": ["ar", "vae"]}}, "unknown part 'vae'"),
    ({"lora": {**LORA, "rank": 0}}, "lora.rank must be >= 1, got 0"),
    ({"lora": {**LORA, "rnak": 4}}, "unknown setting.s. rnak"),
    ({"lora": {**LORA, "target_modules": {"connector": ["proj"]}}}, "unknown part 'connector'"),
    ({"stage": "vae"}, "lora is for the sft stage, not vae"),
    ({"train_only": ["ar"]}, "leave train_only unset"),
])
def test_bad_lora_settings_are_refused(base_dir, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        sft_config(base_dir, tmp_path, **change)


def test_unknown_target_modules_are_refused(model_and_batch, tmp_path):
    settings = LoraSettings(parts=["ar"], target_modules={"ar": ["q_proj", "qproj"]})
    with pytest.raises(ValueError, match="'qproj' matches no layer of ar"):
        add_adapters(copy.deepcopy(model_and_batch[0]), settings)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**dataclasses.asdict(sft_config(Path("m"), tmp_path)), "lora": {"rank": -1}}))
    with pytest.raises(InputError, match="c.yaml: lora.rank must be >= 1"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
