"""Read the official BLIP3o-NEXT release layout (BLIP3o/BLIP3o-NEXT-SFT-3B, -GRPO-Geneval-3B, -GRPO-Text-3B,
-edit-VAE) and turn it into this project's parts, so `Pipeline.from_pretrained(folder)` runs it and `blip3o convert`
writes it in the `Blip3oNext.save_pretrained` layout.

What was checked against the official code (JiuhaiChen/BLIP3o, branch BLIP3o-NEXT, commit 6ced364; csuhan/Tar):
- `blip3o/model/blip3o_arch.py`: `blip3oMetaModel` (the inner `model.` of a Qwen3ForCausalLM) holds `vision_tower`
  (TATokVisionTower, whose `vision_tower` is the TA-Tok), `sana` (SanaTransformer2DModel), `sana_vae` (AutoencoderDC)
  and `diffusion_connector` = Sequential(Linear(hidden, 2304), GELU(tanh), Linear(2304, 2304), diffusers RMSNorm(2304,
  eps=1e-5, weight filled with sqrt(5.5))), hence the keys `model.diffusion_connector.{0,2,3}.*`. `initialize_vision_
  tokenizer` adds `<im_start>`, `<im_end>` (special), then `<S0>..<S2>`, then `<I0>..<I{n-1}>` (not special; formats
  from `blip3o/train/train.py`) and sets `image_start_tag_id`, `image_end_tag_id`, `scale_start_token_id`,
  `image_start_token_id` in the config. Nothing excludes the vision tower from the saved state dict (`blip3o/train/
  train.py` saves the whole model), so a release may hold the TA-Tok as `model.vision_tower.vision_tower.*`: those keys
  are mapped to the TA-Tok when present, with its fixed input scaling (`scale_layer.*`) recognised and not used.
- `blip3o/model/language_model/blip3o_qwen_inference.py`: AR `generate` (do_sample, top_p, top_k, temperature None, so
  transformers falls back to the folder's generation_config.json), then a second forward; the condition is the
  last-layer states from `<S0>` on (730 positions), CFG against all-zero states, 30 Euler steps, guidance 2.0, latent
  side 32 hard-coded. `inference.py`: system "You are a helpful assistant.", user "Please generate image based on the
  following caption: {prompt}", `apply_chat_template(add_generation_prompt=True)` + `<im_start><S0>`, left padding,
  729 new tokens, top_p 0.95, top_k 1200. `blip3o/data/dataset.py` sets the plain `<|im_start|>role\\n...<|im_end|>\\n`
  chat template that the trained tokenizer keeps.
- `tok/ta_tok.py` (in both repositories): the encoder is `AutoModel.from_config(AutoConfig(teacher)).vision_model`
  with `hidden_states[select_layer_id]` (-2), `encode_task_layer` = Linear + Tanh, `bottleneck.in_linear`, a SimVQ
  codebook `embedding_proj(embedding.weight)` (`tok/ar_dtok/bottleneck.py`), a feature decoder (`Siglip2VisionModel`
  with patch 1, `decode_task_layer`, `bottleneck.out_linear`); weights in `ta_tok.pth` under `model.sd`, constructor
  arguments under `model.args`; the official file downloads it from the hub at import time. BLIP3o-NEXT sets the
  codebook to deterministic (argmax) and feeds [-1, 1] pixels (`multimodal_encoder/ta_tok_encoder.py`).
- The edit model's `und_image_vae_connector` (Linear(32, 2304), GELU(tanh), Linear, RMSNorm(eps=1e-5)) and the flags
  `use_und_image_vae`, `only_use_und_image_vae_as_noise`, `use_und_image_vae_as_noise` come from a stored copy of the
  later edit code (blip3o_arch.py / blip3o_qwen.py, repository not named by the index); the BLIP3o-NEXT branch snapshot
  has no edit code.

Not verified here (no released files were downloaded): the released key list itself (whether `lm_head.weight` is
stored or tied, whether the vision tower is included), the released tokenizer's chat template, the SANA/DC-AE configs
(the release points `diffusion_name_or_path` at a SANA 1.5 folder; this loader reads those configs from a local folder),
whether the SigLIP2 teacher config is the fixed-resolution `siglip` type (TA-Tok calls the encoder with pixel tensors,
which only that type accepts), the edit prompt's token layout and the noise-injection axis (`CONCAT_AS_HEIGHT`).
Known differences from the official sampler: image tokens are drawn from the codebook only (the official `generate`
may draw any token), with this project's generator, so equal seeds do not give equal tokens; TA-Tok inputs are resized
by torch interpolation instead of the SigLIP image processor.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .connector import Connector
from .modeling import Blip3oNext, Blip3oNextConfig, CheckpointError, refuse_pickled_weights
from .ta_tok import TATok
from .text_tokenizer import IM_END, IM_START, ImageVocab, image_token, scale_token
from .vae import spatial_compression

PROMPT_TEMPLATE = "blip3o-next"  # Blip3oNextConfig.extra["prompt_template"] of models converted from the release
SYSTEM_PROMPT = "You are a helpful assistant."
T2I_INSTRUCTION = "Please generate image based on the following caption: {prompt}"
EDIT_INSTRUCTION = "Please edit this image according to the following instruction: {instruction}."
INDEX_NAME, SINGLE_NAME = "model.safetensors.index.json", "model.safetensors"

# Where each released key prefix goes; the AR part keeps its names (`model.layers.*`, `model.embed_tokens.*`, ...).
PREFIXES = {
    "transformer": "model.sana.",
    "vae": "model.sana_vae.",
    "connector": "model.diffusion_connector.",
    "reference_connector": "model.und_image_vae_connector.",
    "image_tokenizer": "model.vision_tower.vision_tower.",
    "ar": "",
}
# nn.Sequential indices of the official connectors -> this project's Connector modules (same layers, same order).
CONNECTOR_INDEX = {"proj_in": "0", "proj_out": "2", "norm": "3"}
# TA-Tok's fixed input normalisation: BLIP3o-NEXT replaces it by the identity and feeds [-1, 1] pixels, as here.
TATOK_UNUSED = ("scale_layer.shift", "scale_layer.scale")


# ----------------------------------------------------------------------------- prompts


def released_messages(text: str, edit: bool = False) -> list[dict[str, str]]:
    """The official chat: system prompt, then the caption (or edit instruction) in the user turn."""
    user = EDIT_INSTRUCTION.format(instruction=text) if edit else T2I_INSTRUCTION.format(prompt=text)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def released_prompt(tokenizer: PreTrainedTokenizerFast, text: str, edit: bool = False) -> str:
    """The text before the image span, through the tokenizer's own chat template as the official inference does.
    The sampler appends `<im_start><S0>` (autoregressive.image_span_prefix), which completes the official input."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; the released models' prompt format needs it")
    return tokenizer.apply_chat_template(released_messages(text, edit), tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------- TA-Tok


def tatok_from_args(args: dict, encoder_config: dict, image_size: int) -> TATok:
    """A TATok built (with empty weights) from ta_tok.pth's `model.args` and the teacher's vision config."""
    try:
        bottleneck = args["bottleneck"]["args"]
        regularizer = bottleneck["regularizer"]
        if regularizer["name"] != "simvq":
            raise ValueError(f"regularizer {regularizer['name']!r} is not SimVQ")
        reg = regularizer["args"]
        stochastic = bool(reg.get("stochastic", False))
        with init_empty_weights():
            return TATok(
                encoder_config, image_size, bottleneck["bottleneck_dim"], reg["codebook_size"], bool(reg.get("l2_normalized", False)),
                stochastic, stochastic and reg.get("stochastic_temperature", 1.0) <= 0, args.get("select_layer_id", -2), args.get("decoder_depth", 3),
            )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"unexpected TA-Tok arguments ({e})") from None


