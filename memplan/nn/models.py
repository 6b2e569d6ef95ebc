"""Reference decoder-only transformers (llama and gpt2 layouts) built from a ModelSpec.

Module names are Hugging Face's, so LoRA targets and state_dicts mean the same thing. The code
is plain on purpose: the planner predicts its memory, so nothing is cached, kept on ``self`` or
copied without need. Builds work on the meta device and under ``FakeTensorMode``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from memplan.errors import MemplanError, unknown
from memplan.spec import ModelSpec

ATTENTION_IMPLS = ("sdpa", "eager")
ROPE_THETA = 10000.0  # Llama-2's rotary base (HF LlamaConfig default)
INIT_STD = 0.02  # HF initializer_range default
RMS_EPS = 1e-6  # HF LlamaConfig.rms_norm_eps default
LN_EPS = 1e-5  # HF GPT2Config.layer_norm_epsilon default


_gelu_tanh = partial(F.gelu, approximate="tanh")
# HF ACT2FN names -> functions (only the ones the presets and configs use).
ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
}


def _check_attention(name: str) -> str:
    if name not in ATTENTION_IMPLS:
        raise unknown("attention implementation", name, ATTENTION_IMPLS)
    return name


def attend(q: Tensor, k: Tensor, v: Tensor, impl: str, dropout_p: float,
           training: bool) -> Tensor:
    """Causal attention of q (B, nh, T, hd) over grouped k, v (B, nkv, T, hd) -> (B, nh, T, hd).

    ``impl`` is ``sdpa`` (one fused call) or ``eager`` (HF's eager path: repeat_kv, fp32
    softmax); ``dropout_p`` drops attention probabilities while training.
    """
    p = dropout_p if training else 0.0
    gqa = k.shape[1] != q.shape[1]
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                              dropout_p=p)
    if gqa:  # HF repeat_kv: (B, nkv, T, hd) -> (B, nh, T, hd)
        n_rep = q.shape[1] // k.shape[1]
        b, nkv, t, hd = k.shape
        k = k[:, :, None].expand(b, nkv, n_rep, t, hd).reshape(b, nkv * n_rep, t, hd)
        v = v[:, :, None].expand(b, nkv, n_rep, t, hd).reshape(b, nkv * n_rep, t, hd)
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, T, T)
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1)  # (T, T)
    scores = scores.masked_fill(mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if p > 0:
        probs = F.dropout(probs, p=p, training=True)
    return probs @ v  # (B, nh, T, hd)


def _norm(spec: ModelSpec, **factory) -> nn.Module:
    if spec.norm == "layernorm":
        return nn.LayerNorm(spec.hidden_size, eps=LN_EPS, **factory)
    return RMSNorm(spec.hidden_size, eps=RMS_EPS, **factory)


class RMSNorm(nn.Module):
    """Root-mean-square norm, as HF's LlamaRMSNorm (computed in fp32, weight applied after)."""

    def __init__(self, hidden_size: int, eps: float = RMS_EPS, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        var = x32.pow(2).mean(-1, keepdim=True)  # (B, T, 1)
        x32 = x32 * torch.rsqrt(var + self.eps)
        return self.weight * x32.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position tables (HF LlamaRotaryEmbedding), from a non-persistent inv_freq."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = ROPE_THETA,
                 device=None) -> None:
        super().__init__()
        self.max_positions = max_positions
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta ** exponents), persistent=False)

    def forward(self, x: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        """Cos and sin tables (1, T, hd) in x's dtype for positions 0..T-1."""
        positions = torch.arange(seq_len, device=x.device, dtype=torch.float32)  # (T,)
        freqs = torch.outer(positions, self.inv_freq.float())  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[None]  # (1, T, hd)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, T, n·hd) -> (B, n, T, hd), a view."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF apply_rotary_pos_emb: q, k (B, n, T, hd); cos, sin (1, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]  # (1, 1, T, hd)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class LlamaAttention(nn.Module):
    """Grouped-query attention with rotary positions and q/k/v/o projections."""

    def __init__(self, spec: ModelSpec, **factory) -> None:
        super().__init__()
        h = spec.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads, spec.num_kv_heads, spec.head_dim)
        self.dropout_p = spec.dropout
        self.impl = "sdpa"
        self.q_proj = nn.Linear(h, spec.q_dim, bias=spec.qkv_bias, **factory)
        self.k_proj = nn.Linear(h, spec.kv_dim, bias=spec.qkv_bias, **factory)
        self.v_proj = nn.Linear(h, spec.kv_dim, bias=spec.qkv_bias, **factory)
        self.o_proj = nn.Linear(spec.q_dim, h, bias=spec.out_bias, **factory)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q = _heads(self.q_proj(x), self.head_dim)  # (B, nh, T, hd)
        k = _heads(self.k_proj(x), self.head_dim)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, k, cos, sin)
        v = _heads(self.v_proj(x), self.head_dim)  # (B, nkv, T, hd)
        out = attend(q, k, v, self.impl, self.dropout_p, self.training)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).flatten(2))  # (B, T, C)


