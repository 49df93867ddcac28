"""Serving under load: aggregate tokens/s and time to first token of serve.py with concurrent clients.

    python bench/serve.py                                # 1, 8 and 32 clients, 64 tokens, and llama.cpp (minutes)
    python bench/serve.py --quick                        # 1 and 4 clients, 8 tokens: checks that it all runs
    python bench/serve.py --skip-llama --clients 8 32 --out runs/serve.json

Starts serve.py (and llama.cpp's server) itself on free loopback ports, sends streaming chat completions
(greedy, --max-tokens each, the fixed PROMPTS below in turn) from --clients concurrent clients, and stops
the servers at the end (their logs: .cache/bench_serve/). Per request: time to first token (TTFT) = from
sending it to its first content delta; completion tokens from the stream's usage chunk. Aggregate tok/s =
all completion tokens / wall seconds from the first request sent to the last reply ended (an EOS counts,
as in serve.py's usage; pass 1 of `auto` does not). Workloads, at each number of clients C:
    (a) one expert   every request with model --expert (math)
    (b) mixed        request i with MIXED[i % 5]: math, code, reasoning, base, auto (auto runs two passes)
    (c) one at a time the requests of (a) sent sequentially; measured once: the denominator of (a)/(c)
    (d) llama.cpp    the requests of (a) against llama-cpp-python's OpenAI-compatible server serving the
                     GGUF of --expert merged into the model (export.py, f16), with the same threads
Targets: (b) >= 0.7x (a) at every C; (a) >= 4x (c) at 32 clients. llama.cpp cannot run different experts
in one batch (nor mix them); its ratio is reported as it is.

llama-cpp-python is optional: install it (it builds llama.cpp from source) into a separate environment,
by default ../llama-venv beside this repository (else name its interpreter with --llama-python):
    python3 -m venv ../llama-venv && ../llama-venv/bin/pip install 'llama-cpp-python[server]'
Its server runs one request at a time (one Llama object behind a lock; the others wait), and it is
started with --interrupt_requests False, since by default a waiting request cuts off the stream being
generated. Its streams carry no usage chunk: a reply's tokens are its content deltas (one per token),
plus the EOS of a reply that stopped.
"""

import argparse
import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import model as m  # noqa: E402

