"""Upload a folder of SVF experts to the Hugging Face hub with a model card, so that others can use them
by name: `python adapt.py --experts org/name` or `python evaluate.py --expert org/name/math.safetensors`.

    huggingface-cli login
    python share.py --experts experts --repo you/smollm2-135m-svf-experts

The card says which base model the experts were trained on, its σ fingerprint (an expert only fits a
model with the same singular values), each expert's task, category and validation accuracy, and the
command that made it. `--dry-run` prints the card and uploads nothing.
"""

import argparse
import html
import json
import re
import sys
from pathlib import Path

import dispatch


def is_repo_id(text: str) -> bool:
    """Whether text is a hub repository id of the form owner/name, by huggingface_hub's own rules (letters,
    digits, '-', '_', '.', no '..' or '--', at most 96 characters)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1  # validate_repo_id also takes a bare name; the card's commands need owner/name


def repo_id(text: str) -> str:
    """argparse type for --repo: a hub repository id, owner/name."""
    if not is_repo_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hugging Face hub repository id: give owner/name "
                                         f"(letters, digits, '-', '_', '.'), e.g. you/smollm2-135m-svf-experts")
    return text


def markdown_text(value) -> str:
    """Metadata as text on one line of a Markdown card: whitespace (newlines included, which would end a
    table row or start a heading) collapsed to single spaces, <, > and & as entities (no HTML gets in),
    and | escaped (Markdown tables split cells at every unescaped |)."""
    return html.escape(" ".join(str(value).split()), quote=False).replace("|", "\\|")


def markdown_code(value) -> str:
    """Metadata as inline code in a card's table: on one line, the fence longer than any run of backticks
    inside it, and | escaped (GitHub-flavoured Markdown splits table cells at | even inside code)."""
    text = " ".join(str(value).split())
    if not text:
        return ""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def model_card(experts: dict[str, tuple[dict, dict]], repo: str) -> str:
    """The repository's README.md. The YAML front matter holds only fixed lines and a base_model that is a
    valid hub id; every metadata value in the text goes through markdown_text or markdown_code, so a
    metadata value cannot add front-matter keys, lines or table rows."""
    metas = [meta for _, meta in experts.values()]
    base_models = sorted({meta.get("base_model", "unknown") for meta in metas})
    fingerprints = sorted({meta.get("sigma_fingerprint", "unknown") for meta in metas})
    bases, meta = markdown_text(", ".join(base_models)), metas[0]
    lines = [
        "---", "library_name: transformer2-svf", "tags: [svf, transformer2, self-adaptive]",
        *(f"base_model: {b}" for b in base_models[:1] if is_repo_id(b)), "---", "",
        f"# SVF experts for {bases}", "",
        "Expert vectors z of Transformer² (arXiv 2501.06252): each rescales the singular values of the "
        f"{markdown_text(meta.get('targets', '?'))} matrices of the base model ({markdown_text(meta.get('param', '?'))} "
        "parametrization), W' = U diag(σ') Vᵀ.", "",
        f"Base model: {bases}. σ fingerprint: {markdown_text(', '.join(fingerprints))} (an expert fits only a "
        "model with these singular values).", "",
        "| file | task | category | validation accuracy | command |", "|---|---|---|---|---|",
    ]
    for name, (z, meta) in sorted(experts.items()):
        cells = [markdown_text(v) for v in (meta.get("file", name), meta.get("task", ""), name, meta.get("valid_accuracy", ""))]
        lines.append(f"| {' | '.join(cells)} | {markdown_code(meta.get('command', ''))} |")
    lines += ["", "Use them with the project's scripts:", "", "```bash",
              f"python adapt.py --mode fewshot --task arc_challenge --experts {repo}",
              f"python evaluate.py --task gsm8k --expert {repo}/math.safetensors", "```", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="experts", help="the folder of expert files to upload")
    p.add_argument("--repo", required=True, type=repo_id, help="the hub repository to create or update, org/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the model card and upload nothing")
    args = p.parse_args(argv)
    folder = Path(args.experts)
    experts = dispatch.load_experts(folder)  # checks the files read and fit together
    card = model_card(experts, args.repo)
    if args.dry_run:
        print(card)
        print("nothing uploaded (--dry-run)", file=sys.stderr)
        return card
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo, private=args.private, exist_ok=True)
    api.upload_folder(repo_id=args.repo, folder_path=str(folder), allow_patterns=["*.safetensors"],
                      commit_message=f"SVF experts: {', '.join(sorted(experts))}")
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=args.repo,
                    commit_message="model card")
    print(json.dumps({"repo": args.repo, "experts": sorted(experts)}))
    return card


if __name__ == "__main__":
    main()
