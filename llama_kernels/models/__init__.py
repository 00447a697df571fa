"""Code Llama on the kernels (``CodeLlama``), its configs and checkpoints, generation, and the Hugging Face patch."""

from .code_llama import CodeLlama, KVCache
from .config import CodeLlamaConfig
from .generation import generate, infill
from .hf import patch_hf_llama, unpatch_hf_llama
from .paged_cache import PagedKVCache
from .tokenizer import CodeLlamaTokenizer

__all__ = ["CodeLlama", "CodeLlamaConfig", "CodeLlamaTokenizer", "KVCache", "PagedKVCache", "generate", "infill",
           "patch_hf_llama", "unpatch_hf_llama"]