class LlamaMLP(nn.Module):
    """SwiGLU ``down(act(gate(x)) * up(x))``, or plain ``down(act(up(x)))`` when not gated."""

    def __init__(self, spec: ModelSpec, **factory) -> None:
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.act_name = spec.activation
        self.act_fn = ACTIVATIONS[spec.activation]
        if spec.gated_mlp:
            self.gate_proj = nn.Linear(h, i, bias=spec.mlp_bias, **factory)
        self.up_proj = nn.Linear(h, i, bias=spec.mlp_bias, **factory)
        self.down_proj = nn.Linear(i, h, bias=spec.mlp_bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)
        return self.down_proj(self.act_fn(self.up_proj(x)))  # (B, T, C)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, spec: ModelSpec, **factory) -> None:
        super().__init__()
        self.input_layernorm = _norm(spec, **factory)
        self.self_attn = LlamaAttention(spec, **factory)
        self.post_attention_layernorm = _norm(spec, **factory)
        self.mlp = LlamaMLP(spec, **factory)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)  # (B, T, C)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, C)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF LlamaModel)."""

    def __init__(self, spec: ModelSpec, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, **factory)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, **factory)
                                    for _ in range(spec.num_layers))
        self.norm = _norm(spec, **factory)
        self.rotary_emb = RotaryEmbedding(spec.head_dim, spec.max_positions, device=device)


def _dropout(module: nn.Dropout, x: Tensor) -> Tensor:
    """Apply dropout only when it can drop something, so that p = 0 stores no mask."""
    return module(x) if module.p > 0 and module.training else x


