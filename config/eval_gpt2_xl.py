# Evaluate OpenAI's gpt2-xl (1558M: n_layer=48, n_head=25, n_embd=1600): its loss on a dataset, no training.
# $ python data/openwebtext/prepare.py
# $ python train.py config/eval_gpt2_xl.py       # or --dataset=<any dataset in GPT-2 tokens>
# nanoGPT reports its loss on OpenWebText in docs/pretraining.md; HellaSwag: python hellaswag.py --model=gpt2-xl

init_from = "gpt2-xl"
dataset = "openwebtext"
eval_only = True
batch_size = 8
eval_iters = 500  # 500 batches of 8 x 1024 tokens: a steady estimate
out_dir = "out-eval-gpt2-xl"  # the run log goes here, not over another run's
wandb_log = False
