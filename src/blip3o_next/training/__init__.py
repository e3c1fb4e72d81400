"""Training: config files, the stages and their loop, checkpoints, recipes, GRPO with its rewards, LoRA, FSDP and
training on your own shards."""
