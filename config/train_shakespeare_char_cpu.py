# A baby GPT on character-level Shakespeare, tuned for a 2-core CPU (no GPU).
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu.py
# nanoGPT's own CPU recipe (4x4x128, batch 12, lr 1e-3, 2000 iters) reaches val ~1.88-1.91;
# this one uses the same model with a 4x higher learning rate and a bit larger batch,
# and stops as soon as val is comfortably below 1.88.

out_dir = "out-shakespeare-char"
eval_interval = 1300  # = max_iters: evaluate only at the start and the end (the loop always does both)
eval_iters = 25  # 25 batches x 16 x 64 = 25.6k tokens per split: cheap but meaningful
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
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too few iterations to overfit
bias = False

learning_rate = 4e-3  # a model this small tolerates a high learning rate
max_iters = 1300
lr_decay_iters = 1300  # = max_iters
min_lr = 4e-4  # learning_rate / 10
beta2 = 0.99  # small batches
warmup_iters = 50
weight_decay = 1e-1
grad_clip = 1.0

device = "cpu"
dtype = "bfloat16"  # autocast; same loss as float32 here, slightly faster per iteration
compile = False  # compile time is not repaid in a run this short (not measured: machine was loaded)
