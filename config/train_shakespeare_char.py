# A baby GPT on character-level Shakespeare: nanoGPT's GPU recipe.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char.py
# About 3 minutes on an A100 to val loss ~1.47. On a CPU use train_shakespeare_char_cpu.py.

out_dir = "out-shakespeare-char"
eval_interval = 250  # the model overfits this small corpus: check often
eval_iters = 200
log_interval = 10

always_save_checkpoint = False  # keep only the best-val checkpoint

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small networks can take a higher learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # a bit higher because the batches are small

warmup_iters = 100  # not super necessary
