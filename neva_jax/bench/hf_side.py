"""The `transformers` (PyTorch) baseline: what a user would otherwise run.

`LlavaForConditionalGeneration` built from a config at a benchmark shape, random
weights (seeded), fp32, eval-mode dropout (all dropouts are 0 anyway), its default
attention (`sdpa`). Training: the vision tower frozen (`requires_grad_(False)`),
for stage 1 the language model AND the LM head frozen (in `transformers` 5 the
LM head sits outside `language_model`), loss from `labels`, global-norm clipping
1.0 and `torch.optim.AdamW` over the trainable parameters. Decoding: `generate`
greedy with its KV cache and no end-of-sequence id, so every call makes exactly
`max_new_tokens` tokens.

The same weights reach our side through the project's importer: `save(folder)`
writes safetensors that `neva_jax.convert.hf.import_llava` reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neva_jax.bench.shapes import BenchShape, hf_llava_config

LR = 2e-5
GRAD_CLIP = 1.0


class HFSide:
    """A `transformers` LLaVA model plus its optimizer for one training stage."""

    def __init__(self, shape: BenchShape, *, seed: int = 0):
        import torch
        from transformers import LlavaForConditionalGeneration

        torch.manual_seed(seed)
        self.shape = shape
        self.model = LlavaForConditionalGeneration(hf_llava_config(shape.model)).float()
        self.model.train()
        self.optimizer: Any = None
        self.stage = 0

    def save(self, folder: str) -> None:
        """Writes the model as safetensors (for our importer)."""
        self.model.save_pretrained(folder)

    def num_params(self) -> tuple[int, int]:
        """(trainable, total) parameter counts under the current freezing."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def set_stage(self, stage: int) -> None:
        """Freezes as LLaVA does: vision always; stage 1 also the LLM and the LM head."""
        import torch

        self.stage = stage
        m = self.model
        m.requires_grad_(True)
        m.model.vision_tower.requires_grad_(False)
        if stage == 1:
            m.model.language_model.requires_grad_(False)
            m.lm_head.requires_grad_(False)
        trainable = [p for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)

    def tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """numpy inputs -> torch tensors (int64 ids/labels, float32 pixels)."""
        import torch

        return {
            "input_ids": torch.from_numpy(inputs["input_ids"].astype(np.int64)),
            "pixel_values": torch.from_numpy(inputs["pixel_values"].astype(np.float32)),
            "labels": torch.from_numpy(inputs["labels"].astype(np.int64)),
        }

    def train_step(self, batch: dict[str, Any]) -> float:
        """One optimizer step on torch tensors; returns the loss."""
        import torch

        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        out = self.model(**batch)
        out.loss.backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        return float(out.loss.detach())

    def generate(
        self, input_ids: np.ndarray, pixel_values: np.ndarray, max_new_tokens: int
    ) -> np.ndarray:
        """Greedy `generate` of exactly `max_new_tokens` tokens -> new ids [B, N]."""
        import torch

        m = self.model
        m.eval()
        ids = torch.from_numpy(input_ids.astype(np.int64))
        with torch.inference_mode():
            out = m.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=torch.from_numpy(pixel_values.astype(np.float32)),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        m.train()
        return out[:, ids.shape[1] :].numpy()
