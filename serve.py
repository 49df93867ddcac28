"""Transformer² as a service: an OpenAI-compatible HTTP server that adapts its weights to every request.

    python serve.py                        # the default model and the experts in experts/, on 127.0.0.1:8000
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "auto", "messages": [{"role": "user", "content": "What is 12 * 7?"}]}'

What a request's `model` selects:
    auto       the paper's two passes: pass 1 asks the model which kind of task the prompt is (--strategy
               cls: with the classification expert; prompt: with the base weights, the paper's Figure 3
               prompt either way), pass 2 answers with that expert ('others' or an unreadable pass-1
               reply: the base weights)
    base       the base weights
    NAME       one expert (GET /v1/models lists them)
    mixture    Σ α_k z_k, with "alpha": {"math": 0.6, "code": 0.4} in the request body
Every response carries a "transformer2" field that says what adapted it (the expert or α, pass 1's reply
and seconds), so a client can watch the method work.

How it runs: one generate.Engine (continuous batching) in a worker thread owns the model. Requests join
its batch at any step and leave when they end or their client goes away; pass 1 and pass 2 of "auto"
requests are two sequences of that one batch. Rows with different experts share every step through
svf.RowAdapter: all experts of a model share U and V, so a row runs through U diag(σ ⊙ z_row) Vᵀ with
its own z, and a step whose rows all use one expert runs that expert's merged weights
(bench/row_experts.py measured this against grouping rows by expert over merged weights; README).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Streaming is
server-sent events ending with `data: [DONE]`. Errors are OpenAI's error objects with a 4xx status for
anything a client did wrong; the server keeps serving. It binds to loopback unless told otherwise,
checks `Authorization: Bearer` when --api-key is set, loads nothing a request names that was not
configured at start-up, and logs no prompt text unless --log-prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

import classify
import common
import dispatch
import generate as gen
import model as m
import svf as svf_lib

DEFAULT_MAX_TOKENS = 512  # a request without max_tokens: at most this many, and what fits the context
MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far more than any prompt the context holds
MAX_STOP_STRINGS = 4  # as OpenAI's API
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error", 504: "timeout_error"}


class ApiError(Exception):
    """An error answered with an OpenAI error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ---- One request: what to generate, and how it went


@dataclass(eq=False)
class Job:
    """A request from parsing to its last byte. The worker thread writes the sequences' progress and
    `done`; the request's coroutine reads them when `event` is set."""

    id: str
    kind: str  # "chat" or "text" (/v1/completions)
    model: str  # as the client named it: auto, base, an expert, mixture
    prompt: list[int]
    question: str  # what pass 1 classifies (the last user message, or the completion prompt)
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] | None
    stream: bool
    include_usage: bool
    alpha: dict[str, float] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    start: float = field(default_factory=time.perf_counter)
    deadline: float = math.inf
    # Written by the worker thread:
    pass1: gen.Sequence | None = None
    answer: gen.Sequence | None = None
    expert: str | None = None  # what pass 2 runs with: an expert's name, None for the base weights
    pass1_reply: str | None = None
    pass1_seconds: float | None = None
    mixture_slot: int | None = None
    error: ApiError | None = None
    done: bool = False
    # Tokens of the answer checked for EOS and stop strings: while the reply goes on none of them is an
    # EOS and their text holds no whole stop string (the token being checked may be either).
    checked: int = 0
    # Owned by the request's coroutine:
    loop: asyncio.AbstractEventLoop | None = None
    event: asyncio.Event | None = None
    sent: int = 0  # characters of the reply already streamed

    def notify(self):
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.event.set)

    def adaptation(self) -> dict:
        """The response's "transformer2" field: what adapted this reply."""
        return {"adapted_with": "mixture" if self.alpha else (self.expert or "base"), "expert": self.expert,
                "alpha": self.alpha, "pass1_reply": self.pass1_reply, "pass1_seconds": self.pass1_seconds}


# ---- The worker thread: the one owner of the model


