# Instruction tuning, every parameter: a chat model (or a base model, to teach it to chat) on
# conversations of your own; only the assistant's tokens are learned (data/chat/prepare.py).
# $ python data/chat/prepare.py --input=conversations.jsonl --tokenizer=Qwen/Qwen2.5-0.5B-Instruct --out=data/mychat
# $ python train.py config/chat_sft.py            # --max_iters=... : the schedule follows it
# $ python chat.py --out_dir=out-chat-sft
# Another model: --init_from=<a hub id, a Qwen2 / Llama / Mistral folder, gpt2, a run's out_dir>,
# with the dataset prepared by its tokenizer (--tokenizer=<the same>). Each parameter costs 16
# bytes with its gradient and AdamW's moments (Qwen2.5-0.5B: 8 GB); config/chat_lora.py needs
# a fraction of that.

out_dir = "out-chat-sft"
init_from = "Qwen/Qwen2.5-0.5B-Instruct"
dataset = "mychat"  # data/chat/prepare.py --out=data/mychat, with init_from's tokenizer
finetune = "full"

# a few hundred steps see a few thousand conversations: enough to learn a format or a style
max_iters = 300
# a short ramp while AdamW's moments fill (pretraining's 2,000 would outlast the run), then a
# cosine down to min_lr at the last step: None decays over max_iters, whatever --max_iters says
warmup_iters = 10
lr_decay_iters = None
# a pretrained model needs nudging, not pretraining's 6e-4, which would wipe out what it knows;
# full fine-tunes of models this size commonly use 1e-5 ... 2e-5
learning_rate = 2e-5
min_lr = 2e-6  # learning_rate / 10
# decay pulls every weight toward zero, not toward the pretrained values: nothing to gain in a
# run this short
weight_decay = 0.0
dropout = 0.0  # as the model was trained; a small set overfits anyway, and the best val is kept

# 4 x 4 rows of 1024 tokens, 16K tokens a step: several conversations a row, a steady gradient;
# small accumulation, so a step is quick (pretraining's 40 is for batches of 0.5M tokens)
block_size = 1024  # the context trained on, and the tuned model's (shorter crops it): room to chat
batch_size = 4
gradient_accumulation_steps = 4

# evaluate often enough to catch the best moment (a small set overfits within an epoch or two)
# and keep only the best checkpoint
eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False
