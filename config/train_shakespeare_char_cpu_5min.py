# A baby GPT on character-level Shakespeare in under 5 minutes on a 2-core CPU: val 1.45 over
# all of val, under nanoGPT's GPU result (1.47) (docs/speedrun.md has the records, what did not help,
# and the machine; docs/benchmarks.md the figures).
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu_5min.py
# nanoGPT's CPU model size (4 layers, 128 wide) with a context of 256 characters in batches of
# 8. In runs this short, optimizer steps are what is scarce, so the optimizer is Muon, which
# learns far more per step than AdamW, and the model is the Llama family's (llama.py): rotary
# positions, RMSNorm and a SwiGLU MLP learn more per step than GPT-2's blocks, at the same size.
# The learning rate stays high for half the run, then falls in a straight line to zero.
# Evaluations are few and small, the last over all of val.

out_dir = "out-shakespeare-char-5min"
eval_interval = 750  # three evaluations in the run, for the loss curve, and one at its end
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

family = "llama"  # rotary positions, RMSNorm, SwiGLU
n_layer = 4
n_head = 4
n_embd = 128
mlp_hidden = 344  # ~8/3 x 128: the size of GPT-2's 4x MLP in three matrices
dropout = 0.0  # dropout 0.1 cost more than it gave, at this size

optim = "muon"  # Muon for the blocks' matrices, AdamW for embeddings and gains (same lr)
learning_rate = 6e-3
max_iters = 3000  # more steps overfit: 3,500 scored 1.453, 2,500 1.454
lr_decay_iters = 3000  # = max_iters
lr_schedule = "wsd"  # warmup, stable, then a straight line down: better than the cosine here
decay_fraction = 0.5  # the second half of the run
min_lr = 0.0  # decayed to zero: better than lr / 10 at the end of the run
beta2 = 0.99  # small batches
warmup_iters = 50
weight_decay = 1e-1
grad_clip = 1.0

device = "cpu"
compile = False  # measured: no faster for a model this small, and the compile costs time