class GPT2Attention(nn.Module):
    """Fused-qkv attention (HF GPT2Attention, with nn.Linear in place of Conv1D)."""

    def __init__(self, spec: ModelSpec, **factory) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads, spec.num_kv_heads, spec.head_dim)
        self.dropout_p = spec.dropout
        self.impl = "sdpa"
        self.c_attn = nn.Linear(spec.hidden_size, spec.q_dim + 2 * spec.kv_dim, **factory)
        self.c_proj = nn.Linear(spec.q_dim, spec.hidden_size, **factory)
        self.resid_dropout = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor) -> Tensor:
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = (_heads(part, self.head_dim)  # (B, nh|nkv, T, hd)
                   for part in self.c_attn(x).split((q_dim, kv_dim, kv_dim), dim=-1))
        out = attend(q, k, v, self.impl, self.dropout_p, self.training)  # (B, nh, T, hd)
        out = self.c_proj(out.transpose(1, 2).flatten(2))  # (B, T, C)
        return _dropout(self.resid_dropout, out)


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` followed by residual dropout."""

    def __init__(self, spec: ModelSpec, **factory) -> None:
        super().__init__()
        self.act_name = spec.activation
        self.act_fn = ACTIVATIONS[spec.activation]
        self.c_fc = nn.Linear(spec.hidden_size, spec.intermediate_size, **factory)
        self.c_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, **factory)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return _dropout(self.dropout, self.c_proj(self.act_fn(self.c_fc(x))))  # (B, T, C)


class GPT2Block(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, spec: ModelSpec, **factory) -> None:
        super().__init__()
        self.ln_1 = _norm(spec, **factory)
        self.attn = GPT2Attention(spec, **factory)
        self.ln_2 = _norm(spec, **factory)
        self.mlp = GPT2MLP(spec, **factory)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT2Model(nn.Module):
    """Token and learned position embeddings, blocks and final norm (HF GPT2Model)."""

    def __init__(self, spec: ModelSpec, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.wte = nn.Embedding(spec.vocab_size, spec.hidden_size, **factory)
        self.wpe = nn.Embedding(spec.max_positions, spec.hidden_size, **factory)
        self.drop = nn.Dropout(spec.dropout)
        self.h = nn.ModuleList(GPT2Block(spec, **factory) for _ in range(spec.num_layers))
        self.ln_f = _norm(spec, **factory)


class CausalLM(nn.Module):
    """A decoder-only language model: ``model`` (llama) or ``transformer`` (gpt2) + ``lm_head``.

    Attributes:
        spec: The ModelSpec it was built from.
        attention: ``sdpa`` or ``eager``; settable after build.
        checkpointing: Recompute each block in backward (activation checkpointing).
    """

    def __init__(self, spec: ModelSpec, device=None, dtype=None, attention: str = "sdpa",
                 checkpointing: bool = False) -> None:
        super().__init__()
        from memplan import arch

        if spec.approximation or not arch.profile_of(spec).reference_model:
            raise MemplanError(f"memplan has no reference model of {spec.model_type or spec.family}"
                               f" ({spec.name}) and never builds a stand-in; use --impl hf")
        if spec.activation not in ACTIVATIONS:
            raise unknown("activation", spec.activation, ACTIVATIONS)
        if spec.learned_positions != (spec.family == "gpt2"):
            raise MemplanError(f"model {spec.name!r}: the {spec.family} family is built with "
                               f"{'learned' if spec.family == 'gpt2' else 'rotary'} positions; "
                               f"set learned_positions={spec.family == 'gpt2'}")
        self.spec = spec
        self.checkpointing = checkpointing
        if spec.family == "gpt2":
            self.transformer = GPT2Model(spec, device=device, dtype=dtype)
        else:
            self.model = LlamaModel(spec, device=device, dtype=dtype)
        # A tied head gets a meta placeholder: no memory is spent on a weight replaced below.
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False,
                                 device="meta" if spec.tie_embeddings else device, dtype=dtype)
        self.apply(_init_weights)
        self.tie_weights()
        self.attention = attention

    def tie_weights(self) -> None:
        """Share the input embedding with lm_head when the spec ties them (again after
        ``to_empty``, which unties)."""
        if self.spec.tie_embeddings:
            self.lm_head.weight = self._embedding().weight

    @property
    def attention(self) -> str:
        """The attention implementation of every block, ``sdpa`` or ``eager``."""
        return self._attention

    @attention.setter
    def attention(self, name: str) -> None:
        self._attention = _check_attention(name)
        for module in self.modules():
            if isinstance(module, LlamaAttention | GPT2Attention):
                module.impl = name

    def _body(self) -> LlamaModel | GPT2Model:
        return self.transformer if self.spec.family == "gpt2" else self.model

    def _embedding(self) -> nn.Embedding:
        body = self._body()
        return body.wte if isinstance(body, GPT2Model) else body.embed_tokens

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings (B, T, H) of input_ids (B, T); positions are added in the body."""
        return self._embedding()(input_ids)

    def _run_block(self, block: nn.Module, x: Tensor, *extra: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *extra, use_reentrant=False)
        return block(x, *extra)

    def hidden_states(self, input_ids: Tensor | None = None,
                      inputs_embeds: Tensor | None = None) -> Tensor:
        """The final-norm output (B, T, H) of input_ids (B, T) or inputs_embeds (B, T, H)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise MemplanError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        t = x.shape[1]
        body = self._body()
        if isinstance(body, GPT2Model):
            if t > body.wpe.num_embeddings:
                raise MemplanError(f"sequence length {t} exceeds max_positions "
                                   f"{body.wpe.num_embeddings} of {self.spec.name}")
            positions = torch.arange(t, device=x.device)  # (T,)
            x = _dropout(body.drop, x + body.wpe(positions))  # (B, T, H)
            for block in body.h:
                x = self._run_block(block, x)
            return body.ln_f(x)
        cos, sin = body.rotary_emb(x, t)  # (1, T, hd) each
        for layer in body.layers:
            x = self._run_block(layer, x, cos, sin)
        return body.norm(x)  # (B, T, H)

    def forward(self, input_ids: Tensor | None = None, labels: Tensor | None = None,
                inputs_embeds: Tensor | None = None, return_logits: bool = False) -> Any:
        """The mean cross-entropy loss when labels (B, T) are given, else the logits (B, T, V).

        Labels are aligned with positions already (no shift here); -100 is ignored. With labels
        the logits are dropped as soon as the loss is computed, unless ``return_logits``:
        then ``(loss, logits)``, as a Hugging Face model returns both.
        """
        logits = self.lm_head(self.hidden_states(input_ids, inputs_embeds))  # (B, T, V)
        if labels is None:
            return logits
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits.float().view(-1, vocab), labels.view(-1))
        if return_logits:
            return loss, logits
        del logits
        return loss


def _init_weights(module: nn.Module) -> None:
    """HF-style init: normal(0, 0.02) weights, zero biases, unit norm weights."""
    with torch.no_grad():
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, INIT_STD)
        elif isinstance(module, nn.LayerNorm | RMSNorm):
            module.weight.fill_(1.0)
        if isinstance(getattr(module, "bias", None), Tensor):
            module.bias.zero_()


def build_model(spec_or_name: ModelSpec | str, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, attention: str = "sdpa",
                checkpointing: bool = False) -> CausalLM:
    """Build the reference model of a spec or preset name.

    Args:
        spec_or_name: A ModelSpec, or a preset name (``llama-2-7b``).
        device: Where parameters live; ``meta`` allocates nothing (under ``FakeTensorMode``
            they are fake tensors).
        dtype: Dtype of every parameter (e.g. ``torch.bfloat16``); default fp32.
        attention: ``sdpa`` or ``eager``.
        checkpointing: Activation checkpointing of each block while training.

    Raises:
        MemplanError: An unknown preset, attention implementation or activation.
    """
    _check_attention(attention)
    if isinstance(spec_or_name, str):
        from memplan.presets import get_model

        spec_or_name = get_model(spec_or_name)
    return CausalLM(spec_or_name, device=device, dtype=dtype, attention=attention,
                    checkpointing=checkpointing)


def _features(linear: nn.Module) -> tuple[int, int, bool]:
    """(in, out, has bias) of a linear layer, or of a wrapper (LoRA) that says in/out."""
    bias = getattr(linear, "bias", None) is not None
    if hasattr(linear, "in_features") and hasattr(linear, "out_features"):
        return int(linear.in_features), int(linear.out_features), bias
    out_f, in_f = linear.weight.shape
    return int(in_f), int(out_f), bias


def spec_from_module(model: nn.Module) -> ModelSpec:
    """Turn a real module back into the ModelSpec it implements, from its modules and shapes.

    A :class:`CausalLM` (or a module holding one, such as a classifier around a backbone) is
    read from its layers; a Hugging Face model through its ``config``.

    Raises:
        MemplanError: The module is neither."""
    if not isinstance(model, CausalLM):
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            from memplan.config import spec_from_config

            cfg = config.to_dict()
            name = getattr(config, "name_or_path", "") or cfg.get("model_type") or "hf-model"
            return spec_from_config(cfg, name=name)
        inner = next((m for m in model.modules() if isinstance(m, CausalLM)), None)
        if inner is None:
            raise MemplanError(f"cannot read a ModelSpec from a {type(model).__name__}: it is "
                               "neither a memplan CausalLM nor a Hugging Face model")
        model = inner
    body = model._body()
    gpt2 = isinstance(body, GPT2Model)
    if gpt2:
        embedding, blocks, final_norm = body.wte, body.h, body.ln_f
        attn, mlp = blocks[0].attn, blocks[0].mlp
        q_dim, _, out_bias = _features(attn.c_proj)
        _, qkv_out, qkv_bias = _features(attn.c_attn)
        kv_dim = (qkv_out - q_dim) // 2
        _, intermediate, mlp_bias = _features(mlp.c_fc)
        max_positions = body.wpe.num_embeddings
    else:
        embedding, blocks, final_norm = body.embed_tokens, body.layers, body.norm
        attn, mlp = blocks[0].self_attn, blocks[0].mlp
        _, q_dim, qkv_bias = _features(attn.q_proj)
        kv_dim, out_bias = _features(attn.k_proj)[1], _features(attn.o_proj)[2]
        _, intermediate, mlp_bias = _features(mlp.up_proj)
        max_positions = body.rotary_emb.max_positions
    vocab, hidden = embedding.weight.shape
    head_dim = attn.head_dim
    return ModelSpec(
        name=model.spec.name, family="gpt2" if gpt2 else "llama",
        model_type=model.spec.model_type,
        vocab_size=int(vocab), hidden_size=int(hidden), num_layers=len(blocks),
        num_heads=q_dim // head_dim, num_kv_heads=kv_dim // head_dim, head_dim=head_dim,
        intermediate_size=intermediate, gated_mlp=hasattr(mlp, "gate_proj"),
        activation=mlp.act_name,
        qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias,
        norm="layernorm" if isinstance(final_norm, nn.LayerNorm) else "rmsnorm",
        tie_embeddings=model.lm_head.weight is embedding.weight,
        learned_positions=gpt2, max_positions=int(max_positions),
        dropout=float(attn.dropout_p),
    )
