"""Hugging Face transformers models, built from a config (no download), for the profiler.

``build_hf_model(spec)`` makes the transformers model of a ModelSpec (llama, mistral, qwen2,
gpt2) and wraps it in :class:`HFCausalLM`, which speaks the interface of memplan's own
CausalLM (``forward(input_ids, labels, inputs_embeds) -> loss``, ``hidden_states``,
``embed``), so that :func:`memplan.nn.regimes.prepare` and the step driver run it unchanged.
The loss is taken as Hugging Face's Trainer takes it: ``model(**batch).loss``, the output
object (and the logits in it) dropped before backward. ``apply_peft_lora`` wraps the model
with PEFT's LoRA instead of memplan's LoRALinear. Needs the ``[hf]`` extra.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from memplan import arch
from memplan.config import hf_config
from memplan.errors import MemplanError
from memplan.params import check_rank
from memplan.spec import LoraSpec, ModelSpec


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MemplanError("--impl hf needs Hugging Face transformers: "
                           "pip install 'memplan[hf]'") from None
    return transformers


class HFCausalLM(nn.Module):
    """A transformers causal LM behind memplan's CausalLM interface.

    Attributes:
        hf: The transformers model (``LlamaForCausalLM``, ``GPT2LMHeadModel`` ...), or the
            PEFT model wrapping it.
        spec: The ModelSpec it was built from.
    """

    def __init__(self, hf: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.hf = hf
        self.spec = spec
        # a sequence classifier (BERT) takes class labels (B,) where a causal LM takes (B, T)
        self.sequence_classifier = getattr(arch.profile_of(spec), "sequence_classifier", False)

    def _base(self) -> nn.Module:
        model = self.hf
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _body(self) -> nn.Module:
        base = self._base()
        return getattr(base, arch.profile_of(self.spec).body)

    def input_embedding(self) -> nn.Embedding:
        """The token embedding module."""
        return self._base().get_input_embeddings()

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings (B, T, H)."""
        return self.input_embedding()(input_ids)

    def hidden_states(self, input_ids: Tensor | None = None,
                      inputs_embeds: Tensor | None = None) -> Tensor:
        """The final-norm output (B, T, H) of the transformer body."""
        out = self._body()(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: Tensor | None = None, labels: Tensor | None = None,
                inputs_embeds: Tensor | None = None, return_logits: bool = False) -> Any:
        """The loss when labels are given (Hugging Face shifts them), else the logits.
        ``return_logits``: ``(loss, outputs)``, the model's whole output (its logits) kept."""
        out = self.hf(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels,
                      use_cache=False)
        if labels is None:
            return out.logits
        return (out.loss, out) if return_logits else out.loss


def build_hf_model(spec: ModelSpec, device: str | torch.device | None = None,
                   attention: str | None = None, checkpointing: bool = False) -> HFCausalLM:
    """Build the transformers model of ``spec`` from its config, in fp32, in training mode.

    Under an active ``FakeTensorMode`` the parameters are fake tensors. ``attention`` None:
    the family's first kernel (sdpa, or eager for a family without sdpa such as Gemma 2).
    """
    attention = attention or arch.profile_of(spec).attentions[0]
    if getattr(arch.profile_of(spec), "grouped_mm_fake", False):  # MoE experts under fakes
        from memplan.nn.moe_kernels import register_fake_grouped_mm

        register_fake_grouped_mm()
    transformers = _transformers()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    config = transformers.AutoConfig.for_model(**(tokens | hf_config(spec)))
    config.use_cache = False
    config._attn_implementation = attention
    with torch.device(device or "cpu"):
        auto = getattr(transformers, arch.profile_of(spec).hf_auto_class)
        model = auto.from_config(config, torch_dtype=torch.float32, attn_implementation=attention)
    if checkpointing:  # transformers 5 renamed gradient checkpointing to activation checkpointing
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return HFCausalLM(model, spec)


def apply_peft_lora(model: HFCausalLM, lora: LoraSpec, adapter_fp32: bool = True) -> list[str]:
    """Wrap ``model.hf`` with PEFT's LoRA on the planner's targets; returns the wrapped names.

    PEFT matches module names by suffix, so the targets are the planner's dotted names
    inside a block (``attn.c_proj`` is attention's, not the MLP's). Adapters are kept in fp32
    on a bf16 base, as PEFT's ``autocast_adapter_dtype`` does.
    """
    try:
        import peft
    except ImportError:
        raise MemplanError("--lora-backend peft needs PEFT: pip install 'memplan[hf]'") from None
    layers = check_rank(model.spec, lora)
    names = sorted({layer.name for layer in layers})  # dotted: "attn.c_proj", not "c_proj"
    profile = arch.profile_of(model.spec)
    names += [layer.name for layer in profile.root_lora_linears(model.spec, lora)]
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                             target_modules=profile.peft_targets(names),
                             lora_dropout=0.0, bias="none",
                             fan_in_fan_out=arch.profile_of(model.spec).conv1d)
    # PEFT's own upcast (autocast_adapter_dtype) uses Module.to, which cannot swap the
    # parameters of FakeTensors; cast the adapters one tensor at a time instead.
    with _no_adapter_moves_under_fake_tensors():
        model.hf = peft.get_peft_model(model.hf, config, autocast_adapter_dtype=False)
    if adapter_fp32:
        from memplan.nn.regimes import cast_floating

        for module in model.hf.modules():
            for name in ("lora_A", "lora_B"):
                if isinstance(getattr(module, name, None), nn.ModuleDict):
                    cast_floating(getattr(module, name), torch.float32)
    if lora.train_embeddings:
        base = model._base()
        for module in (base.get_input_embeddings(), base.get_output_embeddings()):
            for p in module.parameters():
                p.requires_grad_(True)
    return [n for n, m in model.hf.named_modules() if hasattr(m, "lora_A") and
            any(n.endswith(t) for t in names)]


@contextlib.contextmanager
def _no_adapter_moves_under_fake_tensors() -> Iterator[None]:
    """Under FakeTensorMode, make ``Module.to`` a no-op for modules already on the target
    device and dtype while PEFT wraps the model: PEFT moves each new adapter to its base
    layer's device, and ``Module.to`` cannot swap FakeTensor parameters even when nothing
    changes. Real tensors are left to PEFT."""
    from torch._guards import detect_fake_mode

    original = nn.Module.to
    if detect_fake_mode() is None:
        yield
        return

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        if all((device is None or t.device.type == torch.device(device).type)
               and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
               for t in tensors):
            return self
        return original(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original