class Worker(threading.Thread):
    """Drives the engine: takes new and cancelled jobs from its inbox between steps, runs pass 1 and
    pass 2, frees a mixture's slot when its job ends, and expires jobs past their deadline."""

    def __init__(self, server: "Server"):
        super().__init__(name="engine", daemon=True)
        self.server = server
        self.inbox: queue.Queue = queue.Queue()
        self.jobs: set[Job] = set()
        self.job_of: dict[gen.Sequence, Job] = {}
        self.stopping = False

    def submit(self, job: Job):
        self.inbox.put(("add", job))

    def cancel(self, job: Job):
        self.inbox.put(("cancel", job))

    def stop(self):
        self.stopping = True
        self.inbox.put(("stop", None))

    def run(self):
        while not self.stopping:
            try:
                self._take_inbox(block=not self.server.engine.busy())
                if self.stopping:
                    break
                self._expire()
                for seq in self.server.engine.step():
                    self._progress(seq)
            except Exception:  # a failure while generating (out of memory, a kernel error): fail the jobs, go on
                traceback.print_exc()
                for job in list(self.jobs):
                    self._end(job, ApiError(500, "the server failed while generating this reply; see its log"))
                self.server.engine.close()
                self.server.engine = self.server.new_engine()
        for job in list(self.jobs):
            self._end(job, ApiError(503, "the server is shutting down", code="shutting_down"))
        self.server.engine.close()

    def _take_inbox(self, block: bool):
        while True:
            try:
                action, job = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if action == "stop":
                return
            if action == "add":
                self._start(job)
            elif action == "cancel" and job in self.jobs:
                self._end(job, None)

    def _start(self, job: Job):
        server = self.server
        self.jobs.add(job)
        if job.alpha:
            job.mixture_slot = server.rows.add(server.two_pass.mixed(list(job.alpha), torch.tensor(list(job.alpha.values()))))
        pass1_prompt = server.pass1_prompt(job.question) if job.model == "auto" else None
        if pass1_prompt is not None:
            job.pass1 = gen.Sequence(pass1_prompt, dispatch.CLASSIFY_TOKENS, adapter=server.pass1_slot)
            self._add(job.pass1, job)
        else:
            if job.model == "auto":
                job.pass1_reply = ""  # pass 1's prompt does not fit the context: the base weights answer
            job.expert = job.model if job.model in server.expert_slots else None
            self._answer(job)

    def _answer(self, job: Job):
        slot = job.mixture_slot if job.alpha else self.server.expert_slots.get(job.expert, svf_lib.RowAdapter.BASE)
        generator = None
        if job.temperature >= gen.GREEDY_BELOW:
            generator = torch.Generator(device=self.server.engine.device)
            generator.manual_seed(job.seed if job.seed is not None else torch.seed())
        job.answer = gen.Sequence(job.prompt, job.max_tokens, job.temperature, job.top_p, generator, job.stop, slot)
        self._add(job.answer, job)

    def _add(self, seq: gen.Sequence, job: Job):
        self.job_of[seq] = job
        self.server.engine.add(seq)
        if seq.finish is not None:  # nothing fits after the prompt
            self._progress(seq)

    def _progress(self, seq: gen.Sequence):
        job = self.job_of.get(seq)
        if job is None:
            return
        if seq is job.answer:
            job.checked = len(seq.tokens)  # published after this step's end-of-reply checks
        if seq.finish is None:
            job.notify()
            return
        del self.job_of[seq]
        if seq is job.pass1 and seq.finish != "cancelled":
            job.pass1_reply = seq.text(self.server.tokenizer)
            job.pass1_seconds = round(time.perf_counter() - job.start, 4)
            job.expert = self.server.route(job.pass1_reply)
            self._answer(job)
        elif seq is job.answer:
            self._end(job, None)

    def _end(self, job: Job, error: ApiError | None):
        for seq in (job.pass1, job.answer):
            if seq is not None:
                self.server.engine.cancel(seq)  # no-op for a sequence that has ended
                self.job_of.pop(seq, None)
        if job.mixture_slot is not None:
            self.server.rows.remove(job.mixture_slot)  # its rows leave before the next forward
            job.mixture_slot = None
        self.jobs.discard(job)
        job.error, job.done = job.error or error, True
        self.server.finished(job)
        job.notify()

    def _expire(self):
        now = time.perf_counter()
        for job in [j for j in self.jobs if now > j.deadline]:
            self._end(job, ApiError(504, f"the request ran past the server's --request-timeout of "
                                         f"{self.server.args.request_timeout:g} s", code="timeout"))


# ---- The server: model, experts, engine, and the rules a request must meet


