"""Optional PyTorch reference for `benchmarks/run.py`: the same measurement as the probe
(per-layer weight-gradient norms at initialization over several seeds), written the obvious way
with a Python loop over seeds and ``nn.TransformerEncoderLayer`` stacks (Post-LN, ReLU,
no dropout, no biases, sinusoidal positions, untied head, mean cross-entropy).

`run(shape, seeds, precision)` returns a dict with the steady-state seconds per seed batch, or
``None`` (with a printed message) when ``import torch`` fails.  Modules are created directly on
the device (``device=`` factory argument), the norms of one seed come back in one transfer, and
precision is float32 (TF32 off), tf32 (TF32 matmuls) or bfloat16 (``torch.autocast``).
"""

from __future__ import annotations

import time


def _sinusoidal(n, d, torch):
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    i = torch.arange(0, d, 2, dtype=torch.float32)
    ang = pos / torch.pow(10000.0, i / d)
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(ang)
    table[:, 1::2] = torch.cos(ang[:, : d // 2])
    return table


def run(shape: dict, seeds: int, precision: str = "float32", repeats: int = 2) -> dict | None:
    try:
        import torch
        from torch import nn
    except Exception as exc:  # torch is optional
        print(f"[torch_reference] skipped: import torch failed ({exc.__class__.__name__}: {exc})")
        return None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    d, h, f = shape["d_model"], shape["n_heads"], shape["d_ff"]
    depth, n, b, v = shape["depth"], shape["seq_len"], shape["batch_size"], shape["vocab_size"]
    pos = _sinusoidal(n, d, torch).to(device)

    def one_seed(seed):
        torch.manual_seed(seed)
        layers = nn.ModuleList([nn.TransformerEncoderLayer(
            d, h, f, dropout=0.0, activation="relu", batch_first=True, norm_first=False,
            bias=False, device=device) for _ in range(depth)])
        emb = nn.Embedding(v, d, device=device)
        head = nn.Linear(d, v, bias=False, device=device)
        nn.init.xavier_normal_(head.weight)
        tokens = torch.randint(0, v, (b, n), device=device)
        targets = torch.randint(0, v, (b, n), device=device)
        with autocast:
            x = emb(tokens) + pos
            for lyr in layers:
                x = lyr(x)
            logits = head(x).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, v), targets.reshape(-1))
        loss.backward()
        norms = torch.stack([p.grad.norm() for lyr in layers for p in lyr.parameters()])
        return norms.cpu()

    def batch():
        for s in range(seeds):
            one_seed(s)
        if device == "cuda":
            torch.cuda.synchronize()

    batch()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        batch()
        times.append(time.perf_counter() - t)
    return {"torch_version": torch.__version__, "device": device, "seeds": seeds,
            "precision": precision, "seconds_per_seed_batch": min(times), "repeats": repeats,
            "note": "Post-LN nn.TransformerEncoderLayer stack created on the device, "
                    "loop over seeds"}


if __name__ == "__main__":
    quick = dict(d_model=128, n_heads=2, d_ff=512, depth=4, seq_len=64, batch_size=2,
                 vocab_size=512)
    print(run(quick, seeds=4))
