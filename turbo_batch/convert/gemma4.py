"""How a Gemma 4 checkpoint names its tensors, as far as `turbo-batch convert` cares. Imports no torch.

Owns: the module groups the recipe can quantize (`GROUPS`), which q/k/v and gate/up shards vLLM fuses
(`FUSED`), the regexes that find decoder linears (`LINEAR_RE`) and vision/audio encoder tensors
(`ENCODER_RE`), and the rename of a multimodal checkpoint's text stack to text-only Gemma4ForCausalLM names
(`rename`).
Must not touch: files, tensors, quantization configs (modelopt.py), the conversion itself (recipe.py).
"""

from __future__ import annotations

import re

GROUPS: dict[str, tuple[str, ...]] = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
# projection -> the shards vLLM fuses it with (qkv_proj, gate_up_proj); they must share one global scale
FUSED = {
    "q": ("q", "k", "v"),
    "k": ("q", "k", "v"),
    "v": ("q", "k", "v"),
    "gate": ("gate", "up"),
    "up": ("gate", "up"),
}
LINEAR_RE = re.compile(
    r"^(?P<layer>(?:.*\.)?layers\.(?P<idx>\d+))\.(?P<block>self_attn|mlp)\.(?P<proj>q|k|v|o|gate|up|down)_proj$"
)
ENCODER_RE = re.compile(
    r"(^|\.)(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector|vision_model|audio_model)(\.|\*|$)"
)
# Checkpoint prefixes of the text stack in multimodal checkpoints -> text-only (Gemma4ForCausalLM) names.
TEXT_RENAMES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


def rename(name: str, strip: bool) -> str:
    """The text-only name of a tensor or module when the encoders are stripped; unchanged otherwise."""
    if strip:
        for old, new in TEXT_RENAMES:
            if name.startswith(old):
                return new + name[len(old) :]
    return name
