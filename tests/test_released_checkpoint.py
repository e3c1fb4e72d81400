"""The official BLIP3o-NEXT release layout, on a tiny random model written here with the official key names and module
structure (blip3o_arch.py, ta_tok.py): load, generate, convert, and one-line refusals of malformed files."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Siglip2VisionConfig, Siglip2VisionModel, SiglipConfig

from blip3o_next.cli import main
from blip3o_next.models.modeling import Blip3oNext, CheckpointError
from blip3o_next.pipeline import Pipeline
from blip3o_next.models.released_checkpoint import load_released, released_prompt
from blip3o_next.models.ta_tok import TATok
from blip3o_next.models.text_tokenizer import train_text_tokenizer
from blip3o_next.models.vae import tiny_vae_config

CODES, HIDDEN, WIDTH = 64, 32, 24
PLAIN_CHAT = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def official_connector(d_in: int) -> nn.Sequential:
    """blip3o_arch.py's diffusion_connector / und_image_vae_connector (RMSNorm as diffusers', weight only)."""
    return nn.Sequential(nn.Linear(d_in, WIDTH), nn.GELU(approximate="tanh"), nn.Linear(WIDTH, WIDTH), nn.RMSNorm(WIDTH, eps=1e-5))


def official_tatok_state(siglip: SiglipConfig, bottleneck_dim: int = 8) -> dict[str, torch.Tensor]:
    """ta_tok.py's TextAlignedTokenizer modules, built as it builds them (load_teacher=False)."""
    hidden = siglip.vision_config.hidden_size
    modules = {
        "encoder": AutoModel.from_config(siglip).vision_model,
        "decoder": Siglip2VisionModel(Siglip2VisionConfig(patch_size=1, num_hidden_layers=3, num_channels=bottleneck_dim, hidden_size=hidden)),
        "encode_task_layer": nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()),
        "decode_task_layer": nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden)),
        "bottleneck.in_linear": nn.Linear(hidden, bottleneck_dim),
        "bottleneck.out_linear": nn.Linear(bottleneck_dim, hidden),
        "bottleneck.regularizer.embedding": nn.Embedding(CODES, bottleneck_dim),
        "bottleneck.regularizer.embedding_proj": nn.Linear(bottleneck_dim, bottleneck_dim),
    }
    state = {f"{prefix}.{k}": v for prefix, m in modules.items() for k, v in m.state_dict().items()}
    state["scale_layer.shift"] = torch.full((1, 3, 1, 1), 0.5)
    state["scale_layer.scale"] = torch.full((1, 3, 1, 1), 0.5)
    return state


