# Fine-tune GPT-2 on Shakespeare: nanoGPT's recipe.
# $ python data/shakespeare/prepare.py
# $ python train.py config/finetune_shakespeare.py
# $ python sample.py --out_dir=out-shakespeare --start="ROMEO:"
# gpt2-xl (1.5B) wants a big GPU, and a few minutes there; on smaller machines take a smaller
# size: --init_from=gpt2 (124M) fine-tunes on a CPU in well under an hour.

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
log_interval = 1

# a pretrained model overfits a small corpus within a few dozen steps: keep only the best
always_save_checkpoint = False

wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2"

dataset = "shakespeare"  # GPT-2 tokens, as the model expects
init_from = "gpt2-xl"  # or gpt2, gpt2-medium, gpt2-large, a hub id, a folder

# 32 sequences of 1024 tokens per step: 32K tokens, from one at a time
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# fine-tuning nudges the pretrained weights: a small learning rate, held constant
learning_rate = 3e-5
decay_lr = False
