# A baby GPT on character-level Shakespeare, tuned for a 2-core CPU (no GPU): a lower val loss
# than nanoGPT's CPU recipe (4 layers, 2000 iterations) in a third of its time (docs/benchmarks.md).
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu.py
# A run this short is limited by the number of optimizer steps it can take, not by the model's
# size: a 2-layer model takes steps twice as fast as a 4-layer one and gets further in the same
# time, at a learning rate a model this small tolerates; and Muon learns more per step than
# AdamW. For a better model
# in 5 minutes see train_shakespeare_char_cpu_5min.py.

out_dir = "out-shakespeare-char"
eval_interval = 550  # = max_iters: evaluate only at the start and the end (the loop always does both)
eval_iters = 50  # 50 batches x 16 x 64 = 51k tokens per split, half of val: cheap but steady
log_interval = 100
always_save_checkpoint = False

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt-cpu"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 16
block_size = 64  # context of up to 64 previous characters

# baby GPT model :)
n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0  # too few iterations to overfit
bias = False

optim = "muon"  # Muon for the blocks' matrices, AdamW for embeddings and gains (same lr)
learning_rate = 6e-3  # a model this small tolerates a high learning rate
max_iters = 550
lr_decay_iters = 550  # = max_iters
min_lr = 6e-4  # learning_rate / 10
beta2 = 0.99  # small batches
warmup_iters = 30
weight_decay = 1e-1
grad_clip = 1.0

device = "cpu"
compile = False  # a compile takes longer than this whole run
