# A baby GPT on character-level Shakespeare in under 5 minutes on a 2-core CPU, ahead of
# nanoGPT's CPU recipe in the same time (docs/speedrun.md has the records, docs/benchmarks.md
# the figures).
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu_5min.py
# nanoGPT's CPU model (4 layers, 128 wide) with a context of 256 characters in batches of 8: the
# longer rows run more characters a second than nanoGPT's 64 (fewer, longer matrix products),
# and each character is predicted with more context. In runs this short, optimizer steps are
# what is scarce, so the optimizer is Muon, which learns far more per step than AdamW, at a high
# learning rate decayed to zero over the run. Evaluations are few and small, the last over all
# of val (docs/notes.md has what did not help).

out_dir = "out-shakespeare-char-5min"
eval_interval = 500  # three evaluations in the run, for the loss curve, and one at its end
eval_iters = 20  # 20 batches x 8 x 256 = 41k characters per split: enough for the curve
final_eval_whole_val = True  # the figure to report: every val character once
log_interval = 100
always_save_checkpoint = False

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt-cpu-5min"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 8
block_size = 256

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # 4 passes over the data
bias = False

optim = "muon"  # Muon for the blocks' matrices, AdamW for embeddings and gains (same lr)
learning_rate = 6e-3  # 1e-2 did worse
max_iters = 2000
lr_decay_iters = 2000  # = max_iters
min_lr = 0.0  # decayed to zero: better than lr / 10 at the end of the run
beta2 = 0.99  # small batches
warmup_iters = 50
weight_decay = 1e-1
grad_clip = 1.0

device = "cpu"
compile = False  # measured: no faster for a model this small, and the compile costs a minute
