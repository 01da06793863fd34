"""What the benchmark scripts share: a model of any shape with random weights drawn on its device."""

import torch

from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.ops.rope import rope_inv_freq


def random_model(
    args: ModelArgs, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Transformer:
    """``args``'s model with the distributions of ``league init`` (normal(0, 0.02) matrices, zero (1+w) norms, ones
    for the gated norm and dt_bias, ``A_log = log(U(0.01, 16))``, uniform conv kernels), drawn directly on ``device``
    in ``dtype`` (a 35 B model is made in seconds on a GPU, without a checkpoint on disk)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(0.01, 16.0).log_()
            elif name.endswith(("dt_bias", "norm_weight")):
                p.fill_(1.0)
            elif name.endswith("conv_weight"):
                bound = p.shape[-1] ** -0.5
                p.uniform_(-bound, bound)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.inv_freq = rope_inv_freq(args.rotary_dim, args.rope_theta).to(device)
    return model
