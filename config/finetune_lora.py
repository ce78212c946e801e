# Fine-tune GPT-2 through LoRA adapters, on a text of your own.
# $ python data/text/prepare.py --input=my.txt --out=data/mytext    # GPT-2 tokens
# $ python train.py config/finetune_lora.py
# $ python sample.py --out_dir=out-finetune-lora --start="..."     # loads gpt2, adds the adapters
# $ python export_hf.py --out_dir=out-finetune-lora                 # adapters baked into the weights
# The pretrained weights stay as they are; small low-rank adapters beside the Linears of every
# block are all that trains (gpt2: 1.2M of 124M parameters), so gradients and AdamW state are
# tiny, and the checkpoint holds the adapters with their optimizer state (14 MB for gpt2, not
# 1.5 GB) and the name of the base model.

out_dir = "out-finetune-lora"
init_from = "gpt2"  # or gpt2-medium ... gpt2-xl, a hub id, a model folder, a run's out_dir
dataset = "mytext"  # prepared in the model's tokens
finetune = "lora"
lora_rank = 8
lora_alpha = 16  # the update is scaled by alpha / rank = 2
lora_dropout = 0.05
lora_targets = "c_attn,c_proj,c_fc"  # every Linear of a block (c_proj: attention's and the MLP's)

eval_interval = 20
eval_iters = 20
log_interval = 1
always_save_checkpoint = False  # keep the best-val adapters

block_size = 256  # GPT-2 reads up to 1024 tokens; a shorter context fine-tunes faster
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 200

# the adapters start from nothing: a larger learning rate than full fine-tuning's, held
# constant, and no weight decay, which would pull them back to the base model
learning_rate = 1e-3
decay_lr = False
weight_decay = 0.0
