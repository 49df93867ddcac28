"""Tiny random transformers models saved as Hugging Face folders: the reference the tests (and
bench/gpu.py) compare model.py with. Importing this changes nothing else (no threads, no dtype)."""

from pathlib import Path

import torch


def write_tiny_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer over vocab_size tokens, enough for load() on a random model.
    Id 0 is <unk>, 1 <s> (bos), 2 </s> (eos); the rest are the words w3, w4, ..."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    template = "{% for message in messages %}{{ message['content'] }} {% endfor %}"  # plain words, no roles
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}))


TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5)


def tiny_hf_model(family: str, folder: Path, seed: int = 0, **overrides):
    """Save a randomly initialised transformers model of a tiny config to folder; return the HF model."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, "bos_token_id": 1, "eos_token_id": 2, **overrides})
    model = model_cls(config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so the test sees whether we load them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_tiny_tokenizer(folder, config.vocab_size)
    return model
