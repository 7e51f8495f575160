"""Incremental decoding with causal STL layers (stl_compiler.generation): the logits of
``generate`` with a KV cache equal those of one full forward over the same tokens.

Models: tiny random-weight transformers Llama and GPT-2 (GPT-2's Conv1D layers are swapped by
hand, as swap_linears_ only takes nn.Linear). The rank-24 basis is a random causal basis whose
terms span rows (a term with pivot row q reads rows <= q and writes rows >= q), so an output
row depends on the earlier rows of its tile: decoding without the tile state is far off (checked
below), and with it the logits match the full forward to float32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stl_compiler as stl
from stl_compiler import STLLinear, bases, generation
from stl_compiler.bases import STLBasis
from stl_compiler.tiling import is_causal, is_row_separable

transformers = pytest.importorskip("transformers")

VOCAB = 96
TOL = 1e-4  # float32 incremental vs full forward (measured ~1e-7)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is fastest (and on a loaded machine, OpenMP
    spinning makes the small STL GEMMs ~1000x slower with more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def random_causal_basis(tile: int = 4, rank: int = 24) -> STLBasis:
    """Random terms, each with a pivot row q: reads tile rows <= q, writes rows >= q."""
    pivot = torch.randint(0, tile, (rank,))
    row = torch.arange(tile).repeat_interleave(tile)
    scale = tile ** -1
    ex = torch.randn(rank, tile * tile, dtype=torch.float64) * (row <= pivot[:, None]) * scale
    d = torch.randn(rank, tile * tile, dtype=torch.float64) * (row >= pivot[:, None]) * scale
    ew = torch.randn(rank, tile * tile, dtype=torch.float64) * scale
    return STLBasis(tile, rank, ex, ew, d, name="random-causal")


def llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=None, pad_token_id=0))
    return model.to(dtype).eval()


def gpt2(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=0,
        eos_token_id=None, pad_token_id=0))
    return model.to(dtype).eval()


MODELS = {"llama": llama, "gpt2": gpt2}


def convert(model: nn.Module, basis: STLBasis) -> nn.Module:
    """Causal STL layers for every nn.Linear (swap_linears_) and GPT-2 Conv1D (by hand)."""
    config = stl.STLConfig(row_grouping="causal", basis=basis, min_dim=0, max_cost_ratio=None)
    outcome = stl.swap_linears_(model, config)
    assert outcome and all(v == "converted" for v in outcome.values()), outcome
    conv1d = transformers.pytorch_utils.Conv1D
    for name, module in list(model.named_modules()):
        if isinstance(module, conv1d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, STLLinear.from_weight(
                module.weight, module.bias, basis, row_grouping="causal"))
    assert generation.enable_incremental(model) is not None
    return model


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length))


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, new: int, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


@torch.no_grad()
def full_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits


def generated_vs_full(model: nn.Module, out, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the generated steps, the full forward's logits at the same positions)."""
    steps = torch.stack(out.logits, 1)
    full = full_logits(model, out.sequences)[:, prompt - 1:prompt - 1 + steps.shape[1]]
    return steps, full


# --- the layer --------------------------------------------------------------------------------

def test_layer_later_and_zero_rows_change_no_earlier_row():
    """Causal basis: output row a of a tile depends only on input rows 0..a, exactly (the
    property that lets a partial tile be zero-padded, and the state prepend earlier rows)."""
    basis = random_causal_basis()
    assert is_causal(basis) and not is_row_separable(basis)
    layer = STLLinear.from_weight(torch.randn(12, 20, dtype=torch.float64), torch.randn(20),
                                  basis, row_grouping="causal")
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    y = layer(x)
    for a in range(1, 11):
        later = x.clone()
        later[:, a:] = torch.randn_like(later[:, a:])
        assert torch.equal(layer(later)[:, :a], y[:, :a])
        assert not torch.allclose(layer(later)[:, a:], y[:, a:])
        # fewer rows (a partial last tile) or zero rows after: other GEMM shapes, so rounding
        padded = torch.cat([x[:, :a], torch.zeros(2, 3, 12, dtype=torch.float64)], 1)
        assert rel_err(layer(padded)[:, :a], y[:, :a]) < 1e-13
        assert rel_err(layer(x[:, :a]), y[:, :a]) < 1e-13


