"""Hugging Face ``transformers`` Llama on this package's kernels: ``patch_hf_llama`` and ``unpatch_hf_llama``.

    model = LlamaForCausalLM.from_pretrained("codellama/CodeLlama-7b-hf", torch_dtype=torch.bfloat16)
    lk.patch_hf_llama(model)    # patches the classes, switches this model to attn_implementation="llama_kernels"
    lk.patch_hf_llama(model, cross_entropy=False)  # per-op switches, as Liger's apply_liger_kernel_to_llama
    other = LlamaForCausalLM.from_pretrained(..., attn_implementation="llama_kernels")  # once patched
    lk.unpatch_hf_llama()       # every original back

Supported: transformers 4.50 to 5.x. Classes and functions of
``transformers.models.llama.modeling_llama`` are patched, not instances, so a model
built before the call and one built after both run the kernels. Each piece has its switch
(``rms_norm``, ``rope``, ``attention``, ``swiglu``, ``cross_entropy``; all on by default), and a
piece switched off is left as transformers has it:

- ``rms_norm``: ``LlamaRMSNorm.forward`` runs ``rms_norm``, and ``LlamaDecoderLayer.forward`` the same layer with the residual add before
  ``post_attention_layernorm`` fused into that norm (``rms_norm(attn_out, w, eps,
  residual=h)`` writes the sum and its norm in one kernel). Its arguments are bound
  to the installed forward's signature and passed on to the attention module as the
  original passes them, and it returns what the installed version returns: a tuple
  ``(hidden_states,)`` or ``(hidden_states, attn_weights)`` where the forward takes
  ``output_attentions`` (4.53 and before), else the tensor. The fusion reads the norm's
  weight directly, so a norm that is not a plain ``LlamaRMSNorm`` or has hooks
  (accelerate's offloading wraps forward) is called as the original calls it.
- ``rope``: ``LlamaRotaryEmbedding.forward`` still returns HF's cos/sin tables (anything
  else that reads them is unaffected) and tags the cos tensor with what it was
  computed from: the position ids, the module's ``inv_freq`` as it stands after the
  call (dynamic and longrope recompute it per call), and ``attention_scaling``. The
  patched ``apply_rotary_pos_emb`` finds the tag and rotates q and k in one
  ``apply_rope`` launch from those integers: the same fp32 angles
  fl32(position) * inv_freq as HF's tables, so every rope type (default, linear,
  llama3, yarn, dynamic, longrope) is exact. An untagged table (another caller's)
  takes HF's formula; torch.compile (fullgraph too) traces the tag. The attention
  module is not patched for this: it never sees the rotary module (that lives on
  ``LlamaModel``) and its body differs between versions.
- ``attention``: ``"llama_kernels"`` is registered with transformers' attention
  interface, and (4.53+) its mask interface, so ``attn_implementation="llama_kernels"``
  runs ``flash_attention(q, k, v, causal=True)`` on k and v as the cache returns them
  (GQA heads not repeated; causal is bottom-right aligned, which is right when
  decoding with a KV cache: Sq < Sk). The mask function returns None for a plain
  causal mask and sdpa's boolean mask otherwise (left padding in batched generation,
  static caches, packed sequences); before 4.53 the model always builds a 4D
  additive mask itself. A mask that is exactly the bottom-right causal pattern still
  runs the kernel (one host sync per layer to check it; not under torch.compile);
  any other mask, dropout in training, and head dims other than 64 and 128 go to
  transformers' ``sdpa_attention_forward`` with the mask, never ignoring padding. So does
  every call where the model's choice (``attention="auto"``, the default, or ``"sdpa"``;
  ``ops.attention_choice``) picks SDPA for the card and phase: decoding (fewer queries than
  keys), training (gradients recorded: the backward's entry), else the forward.
- ``swiglu``: ``LlamaMLP.forward`` runs ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` where
  the activation is SiLU (``hidden_act`` "silu"), the original otherwise.
- ``cross_entropy``: ``LlamaForCausalLM.forward`` in training mode with ``labels`` computes
  HF's loss (labels shifted by one, -100 ignored; ``shift_labels`` if given; the sum over
  ``num_items_in_batch`` where the Trainer passes it for gradient accumulation, else the mean)
  by ``fused_linear_cross_entropy`` on the last hidden states and ``lm_head``: the logits are
  never built and come back as None (as Liger's). The model itself runs with the arguments the
  original would give it. Eval mode, calls without labels, a ``logits_to_keep`` other than 0
  and an ``lm_head`` that is not a plain ``nn.Linear`` run the original.

Dtypes the kernels do not take (float64): each patched piece runs transformers' own code
for them (attention: ``sdpa_attention_forward``), said once per dtype by a warning.
Autocast: the loss casts ``lm_head``'s operands to autocast's dtype, as the Linear's would be; ``rms_norm`` promotes a bf16 sublayer output and an fp32
residual stream as the unpatched add does, and RoPE and attention see the projections' dtype.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

from .._checks import FLOAT_DTYPES
from ..ops._shared import HEAD_DIMS
from ..ops.attention_choice import attention_for, check_choice, phase_of
from ..ops.attention import flash_attention
from ..ops.rms_norm import rms_norm
from ..ops.cross_entropy import fused_linear_cross_entropy
from ..ops.rope import apply_rope
from ..ops.swiglu import swiglu
from .code_llama import as_autocast

IMPLEMENTATION = "llama_kernels"
SUPPORTED = "transformers 4.50 to 5.x (>= 4.50, < 6)"
_ANGLES = "_llama_kernels_rope_angles"  # the tag the patched rotary embedding puts on its cos table
_CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "cache")  # the cache argument's names, oldest first
_MISSING = object()
_CHOICE = "_llama_kernels_attention"  # the attention choice patch_hf_llama puts on each attention module of a model
PIECES = ("rms_norm", "rope", "attention", "swiglu", "cross_entropy")  # patch_hf_llama's switches
IGNORE_INDEX = -100  # transformers' ForCausalLMLoss

_undo: list = []  # what patch_hf_llama changed, as callables that restore it, in order of change
_patched: set = set()  # the pieces patched
_warned: set = set()  # the dtypes already told to run transformers' own code


def patch_hf_llama(model=None, *, rms_norm: bool = True, rope: bool = True, attention: bool | str = True,
                   swiglu: bool = True, cross_entropy: bool = True):
    """Run transformers' Llama classes on the kernels, the pieces switched on; if ``model`` is given and
    ``attention`` is on, switch its attention to them.

    attention: True or "auto" (ours, or transformers' sdpa_attention_forward for a phase where the card's
    measurements say SDPA beats ours: ``ops.attention_choice``, said once by a warning), "llama_kernels" (ours
    always), "sdpa" (transformers' sdpa always), False (transformers' attention left as it is). The choice is
    ``model``'s; a model switched later by ``attn_implementation="llama_kernels"`` gets "auto".

    Idempotent: a second call patches only the pieces not patched yet (it never unpatches one: that is
    ``unpatch_hf_llama``'s), and still switches ``model``.
    Returns ``model``. Raises RuntimeError on a transformers version outside 4.50 to 5.x, and TypeError
    (patching nothing) for a ``model`` that is not a transformers Llama model or a switch that is not a bool.
    """
    choice = check_choice("attention", attention, also=(True, False))
    choice = "auto" if choice is True else choice
    switches = dict(rms_norm=rms_norm, rope=rope, attention=attention is not False, swiglu=swiglu,
                    cross_entropy=cross_entropy)
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    modules = _import_transformers()
    llama_model = modules[0].LlamaPreTrainedModel
    if model is not None and not isinstance(model, llama_model):
        raise TypeError(f"model: expected a transformers Llama model (a {llama_model.__name__}, e.g. "
                        f"LlamaForCausalLM) or None, got {type(model).__name__}")
    _patch(*modules, pieces=[piece for piece in PIECES if switches[piece] and piece not in _patched])
    if model is not None and switches["attention"]:
        _set_undoably(model.config, "_attn_implementation_internal", IMPLEMENTATION)
        for module in model.modules():
            if isinstance(module, modules[0].LlamaAttention):
                _set_undoably(module, _CHOICE, choice)
    return model


def _set_undoably(owner, name: str, value) -> None:
    previous = getattr(owner, name, _MISSING)
    setattr(owner, name, value)
    _undo.append(lambda: delattr(owner, name) if previous is _MISSING else setattr(owner, name, previous))


def unpatch_hf_llama() -> None:
    """Restore every class method, function and registry entry patch_hf_llama replaced, and the
    attention implementation of the models it switched."""
    while _undo:
        _undo.pop()()
    _patched.clear()


def _import_transformers():
    """The modules to patch, after checking the installed version."""
    import transformers
    from packaging.version import Version

    version = transformers.__version__
    if not (4, 50) <= Version(version).release[:2] < (6, 0):
        raise RuntimeError(f"patch_hf_llama supports {SUPPORTED}; transformers {version} is installed")
    try:
        from transformers import modeling_utils
        from transformers.models.llama import modeling_llama

        for owner, name in ((modeling_llama.LlamaRMSNorm, "forward"), (modeling_llama.LlamaDecoderLayer, "forward"),
                            (modeling_llama.LlamaRotaryEmbedding, "forward"), (modeling_llama, "apply_rotary_pos_emb"),
                            (modeling_utils, "ALL_ATTENTION_FUNCTIONS"), (modeling_llama.LlamaMLP, "forward"),
                            (modeling_llama.LlamaForCausalLM, "forward")):
            if name not in vars(owner):
                raise AttributeError(f"{owner.__name__}.{name}")
    except (ImportError, AttributeError) as error:
        raise RuntimeError(f"patch_hf_llama supports {SUPPORTED}, but transformers {version} lacks {error}") from error
    try:
        from transformers import masking_utils  # 4.53+: the models ask it for the mask
    except ImportError:
        masking_utils = None
    return modeling_llama, modeling_utils, masking_utils


def _patch(modeling_llama, modeling_utils, masking_utils, pieces: list[str]) -> None:
    def replace(owner, name, make):
        original = vars(owner)[name]
        setattr(owner, name, make(original))
        _undo.append(lambda: setattr(owner, name, original))

    def register(mapping, function):
        previous = mapping.get(IMPLEMENTATION, _MISSING)
        mapping[IMPLEMENTATION] = function

        def restore():
            if previous is _MISSING:
                del mapping[IMPLEMENTATION]
            else:
                mapping[IMPLEMENTATION] = previous

        _undo.append(restore)

    if "rms_norm" in pieces:
        replace(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_forward)
        replace(modeling_llama.LlamaDecoderLayer, "forward",
                functools.partial(_decoder_forward, norm_class=modeling_llama.LlamaRMSNorm))
        # transformers 5 wraps a GradientCheckpointingLayer's forward in its checkpointing when the class is made
        # (__init_subclass__): a forward set later runs unwrapped, and checkpointing silently stops, unless the
        # class's hook wraps it again (before 5, checkpointing lived in __call__ and the hook is object's, a no-op)
        modeling_llama.LlamaDecoderLayer.__init_subclass__()
    if "rope" in pieces:
        replace(modeling_llama.LlamaRotaryEmbedding, "forward", _rotary_forward)
        replace(modeling_llama, "apply_rotary_pos_emb", _apply_rotary_pos_emb)
    if "attention" in pieces:
        # 4.50: a dict. Later, AttentionInterface / AttentionMaskInterface objects whose class-wide mapping
        # (what their register() writes, and what the models read) has no unregister.
        attention = modeling_utils.ALL_ATTENTION_FUNCTIONS
        register(getattr(attention, "_global_mapping", attention), _attention)
        if masking_utils is not None:
            register(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, _mask)
    if "swiglu" in pieces:
        replace(modeling_llama.LlamaMLP, "forward", _mlp_forward)
    if "cross_entropy" in pieces:
        replace(modeling_llama.LlamaForCausalLM, "forward", _causal_lm_forward)
    _patched.update(pieces)


# --------------------------------------------------------------------------- replacements
def _rms_norm_forward(original):
    @functools.wraps(original)
    def forward(self, hidden_states):
        if not _kernels_take("LlamaRMSNorm", hidden_states, self.weight):
            return original(self, hidden_states)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    return forward


def _binder(original, skip: int):
    """``bind(args, kwargs)``: a call's arguments by name as ``original`` takes them, its first ``skip``
    parameters (self, ...) left out, the others' defaults filled in, an older name of the cache argument
    renamed (as the originals' deprecate_kwarg decorators do). By hand, not by Signature.bind: torch.compile
    traces it (fullgraph too)."""
    parameters = inspect.signature(original).parameters  # the undecorated forward's: inspect follows __wrapped__
    names = [name for name, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD][skip:]
    defaults = {name: parameters[name].default for name in names
                if parameters[name].default is not inspect.Parameter.empty}
    cache_argument = next(name for name in _CACHE_ARGUMENTS if name in parameters)

    def bind(args: tuple, kwargs: dict) -> dict:
        if len(args) > len(names):
            raise TypeError(f"forward() takes {len(names) + skip} positional arguments but {len(args) + skip} "
                            f"were given")
        kwargs = {cache_argument if name in _CACHE_ARGUMENTS else name: value for name, value in kwargs.items()}
        return {**defaults, **dict(zip(names, args)), **kwargs}

    return bind


def _decoder_forward(original, norm_class):
    # (self, hidden_states, the named arguments passed on to the attention module, **kwargs)
    bind = _binder(original, skip=2)
    returns_tuple = "output_attentions" in inspect.signature(original).parameters

    @functools.wraps(original)
    def forward(self, hidden_states, *args, **kwargs):
        arguments = bind(args, kwargs)
        residual = hidden_states
        attn_output, attn_weights = self.self_attn(hidden_states=self.input_layernorm(residual), **arguments)

        # The fused add reads the norm's weight, bypassing its forward: only for a plain LlamaRMSNorm (accelerate's
        # offloading hooks replace forward on the instance).
        norm = self.post_attention_layernorm
        plain = type(norm) is norm_class and "forward" not in vars(norm)
        if (plain and not (norm._forward_hooks or norm._forward_pre_hooks)
                and _kernels_take("LlamaDecoderLayer's fused add and norm", attn_output, residual, norm.weight)):
            normed, hidden_states = rms_norm(attn_output, norm.weight, norm.variance_epsilon, residual=residual)
        else:
            hidden_states = residual + attn_output
            normed = norm(hidden_states)
        hidden_states = hidden_states + self.mlp(normed)

        if not returns_tuple:
            return hidden_states
        return (hidden_states, attn_weights) if arguments["output_attentions"] else (hidden_states,)

    return forward


def _mlp_forward(original):
    @functools.wraps(original)
    def forward(self, x):
        if self.config.hidden_act != "silu" or not _kernels_take("LlamaMLP", x):
            return original(self, x)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    return forward


def _causal_lm_forward(original):
    bind = _binder(original, skip=1)
    parameters = inspect.signature(original).parameters
    keep_argument = "logits_to_keep" if "logits_to_keep" in parameters else "num_logits_to_keep"  # 4.50's name

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = bind(args, kwargs)
        labels, keep = arguments.pop("labels", None), arguments.pop(keep_argument, 0)
        head = self.lm_head
        if (labels is None or not self.training or not (isinstance(keep, int) and keep == 0)
                or type(head) is not torch.nn.Linear or not _kernels_take("LlamaForCausalLM's loss", head.weight)):
            return original(self, *args, **kwargs)
        return_dict = arguments.pop("return_dict", None)
        outputs = self.model(**arguments)  # num_items_in_batch and shift_labels too, as the original passes them
        loss = _causal_lm_loss(outputs[0], head, labels, arguments.get("num_items_in_batch"),
                               arguments.get("shift_labels"))
        if isinstance(outputs, tuple):  # 4.50 with return_dict=False
            return (loss, *outputs[1:])
        from transformers.modeling_outputs import CausalLMOutputWithPast

        result = CausalLMOutputWithPast(loss=loss, logits=None,
                                        **{name: value for name, value in outputs.items() if name != "last_hidden_state"})
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()

    return forward


def _causal_lm_loss(hidden, head, labels, num_items_in_batch, shift_labels):
    """transformers' ForCausalLMLoss through the fused op: each position predicts the next label."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden, weight, bias = as_autocast(hidden, head.weight, head.bias)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(hidden, weight, shift_labels.to(hidden.device), bias,
                                      ignore_index=IGNORE_INDEX, reduction=reduction)
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _rotary_forward(original):
    @functools.wraps(original)
    def forward(self, x, position_ids):
        cos, sin = original(self, x, position_ids)
        if not position_ids.is_floating_point():  # apply_rope takes integer positions
            setattr(cos, _ANGLES, (position_ids, self.inv_freq, self.attention_scaling))
        return cos, sin

    return forward


def _apply_rotary_pos_emb(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        angles = getattr(cos, _ANGLES, None)
        if (angles is None or args or kwargs  # not a table of ours, or not the (B, H, S, D) layout
                or not _kernels_take("apply_rotary_pos_emb", q, k)):
            return original(q, k, cos, sin, *args, **kwargs)
        position_ids, inv_freq, attention_scaling = angles
        positions = position_ids.to(q.device).expand(q.shape[0], q.shape[2])
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), positions,
                          inv_freq=inv_freq.to(q.device, torch.float32), attention_factor=attention_scaling)
        return q.transpose(1, 2), k.transpose(1, 2)

    return apply_rotary_pos_emb


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: q, k, v (B, H, S, D) in; (output (B, S, H, D), None) out. Decoding is a
    call with fewer queries than keys (the cache's keys before them)."""
    phase = phase_of(query.shape[2] < key.shape[2], query, key, value)
    # A mask is read on the host to see whether it is the causal one: a compiled graph cannot, it takes sdpa.
    if (attention_for(getattr(module, _CHOICE, "auto"), query.device, phase) == "sdpa"
            or dropout or query.shape[-1] not in HEAD_DIMS or not _kernels_take("attention", query, key, value)
            or (attention_mask is not None and (torch.compiler.is_compiling()
                                                or not _is_causal_mask(attention_mask, query.shape[2], key.shape[2])))):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        is_causal = True  # the mask is the bottom-right causal one
    elif is_causal is None:
        is_causal = getattr(module, "is_causal", True)  # as sdpa_attention_forward decides
    out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          causal=is_causal, softmax_scale=scaling)
    return out, None


