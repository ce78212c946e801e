# The instruction-tuning demo (docs/finetuning.md, "Instruction tuning"): the tiny random Qwen2 of
# data/chat_demo/prepare.py learns the answer format of its conversations, on a CPU in minutes.
# Every parameter trains; only the assistant's tokens are learned (the dataset's loss mask).
init_from = "out-chat-demo-base"
dataset = "chat_demo"  # data/chat/prepare.py --out=data/chat_demo
out_dir = "out-chat-demo"
finetune = "full"
device = "cpu"
dtype = "float32"
compile = False
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 600
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
lr_decay_iters = 600
weight_decay = 0.0
dropout = 0.0
eval_interval = 200
eval_iters = 10
log_interval = 50
always_save_checkpoint = False  # keep the best val loss