def read_tatok_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(constructor args, state dict without the distillation teacher) of a TA-Tok file: the official ta_tok.pth,
    read with torch.load(weights_only=True), which unpickles tensors and plain containers only, or a .safetensors
    file whose metadata holds the args as JSON under "args"."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                args = json.loads((f.metadata() or {})["args"])
                sd = {k: f.get_tensor(k) for k in f.keys()}
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            args, sd = ckpt["model"]["args"], ckpt["model"]["sd"]
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: not a TA-Tok file ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    return args, {k: v for k, v in sd.items() if not k.startswith("teacher.")}


# ----------------------------------------------------------------------------- the release layout


def is_released_layout(path: str | os.PathLike) -> bool:
    """Whether a folder looks like an official release: a Qwen3 config with BLIP3o-NEXT's token ids, safetensors
    weights, and no blip3o_config.json (this project's own layout)."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file() or (path / "blip3o_config.json").exists():
        return False
    try:
        return "image_start_tag_id" in json.loads(config.read_text())
    except ValueError:
        return False


def weight_files(path: Path) -> dict[str, Path]:
    """Each tensor name -> the safetensors file holding it (sharded index or a single file); pickles refused."""
    refuse_pickled_weights(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return {k: path / v for k, v in weight_map.items()}
    single = path / SINGLE_NAME
    if not single.is_file():
        raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME}")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def stored_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from the safetensors headers (no tensor is loaded)."""
    shapes = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(file, "pt") as f:
                stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{file}: {str(e).strip().splitlines()[0]}") from None
        for key, file_of_key in files.items():
            if file_of_key == file:
                if key not in stored:
                    raise CheckpointError(f"{file}: missing key {key} (listed in {INDEX_NAME})")
                shapes[key] = stored[key]
    return shapes


