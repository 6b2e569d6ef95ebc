"""Parameter counts: N of every preset, PEFT's LoRA counts M, and C, E, P, B by hand."""

from __future__ import annotations

import pytest

from memplan import params as P
from memplan.errors import MemplanError
from memplan.presets import get_model, model_names
from memplan.spec import LoraSpec, ModelSpec

# Published counts: what transformers builds from each config (tied weights once).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "gpt3-175b": 174_604_259_328,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize(("name", "expected"), sorted(PUBLISHED.items()))
def test_preset_count_matches_published(name: str, expected: int) -> None:
    assert P.count_params(get_model(name)) == expected


def test_every_published_preset_exists() -> None:
    assert set(PUBLISHED) <= set(model_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_tensor_sizes_add_up_to_count(name: str) -> None:
    spec = get_model(name)
    assert sum(P.param_tensor_sizes(spec)) == P.count_params(spec)
    assert all(size > 0 for size in P.param_tensor_sizes(spec))


# ---- LoRA (PEFT's counts on llama-2-7b, r = 8) ----------------------------------------------

LLAMA7 = "llama-2-7b"


@pytest.mark.parametrize(("targets", "expected"), [
    ("q_proj,v_proj", 4_194_304),
    (("q_proj", "v_proj"), 4_194_304),
    (["q_proj", "v_proj"], 4_194_304),
    (" q_proj , v_proj ", 4_194_304),
    ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 19_988_480),
    ("all", 19_988_480),
    # every layer once, even when named twice
    ("q_proj,q_proj,v_proj", 4_194_304),
    ("all,q_proj", 19_988_480),
])
def test_lora_params_llama2_7b_r8(targets, expected: int) -> None:
    spec = get_model(LLAMA7)
    assert P.lora_params(spec, LoraSpec(rank=8, targets=targets)) == expected


def test_lora_q_v_by_hand() -> None:
    # 32 blocks × 2 matrices × r·(4096 + 4096)
    assert 32 * 2 * 8 * (4096 + 4096) == 4_194_304


def test_lora_scales_linearly_with_rank() -> None:
    spec = get_model(LLAMA7)
    m8 = P.lora_params(spec, LoraSpec(rank=8))
    assert P.lora_params(spec, LoraSpec(rank=16)) == 2 * m8
    assert P.lora_params(spec, LoraSpec(rank=1)) * 8 == m8


@pytest.mark.parametrize("name", ["llama-2-7b", "gpt2", "qwen2.5-0.5b", "llama-3-8b", "gpt2-tiny",
                                  "llama-tiny"])
def test_mlp_plus_attention_is_all(name: str) -> None:
    spec = get_model(name)
    mlp = P.lora_params(spec, LoraSpec(targets="mlp"))
    att = P.lora_params(spec, LoraSpec(targets="attention"))
    assert mlp > 0 and att > 0
    assert mlp + att == P.lora_params(spec, LoraSpec(targets="all"))
    assert P.lora_params(spec, LoraSpec(targets="mlp,attention")) == mlp + att


