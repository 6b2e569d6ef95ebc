"""Tests of prepare(): each regime trains exactly what the planner counts, and it trains."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from memplan import params as P  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.nn.lora import LoRALinear  # noqa: E402
from memplan.nn.models import build_model  # noqa: E402
from memplan.nn.optim import MixedAdamW, MixedSGD  # noqa: E402
from memplan.nn.regimes import SUPPORTED_REGIMES, TrainingSetup, prepare  # noqa: E402
from memplan.presets import get_model  # noqa: E402
from memplan.spec import REGIMES, LoraSpec  # noqa: E402

TINY = ("llama-tiny", "gpt2-tiny")


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name)


def _batch(name: str, b: int = 2, t: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, get_model(name).vocab_size, (b, t), generator=g)
    return ids, ids.roll(-1, dims=1), torch.randint(0, 3, (b,), generator=g)


def _expected(name: str, regime: str, lora: LoraSpec, classes: int, prompt: int) -> int:
    spec = get_model(name)
    return {
        "full": lambda: P.count_params(spec),
        "mixed": lambda: P.count_params(spec),
        "lora": lambda: P.lora_params(spec, lora) + P.lora_embedding_params(spec, lora),
        "lora-bf16": lambda: P.lora_params(spec, lora) + P.lora_embedding_params(spec, lora),
        "classifier": lambda: P.classifier_params(spec, classes),
        "input-adapter": lambda: P.embedding_params(spec),
        "prompt-tuning": lambda: P.prompt_params(spec, prompt),
        "bitfit": lambda: P.bias_params(spec),
    }[regime]()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("regime", SUPPORTED_REGIMES)
def test_trainable_set_equals_planner(name, regime):
    lora = LoraSpec(rank=4, alpha=8.0, targets="all")
    if regime == "bitfit" and P.bias_params(get_model(name)) == 0:
        with pytest.raises(MemplanError, match="no bias"):
            prepare(_model(name), regime)
        return
    setup = prepare(_model(name), regime, lora=lora, num_classes=3, prompt_tokens=5)
    assert isinstance(setup, TrainingSetup) and setup.regime == regime
    assert setup.num_trainable == _expected(name, regime, lora, 3, 5)
    # exactly the parameters that require grad, model and new modules together
    in_model = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    in_extra = {f"{k}.{n}" for k, m in setup.extra_modules.items()
                for n, p in m.named_parameters() if p.requires_grad}
    assert set(setup.trainable) == in_model | in_extra
    opt_params = [p for g in setup.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in setup.trainable.values()}
    ids, labels, classes = _batch(name)
    loss = setup.train_step(ids, labels, classes)
    assert loss == loss and loss > 0  # finite


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("targets", ["all", "mlp", "attention", "q_proj,v_proj"])
@pytest.mark.parametrize("regime", ["lora", "lora-bf16"])
def test_lora_targets_equal_planner(name, targets, regime):
    lora = LoraSpec(rank=8, alpha=16.0, targets=targets, train_embeddings=targets == "mlp")
    try:
        expected = _expected(name, "lora", lora, 2, 20)
    except MemplanError:  # q_proj,v_proj does not exist in gpt2
        with pytest.raises(MemplanError):
            prepare(_model(name), regime, lora=lora)
        return
    setup = prepare(_model(name), regime, lora=lora)
    assert setup.num_trainable == expected


def test_lora_bf16_dtypes_and_training():
    setup = prepare(_model("llama-tiny"), "lora-bf16", lora=LoraSpec(rank=4))
    layer = setup.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in setup.trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in setup.model.named_parameters()
               if "lora_" not in n)
    ids, labels, _ = _batch("llama-tiny")
    before = setup.model.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    first = setup.train_step(ids, labels)
    for _ in range(4):
        last = setup.train_step(ids, labels)
    assert last < first
    assert torch.equal(setup.model.state_dict()["model.layers.0.self_attn.q_proj.weight"], before)


@pytest.mark.parametrize("optimizer, cls, momentum", [
    ("adamw", MixedAdamW, None), ("sgd", MixedSGD, 0.0), ("sgd-momentum", MixedSGD, 0.9),
])
def test_mixed_uses_the_mixed_optimizers(optimizer, cls, momentum):
    setup = prepare(_model("gpt2-tiny"), "mixed", optimizer=optimizer, impl="foreach")
    assert type(setup.optimizer) is cls
    if momentum is not None:
        assert setup.optimizer.param_groups[0]["momentum"] == momentum
    ids, labels, _ = _batch("gpt2-tiny")
    setup.zero_grad()
    loss = setup.loss(ids, labels)
    setup.backward(loss)
    assert all(p.grad is None for p in setup.model.parameters())  # moved into bf16 buffers
    setup.optimizer.step()
    with pytest.raises(MemplanError, match="fp32"):
        prepare(build_model("gpt2-tiny", dtype=torch.bfloat16), "mixed")


def test_full_trains_everything_with_the_chosen_optimizer():
    setup = prepare(_model("llama-tiny"), "full", optimizer="sgd-momentum", impl="forloop",
                    lr=0.1)
    assert type(setup.optimizer) is torch.optim.SGD
    ids, labels, _ = _batch("llama-tiny")
    losses = [setup.train_step(ids, labels) for _ in range(3)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", TINY)
def test_classifier_changes_only_the_head(name):
    setup = prepare(_model(name), "classifier", num_classes=3, lr=1e-2)
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    head = setup.extra_modules["head"]
    head_before = head.weight.clone()
    ids, _, classes = _batch(name, b=4)
    losses = [setup.train_step(ids, None, classes) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert not torch.equal(head.weight, head_before)
    for key, value in setup.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in setup.model.parameters())
    with pytest.raises(MemplanError, match="class_labels"):
        setup.loss(ids, None)


@pytest.mark.parametrize("name", TINY)
def test_input_adapter_starts_at_base_and_backprops_through(name):
    base = _model(name)
    setup = prepare(_model(name), "input-adapter", lr=1e-2)
    delta = setup.extra_modules["input_adapter"]
    assert tuple(delta.weight.shape) == (get_model(name).vocab_size, get_model(name).hidden_size)
    ids, labels, _ = _batch(name)
    with torch.no_grad():
        assert torch.equal(setup.loss(ids, labels), base(ids, labels=labels))
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    losses = [setup.train_step(ids, labels) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert torch.count_nonzero(delta.weight) > 0
    for key, value in setup.model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", TINY)
def test_prompt_tuning_trains_only_the_prompt(name):
    setup = prepare(_model(name), "prompt-tuning", prompt_tokens=4, lr=1e-2)
    prompt = setup.extra_modules["prompt"]
    assert tuple(prompt.weight.shape) == (4, get_model(name).hidden_size)
    ids, labels, _ = _batch(name)
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    start = prompt.weight.clone()
    losses = [setup.train_step(ids, labels) for _ in range(5)]
    assert losses[-1] < losses[0] and not torch.equal(prompt.weight, start)
    for key, value in setup.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bitfit_trains_only_biases():
    setup = prepare(_model("gpt2-tiny"), "bitfit", lr=1e-2)
    assert setup.trainable and all(n.endswith(".bias") for n in setup.trainable)
    ids, labels, _ = _batch("gpt2-tiny")
    weights = {n: p.clone() for n, p in setup.model.named_parameters() if n.endswith("weight")}
    setup.train_step(ids, labels)
    for n, p in setup.model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n


@pytest.mark.parametrize("regime", sorted(set(REGIMES) - set(SUPPORTED_REGIMES)))
def test_unsupported_regimes_say_so(regime):
    with pytest.raises(MemplanError, match="cannot run"):
        prepare(_model("llama-tiny"), regime)


@pytest.mark.parametrize("kwargs", [
    {"regime": "lorra"}, {"regime": "full", "optimizer": "adam"},
    {"regime": "full", "impl": "apex"}, {"regime": "classifier", "num_classes": 0},
    {"regime": "prompt-tuning", "prompt_tokens": -1},
    {"regime": "lora", "lora": LoraSpec(rank=1000)},
    {"regime": "lora", "lora": LoraSpec(targets="c_attn")},
])
def test_bad_options(kwargs):
    regime = kwargs.pop("regime")
    with pytest.raises(MemplanError):
        prepare(_model("llama-tiny"), regime, **kwargs)


def test_lora_bf16_keeps_ties_and_runs_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    setup = prepare(_model("gpt2-tiny"), "lora-bf16", lora=LoraSpec(train_embeddings=True))
    model = setup.model
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.requires_grad
    with FakeTensorMode():  # Module.to cannot swap fake parameters; prepare must not need it
        setup = prepare(build_model("llama-tiny"), "lora-bf16", lora=LoraSpec(rank=4))
        ids = torch.randint(0, 4096, (1, 8))
        setup.train_step(ids, ids)
    assert setup.num_trainable == P.lora_params(get_model("llama-tiny"), LoraSpec(rank=4))
