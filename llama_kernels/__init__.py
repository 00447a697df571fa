"""llama-kernels: fused Triton kernels for Llama-family models, centred on Code Llama.

    import llama_kernels as lk
    y = lk.rms_norm(x, weight)                       # RMSNorm
    y, h = lk.rms_norm(x, weight, residual=r)        # h = x + r, y = RMSNorm(h), one kernel
    q, k = lk.apply_rope(q, k, theta=1e6)            # RoPE on q and k, one kernel
    inv_freq = lk.rope_inv_freq(128, theta=1e6, scaling={"rope_type": "linear", "factor": 4.0})
    o = lk.flash_attention(q, k, v, causal=True)     # (B, S, H, D), GQA, O(N) memory
    y = lk.swiglu(gate, up)                          # silu(gate) * up, one kernel
    loss = lk.fused_linear_cross_entropy(h, lm_head.weight, labels)  # the loss without the logits
    model = lk.CodeLlama.from_pretrained(path)       # Code Llama on these kernels (Meta's or HF's checkpoint)
    lk.patch_hf_llama()                              # or: transformers' Llama on these kernels

Each function is a torch.library op (torch.compile traces it) with autograd.
CUDA tensors run the Triton kernels; CPU tensors run the extension's C++ kernels
(``llama_kernels._C``, built by ``pip install --no-build-isolation .``), or
``llama_kernels.reference`` where it is not built (said once), or the Triton kernels
through Triton's interpreter under ``TRITON_INTERPRET=1``. ``backend=`` forces one.
"""

from . import reference
from .ops.attention import flash_attention, flash_attention_varlen
from .ops.cross_entropy import fused_linear_cross_entropy
from .ops.decode import flash_attention_with_kvcache
from .ops.rms_norm import rms_norm
from .ops.rope import apply_rope
from .ops.swiglu import swiglu
from .rope_scaling import rope_attention_factor, rope_inv_freq
from .models import CodeLlama, CodeLlamaConfig, patch_hf_llama, unpatch_hf_llama  # last: they use the ops above

__version__ = "0.1.0"

__all__ = ["rms_norm", "apply_rope", "flash_attention", "flash_attention_varlen",
           "flash_attention_with_kvcache", "swiglu", "fused_linear_cross_entropy", "rope_inv_freq",
           "rope_attention_factor", "reference", "CodeLlama", "CodeLlamaConfig", "patch_hf_llama",
           "unpatch_hf_llama", "__version__"]