def test_llama_target_groups() -> None:
    spec = get_model(LLAMA7)
    names = lambda t: [l.short_name for l in P.resolve_targets(spec, t)]  # noqa: E731
    assert names("attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert names("mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert P.target_names(spec) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj")


def test_gpt2_c_proj_matches_attention_and_mlp() -> None:
    spec = get_model("gpt2")
    layers = P.resolve_targets(spec, "c_proj")
    assert [l.name for l in layers] == ["attn.c_proj", "mlp.c_proj"]
    assert {l.group for l in layers} == {"attention", "mlp"}
    # 12 blocks × r · ((768 + 768) + (3072 + 768))
    assert P.lora_params(spec, LoraSpec(rank=8, targets="c_proj")) == 12 * 8 * (1536 + 3840)


@pytest.mark.parametrize(("target", "expected"), [
    ("attn.c_proj", ["attn.c_proj"]),
    ("mlp.c_proj", ["mlp.c_proj"]),
    ("c_attn", ["attn.c_attn"]),
])
def test_gpt2_dotted_target_matches_one(target: str, expected: list[str]) -> None:
    spec = get_model("gpt2")
    assert [l.name for l in P.resolve_targets(spec, target)] == expected


def test_gpt2_attn_c_proj_count() -> None:
    spec = get_model("gpt2")
    assert P.lora_params(spec, LoraSpec(rank=8, targets="attn.c_proj")) == 12 * 8 * 1536


@pytest.mark.parametrize(("model", "target", "suggestion"), [
    ("llama-2-7b", "q_prj", "q_proj"),
    ("llama-2-7b", "down", "down_proj"),
    ("gpt2", "c_prj", "c_proj"),
    ("gpt2", "q_proj", None),  # a llama name on gpt2: no layer, list of known names
    ("llama-2-7b", "c_attn", None),
])
def test_bad_target_raises_with_suggestion(model: str, target: str, suggestion) -> None:
    spec = get_model(model)
    with pytest.raises(MemplanError) as info:
        P.lora_params(spec, LoraSpec(targets=target))
    message = str(info.value)
    assert repr(target) in message
    assert "known:" in message
    assert "\n" not in message
    if suggestion:
        assert f"did you mean {suggestion!r}" in message
    for name in P.target_names(spec):
        assert name in message


@pytest.mark.parametrize("targets", ["", " , ", ()])
def test_empty_targets_raise(targets) -> None:
    with pytest.raises(MemplanError, match="empty"):
        P.resolve_targets(get_model("gpt2"), targets)


@pytest.mark.parametrize(("model", "targets", "smallest"), [
    ("llama-2-7b", "all", 4096),
    ("llama-2-70b", "all", 1024),          # k_proj/v_proj: 8 kv heads × 128
    ("llama-2-70b", "q_proj", 8192),
    ("qwen2.5-0.5b", "k_proj", 128),       # 2 kv heads × 64
    ("gpt2-tiny", "all", 256),
])
def test_rank_larger_than_smallest_dim_raises(model: str, targets: str, smallest: int) -> None:
    spec = get_model(model)
    assert P.lora_params(spec, LoraSpec(rank=smallest, targets=targets)) > 0
    with pytest.raises(MemplanError, match=f"--rank {smallest} or less"):
        P.lora_params(spec, LoraSpec(rank=smallest + 1, targets=targets))


@pytest.mark.parametrize("rank", [0, -1, True, 2.5])
def test_lora_spec_rejects_bad_rank(rank) -> None:
    with pytest.raises(MemplanError):
        LoraSpec(rank=rank)


def test_lora_embedding_params() -> None:
    llama = get_model(LLAMA7)
    assert P.lora_embedding_params(llama, LoraSpec()) == 0
    assert P.lora_embedding_params(llama, LoraSpec(train_embeddings=True)) == 2 * 32000 * 4096
    gpt2 = get_model("gpt2")  # tied: the embedding once
    assert P.lora_embedding_params(gpt2, LoraSpec(train_embeddings=True)) == 50257 * 768


# ---- C, E, P, B and N by hand on tiny specs --------------------------------------------------

TINY_GPT2 = ModelSpec(
    name="hand-gpt2", family="gpt2", vocab_size=11, hidden_size=8, num_layers=2, num_heads=2,
    num_kv_heads=2, head_dim=4, intermediate_size=32, gated_mlp=False, activation="gelu_new",
    qkv_bias=True, out_bias=True, mlp_bias=True, norm="layernorm", tie_embeddings=True,
    learned_positions=True, max_positions=16,
)
TINY_LLAMA = ModelSpec(
    name="hand-llama", family="llama", vocab_size=10, hidden_size=8, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=4, intermediate_size=16,
)


def test_tiny_gpt2_n_by_hand() -> None:
    wte, wpe = 11 * 8, 16 * 8
    c_attn = 8 * 24 + 24
    attn_proj = 8 * 8 + 8
    c_fc = 8 * 32 + 32
    mlp_proj = 32 * 8 + 8
    norms = 2 * (8 + 8)
    block = c_attn + attn_proj + c_fc + mlp_proj + norms
    assert block == 872
    assert P.block_params(TINY_GPT2) == block
    assert P.count_params(TINY_GPT2) == wte + wpe + 2 * block + (8 + 8)  # tied head: none
    assert P.count_params(TINY_GPT2) == 1976


def test_tiny_llama_n_by_hand() -> None:
    q, k, v, o = 8 * 8, 8 * 4, 8 * 4, 8 * 8
    gate = up = down = 8 * 16
    block = q + k + v + o + gate + up + down + 2 * 8
    assert P.block_params(TINY_LLAMA) == block == 592
    assert P.count_params(TINY_LLAMA) == 10 * 8 + 2 * block + 8 + 10 * 8 == 1352


@pytest.mark.parametrize(("classes", "expected"), [(2, 8 * 2 + 2), (3, 27), (1000, 9000)])
def test_classifier_params_c(classes: int, expected: int) -> None:
    assert P.classifier_params(TINY_GPT2, classes) == expected
    assert P.classifier_params(TINY_LLAMA, classes) == expected


def test_embedding_params_e() -> None:
    assert P.embedding_params(TINY_GPT2) == 88
    assert P.embedding_params(TINY_LLAMA) == 80
    assert P.embedding_params(get_model(LLAMA7)) == 32000 * 4096


@pytest.mark.parametrize(("tokens", "expected"), [(1, 8), (5, 40), (20, 160)])
def test_prompt_params_p(tokens: int, expected: int) -> None:
    assert P.prompt_params(TINY_GPT2, tokens) == expected


def test_bias_params_b_by_hand() -> None:
    # per block: c_attn 24 + c_proj 8 + c_fc 32 + c_proj 8 + two LayerNorm biases 2·8
    per_block = 24 + 8 + 32 + 8 + 16
    assert P.bias_params(TINY_GPT2) == 2 * per_block + 8 == 184
    assert P.bias_params(TINY_LLAMA) == 0


def test_bias_params_gpt2() -> None:
    # 12 blocks × (2304 + 768 + 3072 + 768 + 2·768) + final LayerNorm 768
    assert P.bias_params(get_model("gpt2")) == 12 * (2304 + 768 + 3072 + 768 + 1536) + 768


def test_qwen2_bias_params_are_qkv_only() -> None:
    spec = get_model("qwen2.5-0.5b")
    assert P.bias_params(spec) == spec.num_layers * (spec.q_dim + 2 * spec.kv_dim)


def test_tiny_lora_by_hand() -> None:
    # rank 2 on every linear: r · (in + out) each
    per_block = 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8) + (8 + 16) + (8 + 16) + (16 + 8))
    assert P.lora_params(TINY_LLAMA, LoraSpec(rank=2)) == 2 * per_block
    with pytest.raises(MemplanError):
        P.lora_params(TINY_LLAMA, LoraSpec(rank=5))  # k_proj is 8 → 4
