"""generate.py: the KV cache's prefill and decode against a full forward, continuous batching against
transformers' generate one prompt at a time, log-probabilities, stop strings, seeded sampling, the
fixed-shape (compiled) path, and the CPU dtype probe."""

import pytest
import torch

import common
import generate as gen
import model as m
from tiny_models import tiny_hf_model

FAMILIES = {"llama": {}, "mistral_window": dict(sliding_window=8), "qwen2": dict(tie_word_embeddings=True)}


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_per_row_decode_equal_full_forward(family, tmp_path):
    """Ragged prompts prefilled right-padded into chosen cache rows, then decoded one token per row at each
    row's own position (rows moved as generate() moves them): every logit equals the full forward's on
    that row alone, also past the sliding window."""
    tiny_hf_model(family.split("_")[0], tmp_path, **FAMILIES[family])
    model, _ = m.load(tmp_path, dtype=torch.float64, device="cpu")
    sequences = random_prompts((20, 14, 17), seed=2)
    prompt_lengths = [9, 3, 12]
    expected = [model(torch.tensor([s]))[0] for s in sequences]  # (T, vocab) each, no cache
    model.setup_cache(4, 24)
    try:
        rows = torch.tensor([3, 0, 1])  # cache rows in another order than the prompts
        prompts = [s[:n] for s, n in zip(sequences, prompt_lengths)]
        logits = gen.prefill(model, prompts, rows, pad_id=2)
        for i, n in enumerate(prompt_lengths):
            assert torch.allclose(logits[i], expected[i][n - 1], atol=1e-10)
        # Decode needs the active rows at 0..B-1: move row 3 to row 2's place, then rows are 0, 1, 2 for
        # sequences 1, 2, 0.
        model.copy_cache_row(3, 2, prompt_lengths[0])
        order, position = [1, 2, 0], [prompt_lengths[i] for i in (1, 2, 0)]
        for _ in range(5):
            tokens = torch.tensor([sequences[i][p] for i, p in zip(order, position)])
            logits = gen.decode_one_token(model, tokens, torch.tensor(position), max(position) + 1)
            for r, (i, p) in enumerate(zip(order, position)):
                assert torch.allclose(logits[r], expected[i][p], atol=1e-10)
            position = [p + 1 for p in position]
    finally:
        model.clear_cache()


def reference_replies(hf_model, prompts, max_new_tokens, eos_id, max_len):
    """transformers' greedy generate, one prompt at a time, cut at the first eos_id (included)."""
    replies = []
    for p in prompts:
        budget = min(max_new_tokens, max_len - len(p))
        ids = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=budget, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        reply = ids[0, len(p):].tolist()
        replies.append(reply[: reply.index(eos_id) + 1] if eos_id in reply else reply)
    return replies


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_continuous_batching_equals_transformers_one_prompt_at_a_time(batch_size, tmp_path):
    """Nine ragged prompts through batch_size rows: rows end at different steps (an end-of-sequence token
    the model often produces; prompts that nearly fill the 64-token context get fewer tokens) and their
    rows are refilled; repeated prompts take a cache row's slots instead of a prefill. Each reply is
    transformers' greedy reply for its prompt alone."""
    hf = tiny_hf_model("llama", tmp_path, max_position_embeddings=64).double()
    model, tokenizer = m.load(tmp_path, dtype=torch.float64, device="cpu")
    prompts = random_prompts((3, 11, 7, 1, 58, 61, 5, 20, 9), seed=3)
    prompts = prompts[:3] + [prompts[1]] + prompts[3:] + [prompts[1], prompts[4]]  # repeats, some while a row holds one
    # An "end" token: the most frequent one in free replies, so that rows end at different steps.
    free = gen.generate(model, tokenizer, prompts, max_new_tokens=12).tokens
    end = max(range(96), key=lambda t: sum(reply.count(t) for reply in free))
    tokenizer.eos_ids = [end]
    expected = reference_replies(hf, prompts, 12, end, 64)
    assert len({len(r) for r in expected}) >= 4  # the prompts' replies do end at different steps

    out = gen.generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=batch_size, return_logprobs=True)
    assert out.tokens == expected
    assert out.finish == ["eos" if r[-1] == end else "length" for r in expected]
    assert out.texts == [tokenizer.decode(r[:-1] if r[-1] == end else r) for r in expected]
    assert out.n_generated == sum(map(len, expected))
    check_against_full_forward(model, prompts, out)