# --- incremental == full forward --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prompt", [1, 5, 8])
def test_generate_logits_equal_full_forward(name, batch, prompt):
    model = convert(MODELS[name](), random_causal_basis())
    out = generate(model, tokens(batch, prompt), 11)
    steps, full = generated_vs_full(model, out, prompt)
    assert rel_err(steps, full) < TOL


@pytest.mark.parametrize("name", sorted(MODELS))
def test_without_the_tile_state_logits_are_wrong(name):
    """The tolerance above means something: decoding that puts each new token in a fresh tile
    (no state) is far from the full forward with this basis."""
    model = convert(MODELS[name](), random_causal_basis())
    generation.disable_incremental(model)
    assert generation.generation_state(model) is None
    out = generate(model, tokens(2, 5), 8)
    steps, full = generated_vs_full(model, out, 5)
    assert rel_err(steps, full) > 1e-2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunked_calls_equal_full_forward(name):
    """Calls of several new tokens after the prompt, starting anywhere in a tile."""
    model = convert(MODELS[name](), random_causal_basis())
    ids = tokens(2, 22)
    cache = transformers.DynamicCache(config=model.config)
    pieces, at = [], 0
    with torch.no_grad():
        for size in (5, 3, 1, 1, 6, 2, 4):
            pieces.append(model(ids[:, at:at + size], cache=cache).logits)
            at += size
    assert rel_err(torch.cat(pieces, 1), full_logits(model, ids)) < TOL


def test_static_cache_eager_equals_full_forward():
    model = convert(llama(), random_causal_basis())
    ids = tokens(3, 6)
    for _ in range(2):  # the second generate reuses (resets) the static cache
        out = generate(model, ids, 9, cache_implementation="static")
        steps, full = generated_vs_full(model, out, 6)
        assert rel_err(steps, full) < TOL


@pytest.mark.slow
def test_compiled_static_decode_equals_full_forward():
    """transformers' compiled decode step (StaticCache, torch.compile of the model call with
    fullgraph=True, Inductor on CPU): the STL state compiles without graph breaks."""
    model = convert(llama(), random_causal_basis())
    compile_config = transformers.CompileConfig(fullgraph=True, backend="inductor",
                                                mode="default")
    compile_config._compile_all_devices = True
    ids = tokens(2, 5)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    out = generate(model, ids, 7, cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # the decode steps did run compiled
    # decode steps at positions 5..10 (every tile row): compiled once, no recompile per
    # position (the pre-hook may be a frame of its own: at most 2 graphs)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert not counters["graph_break"]
    steps, full = generated_vs_full(model, out, 5)
    assert rel_err(steps, full) < TOL


@pytest.mark.slow
def test_compiled_forward_prefill_and_decode_equal_full_forward():
    """The whole ``model.forward`` compiled (transformers' "compile the forward" recipe, static
    shapes), so the prefill runs compiled as well as the decode steps; the prompt ends inside
    a tile."""
    model = convert(llama(), random_causal_basis())
    ids = tokens(2, 6)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    try:
        out = generate(model, ids, 7, cache_implementation="static", disable_compile=True)
    finally:
        del model.forward
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])  # prefill, decode
    assert not counters["graph_break"]
    steps, full = generated_vs_full(model, out, 6)
    assert rel_err(steps, full) < TOL


# --- exact basis: the dense model's tokens ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_basis_greedy_tokens_equal_dense(name):
    dense = MODELS[name](torch.float64)
    model = convert(copy.deepcopy(dense), bases.naive(4))
    ids = tokens(2, 5)
    reference = generate(dense, ids, 36)
    out = generate(model, ids, 36)
    assert torch.equal(out.sequences, reference.sequences)
    assert rel_err(torch.stack(out.logits), torch.stack(reference.logits)) < 1e-10


# --- causality, isolation, state hygiene ------------------------------------------------------

def test_later_tokens_change_no_earlier_logits_float64():
    """Partial tiles: a full forward's logits at positions < j ignore token j and after, exactly,
    and a prefix (last tile partial) gives the same logits as the longer sequence."""
    model = convert(llama(torch.float64), random_causal_basis())
    ids = tokens(1, 11)
    full = full_logits(model, ids)
    for j in range(1, 11):
        changed = ids.clone()
        shift = 1 + torch.randint(0, VOCAB - 2, ())  # 1 .. VOCAB-2: another token of 1..95
        changed[0, j] = (ids[0, j] - 1 + shift) % (VOCAB - 1) + 1
        assert changed[0, j] != ids[0, j]
        logits = full_logits(model, changed)
        assert torch.equal(logits[:, :j], full[:, :j])  # same shapes: bit for bit
        assert not torch.allclose(logits[:, j], full[:, j])
        # a shorter sequence (partial last tile): other GEMM shapes, so float64 rounding
        assert rel_err(full_logits(model, ids[:, :j]), full[:, :j]) < 1e-12


