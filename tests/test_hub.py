"""Experts on the Hugging Face hub, offline: a local folder laid out as the hub's cache stands in for
the hub (huggingface_hub reads it exactly as a download it made), and share.py's upload is recorded
instead of sent."""

import shutil
from pathlib import Path

import pytest

import common
import dispatch
import share

EXPERTS = Path(__file__).resolve().parent.parent / "experts"


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An offline hub cache holding the shipped experts as the repository org/experts."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--experts" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    for path in EXPERTS.glob("*.safetensors"):
        shutil.copy(path, snapshot / path.name)
    (cache / "models--org--experts" / "refs").mkdir()
    (cache / "models--org--experts" / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_experts_by_hub_id_come_from_the_cache(hub_cache):
    from_hub = dispatch.load_experts("org/experts")
    local = dispatch.load_experts(EXPERTS)
    assert sorted(from_hub) == sorted(local) == ["classifier", "code", "math", "reasoning"]
    for name in local:
        assert all((from_hub[name][0][k] == local[name][0][k]).all() for k in local[name][0])
    assert common.resolve_experts("org/experts/math.safetensors") == hub_cache / "math.safetensors"


def test_evaluate_takes_one_expert_from_a_hub_repository(hub_cache, monkeypatch, capsys):
    from conftest import evaluate_main_inputs

    with pytest.raises(SystemExit):
        evaluate_main_inputs(monkeypatch, ["--task", "gsm8k", "--expert", "org/experts", "--limit", "1"])
    assert "holds 4 experts" in capsys.readouterr().err


def test_uncached_experts_offline_say_what_to_do(hub_cache):
    with pytest.raises(FileNotFoundError, match="cannot reach the Hugging Face hub.*huggingface-cli download org/other"):
        dispatch.load_experts("org/other")
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        dispatch.load_experts("no/such/folder")


def test_share_uploads_the_experts_with_a_card(monkeypatch):
    import huggingface_hub

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

        def upload_file(self, **kw):
            calls.append(("upload_file", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    card = share.main(["--experts", str(EXPERTS), "--repo", "me/experts"])
    assert [c[:2] for c in calls] == [("create_repo", "me/experts"), ("upload_folder", "me/experts"),
                                      ("upload_file", "me/experts")]
    assert calls[1][2]["folder_path"] == str(EXPERTS) and calls[1][2]["allow_patterns"] == ["*.safetensors"]
    assert calls[2][2]["path_in_repo"] == "README.md" and calls[2][2]["path_or_fileobj"] == card.encode()
    _, meta = dispatch.load_experts(EXPERTS)["math"]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and meta["sigma_fingerprint"] in card
    for task, category in [("gsm8k", "math"), ("mbpp", "code"), ("arc_easy", "reasoning"), ("cls", "classifier")]:
        assert f"| {task} | {category} |" in card
