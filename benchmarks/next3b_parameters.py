"""Parameter counts of the next-3b parts (built on the meta device: no memory, no weights), per part and in all,
next to the totals the released model cards show.

    python benchmarks/next3b_parameters.py

The cards' totals are Hugging Face's rounded "Model size" of each repository's safetensors (huggingface.co/BLIP3o,
read through this project's search tool); they count every stored tensor, so they include whatever else a release
stores (e.g. a TA-Tok copy under model.vision_tower, an untied lm_head), which is not verified here.
"""

from __future__ import annotations

from blip3o_next.models.presets import meta_parameter_counts, next3b_parts_configs

RELEASED_CARD_TOTALS = {  # rounded, as listed on huggingface.co/BLIP3o
    "BLIP3o-NEXT-Pretrain-3B": "5B",
    "BLIP3o-NEXT-SFT-3B": "5B",
    "BLIP3o-NEXT-GRPO-Geneval-3B": "4B",
    "BLIP3o-NEXT-GRPO-Text-3B": "4B",
    "BLIP3o-NEXT-edit-VAE": "5B",
}


def main() -> None:
    configs = next3b_parts_configs()
    counts = meta_parameter_counts(configs)
    ar = configs["ar"]
    untied_head = ar["vocab_size"] * ar["hidden_size"]  # stored once more if a release unties lm_head
    print(f"{'part':<34}{'parameters':>16}")
    for name, n in counts.items():
        print(f"{name:<34}{n:>16,}")
    total = sum(counts.values())
    print(f"{'total (lm_head tied)':<34}{total:>16,}")
    print(f"{'total with an untied lm_head':<34}{total + untied_head:>16,}")
    print("\nreleased model cards (Hugging Face 'Model size', rounded):")
    for repo, size in RELEASED_CARD_TOTALS.items():
        print(f"  {repo:<32}{size:>6}")


if __name__ == "__main__":
    main()