PROMPTS = [  # short and mixed: arithmetic, code, reasoning and science, general
    "What is 17 * 23?", "A shirt costs $25 and is 20% off. What is the sale price?",
    "Tom has 3 boxes of 12 apples and eats 5. How many apples are left?", "What is the square root of 144?",
    "Solve for x: 3x + 7 = 22.", "What is 15% of 240?", "How many minutes are there in 3.5 hours?",
    "A train travels 180 km in 2 hours. What is its average speed?",
    "Write a Python function that reverses a string.", "Write a Python function for the n-th Fibonacci number.",
    "How do I read a file line by line in Python?", "Write a SQL query that counts the rows of a table named users.",
    "What does the `yield` keyword do in Python?", "Write a JavaScript function that checks if a number is even.",
    "Explain what a hash map is.", "Write a bash command that counts the lines of a file.",
    "Why is the sky blue?", "What happens to water at 100 degrees Celsius at sea level?",
    "If all cats are animals and some animals are black, are all cats black?", "Why do plants need sunlight?",
    "What is the difference between weather and climate?", "Which is heavier, a kilogram of iron or of feathers?",
    "What causes the seasons on Earth?", "Why does ice float on water?",
    "What is the capital of France?", "Give me three tips for better sleep.", "Who wrote Romeo and Juliet?",
    "Suggest a name for a small coffee shop.", "What is a good way to learn a new language?",
    "Summarise the plot of Cinderella in one sentence.", "What are the primary colours?", "How do I make a cup of tea?",
]
MIXED = ["math", "code", "reasoning", "base", "auto"]
LLAMA_INSTALL = "pip install 'llama-cpp-python[server]'"
DEFAULT_LLAMA_PYTHON = ROOT.parent / "llama-venv" / "bin" / "python"  # a separate environment keeps ours free of it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], log: Path, ready_url: str, servers: list, timeout: float) -> subprocess.Popen:
    """Start a server with its output in log, and wait until ready_url answers 200."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    servers.append(proc)  # registered before the wait, so that the caller's finally stops it whatever happens
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(command)} exited ({proc.returncode}) before it was ready:\n"
                             f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{' '.join(command)} was not ready after {timeout:g} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one_request(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, tokens, prompt_tokens, deltas, finish = None, None, None, 0, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
            if ttft is None:
                ttft = time.perf_counter() - start
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    usage = tokens is not None
    if not usage:  # a content delta per token, and the EOS of a reply that stopped
        tokens = deltas + (finish == "stop")
    return {"ttft": ttft, "tokens": tokens, "prompt_tokens": prompt_tokens, "usage": usage}


async def run_load(url: str, models: list[str], clients: int, max_tokens: int, timeout: float) -> dict:
    """Request i (model models[i], prompt PROMPTS[i % len]) from `clients` workers that each send their
    next request as soon as their last one ended."""
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout)
    pending, results = list(enumerate(models)), [None] * len(models)

    async def worker():
        while pending:
            i, model = pending.pop(0)
            try:
                results[i] = await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)
            except Exception as error:  # counted as failed; the run goes on
                results[i] = {"error": f"{type(error).__name__}: {error}"}

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(clients, len(models)))))
    seconds = time.perf_counter() - start
    await client.close()
    done = [r for r in results if "error" not in r]
    for error in sorted({r["error"] for r in results if "error" in r}):
        print(f"[bench] {sum(r.get('error') == error for r in results)} of {len(models)} requests failed: {error}",
              file=sys.stderr)
    ttfts = sorted(r["ttft"] * 1e3 for r in done if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in done)
    prompt = [r["prompt_tokens"] for r in done if r["prompt_tokens"] is not None]
    return {"clients": clients, "requests": len(models), "failed": len(models) - len(done),
            "errors": sorted({r["error"] for r in results if "error" in r}),
            "without_usage": sum(not r["usage"] for r in done), "tokens": tokens, "seconds": seconds,
            "tok_s": tokens / seconds, "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p95_ms": percentile(ttfts, 0.95),
            "mean_prompt_tokens": sum(prompt) / len(prompt) if prompt else None}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks of sorted values (numpy's default)."""
    if not values:
        return None
    k = (len(values) - 1) * q
    low = int(k)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (k - low)