def released_name(part: str, key: str) -> str:
    """The released tensor name of a part's state-dict key."""
    if part in ("connector", "reference_connector"):
        module, _, param = key.partition(".")
        key = f"{CONNECTOR_INDEX[module]}.{param}"
    return PREFIXES[part] + key


def expected_tensors(parts: dict[str, nn.Module]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """released name -> (part, its key, shape) for every persistent tensor of the target parts; tied weights
    (the AR's lm_head when its config ties it to the embeddings) are stored once, as the embeddings."""
    expected = {}
    for part, module in parts.items():
        tied = set(getattr(module, "_tied_weights_keys", None) or []) if getattr(module.config, "tie_word_embeddings", False) else set()
        for key, tensor in module.state_dict().items():
            if key not in tied:
                expected[released_name(part, key)] = (part, key, tuple(tensor.shape))
    return expected


def check_tensors(expected: dict, shapes: dict[str, tuple[int, ...]], where: Callable[[str], Path], ignored: Iterable[str] = ()) -> None:
    """Every expected tensor present with its shape, and nothing else: else one line naming the file and the key."""
    for name, (part, _, shape) in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{where(name)}: missing key {name} (needed by the {part})")
        if shapes[name] != shape:
            raise CheckpointError(f"{where(name)}: key {name} has shape {list(shapes[name])}, the {part} expects {list(shape)}")
    ignored = set(ignored)
    for name in shapes:
        if name not in expected and name not in ignored:
            raise CheckpointError(f"{where(name)}: unexpected key {name} (no part of the model takes it)")


def read_tensors(files: dict[str, Path], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors, each opened from its file once per file."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, keys in by_file.items():
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in keys})
    return out


