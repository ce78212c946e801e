# nanoGPT's headline recipe: GPT-2 (124M) on OpenWebText, on 8 GPUs. Not run here (docs/pretraining.md).
# $ python data/openwebtext/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# nanoGPT reports ~2.85 val loss after 600K iterations (~4 days on 8 A100 40GB); OpenAI's gpt2
# scores 3.11 on OpenWebText, its own corpus being slightly different (config/eval_gpt2.py).

out_dir = "out-gpt2"
wandb_log = True
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

dataset = "openwebtext"
# 12 rows x 1024 tokens x 5 micro-steps x 8 GPUs = 491,520 tokens a step, ~0.5M as GPT-2's
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8  # in all: each of the 8 processes does 5

# 600K steps: ~300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
