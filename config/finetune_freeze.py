# Fine-tune GPT-2's upper layers only, on a text of your own.
# $ python data/text/prepare.py --input=my.txt --out=data/mytext    # GPT-2 tokens
# $ python train.py config/finetune_freeze.py
# $ python sample.py --out_dir=out-finetune-freeze --start="..."
# The embeddings (and the output head, tied to them) and the lowest freeze_layers blocks stay as
# they are: they hold the general knowledge of the language, the upper blocks adapt to the text.
# Gradients and AdamW state only for what trains: less memory, and less to overfit.

out_dir = "out-finetune-freeze"
init_from = "gpt2"  # or gpt2-medium ... gpt2-xl, a hub id, a model folder, a run's out_dir
dataset = "mytext"  # prepared in the model's tokens
finetune = "freeze"
freeze_layers = 6  # of gpt2's 12 (gpt2-medium has 24, gpt2-large 36, gpt2-xl 48)

eval_interval = 20
eval_iters = 20
log_interval = 1
always_save_checkpoint = False  # a pretrained model overfits a small text quickly: keep the best

block_size = 256  # GPT-2 reads up to 1024 tokens; a shorter context fine-tunes faster
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 200
dropout = 0.1

learning_rate = 5e-5  # small and constant, as for full fine-tuning
decay_lr = False
