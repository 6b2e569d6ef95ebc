"""Tests of the reference models: exact parameter counts, forward, attention paths,
checkpointing, tying, spec round trips and fake/meta builds."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from memplan import arch  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.nn.models import CausalLM, build_model, spec_from_module  # noqa: E402
from memplan.params import count_params  # noqa: E402
from memplan.presets import get_model, model_names  # noqa: E402

TINY = ("llama-tiny", "gpt2-tiny")


def _qwen_like():
    """A small GQA spec with q/k/v biases and tied embeddings, like Qwen2."""
    return dataclasses.replace(get_model("qwen2.5-0.5b"), name="qwen-tiny", vocab_size=512,
                               hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=16, intermediate_size=96)


def _batch(spec, b=2, t=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (b, t), generator=gen)
    labels = ids.clone()
    labels[:, 0] = -100
    return ids, labels


def _unique_params(model):
    return sum(p.numel() for p in model.parameters())


REFERENCE = [n for n in model_names() if arch.profile_of(get_model(n)).reference_model]


@pytest.mark.parametrize("name", REFERENCE)
def test_param_count_is_exact_on_meta(name):
    model = build_model(name, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert _unique_params(model) == count_params(get_model(name))


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_finite_loss(name):
    torch.manual_seed(0)
    model = build_model(name)
    spec = model.spec
    ids, labels = _batch(spec)
    logits = model(ids)
    assert logits.shape == (2, 12, spec.vocab_size)
    assert model.hidden_states(ids).shape == (2, 12, spec.hidden_size)
    assert model.embed(ids).shape == (2, 12, spec.hidden_size)
    loss = model(ids, labels=labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Near log(V) at init with std 0.02.
    assert abs(loss.item() - torch.log(torch.tensor(float(spec.vocab_size))).item()) < 0.5


@pytest.mark.parametrize("name", TINY)
def test_inputs_embeds_equal_input_ids(name):
    torch.manual_seed(0)
    model = build_model(name)
    ids, labels = _batch(model.spec)
    torch.testing.assert_close(model(inputs_embeds=model.embed(ids), labels=labels),
                               model(ids, labels=labels))
    with pytest.raises(MemplanError):
        model.hidden_states()


def test_init_is_deterministic():
    torch.manual_seed(3)
    a = build_model("llama-tiny")
    torch.manual_seed(3)
    b = build_model("llama-tiny")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb
        assert torch.equal(pa, pb)


def test_dtype_casts_every_parameter():
    model = build_model("llama-tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, labels = _batch(model.spec)
    loss = model(ids, labels=labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("make", [lambda: get_model("llama-tiny"), lambda: get_model("gpt2-tiny"),
                                  _qwen_like])
def test_sdpa_and_eager_agree(make):
    torch.manual_seed(0)
    model = build_model(make())
    ids, labels = _batch(model.spec)
    sdpa = model(ids, labels=labels)
    model.attention = "eager"
    assert model.attention == "eager"
    eager = model(ids, labels=labels)
    torch.testing.assert_close(sdpa, eager)


@pytest.mark.parametrize("make", [lambda: get_model("llama-tiny"),
                                  lambda: dataclasses.replace(get_model("gpt2-tiny"), dropout=0.1),
                                  _qwen_like])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_checkpointing_gives_same_loss_and_grads(make, attention):
    torch.manual_seed(0)
    model = build_model(make(), attention=attention)
    ids, labels = _batch(model.spec)

    def run(checkpointing):
        model.checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same dropout masks in both runs
        loss = model(ids, labels=labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, grads_plain = run(False)
    loss_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], msg=name)


def test_checkpointing_saves_activations():
    """With checkpointing the blocks keep only their inputs for backward."""
    torch.manual_seed(0)
    spec = dataclasses.replace(get_model("llama-tiny"), vocab_size=64)
    ids, labels = _batch(spec, b=4, t=64)

    def saved_bytes(checkpointing):
        model = build_model(spec, checkpointing=checkpointing)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=labels)
        return total

    assert saved_bytes(True) < saved_bytes(False) / 2


def test_tied_embeddings_are_one_parameter():
    model = build_model("gpt2-tiny")
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    untied = build_model("llama-tiny")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_tie_weights_after_to_empty():
    model = build_model("gpt2-tiny", device="meta").to_empty(device="cpu")
    model.tie_weights()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _unique_params(model) == count_params(model.spec)


def test_hugging_face_module_names():
    llama = dict(build_model("llama-tiny").named_parameters())
    for key in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.3.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                "model.norm.weight", "lm_head.weight"):
        assert key in llama, key
    assert not any(n.endswith(".bias") for n in llama)
    gpt2 = dict(build_model("gpt2-tiny").named_parameters())
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.bias",
                "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                "transformer.h.0.ln_2.weight", "transformer.h.0.mlp.c_fc.weight",
                "transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.weight"):
        assert key in gpt2, key
    assert "model.model.rotary_emb.inv_freq" not in build_model("llama-tiny").state_dict()
    assert build_model("gpt2-tiny").transformer.wpe.num_embeddings == 1024


def test_non_gated_llama_and_biases():
    spec = dataclasses.replace(get_model("llama-tiny"), gated_mlp=False, activation="gelu_new",
                               qkv_bias=True, out_bias=True, mlp_bias=True)
    model = build_model(spec, device="meta")
    assert not hasattr(model.model.layers[0].mlp, "gate_proj")
    assert _unique_params(model) == count_params(spec)
    assert spec_from_module(model) == spec


@pytest.mark.parametrize("make", [lambda: get_model("llama-tiny"), lambda: get_model("gpt2-tiny"),
                                  _qwen_like])
def test_spec_from_module_round_trips(make):
    spec = make()
    assert spec_from_module(build_model(spec)) == spec


def test_spec_from_module_finds_wrapped_model_and_rejects_others():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_model("gpt2-tiny", device="meta")

    assert spec_from_module(Head()) == get_model("gpt2-tiny")
    with pytest.raises(MemplanError):
        spec_from_module(torch.nn.Linear(2, 2))


def test_spec_from_module_reads_hugging_face_config():
    class Config:
        name_or_path = "my-llama"

        def to_dict(self):
            return {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}

    module = torch.nn.Module()
    module.config = Config()
    spec = spec_from_module(module)
    assert spec.name == "my-llama" and spec.hidden_size == 64 and spec.num_layers == 2


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "llama-2-7b"])
def test_build_and_step_under_fake_tensor_mode(name):
    with FakeTensorMode():
        model = build_model(name, dtype=torch.bfloat16)
        assert isinstance(model, CausalLM)
        assert _unique_params(model) == count_params(get_model(name))
        ids = torch.randint(0, model.spec.vocab_size, (1, 8))
        loss = model(ids, labels=ids)
        loss.backward()
        assert loss.shape == ()
        assert model.lm_head.weight.grad is not None


def test_bad_attention_raises():
    with pytest.raises(MemplanError, match="attention"):
        build_model("llama-tiny", attention="flash")
    model = build_model("llama-tiny", device="meta")
    with pytest.raises(MemplanError):
        model.attention = "flashy"
    assert model.attention == "sdpa"


def test_unknown_preset_raises():
    with pytest.raises(MemplanError):
        build_model("llama-9000")
