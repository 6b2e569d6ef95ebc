"""Every preset of every family: memplan's inventory equals the transformers model's, and the
LoRA count equals PEFT's (built on the meta device: nothing is allocated)."""

from dataclasses import replace

import pytest

from memplan import arch
from memplan.params import block_linears, count_params, lora_params
from memplan.presets import get_model, model_names
from memplan.spec import LoraSpec

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from memplan.nn.hf import build_hf_model  # noqa: E402


def _small(name: str):
    """The preset with at most two blocks (the blocks are identical; counts scale)."""
    spec = get_model(name)
    return replace(spec, num_layers=min(spec.num_layers, 2))


@pytest.mark.parametrize("name", model_names())
def test_count_equals_transformers(name: str) -> None:
    spec = _small(name)
    model = build_hf_model(spec, device="meta").hf
    assert count_params(spec) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", model_names())
def test_every_parameter_is_in_the_inventory(name: str) -> None:
    """One block's parameters, by name and shape, in the order transformers registers them
    (up to the order of the norms, which memplan lists where they run)."""
    spec = _small(name)
    model = build_hf_model(spec, device="meta").hf
    profile = arch.profile_of(spec)
    marker = ".0."
    # GPT-2's Conv1D stores (in, out); memplan lists (out, in) as nn.Linear and FSDP see it
    flip = profile.conv1d
    ours = sorted((w.name, w.shape[::-1] if flip and len(w.shape) == 2 else w.shape)
                  for w in profile.block_weights(spec))
    theirs = sorted((n.split(marker, 1)[1], tuple(p.shape)) for n, p in model.named_parameters()
                    if marker in n)
    assert ours == theirs


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("targets", ["all", "attention", "mlp"])
def test_lora_count_equals_peft(name: str, targets: str) -> None:
    spec = _small(name)
    lora = LoraSpec(rank=4, targets=targets)
    try:
        expected = lora_params(spec, lora)
    except Exception:  # a family with no layer in this group
        pytest.skip(f"{name} has no {targets} linears")
    model = build_hf_model(spec, device="meta").hf
    if targets == "all":
        modules = "all-linear"
    else:
        modules = sorted({l.name for l in block_linears(spec) if l.targetable
                          and (l.group == targets or (targets == "mlp" and l.group in
                                                      ("mlp", "expert", "router")))})
        modules = arch.profile_of(spec).peft_targets(modules)  # PEFT matches suffixes
    config = peft.LoraConfig(r=4, target_modules=modules, lora_dropout=0.0,
                             fan_in_fan_out=arch.profile_of(spec).conv1d)
    wrapped = peft.get_peft_model(model, config)
    assert expected == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