def write_release(root: Path, edit: bool = False) -> dict[str, Path]:
    """A released-layout folder (two shards + index), the TA-Tok file and the local SigLIP2 / SANA config folders."""
    torch.manual_seed(0)
    siglip_dir, sana_dir, release = root / "siglip2", root / "sana", root / "release"
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 42, "patch_size": 14}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 50,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    siglip = SiglipConfig(vision_config=vision, text_config=text)
    siglip.save_pretrained(siglip_dir)
    args = {"bottleneck": {"name": "bottleneck", "args": {"bottleneck_dim": 8, "regularizer": {
        "name": "simvq", "args": {"codebook_size": CODES, "l2_normalized": True, "stochastic": True, "stochastic_temperature": 0.03}}}},
        "bottleneck_token_num": 9, "input_size": 42, "teacher": str(siglip_dir), "select_layer_id": -2, "decoder_depth": 3}
    torch.save({"model": {"args": args, "sd": official_tatok_state(siglip)}}, root / "ta_tok.pth")  # the official file is a pickle

    transformer = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                         num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                                         caption_channels=WIDTH, sample_size=4, patch_size=1)
    vae = AutoencoderDC(**tiny_vae_config())
    transformer.save_config(sana_dir / "transformer")
    vae.save_config(sana_dir / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(sana_dir / "scheduler")

    # the tokenizer, extended as initialize_vision_tokenizer does it
    corpus = ["a photo of a red circle", "a blue star above a green cross", "make it bigger"] * 20
    tok = PreTrainedTokenizerFast(tokenizer_object=train_text_tokenizer(corpus, vocab_size=280), pad_token="<pad>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    tok.add_tokens([f"<S{i}>" for i in range(3)], special_tokens=False)
    tok.add_tokens([f"<I{i}>" for i in range(CODES)], special_tokens=False)
    tok.chat_template = PLAIN_CHAT
    tok.save_pretrained(release)

    ar = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True))
    state = {k: v for k, v in ar.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    state |= {f"model.sana.{k}": v for k, v in transformer.state_dict().items()}
    state |= {f"model.sana_vae.{k}": v for k, v in vae.state_dict().items()}
    state |= {f"model.diffusion_connector.{k}": v for k, v in official_connector(HIDDEN).state_dict().items()}
    config = ar.config.to_dict() | {
        "model_type": "blip3o_qwen", "architectures": ["blip3oQwenForInferenceLM"], "diffusion_name_or_path": str(sana_dir),
        "image_start_tag_id": tok.convert_tokens_to_ids("<im_start>"), "image_end_tag_id": tok.convert_tokens_to_ids("<im_end>"),
        "scale_start_token_id": tok.convert_tokens_to_ids("<S0>"), "image_start_token_id": tok.convert_tokens_to_ids("<I0>"), "num_image_tokens": CODES,
    }
    if edit:
        state |= {f"model.und_image_vae_connector.{k}": v for k, v in official_connector(8).state_dict().items()}
        config |= {"use_und_image_vae": True, "use_und_image_vae_as_noise": True}
    (release / "config.json").write_text(json.dumps(config))
    (release / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k].detach().clone().contiguous() for k in keys}, release / file)
    (release / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    return {"release": release, "ta_tok": root / "ta_tok.pth", "siglip": siglip_dir, "diffusion": sana_dir}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    return write_release(tmp_path_factory.mktemp("released"))


def sources(paths: dict[str, Path]) -> dict[str, Path]:
    return {k: paths[k] for k in ("ta_tok", "siglip", "diffusion")}


def stored(paths: dict[str, Path], name: str) -> torch.Tensor:
    index = json.loads((paths["release"] / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(paths["release"] / index[name], "pt") as f:
        return f.get_tensor(name)


def test_prompt_template_and_left_padded_batches(release):
    pipe = Pipeline(load_released(release["release"], **sources(release)))
    tok = pipe.model.tokenizer
    assert released_prompt(tok, "a red circle") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Please generate image based on the following caption: a red circle<|im_end|>\n<|im_start|>assistant\n")
    assert "Please edit this image according to the following instruction: make it blue." in released_prompt(tok, "make it blue", edit=True)
    prompts = ["a red circle", "a blue star above a green cross and a red circle"]
    ids, mask = pipe.tokenize(prompts)
    vocab = pipe.model.image_vocab
    for row, m, p in zip(ids, mask, prompts):
        official = tok(released_prompt(tok, p) + "<im_start><S0>", add_special_tokens=False)["input_ids"]
        assert row[m.bool()].tolist() + [vocab.im_start, vocab.scales[0]] == official  # the sampler appends <im_start><S0>
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()  # left padding, masked
    assert ids[0, 0] == tok.pad_token_id


def test_load_maps_every_tensor_and_generates(release):
    pipe = Pipeline.from_pretrained(release["release"], **sources(release))
    model = pipe.model
    assert torch.equal(model.connector.proj_in.weight, stored(release, "model.diffusion_connector.0.weight"))
    assert torch.equal(model.connector.norm.weight, stored(release, "model.diffusion_connector.3.weight"))
    assert model.connector.config.eps == 1e-5
    assert model.ar.lm_head.weight.data_ptr() == model.ar.model.embed_tokens.weight.data_ptr()  # re-tied
    assert torch.equal(model.transformer.proj_out.weight, stored(release, "model.sana.proj_out.weight"))
    assert model.config.temperature == 0.6 and model.config.image_size == 16 and model.span_length == 10
    assert model.scheduler.config.shift == 3.0
    first = pipe(["a red circle", "a blue star above a green cross"], seed=0, num_inference_steps=2)
    again = pipe(["a red circle", "a blue star above a green cross"], seed=0, num_inference_steps=2)
    assert [im.size for im in first.images] == [(16, 16)] * 2 and first.blueprints.shape == (2, 9)
    assert torch.equal(first.blueprints, again.blueprints) and first.blueprint_previews == []
    codes = pipe.image_codes(torch.zeros(1, 3, 16, 16))
    assert codes.shape == (1, 9) and 0 <= int(codes.min()) and int(codes.max()) < CODES


def test_edit_model_maps_the_reference_connector(tmp_path):
    paths = write_release(tmp_path, edit=True)
    model = load_released(paths["release"], **sources(paths))
    assert model.config.editing and model.config.reference_cross_attention and model.config.reference_noise_injection
    assert torch.equal(model.reference_connector.proj_out.weight, stored(paths, "model.und_image_vae_connector.2.weight"))
    with pytest.raises(ValueError, match="not wired"):
        Pipeline(model).tokenize(["make it blue"], [[0] * 9])


def test_convert_round_trip(release, tmp_path):
    out = tmp_path / "converted"
    args = ["convert", release["release"], out] + [a for k, v in sources(release).items() for a in (f"--{k.replace('_', '-')}", v)]
    assert main([str(a) for a in args]) == 0
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    model = load_released(release["release"], **sources(release))
    reloaded = Blip3oNext.from_pretrained(out)
    assert isinstance(reloaded.image_tokenizer, TATok)
    for name in ("ar", "connector", "transformer", "vae", "image_tokenizer"):
        want = getattr(model, name).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(reloaded, name).state_dict().items()), name
    assert json.loads((out / "blip3o_config.json").read_text())["extra"]["prompt_template"] == "blip3o-next"


def rewrite_shard(paths: dict[str, Path], change) -> Path:
    """Apply `change` to the tensors of the shard holding model.diffusion_connector.3.weight; returns the shard."""
    index_file = paths["release"] / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = paths["release"] / index["weight_map"]["model.diffusion_connector.3.weight"]
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name} | {k: shard.name for k in tensors}
    index_file.write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("case, key, file", [
    ("missing", "model.diffusion_connector.3.weight", "model.safetensors.index.json"),
    ("extra", "model.extra_head.weight", "model-0000"),
    ("shape", "model.diffusion_connector.3.weight", "model-0000"),
])
def test_malformed_release_names_file_and_key(tmp_path, case, key, file):
    paths = write_release(tmp_path)
    changes = {
        "missing": lambda t: t.pop(key),
        "extra": lambda t: t.update({key: torch.zeros(2)}),
        "shape": lambda t: t.update({key: torch.zeros(WIDTH + 1)}),
    }
    rewrite_shard(paths, changes[case])
    with pytest.raises(CheckpointError) as e:
        load_released(paths["release"], **sources(paths))
    message = str(e.value)
    assert key in message and file in message and "\n" not in message
    assert case != "shape" or "[25]" in message and "[24]" in message


def test_pickles_are_refused(tmp_path):
    paths = write_release(tmp_path)
    (paths["release"] / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle weights are refused"):
        load_released(paths["release"], **sources(paths))
    (paths["release"] / "pytorch_model.bin").unlink()
    torch.save({"model": {"args": {}, "sd": {}, "code": Path("x")}}, paths["ta_tok"])  # not plain tensors / containers
    with pytest.raises(CheckpointError, match="ta_tok.pth: not a TA-Tok file"):
        load_released(paths["release"], **sources(paths))
