"""Per-family settings for :class:`ddiff.pipelines.BlockDiffusionPipeline`.

Each preset records what a family's own decoding code hard-wires: the mask and EOS token ids,
whether logits are shifted by one position, the attention pattern, the form of attention mask
its modeling code accepts, whether the checkpoint needs ``trust_remote_code``, and the loader
class, and the scheduler settings that are part of the family's decoder rather than a tuning
choice: the token-count schedule (``"dream"`` for Dream's ``1 − s/t``, ``"llada"`` for the
others) and the distribution its confidence is measured under. ``recommended`` holds the
family's usual ``__call__`` arguments (a starting point, not defaults: the pipeline's own
defaults stay in ``__call__``).

Sources (the families' public reference code):

* LLaDA (``GSAI-ML/LLaDA-8B-*``): ``ML-GSAI/LLaDA`` ``generate.py``: ``mask_id=126336``;
  ``logits_eos_inf`` / ``confidence_eos_eot_inf`` name ``126081`` (``<|endoftext|>``) and
  ``126348`` (``<|eot_id|>``). Bidirectional, whole-sequence forward, 2-D padding mask,
  ``AutoModel`` with remote code.
* Dream (``Dream-org/Dream-v0-*-7B``): ``generation_utils.py``: ``mask_token_id`` 151666,
  logits shifted right by one (``torch.cat([logits[:, :1], logits[:, :-1]], 1)``), a 4-D bool
  mask when prompts are padded; EOS / pad ``<|endoftext|>`` 151643, ``<|im_end|>`` 151645.
  Confidence is measured under the sampling distribution (``confidence_from="sampling"``); the
  number of masks a step commits is ``int(m · (1 − s/t))`` on ``linspace(1, 1e-3, steps + 1)``
  (``schedule="dream"``). Dream decodes the whole answer as one block.
* SDAR (``JetLM/SDAR-*-Chat``): ``JetAstra/SDAR`` ``generate.py``: block-causal attention
  with blocks aligned to absolute positions, ``low_confidence_dynamic`` with threshold 0.9 and
  ``block_length = denoising_steps = 4``; ``<|MASK|>`` 151669, ``<|endoftext|>`` 151643,
  ``<|im_end|>`` 151645. Newer SDAR modeling files use their own cache class
  (``BlockdCache``), so the preset recomputes the committed prefix (``use_kv_cache=False``).
* LLaDA2 (``inclusionAI/LLaDA2.0-*``): ``modeling_llada2_moe.py`` ``generate``: block-causal
  additive 4-D mask, threshold 0.95 with a ``steps`` schedule, ``mask_id=156895``,
  ``eos_id=156892``; it recomputes the prefix every step (no cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PRESETS", "BlockDiffusionPreset", "get_preset"]


@dataclass(frozen=True)
class BlockDiffusionPreset:
    name: str
    mask_token_id: int
    eos_token_id: tuple[int, ...]
    logits_shift: bool
    attention: str
    attention_mask_format: str
    use_kv_cache: bool
    trust_remote_code: bool
    model_class: str
    recommended: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    schedule: str = "llada"
    confidence_from: str = "raw"

    def scheduler(self):
        """The family's :class:`~ddiff.pipelines.block_diffusion_scheduler.BlockDiffusionScheduler`."""
        from ddiff.pipelines.block_diffusion_scheduler import BlockDiffusionScheduler

        return BlockDiffusionScheduler(schedule=self.schedule, confidence_from=self.confidence_from,
                                       mask_token_id=self.mask_token_id)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``BlockDiffusionPipeline(model, tokenizer, **kwargs)``."""
        return {
            "scheduler": self.scheduler(),
            "mask_token_id": self.mask_token_id,
            "attention": self.attention,
            "eos_token_id": self.eos_token_id,
            "logits_shift": self.logits_shift,
            "attention_mask_format": self.attention_mask_format,
            "use_kv_cache": self.use_kv_cache,
        }


PRESETS: dict[str, BlockDiffusionPreset] = {
    "llada": BlockDiffusionPreset(
        name="llada",
        mask_token_id=126336,
        eos_token_id=(126081, 126348),
        logits_shift=False,
        attention="bidirectional",
        attention_mask_format="2d",
        use_kv_cache=False,
        trust_remote_code=True,
        model_class="AutoModel",
        recommended={"block_length": 32, "steps_per_block": 32, "remasking": "low_confidence"},
        source="github.com/ML-GSAI/LLaDA generate.py",
    ),
    "dream": BlockDiffusionPreset(
        name="dream",
        schedule="dream",
        confidence_from="sampling",
        mask_token_id=151666,
        eos_token_id=(151643, 151645),
        logits_shift=True,
        attention="bidirectional",
        attention_mask_format="4d_bool",
        use_kv_cache=False,
        trust_remote_code=True,
        model_class="AutoModel",
        recommended={"remasking": "entropy", "temperature": 0.2, "top_p": 0.95, "max_new_tokens": 512,
                     "block_length": 512, "steps_per_block": 512},
        source="github.com/DreamLM/Dream generation_utils.py",
    ),
    "sdar": BlockDiffusionPreset(
        name="sdar",
        confidence_from="sampling",
        mask_token_id=151669,
        eos_token_id=(151643, 151645),
        logits_shift=False,
        attention="block_causal",
        attention_mask_format="4d_bool",
        use_kv_cache=False,
        trust_remote_code=True,
        model_class="AutoModelForCausalLM",
        recommended={"block_length": 4, "steps_per_block": 4, "threshold": 0.9},
        source="github.com/JetAstra/SDAR generate.py; JetLM/SDAR-1.7B-Chat added_tokens.json",
    ),
    "llada2": BlockDiffusionPreset(
        name="llada2",
        confidence_from="sampling",
        mask_token_id=156895,
        eos_token_id=(156892,),
        logits_shift=False,
        attention="block_causal",
        attention_mask_format="4d",
        use_kv_cache=False,
        trust_remote_code=True,
        model_class="AutoModelForCausalLM",
        recommended={"block_length": 32, "steps_per_block": 32, "threshold": 0.95},
        source="huggingface.co/inclusionAI/LLaDA2.0-mini modeling_llada2_moe.py generate()",
    ),
}


def get_preset(name: str) -> BlockDiffusionPreset:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]
