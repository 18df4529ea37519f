"""How many block-wide reductions the top-k/AttMask radix select needs per row (an algorithm count,
not a timing; runs anywhere):  python bench/select_passes.py

Before: one count per key bit (32 for float32 keys, 16 for half/bfloat16).  After (kernels/topk_mask.py,
csrc/topk_mask.cu): a min and a max, then one count per bit below the prefix every key shares, stopping
once a count equals k.  Rows are CLS maps as softmax of N(0, s^2) logits, s = 1 and 3.
"""
import numpy as np, torch
rng = np.random.default_rng(0)
def keys32(x):
    b = x.astype(np.float32).view(np.int32).astype(np.int64)
    key = np.where(b < 0, ~b & 0xFFFFFFFF, b | 0x80000000) & 0xFFFFFFFF
    return (~key) & 0xFFFFFFFF
def keys16(x):
    b = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    key = np.where(b & 0x8000, ~b & 0xFFFF, b | 0x8000) & 0xFFFF
    return key ^ 0xFFFF
def after(key, k):
    lo, hi = int(key.min()), int(key.max()); top = (lo ^ hi).bit_length()
    kth = (lo >> top) << top; n = 2
    for b in range(top - 1, -1, -1):
        trial = kth | (1 << b); below = int((key < trial).sum()); n += 1
        if below <= k: kth = trial
        if below == k: break
    return n
for N in (196, 784):
    for name, kf, bits in (("float32", keys32, 32), ("bfloat16", keys16, 16)):
        out = []
        for what, kfun in (("top-k k=N/2", lambda: N // 2), ("AttMask count U(.1,.5)N", lambda: int(rng.uniform(.1, .5) * N)),
                           ("hint pool 0.1N", lambda: int(.1 * N))):
            v = [after(kf(torch.softmax(torch.from_numpy(rng.standard_normal(N) * s), 0).numpy()), kfun())
                 for s in (1.0, 3.0) for _ in range(300)]
            out.append(f"{what} {np.mean(v):.1f}")
        print(f"N={N} {name}: before {bits} | after " + ", ".join(out))
# hint reveals: 32-bit Philox keys among int(0.1 N) candidates, k = int(U(.01,.05) N)
for N in (196, 784):
    v = []
    for _ in range(600):
        key = rng.integers(0, 2**32, N, dtype=np.int64); cand = np.zeros(N, bool); cand[rng.choice(N, int(.1 * N), replace=False)] = True
        sub = key[cand]; v.append(after(sub, int(rng.uniform(.01, .05) * N)))
    print(f"N={N} hint reveal (Philox keys, 32 bit): before 32 | after {np.mean(v):.1f}")
