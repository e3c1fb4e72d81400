"""Fine-tuning the bundled tiny on your own data: 200 samples read from WebDataset shards, full and with LoRA.

Writes the samples as img2dataset would (96 px JPEGs with a `json` caption; data-engine renders and paraphrased
captions of a seed the bundled model never trained on stand in for your images), fine-tunes with
configs/tiny/ablations/own_data_sft.yaml (full, then `lora:`), and prints each run's loss on those samples before and
after (`trainer.evaluate_loss`: eval mode, each sample's fixed noise) and whether its final/ loads.

    python benchmarks/own_data_finetune.py --out runs/own_data_finetune              # 200 samples, 50 steps each
    python benchmarks/own_data_finetune.py --samples 16 --steps 2 --batch-size 4     # a quick check that it runs
"""

from __future__ import annotations

import argparse
import io
import json
import time
from itertools import islice
from pathlib import Path

import webdataset as wds
from PIL import Image

from blip3o_next.models.modeling import Blip3oNext
from blip3o_next.pipeline import BUNDLED_MODELS
from blip3o_next.shapeworld.dataset import t2i_samples
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.trainer import evaluate_loss, train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "ablations" / "own_data_sft.yaml"
LORA = {"rank": 16, "alpha": 32, "parts": ["ar", "transformer"]}  # lora_sft.yaml's


def write_shards(folder: Path, n: int, seed: int, per_shard: int = 50) -> str:
    """`n` samples in img2dataset's layout (key.jpg + key.json with "caption"); returns the shards' brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / "%05d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, encoder=False) as sink:
        for i, s in enumerate(islice(t2i_samples(seed, 64, paraphrase_probability=1.0), n)):
            buffer = io.BytesIO()
            Image.fromarray(s["image"]).resize((96, 96), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "json": json.dumps({"caption": s["caption"]}).encode()})
    return str(folder / f"{{00000..{(n - 1) // per_shard:05d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/own_data_finetune"))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of each run (50 x 16 = 4 epochs of 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4, help="full fine-tuning (4_sft.yaml's)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA (lora_sft.yaml's)")
    parser.add_argument("--seed", type=int, default=777, help="seeds the stand-in images")
    args = parser.parse_args()
    pattern = write_shards(args.out / "shards", args.samples, args.seed)
    results = {}
    for name, lora, lr in (("full", None, args.lr), ("lora", LORA, args.lora_lr)):
        cfg = TrainConfig.from_yaml(CONFIG, output_dir=str(args.out / name), data=pattern, steps=args.steps, batch_size=args.batch_size,
                                    lr=lr, warmup_steps=min(5, args.steps), checkpoint_every=args.steps, lora=lora)
        before = evaluate_loss(cfg, BUNDLED_MODELS["tiny"], args.samples)
        start = time.perf_counter()
        final = train(cfg) / "final"
        minutes = (time.perf_counter() - start) / 60
        after = evaluate_loss(cfg, final, args.samples)
        loads = isinstance(Blip3oNext.from_pretrained(final), Blip3oNext)
        results[name] = {"loss_before": round(before, 4), "loss_after": round(after, 4), "train_minutes": round(minutes, 2), "final_loads": loads}
        print(f"{name}: loss on the {args.samples} shard samples {before:.4f} -> {after:.4f} ({args.steps} steps, {minutes:.1f} min); "
              f"final/ loads: {loads}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
