# A baby GPT on character-level Shakespeare in under 5 minutes on a 2-core CPU, ahead of
# nanoGPT's CPU recipe in the same time (docs/benchmarks.md has the figures).
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu_5min.py
# nanoGPT's CPU model (4 layers, 128 wide, 64 characters of context) with a batch of 16, a high
# learning rate and a cosine decay over the whole run. In runs this short, optimizer steps are
# what is scarce, so the optimizer is Muon, which learns far more per step than AdamW. A wider
# model (4 x 256, context 128, batch 32) learned no more per token and was slower per token;
# a batch of 32 with Muon reached a lower train loss but no lower val loss in more time
# (docs/notes.md).

out_dir = "out-shakespeare-char-5min"
eval_interval = 875  # four evaluations in the run, for the loss curve
eval_iters = 50  # 50 batches x 16 x 64 = 51k tokens per split, half of val
log_interval = 100
always_save_checkpoint = False

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt-cpu-5min"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 16
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # 3.6 passes over the data
bias = False

optim = "muon"  # Muon for the blocks' matrices, AdamW for embeddings and gains (same lr)
learning_rate = 6e-3  # 1e-2 did worse
max_iters = 3500
lr_decay_iters = 3500  # = max_iters
min_lr = 6e-4  # learning_rate / 10
beta2 = 0.99  # small batches
warmup_iters = 50
weight_decay = 1e-1
grad_clip = 1.0

device = "cpu"
compile = False  # measured: no faster for a model this small, and the compile costs a minute
