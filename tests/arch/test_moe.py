"""Mixtures of experts (mixtral, qwen2_moe, olmoe): config defaults, inventory against
transformers and PEFT, the plan against a FakeTensorMode measurement, and bad configs."""

from dataclasses import replace

import pytest

from memplan import arch
from memplan.config import spec_from_config
from memplan.errors import ConfigError, MemplanError
from memplan.params import count_params, lora_params
from memplan.presets import get_model
from memplan.spec import LoraSpec, TrainSpec

TINY = {
    "mixtral": {"model_type": "mixtral", "vocab_size": 256, "hidden_size": 64,
                "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", "vocab_size": 256, "hidden_size": 64,
                  "moe_intermediate_size": 48, "shared_expert_intermediate_size": 112,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "num_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"model_type": "olmoe", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2},
}


def _spec(family: str, **keys):
    return spec_from_config(TINY[family] | keys, name=family)


@pytest.mark.parametrize("model_type, dims, extras", [
    ("mixtral", (32000, 4096, 32, 32, 8, 128, 14336, 131072),
     {"num_experts": 8, "experts_per_token": 2, "moe_intermediate_size": 14336,
      "norm_topk_prob": True}),
    ("qwen2_moe", (151936, 2048, 24, 16, 16, 128, 5632, 32768),
     {"num_experts": 60, "experts_per_token": 4, "moe_intermediate_size": 1408,
      "norm_topk_prob": False, "shared_expert_intermediate_size": 5632,
      "decoder_sparse_step": 1, "mlp_only_layers": (), "use_sliding_window": False}),
    ("olmoe", (50304, 2048, 16, 16, 16, 128, 2048, 4096),
     {"num_experts": 64, "experts_per_token": 8, "moe_intermediate_size": 2048,
      "norm_topk_prob": False}),
])
def test_defaults_for_absent_keys(model_type: str, dims: tuple, extras: dict) -> None:
    spec = spec_from_config({"model_type": model_type})
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_heads,
            spec.num_kv_heads, spec.head_dim, spec.intermediate_size, spec.max_positions) == dims
    assert dict(spec.extras) == extras and not spec.tie_embeddings
    assert spec.qkv_bias == (model_type == "qwen2_moe") and not spec.out_bias
    again = spec_from_config(arch.profile_of(spec).to_hf(spec), name=spec.name)
    assert again == spec


@pytest.mark.parametrize("name, total, lora4", [
    ("mixtral-8x7b", 46_702_792_704, 89_916_416),
    ("qwen1.5-moe-a2.7b", 14_315_784_192, 3_981_408),
    ("olmoe-1b-7b", 6_919_161_856, 47_321_088),
])
def test_presets_have_the_published_counts(name: str, total: int, lora4: int) -> None:
    spec = get_model(name)
    assert count_params(spec) == total
    assert lora_params(spec, LoraSpec(rank=4)) == lora4  # PEFT's all-linear, r=4


@pytest.mark.parametrize("family, keys", [("mixtral", {}), ("qwen2_moe", {}), ("olmoe", {}),
                                          ("qwen2_moe", {"qkv_bias": False,
                                                         "norm_topk_prob": True}),
                                          ("olmoe", {"attention_bias": True})])
def test_counts_equal_transformers_and_peft(family: str, keys: dict) -> None:
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from memplan.nn.hf import apply_peft_lora, build_hf_model

    spec = _spec(family, **keys)
    model = build_hf_model(spec, device="meta").hf
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    ours = [(w.name, w.shape) for w in arch.profile_of(spec).block_weights(spec)]
    theirs = [(n.split(".0.", 1)[1], tuple(p.shape))
              for n, p in model.named_parameters() if ".0." in n]
    assert ours == theirs  # registration order too
    for rank in (4, 16):  # rank 16 > the 4 experts: PEFT's router wrapper takes it
        fresh = build_hf_model(spec, device="meta").hf
        wrapped = peft.get_peft_model(fresh, peft.LoraConfig(r=rank, target_modules="all-linear"))
        expected = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert lora_params(spec, LoraSpec(rank=rank)) == expected
    for targets in ("all", "attention", "mlp", "down_proj"):  # memplan's names through PEFT
        fresh = build_hf_model(spec, device="meta")
        apply_peft_lora(fresh, LoraSpec(rank=4, targets=targets))
        expected = sum(p.numel() for p in fresh.hf.parameters() if p.requires_grad)
        assert lora_params(spec, LoraSpec(rank=4, targets=targets)) == expected


@pytest.mark.parametrize("family, kw", [
    ("mixtral", dict(regime="full", batch=2, seq=64)),
    ("olmoe", dict(regime="lora-bf16", batch=2, seq=64, lora_backend="peft")),
    ("qwen2_moe", dict(regime="lora", batch=2, seq=64, attention="eager", lora_backend="peft",
                       checkpointing=False)),
])
def test_plan_equals_fake_measurement(family: str, kw: dict) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from memplan.profile.compare import profile

    result = profile(_spec(family), replace(TrainSpec(), impl="hf", **kw), device="fake",
                     steps=1)
    # within a few bytes: a 0-d scalar, and the rotary buffers cast to bf16 (planned in fp32)
    assert abs(result.predicted.total_bytes - result.measured.peak_bytes) <= 64


def test_routing_does_not_change_the_plan() -> None:
    """grouped_mm: every shape depends on T, k and E only (the plan has no routing input)."""
    from memplan.planner import plan

    spec = _spec("mixtral")
    job = TrainSpec(regime="full", batch=2, seq=64, impl="hf")
    assert plan(spec, job).total_bytes == plan(spec, job).total_bytes
    more = replace(spec, extras=tuple((k, 4 if k == "experts_per_token" else v)
                                      for k, v in spec.extras))
    assert plan(more, job).total_bytes > plan(spec, job).total_bytes


@pytest.mark.parametrize("family, keys, named", [
    ("mixtral", {"num_experts_per_tok": 5}, ("num_experts_per_tok", "num_local_experts")),
    ("mixtral", {"num_experts": 8}, ("num_experts", "num_local_experts")),
    ("mixtral", {"router_jitter_noise": 0.1}, ("router_jitter_noise",)),
    ("mixtral", {"output_router_logits": True}, ("output_router_logits",)),
    ("qwen2_moe", {"num_experts_per_tok": 8}, ("num_experts_per_tok", "num_experts")),
    ("qwen2_moe", {"decoder_sparse_step": 2}, ("decoder_sparse_step", "mlp_only_layers")),
    ("qwen2_moe", {"mlp_only_layers": [0]}, ("decoder_sparse_step", "mlp_only_layers")),
    ("qwen2_moe", {"norm_topk_prob": "yes"}, ("norm_topk_prob",)),
    ("olmoe", {"num_experts_per_tok": 0}, ("num_experts_per_tok",)),
    ("olmoe", {"num_local_experts": 8}, ("num_local_experts", "num_experts")),
    ("olmoe", {"clip_qkv": 8.0}, ("clip_qkv",)),
])
def test_bad_configs_name_their_keys(family: str, keys: dict, named: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        _spec(family, **keys)
    for key in named:
        assert key in str(err.value)


def test_lora_needs_peft_and_no_qlora() -> None:
    from memplan.planner import plan

    spec = _spec("mixtral")
    for kw, said in ((dict(regime="lora"), "--lora-backend peft"),
                     (dict(regime="qlora"), "lora-bf16")):
        with pytest.raises(MemplanError, match=said):
            plan(spec, TrainSpec(batch=1, seq=16, impl="hf", **kw))
