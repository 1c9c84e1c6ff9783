"""fastgemma: exact, fast logit-softcapped attention for fine-tuning Gemma 2."""

from . import versions  # noqa: F401  (first: checks the torch / transformers versions, see versions.py)
from .api import cuda_graph_lengths, is_patched, memory_plan, patch_model, unpatch_model
from .attention import softcap_attention
from .masks import AttentionMask, BlockMaskCache
from .options import PatchOptions
from .self_check import UntestedVersionError
from .trainer import lean_trainer

__version__ = "0.1.0"

__all__ = ["patch_model", "PatchOptions", "unpatch_model", "is_patched", "cuda_graph_lengths", "memory_plan", "softcap_attention",
           "AttentionMask", "BlockMaskCache", "lean_trainer", "UntestedVersionError"]
