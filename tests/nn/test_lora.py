"""Tests of LoRA: exact at init, merge/unmerge, checkpoints, planner counts, errors, learning."""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from memplan import params as P  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.nn.lora import (  # noqa: E402
    LoRALinear,
    apply_lora,
    find_targets,
    get_adapter_params,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    save_lora,
    unmerge_lora,
)
from memplan.presets import get_model  # noqa: E402
from memplan.spec import LoraSpec  # noqa: E402

TINY = ("llama-tiny", "gpt2-tiny")


def _build(name: str, seed: int = 0):
    from memplan.nn.models import build_model

    torch.manual_seed(seed)
    return build_model(name)


class _Attn(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h // 2)
        self.v_proj, self.o_proj = nn.Linear(h, h // 2), nn.Linear(h, h)


class _MLP(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(h, 2 * h), nn.Linear(2 * h, h)


class _Block(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.self_attn, self.mlp = _Attn(h), _MLP(h)

    def forward(self, x):
        a = self.self_attn
        x = x + a.o_proj(a.q_proj(x) + torch.cat((a.k_proj(x), a.v_proj(x)), -1))
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class Toy(nn.Module):
    """A tiny model with Llama's module names."""

    def __init__(self, h: int = 16, layers: int = 2, vocab: int = 11) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(_Block(h) for _ in range(layers))
        self.lm_head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def _trained_like(model) -> None:
    """Give every adapter non-zero B so that the adapters change the output."""
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.normal_(0, 0.1)


# ---------------------------------------------------------------------- the layer


def test_fresh_layer_equals_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    lora = LoRALinear.from_linear(base, rank=4, alpha=8.0)
    assert lora.weight is base.weight and lora.bias is base.bias  # reused, not copied
    assert lora.scaling == 2.0
    x = torch.randn(3, 5, 12)
    assert torch.equal(lora(x), base(x))
    assert set(lora.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert lora.lora_A.weight.shape == (4, 12) and lora.lora_B.weight.shape == (7, 4)
    assert torch.count_nonzero(lora.lora_B.weight) == 0


def test_constructor_and_inits():
    torch.manual_seed(0)
    layer = LoRALinear(64, 32, rank=8, alpha=16.0, bias=False)
    assert layer.bias is None and layer.weight.shape == (32, 64)
    bound = 1 / math.sqrt(64)  # kaiming-uniform(a=√5) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound
    g = LoRALinear(256, 256, rank=4, alpha=4.0, init="gaussian")
    assert abs(g.lora_A.weight.std().item() - 1 / 4) < 0.02
    assert isinstance(layer.lora_dropout, nn.Identity)
    with pytest.raises(MemplanError):
        LoRALinear(8, 8, rank=4, alpha=4.0, init="orthogonal")


def test_forward_formula_and_dropout_skipped():
    torch.manual_seed(0)
    layer = LoRALinear(10, 6, rank=3, alpha=6.0)
    _trained_like(layer)
    x = torch.randn(4, 10)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expect = x @ layer.weight.T + layer.bias + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expect)
    calls = []
    layer.lora_dropout.register_forward_hook(lambda *args: calls.append(1))
    layer(x)
    assert calls == []  # dropout == 0: the module is not called
    d = LoRALinear(10, 6, rank=3, alpha=6.0, dropout=0.5)
    d.lora_dropout.register_forward_hook(lambda *args: calls.append(1))
    d(x)
    assert calls == [1]


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_extra_activation_saved(dtype):
    """Only x (already the base's input) and A's rank-R output are saved, never (B, T, out)."""
    torch.manual_seed(0)
    base = nn.Linear(32, 48, dtype=dtype)
    base.requires_grad_(False)
    layer = LoRALinear.from_linear(base, rank=4, alpha=8.0, adapter_dtype=torch.float32)
    x = torch.randn(2, 5, 32, dtype=dtype)
    out, saved = _saved_tensors(lambda: layer(x))
    assert out.dtype == dtype
    params = {p.data_ptr() for p in layer.parameters()}
    weight_sizes = {p.numel() for p in layer.parameters()}
    activations = [t for t in saved if t.data_ptr() not in params
                   and t.data_ptr() != x.data_ptr()  # the input itself
                   and t.numel() not in weight_sizes]  # (transposed) casts of the adapters
    assert [(t.numel(), t.shape[-1]) for t in activations] == [(2 * 5 * 4, 4)]  # A(x), rank R
    assert all(t.dtype == dtype for t in activations)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32
    assert layer.lora_B.weight.grad is not None and base.weight.grad is None


# ---------------------------------------------------------------------- apply_lora on a toy


def test_apply_lora_toy_targets_and_freezing():
    model = Toy()
    names = apply_lora(model, rank=2, alpha=4.0, targets="all")
    assert len(names) == 2 * 6 and "lm_head" not in names
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(get_adapter_params(model))
    assert find_targets(Toy(), "q_proj,v_proj") == [
        "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
        "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    assert find_targets(Toy(), ["mlp"]) == [
        "layers.0.mlp.up_proj", "layers.0.mlp.down_proj",
        "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    assert len(find_targets(Toy(), "attention")) == 8
    assert find_targets(Toy(), "self_attn.o_proj") == ["layers.0.self_attn.o_proj",
                                                       "layers.1.self_attn.o_proj"]


def test_apply_lora_train_embeddings_toy():
    model = Toy()
    apply_lora(model, rank=2, targets="mlp", train_embeddings=True)
    assert model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert not model.layers[0].self_attn.q_proj.weight.requires_grad


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 2.5}, "rank"),
    ({"rank": 9}, "larger than"),  # k_proj is 16 -> 8
    ({"rank": 2, "alpha": 0.0}, "alpha"), ({"rank": 2, "alpha": -1.0}, "alpha"),
    ({"rank": 2, "targets": "c_attn"}, "q_proj"),  # the message lists the modules
    ({"rank": 2, "targets": "lm_head"}, "matches no linear"),
    ({"rank": 2, "targets": ""}, "empty"),
])
def test_apply_lora_errors(kwargs, match):
    model = Toy()
    with pytest.raises(MemplanError, match=match):
        apply_lora(model, **kwargs)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-done


def test_rank_limit_depends_on_targets():
    apply_lora(Toy(), rank=16, targets="q_proj")  # 16×16: rank 16 is allowed
    with pytest.raises(MemplanError):
        apply_lora(Toy(), rank=16, targets="k_proj")  # 16 -> 8


# ---------------------------------------------------------------------- merge, checkpoints


def test_merge_equals_wrapped_and_unmerge_restores():
    torch.manual_seed(0)
    model = Toy()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=3, alpha=6.0)
    _trained_like(model)
    ids = torch.randint(0, 11, (2, 7))
    wrapped = model(ids)
    merged_names = merge_lora(model)
    assert len(merged_names) == 12
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(original)  # a plain model again
    torch.testing.assert_close(model(ids), wrapped, rtol=1e-5, atol=1e-5)
    assert unmerge_lora(model) == merged_names
    for k, v in original.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids), wrapped, rtol=1e-5, atol=1e-5)


