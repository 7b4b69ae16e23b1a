"""Single-process reference training on the same global batches the distributed tests feed the pipeline."""

from __future__ import annotations

import torch

from recipe.tools.synthetic_batches import collate, synthetic_samples


def reference_losses(ckpt: str, global_batch: int, steps: int, seed: int = 7, lr: float = 1e-3,
                     clip: float = 1.0, frozen_prefixes: tuple = ()) -> list[float]:
    """Per-step loss (token-mean CE over the global batch + balance loss) of the plain model trained with
    torch AdamW, the optimizer DeepSpeed runs with ``torch_adam``."""
    return reference_run(ckpt, global_batch, steps, seed, lr, clip, frozen_prefixes)["losses"]


def reference_run(ckpt: str, global_batch: int, steps: int, seed: int = 7, lr: float = 1e-3,
                  clip: float = 1.0, frozen_prefixes: tuple = (), lora: dict | None = None) -> dict:
    """:func:`reference_losses` plus the gradient norm of every step: ``{"losses": [...], "grad_norms": [...]}``.

    The gradient norm is the total L2 norm over the trained parameters before clipping, which is what DeepSpeed's
    ``engine.get_global_grad_norm()`` reports (ZeRO-1/2: ``scaled_global_norm() / loss_scale``, computed before
    ``unscale_and_clip_grads``). ``lora``: a ``recipe.lora`` block; adapters (initialised with ``seed``, as
    train.py does) are then the only trained parameters."""
    from recipe.model import DeepseekVLV2ForCausalLM

    model = DeepseekVLV2ForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).train()
    for name, p in model.named_parameters():
        if name.startswith(("vision.attn_pool.", *frozen_prefixes)):
            p.requires_grad_(False)
    if lora is not None:
        from recipe.lora.config import LoraConfig
        from recipe.lora.inject import apply_lora

        apply_lora(model, LoraConfig.from_dict(lora), seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    samples = synthetic_samples(model.config, global_batch * steps, seed)
    losses, grad_norms = [], []
    for step in range(steps):
        batch = collate(samples[step * global_batch:(step + 1) * global_batch])
        out = model(**batch)
        out.loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))  # returns the pre-clip norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return {"losses": losses, "grad_norms": grad_norms}
