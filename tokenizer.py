"""The model's tokenizer: byte-level BPE from its tokenizer.json (the `tokenizers` library) and the
Jinja chat template from its tokenizer_config.json, rendered as transformers renders it."""

import json
from pathlib import Path

import common


class Tokenizer:
    """Byte-level BPE from tokenizer.json (the `tokenizers` library) plus the model's own chat template."""

    def __init__(self, folder: Path, eos_ids: list[int] | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the model folder needs a tokenizer.json (Hugging Face fast tokenizer)")
        try:
            self.tokenizer = HFTokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ValueError(f"{path} is not a readable tokenizer ({error}): the file is truncated or damaged; "
                             f"{common.repair_advice(folder)}") from error
        config_path = Path(folder) / "tokenizer_config.json"
        config = common.read_json_object(config_path, common.repair_advice(folder)) if config_path.exists() else {}

        def token_text(value):  # tokenizer_config stores special tokens as strings or {"content": ...}
            return value.get("content") if isinstance(value, dict) else value

        self.bos_token = token_text(config.get("bos_token"))
        self.eos_token = token_text(config.get("eos_token"))
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: use "default"
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        eos = set(eos_ids or [])
        if self.eos_token is not None and self.tokenizer.token_to_id(self.eos_token) is not None:
            eos.add(self.tokenizer.token_to_id(self.eos_token))
        self.eos_ids = sorted(eos)
        self.pad_id = self.eos_ids[0] if self.eos_ids else 0
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # No special tokens are added here: chat templates write BOS themselves where the model wants it.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the Jinja template the model was trained with (as transformers does)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template in tokenizer_config.json; pass plain text instead")
        if self._template is None:
            from datetime import datetime

            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template error: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))