class Server:
    def __init__(self, args):
        self.args = args
        experts = dispatch.load_experts(args.experts)  # first: a wrong folder is reported before the model loads
        self.model, self.tokenizer = m.load(args.model, dtype=common.DTYPES[args.dtype], device=args.device,
                                            probe_rows=args.batch_size)
        self.two_pass = dispatch.TwoPass(self.model, self.tokenizer, experts, args.batch_size)
        self.with_classifier = args.strategy == "cls"
        if self.with_classifier and dispatch.CLASSIFIER not in experts:
            raise SystemExit(f"serve.py: --strategy cls needs a classification expert ({dispatch.CLASSIFIER}) in "
                             f"{args.experts}; train one with python train.py --task cls, or use --strategy prompt")
        self.strict = self.two_pass.label_rule(self.with_classifier) == "strict"
        self.rows = svf_lib.RowAdapter(self.two_pass.svf)
        self.expert_slots = {name: self.rows.add(z, merge=args.merge_experts) for name, z in self.two_pass.experts.items()}
        self.pass1_slot = self.expert_slots[dispatch.CLASSIFIER] if self.with_classifier else svf_lib.RowAdapter.BASE
        self.categories = self.two_pass.categories(self.with_classifier)
        self.context = min(args.max_context, self.model.args.max_seq_len)
        self.models = ["auto", "base", *self.two_pass.experts, "mixture"]
        self.engine = self.new_engine()
        self.in_flight = 0  # jobs accepted and not ended (the event loop adds them, the worker ends them; under lock)
        self.lock = threading.Lock()
        self.worker = Worker(self)

    def new_engine(self) -> gen.Engine:
        return gen.Engine(self.model, self.tokenizer, self.args.batch_size, self.context, self.rows)

    def pass1_prompt(self, question: str) -> list[int] | None:
        prompt = self.tokenizer.encode_chat(classify.classification_messages(question, self.categories))
        return prompt if len(prompt) + dispatch.CLASSIFY_TOKENS <= self.context else None

    def route(self, reply: str) -> str | None:
        return self.two_pass.route([reply], self.strict, self.with_classifier)[0]

    def accept(self, job: Job):
        """Queue a job, or refuse it when the batch and the queue are full."""
        with self.lock:
            if self.in_flight >= self.args.batch_size + self.args.max_queue:
                raise ApiError(429, f"the server is busy: {self.in_flight} requests are running or waiting (limit "
                                    f"{self.args.batch_size} running + {self.args.max_queue} waiting); retry shortly",
                               code="queue_full", headers={"Retry-After": "1"})
            self.in_flight += 1
        job.deadline = job.start + self.args.request_timeout
        self.worker.submit(job)

    def finished(self, job: Job):
        with self.lock:
            self.in_flight -= 1
        seq = job.answer
        line = (f"[serve] {job.id} {job.model} -> {job.adaptation()['adapted_with']}: {len(job.prompt)} prompt + "
                f"{len(seq.tokens) if seq else 0} tokens in {time.perf_counter() - job.start:.2f} s, "
                f"{job.error.code or job.error.status if job.error else seq.finish if seq else '-'}")
        if self.args.log_prompts:
            line += f"; prompt {self.tokenizer.decode(job.prompt)!r}"
        print(line, file=sys.stderr, flush=True)

    # -- requests: JSON in, a Job out, or an ApiError that says what is wrong

    def chat_job(self, body: dict) -> Job:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role is {role!r}; use system, user or assistant", f"messages[{i}].role")
            clean.append({"role": role, "content": message_text(content, f"messages[{i}].content")})
        try:
            prompt = self.tokenizer.encode_chat(clean)
        except ValueError as error:  # the chat template refuses this order of roles
            raise ApiError(400, f"the model's chat template refuses these messages: {error}", "messages") from error
        users = [message["content"] for message in clean if message["role"] == "user"]
        return self.job(body, "chat", prompt, users[-1] if users else clean[-1]["content"])

    def completion_job(self, body: dict) -> Job:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (one prompt per request)", "prompt")
        if body.get("echo") or body.get("suffix") is not None or body.get("best_of") not in (None, 1):
            raise ApiError(400, "echo, suffix and best_of are not supported", "echo")
        return self.job(body, "text", self.tokenizer.encode(prompt), prompt)

    def job(self, body: dict, kind: str, prompt: list[int], question: str) -> Job:
        model = body.get("model")
        if not isinstance(model, str) or model not in self.models:
            raise ApiError(404 if isinstance(model, str) else 400,
                           f"model {model!r} is not served here; choose one of {', '.join(self.models)}", "model",
                           "model_not_found")
        alpha = None
        if model == "mixture":
            alpha = self.parse_alpha(body.get("alpha"))
        elif body.get("alpha") is not None:
            raise ApiError(400, "'alpha' mixes experts and needs \"model\": \"mixture\"", "alpha")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n = 1 is supported: send one request per reply", "n")
        if body.get("logprobs") not in (None, False, 0) or body.get("tools") or body.get("functions"):
            raise ApiError(400, "logprobs, tools and functions are not supported", "logprobs")
        if not prompt:
            raise ApiError(400, "the prompt is empty: there is nothing to answer", "messages" if kind == "chat" else "prompt")
        room = self.context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens and the context holds {self.context} "
                                f"(--max-context): shorten it", "messages" if kind == "chat" else "prompt",
                           "context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = integer(body.get(key), key, 1, self.context, default=DEFAULT_MAX_TOKENS)
        temperature = number(body.get("temperature"), "temperature", 0.0, 2.0, default=1.0)
        top_p = number(body.get("top_p"), "top_p", 0.0, 1.0, default=1.0)
        if top_p <= 0:
            raise ApiError(400, "top_p must be above 0 (1 keeps every token)", "top_p")
        seed = integer(body.get("seed"), "seed", -(2**63), 2**63 - 1, default=None)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
        return Job(id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", kind=kind, model=model,
                   prompt=prompt, question=question, max_tokens=min(max_tokens, room), temperature=temperature,
                   top_p=top_p, seed=seed, stop=stop_strings(body.get("stop")), stream=stream,
                   include_usage=options.get("include_usage", False), alpha=alpha)

    def parse_alpha(self, alpha) -> dict[str, float]:
        skills = self.two_pass.skills
        example = ", ".join(f'"{name}": {1 / len(skills):.2f}' for name in skills)
        if not isinstance(alpha, dict) or not alpha:
            raise ApiError(400, f"model 'mixture' needs \"alpha\": an object of expert weights, e.g. {{{example}}}", "alpha")
        unknown = [name for name in alpha if name not in skills]
        if unknown:
            raise ApiError(400, f"alpha names {unknown[0]!r}; the experts to mix are {', '.join(skills)}", "alpha")
        weights = {name: number(value, f"alpha.{name}", 0.0, 10.0) for name, value in alpha.items()}
        if not any(weights.values()):
            raise ApiError(400, "every alpha weight is 0, which mixes no expert; give at least one weight > 0", "alpha")
        return weights

    # -- responses

    def text_of(self, job: Job, final: bool) -> str:
        """The reply so far. Before the end, text that may still change is held back: an incomplete
        UTF-8 character (decoded as U+FFFD) and the last characters that could begin a stop string."""
        seq = job.answer
        if final:
            return seq.text(self.tokenizer)
        text = self.tokenizer.decode(seq.tokens[: job.checked]).rstrip("\ufffd")
        if job.stop:
            text = text[: max(len(text) - (max(map(len, job.stop)) - 1), 0)]
        return text

    def usage(self, job: Job) -> dict:
        completion = len(job.answer.tokens) if job.answer else 0
        return {"prompt_tokens": len(job.prompt), "completion_tokens": completion,
                "total_tokens": len(job.prompt) + completion}

    def response(self, job: Job) -> dict:
        text, finish = self.text_of(job, final=True), finish_reason(job.answer.finish)
        if job.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": job.model, "choices": [choice], "usage": self.usage(job),
                "transformer2": job.adaptation()}

    def chunk(self, job: Job, text: str | None, finish: str | None, first: bool = False) -> str:
        if job.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": job.model, "choices": [choice]}
        if finish is not None:
            body["transformer2"] = job.adaptation()
        return sse(body)