def _kernels_take(piece: str, *tensors) -> bool:
    """Whether the kernels take every tensor's dtype; if not, this piece runs transformers' own code, which a
    warning says once per dtype (naming the piece that met it first)."""
    refused = next((t.dtype for t in tensors if t.dtype not in FLOAT_DTYPES), None)
    if refused is None:
        return True
    if refused not in _warned:
        _warned.add(refused)
        warnings.warn(f"patch_hf_llama: the kernels do not take {refused} (met first in {piece}); every patched "
                      f"piece (RMSNorm, the decoder layer's fused add and norm, RoPE, attention, SwiGLU, the loss) "
                      f"runs transformers' own code for it", stacklevel=3)
    return False


def _is_causal_mask(mask: torch.Tensor, q_len: int, k_len: int) -> bool:
    """Whether a 4D mask (boolean: True attends; additive: 0 attends) lets query i see exactly the keys
    j <= i + k_len - q_len, as flash_attention's causal=True does."""
    visible = mask[..., :k_len]  # 4.5x models may build it a key longer than the keys
    visible = visible if visible.dtype == torch.bool else visible == 0
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len)
    return visible.shape[-2:] == causal.shape and bool((visible == causal).all())


def _mask(**kwargs):
    """transformers' mask interface (4.53+): None where the mask is plain causal with the queries the last
    keys (q_len 1 or q_len == kv_len), else the boolean mask sdpa would get."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(**kwargs)
    q_len = kwargs["q_length"] if "q_length" in kwargs else kwargs["cache_position"].shape[0]  # 5.x / earlier
    if mask is None and q_len not in (1, kwargs["kv_length"]):
        # sdpa skips a mask that its top-left aligned is_causal gets right (a static cache's first chunk);
        # flash_attention's is bottom-right aligned.
        mask = sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})
    return mask
