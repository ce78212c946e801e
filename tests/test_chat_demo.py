"""data/chat_demo/prepare.py: the instruction-tuning demo's base model folder and conversations,
made offline; the folder loads as a hub model would, and its template renders as transformers'."""

import json

from transformers import AutoTokenizer

from nanogpt import checkpoint
from conftest import run_script


def test_the_demo_base_loads_and_its_conversations_hold_the_format(tmp_path):
    out = tmp_path / "base"
    result = run_script("data/chat_demo/prepare.py", f"--out={out}", "--conversations=60")
    assert result.returncode == 0, result.stderr
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
    assert tok.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    # the reply ends at <|im_end|>, from generation_config.json's ids
    assert tok.tok.token_to_id("<|im_end|>") in tok.eos_tokens
    bad = run_script("data/chat_demo/prepare.py", f"--out={tmp_path / 'x'}", "--shape=huge")
    assert bad.returncode == 2 and "shape must be one of" in bad.stderr