def test_base_state_dict_loads_into_wrapped_model():
    base = Toy()
    wrapped = Toy()
    apply_lora(wrapped, rank=2, targets="all")
    result = wrapped.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(get_adapter_params(wrapped))
    ids = torch.randint(0, 11, (2, 5))
    assert torch.equal(wrapped(ids), base(ids))


def test_lora_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    src = Toy()
    apply_lora(src, rank=2, targets="q_proj,v_proj")
    _trained_like(src)
    sd = lora_state_dict(src)
    assert set(sd) == set(get_adapter_params(src)) and len(sd) == 8
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in sd)
    path = tmp_path / "adapter.safetensors"
    save_lora(src, path)
    dst = Toy()
    dst.load_state_dict(src.state_dict(), strict=False)  # same base, fresh adapters
    apply_lora(dst, rank=2, targets="q_proj,v_proj")
    load_lora(dst, path)
    for k, v in lora_state_dict(dst).items():
        assert torch.equal(v, sd[k])
    ids = torch.randint(0, 11, (2, 5))
    assert torch.equal(dst(ids), src(ids))


def test_load_lora_state_dict_errors():
    model = Toy()
    apply_lora(model, rank=2, targets="q_proj")
    sd = lora_state_dict(model)
    with pytest.raises(MemplanError, match="not adapters"):
        load_lora_state_dict(model, {**sd, "layers.0.mlp.up_proj.lora_A.weight": torch.zeros(1)})
    key = next(iter(sd))
    with pytest.raises(MemplanError, match="shape"):
        load_lora_state_dict(model, {**sd, key: torch.zeros(3, 3)})
    partial = dict(list(sd.items())[:1])
    with pytest.raises(MemplanError, match="lacks"):
        load_lora_state_dict(model, partial)
    load_lora_state_dict(model, partial, strict=False)
    with pytest.raises(MemplanError, match="no LoRA"):
        save_lora(Toy(), "unused.safetensors")


