"""What a causal LM's output layer consumes, instead of its logits (``method.fused_lm_head``).

With the fused lm-head path the LM objective is computed from the final hidden states and the output
layer's weight and bias (:meth:`locakd.losses.objectives.LMObjective.fused`), so the ``[tokens, V]``
logits are never built. :class:`HeadTap` takes the hidden states *inside* the model's own forward: a
forward pre-hook on the output layer (``get_output_embeddings()``) records the layer's input -- exactly
what the head consumes, after the final norm and any scaling of the hidden states -- with the layer's
weight and bias at that moment, and hands the layer an empty slice of the positions, so the head
computes a ``[B, 0, V]`` result. The forward therefore runs through whatever wraps the model: DDP's
hooks keep synchronising gradients, FSDP has gathered the parameters, peft's adapters run. The head
weight receives its gradient from the fused loss through the same parameter (tied embeddings included:
autograd adds the embedding's and the head's share, and DDP's reducer sees one gradient).

This is exact only for models whose logits *are* ``hidden @ W.T + b``. :func:`check_fused_head` refuses
the others with a :class:`~locakd.errors.ConfigError` naming the setting, before any training:

* an output layer that is not a plain ``torch.nn.Linear`` (a LoRA adapter on the head, a quantised or
  custom layer); peft's ``modules_to_save`` copy of the head (a trainable head under LoRA) is fine;
* a config that post-processes the logits (:data:`LOGIT_POST_PROCESSING`: Gemma's
  ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling`` ...);
* any other change between the head's output and the logits the model returns: a probe forward on a
  few tokens replaces the head's output by a marker ramp of large values (so soft-capping, scaling,
  cropping or a second head call all show) and the model must return it unchanged.

At every forward :class:`HeadTap` checks again that the layer was called exactly once, on every
position, and that its weight is still materialised (DeepSpeed ZeRO-3 partitions it: refused). An
FSDP-sharded teacher frees its gathered weights when its forward ends (no backward follows), so its tap
keeps a float32 copy of the head taken in the hook: the copy the fused loss would make of a bf16 / fp16
head anyway, ``V x H`` floats.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..losses.objectives import HeadInputs

__all__ = ["FUSED_SETTING", "LOGIT_POST_PROCESSING", "HeadTap", "check_fused_head", "is_sharded", "output_layers"]

FUSED_SETTING = "method.fused_lm_head (DistillationArguments.fused_lm_head)"
"""How errors name the setting: the YAML key of both engines and the Trainer argument."""

# config attribute -> value that leaves the logits unchanged (None: only an unset / None value does)
LOGIT_POST_PROCESSING: dict[str, float | None] = {
    "final_logit_softcapping": None,  # Gemma 2/3, PaliGemma, VaultGemma, nanochat: cap * tanh(logits / cap)
    "logits_soft_cap": None,  # RecurrentGemma
    "logit_softcapping": None,
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "output_multiplier": 1.0,  # logits * multiplier before a soft cap
}


def _is_plain_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _owner(model: nn.Module) -> nn.Module:
    """The object that answers ``get_output_embeddings`` (through DDP / DeepSpeed wrappers' ``.module``)."""
    owner = model
    while not hasattr(owner, "get_output_embeddings") and isinstance(getattr(owner, "module", None), nn.Module):
        owner = owner.module
    return owner


def output_layers(model: nn.Module, what: str) -> tuple[nn.Module, list[nn.Linear]]:
    """``(head, layers)``: the module the model calls as its output layer and the ``nn.Linear`` layers that
    may compute the logits when it is called (the head itself, or the copies inside peft's
    ``modules_to_save`` wrapper). ConfigError for any other kind of output layer."""
    get = getattr(_owner(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ConfigError(f"{FUSED_SETTING} needs the {what}'s output layer, but {type(model).__name__} has none "
                          "(get_output_embeddings() is missing or None); set it to false")
    if _is_plain_linear(head):
        return head, [head]
    original, copies = getattr(head, "original_module", None), getattr(head, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):  # peft's ModulesToSaveWrapper: a trainable copy of the head per adapter
        layers = [original, *copies.values()]
        if all(_is_plain_linear(layer) for layer in layers):
            return head, layers
    kind = f"{type(head).__module__}.{type(head).__qualname__}"
    raise ConfigError(
        f"{FUSED_SETTING} computes the logits as hidden @ weight.T + bias, which needs a plain torch.nn.Linear "
        f"output layer; the {what}'s is {kind} (a LoRA adapter on the head, a quantised or custom layer?). "
        "Leave the head out of the adapters (peft modules_to_save is fine) or set it to false"
    )


def _post_processing(model: nn.Module) -> list[str]:
    """Config attributes (of the model's config or its text config) that change the logits after the head."""
    config = getattr(_owner(model), "config", None)
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        text = get_text()
        if text is not None and text is not config:
            configs.append(text)
    found = []
    for cfg in configs:
        for name, neutral in LOGIT_POST_PROCESSING.items():
            value = getattr(cfg, name, None)
            if value is not None and value is not False and value != neutral:
                found.append(f"{name}={value}")
    return found


class HeadTap:
    """Within ``with HeadTap(model, "student") as tap:``, one forward of ``model`` records what its output
    layer consumes (:attr:`inputs`, a :class:`~locakd.losses.objectives.HeadInputs`) and computes no logits.

    ``model`` may be wrapped (DDP, FSDP, a :class:`~locakd.teachers.FrozenTeacher`, a peft model): call the
    wrapper, the tap sits on the inner output layer. The hook is removed on leaving the block, so
    generation and plain forwards outside it are untouched. ``copy_weights`` (for a model without gradient
    whose parameters are resharded after its forward, see :func:`is_sharded`) keeps float32 copies of the
    weight and bias instead of the layer's own tensors.
    """

    def __init__(self, model: nn.Module, what: str, *, copy_weights: bool = False) -> None:
        self.what = what
        self.copy_weights = copy_weights  # keep a float32 copy of the head (a sharded model frees the gathered one)
        self.head, self.layers = output_layers(model, what)
        self._captured: HeadInputs | None = None
        self._calls = 0
        self._handles: list[Any] = []

    def __enter__(self) -> HeadTap:
        self._captured, self._calls = None, 0
        self._handles = [layer.register_forward_pre_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: nn.Linear, args: tuple[Any, ...]) -> tuple[Any, ...]:
        self._calls += 1
        hidden = args[0]
        # the weight and bias as they are now: FSDP has gathered them for this forward
        weight, bias = layer.weight, layer.bias
        if self.copy_weights:
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            weight = weight.detach().to(dtype, copy=True)
            bias = None if bias is None else bias.detach().to(dtype, copy=True)
        self._captured = HeadInputs(hidden, weight, bias)
        return (hidden[..., :0, :], *args[1:])

    def inputs(self, input_ids: torch.Tensor) -> HeadInputs:
        """What the output layer received in the forward on ``input_ids`` ``[B, L]`` (checked)."""
        captured = self._captured
        if captured is None or self._calls != 1:
            raise ConfigError(f"{FUSED_SETTING}: the {self.what}'s forward called its output layer {self._calls} "
                              "times (expected once, on every position); this model cannot use the fused path, "
                              "set it to false")
        hidden, weight = captured.hidden, captured.weight
        if tuple(hidden.shape[:-1]) != tuple(input_ids.shape):
            raise ConfigError(f"{FUSED_SETTING}: the {self.what}'s output layer received hidden states of shape "
                              f"{tuple(hidden.shape)} for input_ids {tuple(input_ids.shape)}; the fused path needs "
                              "the layer applied to every position; set it to false")
        if weight.dim() != 2 or weight.numel() == 0 or weight.untyped_storage().nbytes() == 0 \
                or weight.shape[1] != hidden.shape[-1]:
            raise ConfigError(f"{FUSED_SETTING}: the {self.what}'s output-layer weight is not materialised after its "
                              f"forward (shape {tuple(weight.shape)}; partitioned by DeepSpeed ZeRO-3 or resharded by "
                              "FSDP?); the fused path needs the whole head weight; set it to false")
        return captured


def is_sharded(model: nn.Module) -> bool:
    """Is any part of ``model`` managed by FSDP (FSDP1 wrapper or FSDP2 ``fully_shard``)? Such a model without
    gradient frees its gathered parameters when its forward ends."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())


def _probe_input(model: nn.Module, vocab: int) -> dict[str, torch.Tensor]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = (torch.arange(4, device=device) % vocab).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def _logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def check_fused_head(model: nn.Module, what: str) -> None:
    """Refuse (ConfigError naming ``method.fused_lm_head``) a model whose logits are not ``hidden @ W.T + b``.

    Checks the kind of output layer (:func:`output_layers`), the config's logit post-processing
    (:data:`LOGIT_POST_PROCESSING`) and, with a probe forward on 4 tokens (eval mode, no gradient, the
    RNG state restored), that the model returns its output layer's result unchanged and that a
    :class:`HeadTap` sees one call on every position. Run it on the plain model, before it is wrapped
    or sharded.
    """
    head, _ = output_layers(model, what)
    found = _post_processing(model)
    if found:
        raise ConfigError(f"{FUSED_SETTING}: the {what} ({type(_owner(model)).__name__}) post-processes its logits "
                          f"({', '.join(found)}), so they are not hidden @ weight.T + bias and the fused loss would be "
                          "wrong; set it to false for this model")
    weight = getattr(head, "weight", None)
    if weight is None:  # peft wrapper: the copies hold the weight
        weight = output_layers(model, what)[1][0].weight
    vocab = int(weight.shape[0])
    inputs = _probe_input(model, vocab)
    calls: list[torch.Tensor] = []

    def replace_output(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        # a ramp of large values per position: soft-capping, scaling or cropping cannot leave it unchanged
        ramp = torch.linspace(-60.0, 60.0, output.shape[-1], device=output.device)
        positions = torch.arange(output.shape[-2], device=output.device, dtype=ramp.dtype).unsqueeze(-1)
        marker = (ramp + positions).expand(output.shape).to(output.dtype)
        calls.append(marker)
        return marker

    was_training = model.training
    devices = [inputs["input_ids"].device] if inputs["input_ids"].device.type == "cuda" else []
    handle = head.register_forward_hook(replace_output)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            logits = _logits_of(model(**inputs))
            handle.remove()
            with HeadTap(model, what) as tap:
                model(**inputs)
            tap.inputs(inputs["input_ids"])
    finally:
        handle.remove()
        model.train(was_training)
    if len(calls) != 1 or tuple(logits.shape) != tuple(calls[0].shape) \
            or not torch.equal(logits.to(calls[0].dtype), calls[0]):
        raise ConfigError(f"{FUSED_SETTING}: the {what} ({type(_owner(model)).__name__}) does not return its output "
                          "layer's result unchanged as its logits (soft-capping, scaling, cropping or another head?), "
                          "so the fused loss would be wrong; set it to false for this model")
