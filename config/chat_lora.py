# Instruction tuning through LoRA adapters: the chat model stays as it is, small low-rank
# adapters beside its Linears are all that trains; only the assistant's tokens are learned
# (data/chat/prepare.py).
# $ python data/chat/prepare.py --input=conversations.jsonl --tokenizer=Qwen/Qwen2.5-0.5B-Instruct --out=data/mychat
# $ python train.py config/chat_lora.py           # --max_iters=... : the schedule follows it
# $ python chat.py --out_dir=out-chat-lora        # loads the model again, adds the adapters
# $ python export_hf.py --out_dir=out-chat-lora   # adapters merged into the weights
# Another model: --init_from=<a hub id, a Qwen2 / Llama / Mistral folder, a run's out_dir>, with
# the dataset prepared by its tokenizer; for GPT-2 also --lora_targets=c_attn,c_proj,c_fc.
# Gradients and AdamW's moments only for the adapters: the checkpoint holds them (MBs) and the
# name of the base model.

out_dir = "out-chat-lora"
init_from = "Qwen/Qwen2.5-0.5B-Instruct"
dataset = "mychat"  # data/chat/prepare.py --out=data/mychat, with init_from's tokenizer
finetune = "lora"
# every Linear of a block: adapters on attention alone learn a format less well
lora_targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
lora_rank = 16
lora_alpha = 32  # the update is scaled by alpha / rank = 2
lora_dropout = 0.05

# a few hundred steps see a few thousand conversations: enough to learn a format or a style
max_iters = 300
# a short ramp while AdamW's moments fill (pretraining's 2,000 would outlast the run), then a
# cosine down to min_lr at the last step: None decays over max_iters, whatever --max_iters says
warmup_iters = 10
lr_decay_iters = None
# the adapters start from nothing (their update is zero): ten times full fine-tuning's rate,
# as LoRA fine-tunes commonly use 1e-4 ... 3e-4
learning_rate = 2e-4
min_lr = 2e-5  # learning_rate / 10
# decay would pull the adapters back to zero, i.e. toward the model they start from
weight_decay = 0.0
dropout = 0.0  # on the model itself; the adapters have lora_dropout

# 4 x 4 rows of 1024 tokens, 16K tokens a step: several conversations a row, a steady gradient;
# small accumulation, so a step is quick (pretraining's 40 is for batches of 0.5M tokens)
block_size = 1024  # the context trained on, and the tuned model's (shorter crops it): room to chat
batch_size = 4
gradient_accumulation_steps = 4

# evaluate often enough to catch the best moment (a small set overfits within an epoch or two)
# and keep only the best adapters
eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False