# ---------------------------------------------------------------------- the real models


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("targets", ["all", "mlp", "attention", "q_proj,v_proj", "c_proj",
                                     "attn.c_proj", "c_attn"])
@pytest.mark.parametrize("embeddings", [False, True])
def test_trainable_count_equals_planner(name, targets, embeddings):
    spec = get_model(name)
    lora = LoraSpec(rank=8, alpha=16.0, targets=targets, train_embeddings=embeddings)
    try:
        expected = P.lora_params(spec, lora) + P.lora_embedding_params(spec, lora)
    except MemplanError:
        with pytest.raises(MemplanError):
            apply_lora(_build(name), lora.rank, lora.alpha, targets)
        return
    model = _build(name)
    apply_lora(model, lora.rank, lora.alpha, targets, train_embeddings=embeddings)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    adapters = sum(p.numel() for p in get_adapter_params(model).values())
    assert adapters == P.lora_params(spec, lora)


@pytest.mark.parametrize("name", TINY)
def test_real_model_exact_at_init_and_checkpoint_loads(name):
    base = _build(name)
    model = _build(name)
    ids = torch.randint(0, get_model(name).vocab_size, (2, 9))
    names = apply_lora(model, rank=4)
    assert not any(n.endswith("lm_head") for n in names)
    assert torch.equal(model(ids), base(ids))
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(get_adapter_params(model))


def test_rank_too_large_for_a_real_layer():
    spec = get_model("llama-tiny")
    with pytest.raises(MemplanError, match=str(spec.kv_dim)):
        apply_lora(_build("llama-tiny"), rank=spec.kv_dim + 1)
    apply_lora(_build("llama-tiny"), rank=spec.kv_dim + 1, targets="mlp")


@pytest.mark.parametrize("name", TINY)
def test_real_model_merge(name):
    model = _build(name)
    apply_lora(model, rank=4, targets="all")
    _trained_like(model)
    ids = torch.randint(0, get_model(name).vocab_size, (2, 9))
    with torch.no_grad():
        wrapped = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), wrapped, rtol=1e-4, atol=1e-4)
        unmerge_lora(model)
        torch.testing.assert_close(model(ids), wrapped, rtol=1e-4, atol=1e-4)