def check_against_full_forward(model, prompts, out, atol=1e-8):
    """Every generated token's log-probability equals the full forward's (no cache) on prompt + reply,
    and greedy decoding picked its argmax."""
    for prompt, tokens, logprobs in zip(prompts, out.tokens, out.logprobs):
        sequence = torch.tensor([prompt + tokens])
        logp = torch.log_softmax(model(sequence)[0, len(prompt) - 1 : -1].double(), dim=-1)
        assert torch.allclose(logprobs.double(), logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1), atol=atol)
        assert tokens == logp.argmax(dim=-1).tolist()


def test_sampled_logprobs_equal_full_forward(tiny_llama):
    """Sampled replies, among them several of one prompt sharing its prefill: each token's log-probability
    is the full forward's on that reply."""
    model, tokenizer = m.load(tiny_llama, dtype=torch.float64, device="cpu")
    prompts = random_prompts((4, 9, 2), seed=5) * 3
    out = gen.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, temperature=1.0, seed=0,
                       return_logprobs=True)
    for prompt, tokens, logprobs in zip(prompts, out.tokens, out.logprobs):
        logp = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1], dim=-1)
        assert torch.allclose(logprobs, logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1), atol=1e-6)


def test_a_repeated_prompt_is_prefilled_once(tiny_llama, monkeypatch):
    """Eight samples each of two prompts through 4 rows: each wave of rows entering prefills one row and
    the others copy its slots, or those of a row still holding the prompt (16 rows prefilled without it)."""
    model, tokenizer = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    prefilled = []
    real_prefill = model.prefill
    monkeypatch.setattr(model, "prefill", lambda tokens, *a: prefilled.append(len(tokens)) or real_prefill(tokens, *a))
    prompts = [[5, 6, 7]] * 8 + [[9, 10]] * 8
    out = gen.generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4, temperature=1.0, seed=0)
    assert set(prefilled) == {1} and len(prefilled) <= 4
    assert len(set(map(tuple, out.tokens[:8]))) > 1  # the samples differ


