"""The shapes of the real models the benchmarks stand in for, with random weights."""

# OpenAI's GPT-2 sizes: n_layer, n_head, n_embd (vocabulary 50,257, context 1024)
GPT2 = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}

# Qwen2.5-0.5B's config.json, as far as the shape goes
QWEN2_5_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                    tie_word_embeddings=True)