def test_lora_really_learns_and_base_is_untouched():
    """LoRA on a frozen random llama learns a copy task; the base stays bit-identical.

    The sequences are pairs ``a a b b ...``; at every first token of a pair the target is the
    token itself. A frozen random head bounds how low the loss can go, so we ask for a clear
    drop below chance (ln V) rather than near zero.
    """
    from memplan.nn.models import build_model
    from memplan.nn.optim import build_optimizer

    vocab = 16
    spec = dataclasses.replace(get_model("llama-tiny"), vocab_size=vocab, hidden_size=64,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                               intermediate_size=128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    try:
        torch.manual_seed(0)
        model = build_model(spec)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        apply_lora(model, rank=8, alpha=16.0, targets="all")
        opt = build_optimizer(get_adapter_params(model), "adamw", "fused", lr=1e-2)
        losses = []
        for _ in range(150):
            tokens = torch.randint(0, vocab, (16, 16))
            ids = tokens.repeat_interleave(2, dim=1)  # a a b b ...
            labels = torch.full_like(ids, -100)
            labels[:, 0::2] = ids[:, 1::2]
            opt.zero_grad()
            loss = model(ids, labels=labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    final = sum(losses[-10:]) / 10
    assert abs(losses[0] - math.log(vocab)) < 0.3
    assert final < losses[0] - 0.8 and final < math.log(vocab) - 0.8, losses[::10]
    after = model.state_dict()
    for key, value in base.items():
        assert torch.equal(after[key], value), key


# ---- several adapters on one base (issue 16): PEFT's mixed-adapter batch --------------------

def _randomise_b(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in get_adapter_params(model).items():
            if "lora_B" in name.split("."):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def test_multi_adapter_layer_routes_each_sample_to_its_adapter() -> None:
    from memplan.nn.lora import set_adapter_index

    torch.manual_seed(0)
    layer = LoRALinear(6, 5, rank=2, alpha=4.0, adapters=3)
    _randomise_b(layer)
    x = torch.randn(4, 3, 6)
    index = [2, 0, 2, 1]
    set_adapter_index(layer, index)
    out = layer(x)
    for i, k in enumerate(index):
        a, b = layer.lora_A[f"adapter{k}"].weight, layer.lora_B[f"adapter{k}"].weight
        want = x[i] @ layer.weight.T + layer.bias + (x[i] @ a.T @ b.T) * layer.scaling
        torch.testing.assert_close(out[i], want)


def test_multi_adapter_gradients_reach_only_the_adapters_used() -> None:
    from memplan.nn.lora import set_adapter_index

    torch.manual_seed(0)
    layer = LoRALinear(6, 5, rank=2, alpha=4.0, adapters=3)
    _randomise_b(layer)
    set_adapter_index(layer, [0, 0, 2])
    layer(torch.randn(3, 4, 6)).square().sum().backward()
    assert layer.lora_A["adapter1"].weight.grad is None
    assert layer.lora_B["adapter1"].weight.grad is None
    for k in (0, 2):
        assert layer.lora_A[f"adapter{k}"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", TINY)
def test_multi_adapter_model_equals_single_adapter_models(name: str) -> None:
    from memplan.nn.lora import set_adapter_index

    model = _build(name)
    apply_lora(model, rank=4, adapters=2)
    _randomise_b(model)
    spec = get_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) \
        == 2 * P.lora_params(spec, LoraSpec(rank=4))
    ids = torch.randint(spec.vocab_size, (4, 16), generator=torch.Generator().manual_seed(3))
    set_adapter_index(model, torch.tensor([0, 1, 1, 0]))
    mixed = model(ids)
    mixed = mixed.logits if hasattr(mixed, "logits") else mixed
    shared = model.state_dict()
    for k in (0, 1):
        single = _build(name)
        apply_lora(single, rank=4)
        single.load_state_dict({key.replace(f".adapter{k}.", "."): value
                                for key, value in shared.items()
                                if ".adapter" not in key or f".adapter{k}." in key})
        rows = [i for i, v in enumerate([0, 1, 1, 0]) if v == k]
        want = single(ids[rows])
        want = want.logits if hasattr(want, "logits") else want
        torch.testing.assert_close(mixed[rows], want, rtol=1e-4, atol=1e-5)


def test_multi_adapter_state_dict_keys_and_round_trip(tmp_path) -> None:
    model = _build("llama-tiny")
    apply_lora(model, rank=2, targets="q_proj", adapters=2)
    _randomise_b(model)
    keys = set(lora_state_dict(model))
    assert "model.layers.0.self_attn.q_proj.lora_A.adapter1.weight" in keys
    assert keys <= set(model.state_dict())
    save_lora(model, tmp_path / "a.safetensors")
    other = _build("llama-tiny", seed=5)
    apply_lora(other, rank=2, targets="q_proj", adapters=2)
    load_lora(other, tmp_path / "a.safetensors")
    for key, value in lora_state_dict(model).items():
        torch.testing.assert_close(lora_state_dict(other)[key], value)
    assert not [n for n in find_targets(model, "all") if "lora_" in n]  # adapters: no targets


def test_multi_adapter_errors() -> None:
    from memplan.nn.lora import set_adapter_index

    layer = LoRALinear(6, 5, rank=2, alpha=4.0, adapters=2)
    with pytest.raises(MemplanError, match="set_adapter_index"):
        layer(torch.randn(2, 3, 6))
    with pytest.raises(MemplanError, match="adapter index 2"):
        set_adapter_index(layer, [0, 2])
    set_adapter_index(layer, [0, 1])
    with pytest.raises(MemplanError, match="the batch has 3"):
        layer(torch.randn(3, 3, 6))
    with pytest.raises(MemplanError, match="merge"):
        merge_lora(layer)
    with pytest.raises(MemplanError, match="adapters"):
        LoRALinear(6, 5, rank=2, alpha=4.0, adapters=0)
    with pytest.raises(MemplanError, match="no layers with several"):
        set_adapter_index(LoRALinear(6, 5, rank=2, alpha=4.0), [0])