def test_sequences_in_a_batch_do_not_influence_each_other():
    model = convert(llama(torch.float64), random_causal_basis())
    ids = tokens(3, 6)
    together = torch.stack(generate(model, ids, 10).logits, 1)
    alone = torch.stack(generate(model, ids[1:2], 10).logits, 1)
    assert rel_err(together[1:2], alone) < 1e-12
    other = ids.clone()
    other[0], other[2] = tokens(1, 6)[0], tokens(1, 6)[0]
    changed = torch.stack(generate(model, other, 10).logits, 1)
    assert rel_err(changed[1], together[1]) < 1e-12
    assert rel_err(changed[0], together[0]) > 1e-3


def test_generate_twice_and_plain_forward_after_use_no_stale_state():
    model = convert(llama(), random_causal_basis())
    ids, other = tokens(2, 7), tokens(2, 5)
    before = full_logits(model, other)
    first = generate(model, ids, 9)
    second = generate(model, ids, 9)
    assert torch.equal(first.sequences, second.sequences)
    assert torch.equal(torch.stack(first.logits), torch.stack(second.logits))
    assert torch.equal(full_logits(model, other), before)  # use_cache=False: no state read
    with torch.no_grad():
        assert torch.equal(model(other).logits, before)  # a fresh cache: position 0


def test_use_cache_false_generate_matches_cached():
    model = convert(llama(), random_causal_basis())
    ids = tokens(2, 6)
    cached = generate(model, ids, 8)
    uncached = generate(model, ids, 8, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert rel_err(torch.stack(cached.logits), torch.stack(uncached.logits)) < TOL
    # logits_to_keep cuts the rows before the STL lm_head: the head still sees whole tiles
    full = full_logits(model, ids)
    for keep in (1, 2, 3, 5):
        with torch.no_grad():
            for use_cache in (False, True):
                kept = model(ids, logits_to_keep=keep, use_cache=use_cache).logits
                assert rel_err(kept, full[:, -keep:]) < TOL
        with pytest.raises(ValueError, match="return_dict=True"):
            model(ids, logits_to_keep=3, return_dict=False)  # 3 of 6 rows: not at a tile


def test_manual_loop_with_the_cache_the_model_returned():
    model = convert(llama(), random_causal_basis())
    ids = tokens(2, 9)
    with torch.no_grad():
        out = model(ids[:, :6])  # no cache given: the model builds one, the rows go with it
        steps = [out.logits]
        for i in range(6, 9):
            out = model(ids[:, i:i + 1], cache=out.cache)
            steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1), full_logits(model, ids)) < TOL


def test_deep_copied_prompt_cache_continues_each_copy():
    """transformers' prompt-reuse recipe: one prefill, deep copies of its cache, different
    continuations. The STL rows travel with each copy."""
    model = convert(llama(), random_causal_basis())
    prompt = tokens(2, 6)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, cache=cache)
        for _ in range(2):
            suffix = tokens(2, 3)
            steps = model(suffix, cache=copy.deepcopy(cache)).logits
            full = full_logits(model, torch.cat([prompt, suffix], 1))[:, 6:]
            assert rel_err(steps, full) < TOL


# --- batch changes and rollbacks --------------------------------------------------------------