def fill(module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> nn.Module:
    """Give a module built with empty weights its tensors (all of them: strict), re-tie tied weights, cast."""
    tied = getattr(module, "_tied_weights_keys", None) or []
    if getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        state = {**state, **{k: state["model.embed_tokens.weight"] for k in tied}}
    module.load_state_dict(state, strict=True, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.to(dtype) if dtype is not None else module


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _local_folder(given: str | os.PathLike | None, fallback: str | None, what: str, flag: str) -> Path:
    """A user-given local folder, else the release's own reference when it is a local folder; never the network."""
    for candidate in (given, fallback):
        if candidate is not None and Path(candidate).is_dir():
            return Path(candidate)
    raise CheckpointError(f"{given or fallback}: {what} is not a local folder; pass {flag} FOLDER")


def load_released(
    path: str | os.PathLike,
    ta_tok: str | os.PathLike | None = None,
    siglip: str | os.PathLike | None = None,
    diffusion: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
) -> Blip3oNext:
    """A `Blip3oNext` from a folder in the official release layout, checked in full before any weight is loaded.

    `ta_tok`: the TA-Tok file (ta_tok.pth or .safetensors); its weights are used unless the release stores the
    tokenizer itself (`model.vision_tower.vision_tower.*`). `siglip`: a local SigLIP2 folder (only its config.json is
    read; default: ta_tok.pth's `teacher` when that is a local folder). `diffusion`: a local SANA 1.5 diffusers folder
    whose transformer/, vae/ and scheduler/ configs are read (default: config.json's `diffusion_name_or_path` when local).
    """
    path = Path(path)
    config = read_json(path / "config.json")
    files = weight_files(path)
    shapes = stored_shapes(files)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: tokenizer: {str(e).strip().splitlines()[0]}") from None
    vocab = _image_vocab(path, config, tokenizer)
    sana_folder = _local_folder(diffusion, config.get("diffusion_name_or_path"), "the SANA 1.5 folder", "--diffusion")
    if ta_tok is None:
        raise CheckpointError(f"{path}: needs the TA-Tok file; pass --ta-tok FILE (ta_tok.pth from csuhan/TA-Tok)")
    tatok_args, tatok_state = read_tatok_file(Path(ta_tok))
    siglip_folder = _local_folder(siglip, tatok_args.get("teacher"), "the SigLIP2 teacher", "--siglip")

    qwen_keys = set(Qwen3Config().to_dict())
    with init_empty_weights():
        ar = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in config.items() if k in qwen_keys and k not in ("model_type", "architectures", "rope_scaling")}))
        transformer = SanaTransformer2DModel.from_config(read_json(sana_folder / "transformer" / "config.json"))
        vae = AutoencoderDC.from_config(read_json(sana_folder / "vae" / "config.json"))
        width = transformer.config.caption_channels
        parts: dict[str, nn.Module] = {"ar": ar, "transformer": transformer, "vae": vae,
                                       "connector": Connector(ar.config.hidden_size, width, eps=1e-5)}
        edit_switches = _edit_switches(config)
        if edit_switches["reference_cross_attention"]:
            parts["reference_connector"] = Connector(vae.config.latent_channels, width, eps=1e-5)
    image_size = transformer.config.sample_size * spatial_compression(vae)
    try:
        encoder_config = AutoConfig.from_pretrained(siglip_folder).vision_config.to_dict()
        image_tokenizer = tatok_from_args(tatok_args, encoder_config, image_size)
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{siglip_folder}: {str(e).strip().splitlines()[0]}") from None
    tatok_in_release = any(k.startswith(PREFIXES["image_tokenizer"]) for k in shapes)
    if tatok_in_release:
        parts["image_tokenizer"] = image_tokenizer

    # 1. every key and shape, before any weight is read
    expected = expected_tensors(parts)
    listing = path / INDEX_NAME if (path / INDEX_NAME).is_file() else path / SINGLE_NAME

    def where(name: str) -> Path:  # the shard holding a tensor, or the listing that lacks it
        return files.get(name, listing)

    check_tensors(expected, shapes, where, ignored=[PREFIXES["image_tokenizer"] + k for k in TATOK_UNUSED])
    if not tatok_in_release:
        tatok_expected = {k: ("TA-Tok", k, tuple(v.shape)) for k, v in image_tokenizer.state_dict().items()}
        check_tensors(tatok_expected, {k: tuple(v.shape) for k, v in tatok_state.items()}, lambda _: Path(ta_tok), ignored=TATOK_UNUSED)
    # 2. the weights
    tensors = read_tensors(files, [name for name in expected])
    for part, module in parts.items():
        fill(module, {key: tensors[name] for name, (p, key, _) in expected.items() if p == part}, torch_dtype)
    if not tatok_in_release:
        fill(image_tokenizer, {k: v for k, v in tatok_state.items() if k not in TATOK_UNUSED}, torch_dtype)
    try:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sana_folder / "scheduler")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{sana_folder / 'scheduler'}: {str(e).strip().splitlines()[0]}") from None

    model_config = Blip3oNextConfig(
        image_size=image_size, temperature=_sampling_temperature(path), **edit_switches,
        extra={"prompt_template": PROMPT_TEMPLATE, "converted_from": str(path)},
    )
    try:
        model = Blip3oNext(model_config, tokenizer, image_tokenizer.eval(), parts["ar"], parts["connector"], parts["transformer"],
                           parts["vae"], scheduler, reference_connector=parts.get("reference_connector"))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if model.image_vocab != vocab:
        raise CheckpointError(f"{path / 'config.json'}: token ids {vocab} disagree with the tokenizer's {model.image_vocab}")
    return model.eval()


