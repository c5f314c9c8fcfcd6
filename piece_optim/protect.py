"""Reference data for protective selection, with no outside data: text sampled from the model.

Protective selection (:meth:`piece_optim.ImportanceEstimator.select` with ``reference=``)
avoids entries that matter for what the model already does.  It needs importance on
*reference* data.  The PIECE paper assumes no access to earlier training data; a held-out
general corpus is one answer, and this module gives the other: sample text from the model
itself before it learns the new task, then estimate importance on those samples (the
model's own distribution, so the Fisher is the true Fisher at the current weights, not an
empirical one on data the model may never have seen).

Usage with a Hugging Face causal LM (any module whose forward takes ``input_ids`` and
returns ``.logits`` works; a KV cache is used when the model has one)::

    ref_ids = po.protect.sample_tokens(model, 128, 128, prompt=torch.tensor([bos_id]))
    with po.ImportanceEstimator(model, method="piece-f") as ref:
        for x in ref_ids.split(16):
            model(input_ids=x, labels=x).loss.backward()
            ref.collect()
        ref_fisher = ref.fisher()
    ...
    mask = est.select(ratio=1e-3, reference=ref_fisher)
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def _cache_arg(model: nn.Module) -> str | None:
    """The forward keyword that takes the KV cache: ``cache`` (transformers >= 5.2x),
    ``past_key_values`` (older), or None (no cache: re-run the sequence)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((a for a in ("cache", "past_key_values") if a in params), None)


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    n_samples: int,
    length: int,
    *,
    prompt: Tensor | None = None,
    batch_size: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """``n_samples`` sequences of ``length`` new tokens sampled from ``model`` (int64).

    Args:
        prompt: 1-D token ids every sample starts from (default: token 0); the result
            holds the prompt followed by the ``length`` sampled tokens.
        temperature: softmax temperature (1.0 = the model's own distribution).
        seed: the samples depend only on it, the model and the arguments (a private
            generator; the global RNG is untouched).

    Sampling runs in eval mode (restored afterwards) with the KV cache when the model
    takes one (``cache`` or ``past_key_values``: Hugging Face models), else by re-running
    the sequence each step.  No end-of-sequence token stops it: every sample has ``length`` tokens.
    """
    if n_samples < 1 or length < 1 or batch_size < 1:
        raise ValueError(
            f"n_samples={n_samples}, length={length} and batch_size={batch_size} must be >= 1"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    device = next(model.parameters()).device
    prompt = torch.zeros(1, dtype=torch.long) if prompt is None else torch.as_tensor(prompt)
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError(f"prompt must be a non-empty 1-D tensor of token ids, got {prompt.shape}")
    gen = torch.Generator(device=device).manual_seed(seed)
    arg = _cache_arg(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, n_samples, batch_size):
            n = min(batch_size, n_samples - start)
            seq = prompt.to(device, torch.long).expand(n, -1).contiguous()
            cache = None
            for _ in range(length):
                if arg is None:
                    res = model(input_ids=seq)
                elif cache is None:
                    res = model(input_ids=seq, use_cache=True)
                else:
                    res = model(input_ids=seq[:, -1:], use_cache=True, **{arg: cache})
                logits = res.logits[:, -1].float() / temperature
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
                seq = torch.cat([seq, nxt], 1)
                if arg is not None:
                    cache = getattr(res, arg, None)
            out.append(seq)
    finally:
        model.train(was_training)
    return torch.cat(out)