def test_cache_reorder_moves_the_rows_with_the_sequences():
    model = convert(llama(), random_causal_basis())
    ids = tokens(3, 9)
    order = torch.tensor([2, 0, 0])
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
        cache.reorder_cache(order)
        steps = model(ids[order, 6:9], cache=cache).logits
    assert rel_err(steps, full_logits(model, ids[order])[:, 6:9]) < TOL


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_beam_search_scores_equal_full_forward(cache):
    """Beam search reorders the cache each step: the returned beams' scores must be the
    log-probabilities of their tokens under the full forward."""
    model = convert(llama(), random_causal_basis())
    prompt, new = 5, 8
    ids = tokens(2, prompt)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, num_beams=3, num_return_sequences=3,
                             do_sample=False, length_penalty=0.0, output_scores=True,
                             return_dict_in_generate=True, cache_implementation=cache)
    seqs = out.sequences
    logprobs = full_logits(model, seqs).log_softmax(-1)[:, prompt - 1:-1]
    scores = logprobs.gather(-1, seqs[:, prompt:, None]).squeeze(-1).sum(-1)
    assert torch.allclose(out.sequences_scores, scores, rtol=0, atol=1e-4 * new)
    beams = out.beam_indices[:, :new]
    assert (beams[:, 2:] != beams[:, 1:-1]).any()  # beams did move between slots on the way


def test_prompt_lookup_decoding_crops_the_cache_and_gets_greedy_tokens(monkeypatch):
    """Prompt-lookup (assisted) decoding checks several candidate tokens in one call and crops
    the cache back past the rejected ones: its tokens must be the greedy tokens."""
    model = convert(llama(torch.float64), random_causal_basis())
    ids = tokens(1, 6).repeat(1, 3)  # repeated n-grams: the lookup proposes candidates
    greedy = generate(model, ids, 20)
    crops = []
    crop = transformers.DynamicCache.crop
    monkeypatch.setattr(transformers.DynamicCache, "crop",
                        lambda self, n: (crops.append(n), crop(self, n))[1])
    with torch.no_grad():
        looked_up = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                   min_new_tokens=20, do_sample=False,
                                   prompt_lookup_num_tokens=5)
    assert any(n < 0 for n in crops)  # candidates were rejected and cropped away
    assert torch.equal(looked_up, greedy.sequences)


def test_rollback_within_the_last_tile_and_beyond():
    model = convert(llama(), random_causal_basis())
    ids = tokens(1, 10)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :7], cache=cache)
        model(tokens(1, 1), cache=cache)  # position 7, then undone
        cache.crop(-1)
        steps = model(ids[:, 7:10], cache=cache).logits
        assert rel_err(steps, full_logits(model, ids)[:, 7:10]) < TOL
        cache.crop(-7)  # back to position 3: the rows of positions 0..2 are gone
        with pytest.raises(generation.IncrementalDecodingError, match="positions 0..2"):
            model(ids[:, 3:4], cache=cache)


def test_a_cache_advanced_without_the_stl_layers_raises():
    model = convert(llama(), random_causal_basis())
    ids = tokens(1, 6)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(ids[:, :5], cache=cache)  # the inner model: the hooks are on the outer one
        with pytest.raises(generation.IncrementalDecodingError, match="needs its input rows"):
            model(ids[:, 5:6], cache=cache)


# --- wiring -----------------------------------------------------------------------------------

def test_swap_linears_enables_generation_only_for_causal_layers():
    model = llama()
    stl.swap_linears_(model, stl.STLConfig(row_grouping="causal", rank=24, min_dim=0,
                                           max_cost_ratio=None))
    state = generation.generation_state(model)
    assert state is not None and state.head_is_stl
    assert all(m._stl_generation is state for m in model.modules() if isinstance(m, STLLinear))
    out = generate(model, tokens(2, 5), 6)  # the default (fitted) causal basis of rank 24
    steps, full = generated_vs_full(model, out, 5)
    assert rel_err(steps, full) < TOL

    batch = llama()
    stl.swap_linears_(batch, stl.STLConfig(row_grouping="batch", rank=24, min_dim=0,
                                           max_cost_ratio=None))
    assert generation.generation_state(batch) is None
    generation.enable_incremental(model)  # again: one set of hooks, not two
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1


def test_enable_warns_when_a_trained_basis_is_no_longer_causal():
    model = convert(llama(), random_causal_basis())
    with torch.no_grad():
        model.lm_head.ex[:, -1] = 1.0  # every term now reads the tile's last row
    with pytest.warns(UserWarning, match="1 causal STL layer"):
        generation.enable_incremental(model)


def test_training_forward_and_gradients_are_untouched():
    """A training step (no cache given; transformers may build one) computes the plain full
    forward: same loss and gradients as the model without the generation hooks."""
    model = convert(llama(), random_causal_basis()).train()
    plain = copy.deepcopy(model)
    generation.disable_incremental(plain)
    ids = tokens(2, 10)
    grads = []
    for m in (model, plain):
        loss = m(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