def test_sampling_is_seeded(tiny_llama):
    model, tokenizer = m.load(tiny_llama, device="cpu")
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, batch_size=3)
    a = gen.generate(model, tokenizer, [[5, 6, 7]] * 8, seed=1, **kw)
    b = gen.generate(model, tokenizer, [[5, 6, 7]] * 8, seed=1, **kw)
    c = gen.generate(model, tokenizer, [[5, 6, 7]] * 8, seed=2, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert len(set(map(tuple, a.tokens))) > 1  # the samples of one prompt differ from each other


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {gen.sample_next(logits, 1.0, 0.7, g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are outside


# Logits whose scaled values overflow fp32 at these temperatures (50 / 1e-37 = 5e38 > 3.4e38); the best
# token of each row, by hand: 60.0 at index 1, then -40.0 at index 1.
OVERFLOWING_LOGITS = [[50.0, 60.0, 40.0, -2.0], [-50.0, -40.0, -60.0, -45.0]]


@pytest.mark.parametrize("temperature", [5e-324, 1e-40, 1e-38, 2e-38, 1e-37])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_tiny_temperature_samples_the_best_token(temperature, top_p):
    """Below fp32's smallest normal number (1.2e-38) sampling is greedy; just above it, the one token
    whose probability is not 0 is still the best one, never a NaN draw."""
    logits = torch.tensor(OVERFLOWING_LOGITS)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert gen.sample_next(logits, temperature, top_p, g).tolist() == [1, 1]


def test_sampling_at_a_tiny_temperature_equals_greedy(tiny_llama):
    model, tokenizer = m.load(tiny_llama, device="cpu")
    prompts = random_prompts((4, 9, 2), seed=5)
    greedy = gen.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    tiny = gen.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, temperature=1e-40, seed=3)
    assert tiny.tokens == greedy.tokens


def test_draw_follows_the_weights():
    """20,000 draws from weights 5 : 3 : 1.5 : 0.5 : 0 (two rows, one scaled): each frequency within 0.01 of
    its probability (about 4 standard errors), and the zero-weight entry never."""
    weights = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [5.0, 3.0, 1.5, 0.5, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([gen.draw(weights, g) for _ in range(10_000)], dim=1)  # (2, 10000)
    for row in draws:
        frequency = torch.bincount(row, minlength=5).double() / len(row)
        assert torch.allclose(frequency, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64), atol=0.01)
        assert frequency[4] == 0


def test_stop_on_eos_and_stop_strings(tiny_llama):
    model, tokenizer = m.load(tiny_llama, dtype=torch.float64, device="cpu")
    free = gen.generate(model, tokenizer, [[5, 6, 7], [5, 6, 7, 8]], max_new_tokens=10)
    assert free.finish == ["length", "length"] and len(free.tokens[0]) == 10
    # Stop at the third generated word: the text is cut before it, and the tokens end with it.
    third = tokenizer.decode([free.tokens[0][2]])
    first_hit = free.texts[0].find(third)
    stopped = gen.generate(model, tokenizer, [[5, 6, 7], [5, 6, 7, 8]], max_new_tokens=10, stop=[third], batch_size=1)
    assert stopped.finish[0] == "stop"
    assert stopped.texts[0] == free.texts[0][:first_hit]
    assert stopped.tokens[0] == free.tokens[0][:3]
    # The second prompt's reply is the same as without the stop string up to where it stops, if it does.
    n = len(stopped.tokens[1])
    assert stopped.tokens[1] == free.tokens[1][:n]
    assert (stopped.finish[1] == "stop") == (third in free.texts[1])

    # EOS: an output layer under which </s> is always the most likely token.
    class AlwaysEOS(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full(x.shape[:-1], 2), 96).to(x.dtype)

    model.lm_head = AlwaysEOS()
    eos = gen.generate(model, tokenizer, [[5, 6, 7]], max_new_tokens=10)
    assert eos.finish == ["eos"] and eos.tokens == [[2]] and eos.texts == [""]


def test_a_prompt_that_fills_the_context_gets_an_empty_reply(tmp_path):
    tiny_hf_model("llama", tmp_path, max_position_embeddings=16)
    model, tokenizer = m.load(tmp_path, dtype=torch.float32, device="cpu")
    out = gen.generate(model, tokenizer, random_prompts((16, 4), seed=6), max_new_tokens=5)
    assert out.tokens[0] == [] and out.finish[0] == "length"
    assert len(out.tokens[1]) == 5


@pytest.mark.parametrize("family", ["llama", "mistral_window"])
def test_static_decode_equals_full_forward(family, tmp_path, monkeypatch):
    """The static step (what is compiled and captured as CUDA graphs), run eagerly: rows padded up to a
    batch bucket, keys up to a multiple of KEY_BLOCK, on ragged prompts, rows ending and refilled, past
    a sliding window. Every step runs at one of the bounded shapes."""
    tiny_hf_model(family.split("_")[0], tmp_path, **FAMILIES[family])
    model, tokenizer = m.load(tmp_path, dtype=torch.float64, device="cpu")
    prompts = random_prompts((3, 11, 7, 1, 6, 9, 2, 4), seed=4)
    free = gen.generate(model, tokenizer, prompts, max_new_tokens=14)
    tokenizer.eos_ids = [free.tokens[0][0]]  # rows end at different steps (1 to 14 tokens)
    eager = gen.generate(model, tokenizer, prompts, max_new_tokens=14, batch_size=7, return_logprobs=True)
    monkeypatch.setattr(gen, "KEY_BLOCK", 8)  # several key blocks within these short replies
    shapes = []
    real_run = gen.StaticStep.run
    monkeypatch.setattr(gen.StaticStep, "run", lambda self, t, p, rows, n_keys: shapes.append((len(t), rows, n_keys))
                        or real_run(self, t, p, rows, n_keys))
    gen.configure_decode(static=True)
    try:
        static = gen.generate(model, tokenizer, prompts, max_new_tokens=14, batch_size=7, return_logprobs=True)
    finally:
        gen.use_eager_decode()
    assert static.tokens == eager.tokens and len({len(t) for t in static.tokens}) > 1
    check_against_full_forward(model, prompts, static)
    cache_len = max(map(len, prompts)) + 14
    assert all(rows == min(s for s in (1, 2, 3, 4, 6, 7) if s >= n) for n, rows, _ in shapes)
    assert any(rows > n for n, rows, _ in shapes)  # e.g. 5 active rows run as 6
    assert {n for _, _, n in shapes} <= {8, 16, 24, cache_len} and len({n for _, _, n in shapes}) >= 2


def test_batch_buckets():
    assert [gen.round_up(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
    assert gen.batch_buckets(1) == [1]
    assert gen.batch_buckets(5) == [1, 2, 3, 4, 5]
    assert gen.batch_buckets(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    assert gen.batch_buckets(256) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]


def test_compiled_or_captured_steps_are_static():
    assert gen.DecodeSettings(compile=True).static and gen.DecodeSettings(graphs=True).static
    assert not gen.DecodeSettings().static and gen.DecodeSettings(static=True).static


def run_engine(model, tokenizer, sequences, batch_size, **engine_args):
    engine = gen.Engine(model, tokenizer, batch_size, cache_len=64, **engine_args)
    try:
        for seq in sequences:
            engine.add(seq)
        while engine.busy():
            engine.step()
    finally:
        engine.close()
    return [(seq.tokens, seq.finish, seq.logprobs) for seq in sequences]


@pytest.mark.parametrize("static", [False, True])
def test_overlapped_steps_equal_the_plain_order(tiny_llama, static, monkeypatch):
    """Overlap (the GPU's default) launches the next step for every row before the host reads which rows
    ended; forced on here, on the CPU. Rows ending by EOS, a stop string and their budget, refilled from
    the queue, greedy and sampled rows in one batch, log-probabilities: all as without overlap."""
    model, tokenizer = m.load(tiny_llama, dtype=torch.float64, device="cpu")
    prompts = random_prompts((5, 2, 9, 4, 7, 3, 8), seed=11)
    free = gen.generate(model, tokenizer, prompts, max_new_tokens=12)
    tokenizer.eos_ids = [free.tokens[0][4]]
    stop = [tokenizer.decode(free.tokens[1][6:8])]
    monkeypatch.setattr(gen, "KEY_BLOCK", 4)

    def sequences():
        generator = torch.Generator().manual_seed(3)
        return [gen.Sequence(p, 4 + 2 * i, temperature=0.0 if i % 2 else 1.0, generator=generator,
                             stop=stop if i == 1 else None, want_logprobs=True) for i, p in enumerate(prompts)]

    settings = gen.DecodeSettings(static=static)
    plain = run_engine(model, tokenizer, sequences(), 3, overlap=False, settings=settings)
    overlapped = run_engine(model, tokenizer, sequences(), 3, overlap=True, settings=settings)
    assert [t for t, _, _ in overlapped] == [t for t, _, _ in plain]
    assert {f for _, f, _ in plain} == {"eos", "stop", "length"}
    assert [f for _, f, _ in overlapped] == [f for _, f, _ in plain]
    for (_, _, a), (_, _, b) in zip(overlapped, plain):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-10)


@pytest.mark.slow
def test_compiled_decode_equals_full_forward_in_few_compilations(tiny_llama, monkeypatch):
    """The compiled static step over many shapes (rows ending, padded to buckets, keys in several blocks)
    compiles twice (one row, and any other count), and later generate() calls whose cache fits in the
    first call's shape (static steps get the largest shape asked for so far) compile nothing more."""
    model, tokenizer = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(gen, "KEY_BLOCK", 4)
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    gen.compile_decode()
    try:
        prompts = random_prompts((4, 2, 1, 6, 3), seed=12)
        out = gen.generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=4, return_logprobs=True)
        first = counters["unique_graphs"] - before
        again = gen.generate(model, tokenizer, prompts[:3], max_new_tokens=14, batch_size=3, return_logprobs=True)
        more = gen.generate(model, tokenizer, prompts[1:], max_new_tokens=6, batch_size=4, return_logprobs=True)
    finally:
        gen.use_eager_decode()
        model.clear_cache()
    check_against_full_forward(model, prompts, out, atol=1e-4)
    check_against_full_forward(model, prompts[:3], again, atol=1e-4)
    check_against_full_forward(model, prompts[1:], more, atol=1e-4)
    assert 1 <= first <= 2 and counters["unique_graphs"] - before == first, (first, counters["unique_graphs"] - before)


def test_dtype_probe_leaves_a_trainable_model(tiny_llama, monkeypatch):
    """load() with no dtype on a CPU with bf16 in hardware times both dtypes and keeps the faster; the
    weights it leaves are ordinary tensors (gradients can flow through them), in one dtype."""
    monkeypatch.delenv("T2_DTYPE", raising=False)
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    calls = []
    real_probe = common.probe_cpu_dtype
    monkeypatch.setattr(common, "probe_cpu_dtype", lambda model, rows: calls.append(rows) or real_probe(model, rows))
    model, _ = m.load(tiny_llama, device="cpu", probe_rows=5)
    assert calls == [5]
    dtypes = {p.dtype for p in model.parameters()}
    assert len(dtypes) == 1 and dtypes <= {torch.float32, torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32
    x = model.embed.weight[:3].detach().clone().requires_grad_(True)
    model.layers[0].mlp(x[None]).sum().backward()  # an inference-mode weight would refuse this
    assert x.grad is not None


def test_dtype_probe_times_at_most_128_rows(tiny_llama, monkeypatch):
    """A batch of 2**63 - 1 rows (the largest count the flags take) is timed at 128 rows, not allocated."""
    model, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    shapes = []
    monkeypatch.setattr(model, "decode", lambda tokens, positions, n_keys: shapes.append((len(tokens), n_keys)))
    common.probe_cpu_dtype(model, rows=2**63 - 1)
    assert shapes and set(shapes) == {(128, common.PROBE_KEYS + 1)}


def test_dtype_probe_times_a_decode_step_over_a_cache(tiny_llama, monkeypatch):
    """The probe's step attends over PROBE_KEYS cached keys (attention is part of a dtype's cost): it runs
    what generate's decode step runs, and the cache is gone afterwards."""
    model, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    seen = []
    real_attention = m.decode_attention
    monkeypatch.setattr(m, "decode_attention", lambda q, k, v, allowed: seen.append(k.shape[2]) or real_attention(q, k, v, allowed))
    common.probe_cpu_dtype(model, rows=3)
    assert seen and set(seen) == {common.PROBE_KEYS + 1}
    assert all(layer.attn.cache is None for layer in model.layers)


def test_dtype_probe_picks_the_faster(tiny_llama, monkeypatch):
    """The probe keeps whichever dtype its clock says is faster."""
    model, _ = m.load(tiny_llama, dtype=torch.float32, device="cpu")
    for slow, fast in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        def decode(tokens, positions, n_keys, slow=slow):  # a model whose cost depends on its weights' dtype
            ticks[0] += 10 if model.embed.weight.dtype == slow else 1
        ticks = [0]
        monkeypatch.setattr(common.time, "perf_counter", lambda: ticks[0])
        monkeypatch.setattr(model, "decode", decode)
        chosen, seconds = common.probe_cpu_dtype(model, rows=4)
        assert chosen == fast and model.embed.weight.dtype == fast
        assert seconds == {slow: 10, fast: 1}


def test_engine_sequences_join_at_any_step_and_cancelled_ones_leave(tiny_llama):
    """The step-wise engine as serve.py drives it: sequences added while others run (one of them a copy
    of a running prompt), one cancelled mid-reply. Every other reply is the one generate() gives that
    prompt alone; the cancelled one stops where it was and its row is used again."""
    model, tokenizer = m.load(tiny_llama, dtype=torch.float64, device="cpu")
    prompts = random_prompts((5, 2, 9, 4, 7), seed=8) + [random_prompts((5,), seed=8)[0]]
    alone = [gen.generate(model, tokenizer, [p], max_new_tokens=10).tokens[0] for p in prompts]
    engine = gen.Engine(model, tokenizer, batch_size=2, cache_len=32)
    sequences = [gen.Sequence(p, 10) for p in prompts]
    try:
        engine.add(sequences[0])
        engine.add(sequences[1])
        engine.step()
        engine.step()
        engine.add(sequences[2])  # waits for a row
        engine.cancel(sequences[1])
        tokens_at_cancel = list(sequences[1].tokens)
        engine.step()
        assert sequences[1] not in engine.rows and sequences[2] in engine.rows
        for seq in sequences[3:]:
            engine.add(seq)
            engine.step()
        while engine.busy():
            engine.step()
    finally:
        engine.close()
    assert sequences[1].finish == "cancelled" and sequences[1].tokens == tokens_at_cancel
    for i in (0, 2, 3, 4, 5):
        assert sequences[i].tokens == alone[i], i


def test_prompts_of_very_different_lengths_are_prefilled_apart(tiny_llama, monkeypatch):
    """One prefill pads every prompt to its longest: a 40-token prompt is prefilled apart from 3-5-token
    ones (3 x 5 + 40 tokens, not 4 x 40), and the replies are those of each prompt alone."""
    model, tokenizer = m.load(tiny_llama, dtype=torch.float64, device="cpu")
    shapes = []
    real_prefill = model.prefill
    monkeypatch.setattr(model, "prefill", lambda tokens, *a: shapes.append(tuple(tokens.shape)) or real_prefill(tokens, *a))
    prompts = random_prompts((3, 4, 40, 5), seed=9)
    out = gen.generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert sorted(shapes) == [(1, 40), (3, 5)]
    monkeypatch.setattr(model, "prefill", real_prefill)
    assert out.tokens == [gen.generate(model, tokenizer, [p], max_new_tokens=6).tokens[0] for p in prompts]