def message_text(content, param: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{param} must be a string or a list of text parts ({{\"type\": \"text\", \"text\": ...}})", param)


def integer(value, name: str, low: int, high: int, default):
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:  # bool is an int to Python, not to a client
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, not {value!r}", name)
    return value


def number(value, name: str, low: float, high: float, default=None) -> float:
    if value is None and default is not None:
        return default
    if type(value) not in (int, float) or not (low <= value <= high):  # NaN fails both comparisons
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}, not {value!r}", name)
    return float(value)


def stop_strings(stop) -> list[str] | None:
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return stop or None


def finish_reason(finish: str | None) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(finish, "stop")


def sse(body) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ---- HTTP


def create_app(server: Server):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        print(f"[serve] ready on http://{server.args.host}:{server.args.port} (models: {', '.join(server.models)})",
              file=sys.stderr, flush=True)
        yield
        server.worker.stop()
        server.worker.join(timeout=30)
        print("[serve] stopped", file=sys.stderr, flush=True)

    app = FastAPI(title="Transformer²", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # unknown paths, wrong methods
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        traceback.print_exception(error)
        return JSONResponse(ApiError(500, "internal error; see the server log").body(), status_code=500)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if server.args.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {server.args.api_key}":
                error = ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        engine = server.engine
        return {"status": "ok", "running": len(engine.rows), "waiting": len(engine.waiting),
                "in_flight": server.in_flight}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "transformer2"}
                                           for name in server.models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await respond(server.chat_job(await read_json(request)), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(server.completion_job(await read_json(request)), request)

    async def respond(job: Job, request: Request):
        job.loop, job.event = asyncio.get_running_loop(), asyncio.Event()
        server.accept(job)
        if job.stream:
            return StreamingResponse(stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while not job.done:
                try:
                    await asyncio.wait_for(job.event.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        break
                job.event.clear()
        finally:
            if not job.done:  # the client went away (or this coroutine was cancelled): free its row
                server.worker.cancel(job)
        if job.error:
            raise job.error
        return JSONResponse(server.response(job))

    async def stream(job: Job):
        try:
            yield server.chunk(job, None, None, first=True)
            while True:
                await job.event.wait()
                job.event.clear()
                if job.error:
                    yield sse(job.error.body())
                    break
                if job.answer is None:
                    continue  # still in pass 1
                final = job.done
                text = server.text_of(job, final)
                if len(text) > job.sent:
                    yield server.chunk(job, text[job.sent:], None)
                    job.sent = len(text)
                if final:
                    yield server.chunk(job, None, finish_reason(job.answer.finish))
                    if job.include_usage:
                        yield sse({"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
                                   "created": job.created, "model": job.model, "choices": [], "usage": server.usage(job)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not job.done:  # the client disconnected mid-stream: its row leaves at the next step
                server.worker.cancel(job)

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")

        def refuse(constant):  # Python's json reads NaN and Infinity; JSON has neither
            raise ValueError(f"{constant} is not JSON")

        try:
            body = json.loads(bytes(raw), parse_constant=refuse)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Transformer² behind an OpenAI-compatible API (see the module docstring).")
    p.add_argument("--model", default=m.DEFAULT_MODEL, help="local Hugging Face folder or hub id")
    p.add_argument("--experts", default="experts", help="folder of expert files, or a hub repository of them")
    p.add_argument("--strategy", choices=("cls", "prompt"), default="cls",
                   help="pass 1 of model 'auto': the classification expert (cls) or the base model (prompt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on /v1/ endpoints")
    p.add_argument("--batch-size", type=common.positive_int, default=32, help="rows generated together")
    p.add_argument("--max-queue", type=common.non_negative_int, default=256,
                   help="requests that may wait for a row; beyond it the server answers 429")
    p.add_argument("--max-context", type=common.positive_int, default=2048,
                   help="tokens of prompt + reply per row (the KV cache holds batch-size rows of it)")
    p.add_argument("--request-timeout", type=common.positive_float, default=600.0, help="seconds a request may take")
    p.add_argument("--merge-experts", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each expert's merged weights, for steps whose rows all use one expert (memory: one "
                        "copy of the adapted matrices per expert)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=common.DTYPES, default="auto", help=common.DTYPE_HELP)
    p.add_argument("--threads", type=common.thread_count, default=None, help="torch CPU threads (default: free cores)")
    p.add_argument("--log-prompts", action="store_true", help="write each request's prompt text to the log")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a port number (0-65535)")
    return args


def main(argv=None):
    args = parse_args(argv)
    import uvicorn

    threads = common.set_threads(args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[serve] listening on {args.host}: reachable from other machines"
              f"{'' if args.api_key else ' with no --api-key'}", file=sys.stderr)
    print(f"[serve] {args.model}, experts {args.experts}, strategy {args.strategy}, threads {threads}", file=sys.stderr)
    try:
        server = Server(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:  # a model or experts folder that is not there or not usable
        raise SystemExit(f"serve.py: {error}") from None
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
