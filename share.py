"""Upload a folder of SVF experts to the Hugging Face hub with a model card, so that others can use them
by name: `python adapt.py --experts org/name` or `python evaluate.py --expert org/name/math.safetensors`.

    huggingface-cli login
    python share.py --experts experts --repo you/smollm2-135m-svf-experts

The card says which base model the experts were trained on, its σ fingerprint (an expert only fits a
model with the same singular values), each expert's task, category and validation accuracy, and the
command that made it. `--dry-run` prints the card and uploads nothing.
"""

import argparse
import json
import sys
from pathlib import Path

import dispatch


def model_card(experts: dict[str, tuple[dict, dict]], repo: str) -> str:
    metas = [meta for _, meta in experts.values()]
    base_models = sorted({meta.get("base_model", "unknown") for meta in metas})
    fingerprints = sorted({meta.get("sigma_fingerprint", "unknown") for meta in metas})
    meta = metas[0]
    lines = [
        "---", "library_name: transformer2-svf", "tags: [svf, transformer2, self-adaptive]",
        *(f"base_model: {b}" for b in base_models[:1] if b != "unknown"), "---", "",
        f"# SVF experts for {', '.join(base_models)}", "",
        "Expert vectors z of Transformer² (arXiv 2501.06252): each rescales the singular values of the "
        f"{meta.get('targets', '?')} matrices of the base model ({meta.get('param', '?')} parametrization), "
        "W' = U diag(σ') Vᵀ.", "",
        f"Base model: {', '.join(base_models)}. σ fingerprint: {', '.join(fingerprints)} (an expert fits only a "
        "model with these singular values).", "",
        "| file | task | category | validation accuracy | command |", "|---|---|---|---|---|",
    ]
    for name, (z, meta) in sorted(experts.items()):
        lines.append(f"| {meta.get('file', name)} | {meta.get('task', '')} | {name} | {meta.get('valid_accuracy', '')} "
                     f"| `{meta.get('command', '')}` |")
    lines += ["", "Use them with the project's scripts:", "", "```bash",
              f"python adapt.py --mode fewshot --task arc_challenge --experts {repo}",
              f"python evaluate.py --task gsm8k --expert {repo}/math.safetensors", "```", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="experts", help="the folder of expert files to upload")
    p.add_argument("--repo", required=True, help="the hub repository to create or update, org/name")
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
