# GPT-2 (124M) on FineWeb-Edu, the modern way: what llm.c's and modded-nanogpt's 124M runs found
# to learn more per token, as far as this repo has it. Not run here (docs/pretraining.md).
# $ python data/fineweb/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py
#
# Against config/train_gpt2.py (nanoGPT's 300B tokens on OpenWebText):
# - FineWeb-Edu's sample-10BT: educational pages, which llm.c and build-nanogpt train on;
# - llm.c's batch, 2**19 = 524,288 tokens a step, with its short warmup (700 steps);
# - Muon for the blocks' matrices (modded-nanogpt's optimizer, the change that cut its tokens
#   most), AdamW for the rest, one learning rate (optim.py scales Muon's update to AdamW's);
#   3x llm.c's AdamW rate, as build-nanogpt found the 124M model takes;
# - 5B tokens (9,537 steps): half of llm.c's 10B, as modded-nanogpt's first records reached
#   llm.c's loss in half its tokens;
# - bfloat16 and torch.compile (the defaults on a GPU); no dropout, no biases.

out_dir = "out-gpt2-fineweb"
wandb_log = True
wandb_project = "fineweb"
wandb_run_name = "gpt2-124M-muon"

dataset = "fineweb"
# 16 rows x 1024 tokens x 4 micro-steps x 8 GPUs = 524,288 tokens a step
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 4 * 8  # in all: each of the 8 processes does 4

optim = "muon"
learning_rate = 1.8e-3
min_lr = 1.8e-4
weight_decay = 1e-1
warmup_iters = 700
max_iters = 9537
lr_decay_iters = 9537

eval_interval = 250
hellaswag_interval = 250  # HellaSwag's acc and acc_norm in the log, as llm.c's run tracks them
eval_iters = 20  # 20 x 16 x 1024 x 8 GPUs: 2.6M val tokens an evaluation
log_interval = 10
