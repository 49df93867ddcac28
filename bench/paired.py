"""Paired comparison of two sets of per-example outcomes on the same prompts (RESULTS.md's differences).

    python bench/paired.py runs/arc_easy-x/test-base.jsonl runs/arc_easy-x/test-expert.jsonl
    python bench/paired.py runs/adapt-none-arc_challenge.json runs/adapt-fewshot-arc_challenge.json

Each file is a JSON Lines file of records (train.py's test-*.jsonl, evaluate.py's output) or an adapt.py
report (its "records"); records are joined on "id", and only ids in both count. Prints the accuracy of
each, the difference (second minus first) with its paired bootstrap 95% interval, and how many examples
each side alone got right.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402


def outcomes(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".json":
        records = json.loads(text)["records"]
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {r["id"]: bool(r["correct"]) for r in records}


def main(first: str, second: str):
    a, b = outcomes(Path(first)), outcomes(Path(second))
    ids = [i for i in a if i in b]
    if not ids:
        raise SystemExit(f"{first} and {second} share no example ids: nothing to pair")
    before, after = [a[i] for i in ids], [b[i] for i in ids]
    result = evaluate.paired_difference(before, after)
    low, high = result["interval"]
    print(f"n={result['n']} (paired on id; {len(a) - len(ids)} only in the first, {len(b) - len(ids)} only in the second)")
    print(f"first {sum(before) / len(ids):.3f}, second {sum(after) / len(ids):.3f}: difference {result['difference']:+.3f} "
          f"[{low:+.3f}, {high:+.3f}] (paired bootstrap 95%, 10,000 resamples); second alone right on {result['gained']}, "
          f"first alone on {result['lost']}" + ("; inside the noise" if low <= 0 <= high else ""))


if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