def _image_vocab(path: Path, config: dict, tokenizer: PreTrainedTokenizerFast) -> ImageVocab:
    """The image-side token ids the release's config.json declares, checked against its tokenizer's added tokens."""
    fields = ("image_start_tag_id", "image_end_tag_id", "scale_start_token_id", "image_start_token_id", "num_image_tokens")
    missing = [f for f in fields if f not in config]
    if missing:
        raise CheckpointError(f"{path / 'config.json'}: missing {missing[0]}")
    scale = config["scale_start_token_id"]
    vocab = ImageVocab(im_start=config["image_start_tag_id"], im_end=config["image_end_tag_id"], scales=(scale, scale + 1, scale + 2),
                       image_offset=config["image_start_token_id"], codebook_size=config["num_image_tokens"])
    names = {IM_START: vocab.im_start, IM_END: vocab.im_end, scale_token(0): scale, scale_token(2): scale + 2,
             image_token(0): vocab.image_offset, image_token(vocab.codebook_size - 1): vocab.vocab_end - 1}
    for name, want in names.items():
        got = tokenizer.convert_tokens_to_ids(name)
        if got != want:
            raise CheckpointError(f"{path / 'config.json'}: token {name} has id {want} there but {got} in the tokenizer")
    return vocab


def _edit_switches(config: dict) -> dict:
    """Blip3oNextConfig's editing switches from the edit model's flags (official names; absent = off)."""
    cross = bool(config.get("use_und_image_vae", False)) and not config.get("only_use_und_image_vae_as_noise", False)
    noise = bool(config.get("use_und_image_vae_as_noise", False))
    return {"editing": cross or noise, "reference_cross_attention": cross, "reference_noise_injection": noise, "reference_injection_axis": "width"}


def _sampling_temperature(path: Path) -> float:
    """The official `generate` passes temperature=None, so transformers takes generation_config.json's, else 1."""
    file = path / "generation_config.json"
    return float(read_json(file).get("temperature", 1.0)) if file.is_file() else 1.0


def convert_released(path: str | os.PathLike, out: str | os.PathLike, **sources) -> Blip3oNext:
    """Load a release (`load_released`; `sources` are its ta_tok, siglip, diffusion, torch_dtype) and write it in this
    project's layout (`Blip3oNext.save_pretrained`: one folder per part, safetensors + JSON)."""
    model = load_released(path, **sources)
    model.save_pretrained(out)
    return model
