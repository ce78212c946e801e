# Fine-tune all of GPT-2 on a text of your own (see also finetune_freeze.py and finetune_lora.py).
# $ python data/text/prepare.py --input=my.txt --out=data/mytext    # GPT-2 tokens
# $ python train.py config/finetune_full.py
# $ python sample.py --out_dir=out-finetune-full --start="..."
# Every parameter trains: the most room to adapt, and the most memory: with its gradient and
# AdamW's two moments, each parameter takes 16 bytes (gpt2: 2 GB, gpt2-medium: 5.7 GB).

out_dir = "out-finetune-full"
init_from = "gpt2"  # or gpt2-medium ... gpt2-xl, a hub id, a model folder, a run's out_dir
dataset = "mytext"  # prepared in the model's tokens
finetune = "full"

eval_interval = 20
eval_iters = 20
log_interval = 1
always_save_checkpoint = False  # a pretrained model overfits a small text quickly: keep the best

block_size = 256  # GPT-2 reads up to 1024 tokens; a shorter context fine-tunes faster
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 200
dropout = 0.1

# nudge the pretrained weights: a small learning rate, held constant
learning_rate = 3e-5
decay_lr = False
