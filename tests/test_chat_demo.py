"""data/chat_demo/prepare.py: the instruction-tuning demo's base model folder and conversations,
made offline and without transformers; the folder loads in transformers as a hub model would,
with our logits, and its template renders as transformers'. config/chat_sft.py and
config/chat_lora.py fine-tune it."""

import json
import runpy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanogpt import checkpoint
from conftest import assert_user_error, run_script, train_losses

# the script run as the program with transformers unimportable, as after `make demo`, which
# installs requirements.txt only
WITHOUT_TRANSFORMERS = ("import runpy, sys; sys.modules['transformers'] = None; "
                        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(the demo's base folder, the chat dataset data/chat/prepare.py makes of its conversations)."""
    root = tmp_path_factory.mktemp("chat_demo")
    base, data = root / "base", root / "data"
    result = run_script("-c", WITHOUT_TRANSFORMERS, "data/chat_demo/prepare.py", f"--out={base}",
                        "--conversations=60")
    assert result.returncode == 0, result.stderr
    result = run_script("data/chat/prepare.py", f"--input={base / 'conversations.jsonl'}",
                        f"--tokenizer={base}", f"--out={data}")
    assert result.returncode == 0, result.stderr
    return base, data


def test_the_demo_base_loads_and_its_conversations_hold_the_format(demo, tmp_path):
    out = demo[0]
    chats = [json.loads(line)["messages"] for line in (out / "conversations.jsonl").read_text().splitlines()]
    assert len(chats) == 60
    for user, assistant in chats:
        assert user["role"] == "user" and assistant["content"].startswith("KIND: ")
        assert not any(held in user["content"] for held in ("tiger", "mango", "violin"))
    model, tok = checkpoint.load_model(str(out))
    assert model.config.hf_model_type == "qwen2" and model.config.tie_embeddings
    theirs = AutoTokenizer.from_pretrained(out)
    conversation = chats[0] + [{"role": "user", "content": "Tell me about the tiger."}]
    text = tok.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    # transformers loads the folder as the Qwen2 it says it is, and computes our logits
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf_model).__name__ == "Qwen2ForCausalLM"
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, torch.zeros_like(x))[0], hf_model(x).logits,
                                   atol=1e-5, rtol=1e-5)
    # the reply ends at <|im_end|>, for both
    assert tok.tok.token_to_id("<|im_end|>") in tok.eos_tokens
    assert tok.tok.token_to_id("<|im_end|>") in hf_model.generation_config.eos_token_id
    bad = run_script("data/chat_demo/prepare.py", f"--out={tmp_path / 'x'}", "--shape=huge")
    assert_user_error(bad, "shape must be one of")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("config", ["config/chat_sft.py", "config/chat_lora.py"])
def test_the_chat_configs_fine_tune_with_a_schedule_that_fits_the_run(config, demo, tmp_path):
    base, data = demo
    # the recipe as written, on the demo's model, shortened by --max_iters alone (and sized for
    # a CPU): the warmup ends and the learning rate decays over the 20 steps taken
    result = run_script("train.py", config, f"--init_from={base}", f"--dataset={data}",
                        f"--out_dir={tmp_path / 'out'}", "--max_iters=20", "--device=cpu",
                        "--dtype=float32", "--compile=False", "--block_size=64", "--batch_size=4",
                        "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1")
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stdout
    lrs = [float(line.split("lr ")[1].split(",")[0]) for line in result.stdout.splitlines()
           if line.startswith("iter ")]
    peak, end = runpy.run_path(config)["learning_rate"], runpy.run_path(config)["min_lr"]
    assert len(lrs) == 20 and max(lrs) == pytest.approx(peak, rel=1e-2)
    # the cosine ends at the run's end (its last step's is 2.5% of the way above min_lr)
    assert lrs[-1] < end + 0.05 * (peak - end)
    assert (tmp_path / "out" / "ckpt.pt").exists()
    assert train_losses(result.stdout)[-1] < train_losses(result.stdout)[0]
