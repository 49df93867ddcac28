"""share.py: the model card cannot be rewritten by an expert's metadata, only real expert files are
listed, a damaged one is named, and --repo is a hub id (owner/name), all checked with --dry-run too."""

import re

import pytest
import torch
from safetensors.torch import save_file

import share
import svf

MATRICES = ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj")


def expert(path, z=None, **metadata):
    """An expert file written directly: three z of 8 values; metadata None deletes a key."""
    meta = {"format": svf.EXPERT_FORMAT, "param": "scale", "targets": "mlp", "layers": "[0]", "task": "gsm8k",
            "category": "math", "valid_accuracy": "0.5", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "command": "python train.py --task gsm8k", **metadata}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.ones(8) for name in MATRICES} if z is None else z, path,
              metadata={k: v for k, v in meta.items() if v is not None})
    return path


def dry_run(folder, repo="me/experts"):
    return share.main(["--experts", str(folder), "--repo", repo, "--dry-run"])


def test_metadata_cannot_inject_front_matter_html_or_table_rows(tmp_path):
    expert(tmp_path / "experts" / "math.safetensors", base_model="evil\n---\nlicense: mit\n<script>alert(1)</script>",
           command="python train.py | tee log\n| injected | row | x | y | z |")
    card = dry_run(tmp_path / "experts")
    # The front matter: the fixed lines only (the base model is no hub id, so it has no base_model line).
    assert card.startswith("---\nlibrary_name: transformer2-svf\ntags: [svf, transformer2, self-adaptive]\n---\n\n")
    assert "license: mit" not in card.splitlines() and "---" not in card.splitlines()[4:] and "<script>" not in card
    assert "# SVF experts for evil --- license: mit &lt;script&gt;alert(1)&lt;/script&gt;\n" in card
    rows = [line for line in card.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and all(len(re.findall(r"(?<!\\)\|", row)) == 6 for row in rows)  # 5 cells each
    assert rows[2] == ("| math.safetensors | gsm8k | math | 0.5 | "
                       r"`python train.py \| tee log \| injected \| row \| x \| y \| z \|` |")


def test_a_file_without_tensors_is_refused_not_listed(tmp_path):
    expert(tmp_path / "experts" / "math.safetensors")
    expert(tmp_path / "experts" / "empty.safetensors", z={}, task="arc_easy", category="reasoning")
    with pytest.raises(ValueError, match="no z vectors") as refused:
        dry_run(tmp_path / "experts")
    assert str(tmp_path / "experts" / "empty.safetensors") in str(refused.value)


@pytest.mark.parametrize("key", ["param", "targets"])
def test_a_missing_key_names_the_file(tmp_path, key):
    expert(tmp_path / "experts" / "math.safetensors", **{key: None})
    with pytest.raises(ValueError) as refused:
        dry_run(tmp_path / "experts")
    assert str(tmp_path / "experts" / "math.safetensors") in str(refused.value) and repr(key) in str(refused.value)


@pytest.mark.parametrize("repo", ["../../etc/passwd", "org/..", "org/name/../name", "a/b/c", "name-only", "a b/c",
                                  "me/x\n---", "me/experts.git"])
def test_repo_must_be_a_hub_id(tmp_path, capsys, repo):
    """Checked with --dry-run too; a valid owner/name is taken and named in the card's commands."""
    expert(tmp_path / "experts" / "math.safetensors")
    card = dry_run(tmp_path / "experts", "me/smollm2.svf-experts_1")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---" in card
    assert "python adapt.py --mode fewshot --task arc_challenge --experts me/smollm2.svf-experts_1\n" in card
    with pytest.raises(SystemExit) as stopped:
        dry_run(tmp_path / "experts", repo)
    assert stopped.value.code == 2 and "not a Hugging Face hub repository id" in capsys.readouterr().err