def llama_version(python: str) -> str | None:
    """llama_cpp's version in that interpreter, or None where it (or its server's extras) cannot be imported."""
    found = subprocess.run([python, "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def merged_gguf(args, folder: Path) -> Path:
    """--gguf, else the GGUF of --expert merged into --model, exported once and again when the expert is newer."""
    if args.gguf:
        return Path(args.gguf)
    expert = ROOT / args.experts / f"{args.expert}.safetensors"
    gguf = folder / f"{args.expert}.gguf"
    if not gguf.exists() or gguf.stat().st_mtime < expert.stat().st_mtime:
        print(f"[bench] exporting {expert.name} merged into the model as {gguf}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=folder) as hf:  # export.py's Hugging Face folder: not needed here
            subprocess.run([sys.executable, "export.py", "--expert", str(expert), "--model", args.model, "--out", hf,
                            "--gguf", str(gguf), "--threads", str(args.threads)], cwd=ROOT, check=True)
    return gguf


def ours_dtype(args, log: Path) -> str:
    """The weights' dtype as the server chose it: its probe's line, else what --dtype / T2_DTYPE fix."""
    probe = re.search(r"\[model\] weights in (\w+)", log.read_text())
    if probe:
        return probe.group(1)
    return str(common.weights_dtype(torch.device("cpu"), common.DTYPES[args.dtype])).removeprefix("torch.")


def measure(url: str, models: list[str], clients: int, max_tokens: int, args, log: Path, warm_up=False) -> dict:
    """run_load; stops the run when every request failed (or any of a warm-up): the server is broken."""
    result = asyncio.run(run_load(url, models, clients, max_tokens, args.timeout))
    if result["failed"] == result["requests"] or (warm_up and result["failed"]):
        raise SystemExit(f"[bench] the server failed {result['failed']} of {result['requests']} requests; the end of "
                         f"its log ({log}):\n{log.read_text()[-3000:]}")
    return result


def ratio(x: float, y: float) -> float | None:
    return x / y if y else None


def fmt(value, digits=0):
    return "-" if value is None else f"{value:.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=common.positive_int, nargs="+", default=None, help="default 1 8 32 (--quick: 1 4)")
    p.add_argument("--requests", type=common.positive_int, default=None,
                   help="requests per workload and number of clients (default max(8, 2 x clients); --quick: "
                        "max(5, clients))")
    p.add_argument("--serial-requests", type=common.positive_int, default=None,
                   help=f"requests of (c), sent one at a time (default {len(PROMPTS)}, every prompt once; --quick: 4)")
    p.add_argument("--max-tokens", type=common.positive_int, default=None, help="per request (default 64; --quick: 8)")
    p.add_argument("--mixed", nargs="+", default=MIXED, help="the models of (b), in turn (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="1 and 4 clients, few requests, 8 tokens: a smoke run")
    p.add_argument("--threads", type=common.thread_count, default=2, help="CPU threads of each server")
    p.add_argument("--model", default=m.DEFAULT_MODEL)
    p.add_argument("--experts", default="experts")
    p.add_argument("--expert", default="math", help="the expert of (a), (c) and llama.cpp's GGUF")
    p.add_argument("--dtype", choices=common.DTYPES, default="auto", help="serve.py's --dtype")
    p.add_argument("--skip-llama", action="store_true", help="no llama.cpp row")
    p.add_argument("--llama-python",
                   default=str(DEFAULT_LLAMA_PYTHON) if DEFAULT_LLAMA_PYTHON.exists() else sys.executable,
                   help="the Python with llama-cpp-python[server] installed (default ../llama-venv/bin/python where "
                        "it exists)")
    p.add_argument("--gguf", default=None, help="the GGUF llama.cpp serves (default: --expert merged, exported to "
                                                ".cache/bench_serve/)")
    p.add_argument("--timeout", type=common.positive_float, default=600.0, help="seconds per request")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    clients = args.clients or ([1, 4] if args.quick else [1, 8, 32])
    max_tokens = args.max_tokens or (8 if args.quick else 64)
    n_requests = {c: args.requests or (max(len(args.mixed), c) if args.quick else max(8, 2 * c)) for c in clients}
    n_serial = args.serial_requests or (4 if args.quick else len(PROMPTS))
    # A kill (timeout, a job scheduler) ends the run through the finally below, which stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    version = None
    if not args.skip_llama:
        version = llama_version(args.llama_python)
        if version is None:
            print(f"[bench] llama_cpp is not importable in {args.llama_python}: no llama.cpp row. Install it with\n"
                  f"    {LLAMA_INSTALL}\n(it compiles llama.cpp; a separate venv, named with --llama-python, keeps "
                  f"this one untouched)", file=sys.stderr)
    logs = ROOT / ".cache" / "bench_serve"  # the servers' logs (replaced each run) and the exported GGUF
    logs.mkdir(parents=True, exist_ok=True)
    gguf = merged_gguf(args, logs) if version else None

    rows, servers = {}, []
    try:
        port = free_port()
        log = logs / "serve.log"
        print(f"[bench] starting serve.py on 127.0.0.1:{port} (log {log})", file=sys.stderr)
        ours = start_server([sys.executable, "serve.py", "--port", str(port), "--threads", str(args.threads),
                             "--model", args.model, "--experts", args.experts, "--dtype", args.dtype],
                            log, f"http://127.0.0.1:{port}/health", servers, timeout=600)
        url = f"http://127.0.0.1:{port}/v1"
        threads = re.search(r"threads (\d+)", log.read_text())
        info = {"cpu": common.cpu_description(), "torch_threads": int(threads.group(1)) if threads else None,
                "dtype": ours_dtype(args, log), "max_tokens": max_tokens, "mixed": args.mixed, "llama_cpp_version": version}
        # Warm-up, not timed: every model once, so first-use costs (kernels chosen, buffers sized) stay out.
        measure(url, args.mixed, len(args.mixed), 4, args, log, warm_up=True)
        for c in clients:
            n = n_requests[c]
            print(f"[bench] ours, {c} clients, {n} requests", file=sys.stderr)
            rows["a", c] = measure(url, [args.expert] * n, c, max_tokens, args, log)
            rows["b", c] = measure(url, [args.mixed[i % len(args.mixed)] for i in range(n)], c, max_tokens, args, log)
        print(f"[bench] ours, one at a time, {n_serial} requests", file=sys.stderr)
        rows["c", 1] = measure(url, [args.expert] * n_serial, 1, max_tokens, args, log)
        stop_server(ours)  # its threads would compete with llama.cpp's for the cores

        if version:
            port = free_port()
            log = logs / "llama.log"
            print(f"[bench] starting llama.cpp {version} on 127.0.0.1:{port} with {gguf} (log {log})", file=sys.stderr)
            command = [args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", args.expert,
                       "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
                       "--n_threads_batch", str(args.threads), "--n_ctx", "2048", "--interrupt_requests", "False"]
            llama = start_server(command, log, f"http://127.0.0.1:{port}/v1/models", servers, timeout=300)
            url = f"http://127.0.0.1:{port}/v1"
            measure(url, [args.expert], 1, 4, args, log, warm_up=True)
            for c in clients:
                print(f"[bench] llama.cpp, {c} clients, {n_requests[c]} requests", file=sys.stderr)
                rows["d", c] = measure(url, [args.expert] * n_requests[c], c, max_tokens, args, log)
            stop_server(llama)
    finally:
        for proc in servers:
            stop_server(proc)

    names = {"a": f"(a) one expert ({args.expert})", "b": "(b) mixed (" + ", ".join(args.mixed) + " in turn)",
             "c": "(c) one at a time", "d": f"(d) llama.cpp ({gguf.name if gguf else '-'})"}
    no_usage = sum(r["without_usage"] for r in rows.values())
    llama = f"{version}, {args.threads} threads" if version else "not run"
    print(f"\n{info['cpu']}; serve.py: {info['torch_threads']} torch threads, weights {info['dtype']}; "
          f"llama.cpp: {llama}; {max_tokens} tokens per request, greedy"
          + (f"; {no_usage} replies without usage: tokens counted from their content deltas" if no_usage else "")
          + "\n")
    print("| workload | clients | requests | tok/s | TTFT p50 (ms) | TTFT p95 (ms) | prompt tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (w, c), r in sorted(rows.items(), key=lambda item: (item[0][0] == "c", item[0][1], item[0][0])):
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        print(f"| {names[w]} | {c} | {r['requests']}{failed} | {r['tok_s']:.1f} | {fmt(r['ttft_p50_ms'])} "
              f"| {fmt(r['ttft_p95_ms'])} | {fmt(r['mean_prompt_tokens'], 1)} |")
    ratios = {}
    print("\n| clients | (b)/(a), target >= 0.7 | (a)/(c), target >= 4 at 32 | ours (a) / llama.cpp |")
    print("|---:|---:|---:|---:|")
    for c in clients:
        a = rows["a", c]["tok_s"]
        ratios[c] = {"b_over_a": ratio(rows["b", c]["tok_s"], a), "a_over_c": ratio(a, rows["c", 1]["tok_s"]),
                     "ours_over_llama": ratio(a, rows["d", c]["tok_s"]) if ("d", c) in rows else None}
        print("| " + " | ".join([str(c)] + [fmt(v, 2) for v in ratios[c].values()]) + " |")
    if args.out:
        results = [{"workload": names[w], "key": w, **r} for (w, _), r in rows.items()]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**info, "results": results, "ratios": ratios}, indent=1) + "\n")
        print(f"[bench] wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
