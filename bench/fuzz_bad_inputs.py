"""Feed bad inputs to every fastmask op on every backend that runs here and classify what happens.

    python bench/fuzz_bad_inputs.py                       # torch and triton (the CPU interpreter without a GPU)
    python bench/fuzz_bad_inputs.py --json out.json --backends torch,triton,cuda

Outcomes per (op, bad input, backend):
  clear    a ValueError/TypeError whose one-line message names the bad argument, or, for inputs with
           a documented result (NaN/inf values; out-of-range ids with value checks off), that result
  obscure  another exception (AttributeError, ZeroDivisionError, a compiler or deep torch error), or
           a message that does not name the argument
  silent   no error and not the documented result (a wrong or undefined answer)
  crash    the process died (a signal: segfault, abort)
Each backend runs in a child process; a crash is recorded and the child restarted after that case.
Only the public ``fastmask.ops`` API is used, so the script runs on older trees too (PYTHONPATH).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter

NAN, INF = float("nan"), float("inf")


def _cases():
    """(name, needle, kind, fn(ops, backend, torch)) with kind 'error', 'nan' (documented IEEE result:
    the NaN pattern of float64 math) or 'off' (value checks off: the documented masked result)."""
    import torch

    g = torch.Generator().manual_seed(0)
    B, N, D, K = 2, 9, 6, 4
    x = torch.randn(B, N, D, generator=g)
    ids = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
    kept = torch.randn(B, K, D, generator=g)
    scores = torch.rand(B, N, generator=g)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))

    def bad_ids(val):
        out = ids.clone()
        out[0, 1] = val
        return out

    def with_nan(t, idx, val=NAN):
        t = t.clone()
        t[idx] = val
        return t

    cases = []

    def add(name, needle, kind, fn):
        cases.append((name, needle, kind, fn))

    G = lambda **kw: (lambda ops, be: ops.gather_tokens(kw.get("x", x), kw.get("ids", ids), pos_embed=kw.get("pos"), backend=be))
    add("gather: id >= N", "ids", "error", G(ids=bad_ids(N)))
    add("gather: id < 0", "ids", "error", G(ids=bad_ids(-1)))
    add("gather: repeated id", "ids", "error", G(ids=bad_ids(int(ids[0, 0]))))
    add("gather: float ids", "ids", "error", G(ids=ids.float()))
    add("gather: int32 ids", "ids", "error", G(ids=ids.int()))
    add("gather: ids as a list", "ids", "error", G(ids=ids.tolist()))
    add("gather: ids batch mismatch", "ids", "error", G(ids=ids[:1]))
    add("gather: 1-D ids", "ids", "error", G(ids=ids[0]))
    add("gather: K > N", "ids", "error", G(ids=torch.zeros(B, N + 1, dtype=torch.long)))
    add("gather: 2-D x", "x", "error", G(x=x[0]))
    add("gather: int x", "x", "error", G(x=x.long()))
    add("gather: x as a list", "x", "error", G(x=x.tolist()))
    add("gather: pos_embed shape", "pos_embed", "error", G(pos=torch.zeros(N + 1, D)))
    add("gather: int pos_embed", "pos_embed", "error", G(pos=torch.zeros(N, D, dtype=torch.long)))
    add("gather: empty ids of K=0 ok?", None, "ok", G(ids=ids[:, :0]))
    for val in (N, 2 ** 40, -1, -(2 ** 40)):
        add(f"gather, checks off: id {val}", "ids", "off_gather", G(ids=bad_ids(val)))

    S = lambda **kw: (lambda ops, be: ops.scatter_tokens(kw.get("kept", kept), kw.get("ids", ids), kw.get("n", N),
                                                         kw.get("fill"), backend=be))
    add("scatter: id >= N", "ids", "error", S(ids=bad_ids(N)))
    add("scatter: repeated id", "ids", "error", S(ids=bad_ids(int(ids[0, 0]))))
    add("scatter: num_tokens < K", "num_tokens", "error", S(n=K - 1))
    add("scatter: float num_tokens", "num_tokens", "error", S(n=9.0))
    add("scatter: fill size", "fill", "error", S(fill=torch.zeros(D + 1)))
    add("scatter: ids K mismatch", "ids", "error", S(ids=ids[:, :2]))
    add("scatter: ids as a list", "ids", "error", S(ids=ids.tolist()))
    add("scatter: int x_kept", "x_kept", "error", S(kept=kept.long()))
    for val in (N, 2 ** 40, -1):
        add(f"scatter, checks off: id {val}", "ids", "off_scatter", S(ids=bad_ids(val)))

    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, ::2] = True
    tok = torch.randn(D, generator=g)
    M = lambda **kw: (lambda ops, be: ops.apply_mask_token(kw.get("x", x), kw.get("mask", mask), kw.get("tok", tok), backend=be))
    add("mask token: float mask", "mask", "error", M(mask=mask.float()))
    add("mask token: mask shape", "mask", "error", M(mask=mask[:, :-1]))
    add("mask token: mask as a list", "mask", "error", M(mask=mask.tolist()))
    add("mask token: token size", "mask_token", "error", M(tok=torch.zeros(D + 1)))
    add("mask token: int token", "mask_token", "error", M(tok=tok.long()))
    add("mask token: token as a list", "mask_token", "error", M(tok=tok.tolist()))

    R = lambda ratio=0.5, **kw: (lambda ops, be: ops.random_masking(kw.get("x", x), ratio, backend=be,
                                                                    **{k: v for k, v in kw.items() if k != "x"}))
    add("random_masking: ratio 1", "mask_ratio", "error", R(1.0))
    add("random_masking: ratio < 0", "mask_ratio", "error", R(-0.1))
    add("random_masking: ratio NaN", "mask_ratio", "error", R(NAN))
    add("random_masking: ratio a string", "mask_ratio", "error", R("half"))
    add("random_masking: seed < 0", "seed", "error", R(seed=-1))
    add("random_masking: seed 2**64", "seed", "error", R(seed=2 ** 64))
    add("random_masking: seed 2**64 + 5", "seed", "error", R(seed=2 ** 64 + 5))
    add("random_masking: seed 1.5", "seed", "error", R(seed=1.5))
    add("random_masking: generator a number", "generator", "error", R(generator=3))
    add("random_masking: 2-D x", "x", "error", R(x=x[0]))

    def A(q_=q, k_=k, v_=v, **kw):
        return lambda ops, be: ops.attention(q_, k_, v_, backend=be, **kw)
    add("attention: scale inf", "scale", "error", A(scale=INF))
    add("attention: scale NaN", "scale", "error", A(scale=NAN))
    add("attention: scale 0", "scale", "error", A(scale=0.0))
    add("attention: scale < 0", "scale", "error", A(scale=-1.0))
    add("attention: scale a string", "scale", "error", A(scale="1"))
    z = torch.zeros(1, 2, 5, 0)
    add("attention: Dh = 0", "Dh", "error", A(z, z, z))
    add("attention: shape mismatch", "shape", "error", A(k_=k[:, :, :4]))
    add("attention: dtype mismatch", "dtype", "error", A(k_=k.half()))
    add("attention: 3-D q", "q", "error", A(q[0], k[0], v[0]))
    add("attention: int q", "q", "error", A(q.long(), k.long(), v.long()))
    add("attention: q as a list", "q", "error", A(q_=q.tolist()))
    add("attention: num_prefix_tokens 0", "num_prefix_tokens", "error", A(return_cls_attn=True, num_prefix_tokens=0))
    add("attention: num_prefix_tokens > L", "num_prefix_tokens", "error", A(return_cls_attn=True, num_prefix_tokens=6))
    add("attention: NaN query", None, "nan", A(q_=with_nan(q, (0, 0, 1, 3)), return_cls_attn=True))
    add("attention: NaN CLS query", None, "nan", A(q_=with_nan(q, (0, 1, 0, 0)), return_cls_attn=True))
    add("attention: NaN key", None, "nan", A(k_=with_nan(k, (0, 0, 2, 1)), return_cls_attn=True))
    add("attention: NaN value", None, "nan", A(v_=with_nan(v, (0, 1, 3, 2)), return_cls_attn=True))
    add("attention: inf value", None, "nan", A(v_=with_nan(v, (0, 0, 2, 2), INF), return_cls_attn=True))
    add("attention: -inf key", None, "nan", A(k_=with_nan(k, (0, 0, 4, 0), -INF), return_cls_attn=True))

    T = lambda s=scores, kk=3, **kw: (lambda ops, be: ops.topk_tokens(s, kk, backend=be, **kw))
    add("topk: k > N", "k", "error", T(kk=N + 1))
    add("topk: k < 0", "k", "error", T(kk=-1))
    add("topk: k float", "k", "error", T(kk=2.0))
    add("topk: NaN scores", "NaN", "error", T(s=with_nan(scores, (1, 4))))
    add("topk: int scores", "scores", "error", T(s=(scores * 10).long()))
    add("topk: 3-D scores", "scores", "error", T(s=scores[None]))
    add("topk: scores as a list", "scores", "error", T(s=scores.tolist()))
    add("topk, checks off: NaN scores", "scores", "off_topk", T(s=with_nan(scores, (1, 4))))

    C = lambda c=scores, ratio=0.5, **kw: (lambda ops, be: ops.cls_attention_mask(c, ratio, backend=be, **kw))
    add("attmask: ratio 1.5", "ratio", "error", C(ratio=1.5))
    add("attmask: ratio NaN", "ratio", "error", C(ratio=NAN))
    add("attmask: mode", "mode", "error", C(mode="middle"))
    add("attmask: hint without show_ratio", "show_ratio", "error", C(mode="hint"))
    add("attmask: mask_prob 2", "mask_prob", "error", C(mask_prob=2.0))
    add("attmask: show_ratio > show_max", "show_ratio", "error", C(mode="hint", show_max=0.1, show_ratio=0.5))
    add("attmask: ratio tensor shape", "ratio", "error", C(ratio=torch.full((B + 1,), 0.5)))
    add("attmask: ratio tensor NaN", "ratio", "error", C(ratio=torch.tensor([0.5, NAN])))
    add("attmask: NaN attention", "NaN", "error", C(c=with_nan(scores, (0, 2))))
    add("attmask: seed 2**64", "seed", "error", C(seed=2 ** 64))
    add("attmask: seed < 0", "seed", "error", C(seed=-5))
    add("attmask: cls_attn as a list", "cls_attn", "error", C(c=scores.tolist()))
    add("attmask, checks off: NaN attention", "cls_attn", "off_mask", C(c=with_nan(scores, (0, 2))))
    return cases, dict(x=x, ids=ids, kept=kept, q=q, k=k, v=v, N=N, B=B)


def _reference_attention(q, k, v, scale=None):
    import torch

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax(q.double() @ k.double().transpose(-2, -1) * scale, dim=-1)
    return p @ v.double(), p[:, :, 0, 1:].mean(1)


def _same_nan_pattern(got, want) -> bool:
    import torch

    return tuple(got.shape) == tuple(want.shape) and bool(torch.equal(torch.isnan(got.double()), torch.isnan(want)))


def classify(name, needle, kind, fn, backend, data):
    import torch

    from fastmask import ops

    off = kind.startswith("off")
    try:
        if off:
            with ops.value_checks(False):
                out = fn(ops, backend)
        else:
            out = fn(ops, backend)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if kind == "error" and needle and needle in msg and "\n" not in msg.strip():
            return "clear", f"{type(e).__name__}: {msg[:150]}"
        if off and needle and needle in msg:
            return "clear", f"{type(e).__name__}: {msg[:150]}"
        return "obscure", f"{type(e).__name__}: {msg.splitlines()[0][:150] if msg else ''}"
    except Exception as e:  # noqa: BLE001 - classifying is the point
        first = str(e).splitlines()[0][:150] if str(e) else ""
        return "obscure", f"{type(e).__name__}: {first}"
    if kind == "ok":
        return "clear", "ok"
    if kind == "error":
        return "silent", "no error"
    if kind == "nan":
        q_, k_, v_ = _qkv_of(fn)
        want_out, want_cls = _reference_attention(q_, k_, v_)
        got_out, got_cls = out
        ok = _same_nan_pattern(got_out, want_out) and _same_nan_pattern(got_cls, want_cls)
        return ("clear", "NaN pattern of the float64 math") if ok else (
            "silent", f"NaN rows {torch.isnan(got_out).any(-1).sum().item()} vs {torch.isnan(want_out).any(-1).sum().item()}"
                      f" expected; cls NaN {torch.isnan(got_cls).sum().item()} vs {torch.isnan(want_cls).sum().item()}")
    N = data["N"]
    if kind == "off_gather":
        ids = _arg_of(fn, "ids")
        bad = (ids < 0) | (ids >= N)
        x = data["x"]
        want = torch.gather(x, 1, ids.clamp(0, N - 1)[..., None].expand(-1, -1, x.shape[2])).masked_fill(bad[..., None], 0)
        return ("clear", "zero rows for the bad ids") if torch.equal(out, want) else ("silent", "garbage rows")
    if kind == "off_scatter":
        ids = _arg_of(fn, "ids")
        kept = data["kept"]
        want = torch.zeros(kept.shape[0], N, kept.shape[2])
        for b in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                if 0 <= int(ids[b, j]) < N:
                    want[b, int(ids[b, j])] = kept[b, j]
        return ("clear", "bad ids dropped") if torch.equal(out, want) else ("silent", "unexpected rows")
    if kind == "off_topk":
        ok = out.dtype == torch.long and bool(((out >= 0) & (out < N)).all())
        return ("clear", "valid indices") if ok else ("silent", "indices out of range")
    if kind == "off_mask":
        ok = out.dtype == torch.bool and tuple(out.shape) == (data["B"], N)
        return ("clear", "a [B, N] mask") if ok else ("silent", "bad mask")
    return "silent", "?"


def _arg_of(fn, name):
    for cell in fn.__closure__ or ():
        if isinstance(cell.cell_contents, dict) and name in cell.cell_contents:
            return cell.cell_contents[name]
    raise KeyError(name)


def _qkv_of(fn):
    names = fn.__code__.co_freevars
    vals = dict(zip(names, (c.cell_contents for c in fn.__closure__)))
    return vals["q_"], vals["k_"], vals["v_"]


def child(backend: str, start: int) -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cases, data = _cases()
    for i in range(start, len(cases)):
        name, needle, kind, fn = cases[i]
        print(json.dumps({"start": i}), flush=True)
        outcome, detail = classify(name, needle, kind, fn, backend, data)
        print(json.dumps({"i": i, "case": name, "outcome": outcome, "detail": detail}), flush=True)


def run_backend(backend: str, env) -> list:
    results, start = [], 0
    while True:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", backend, "--start", str(start)],
                              capture_output=True, text=True, env=env, timeout=1800)
        current = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if "start" in rec:
                current = rec["start"]
            else:
                results.append(rec)
                current = None
        if proc.returncode == 0 and current is None:
            return results
        if current is None:  # failed before any case (import error)
            raise RuntimeError(f"{backend}: child failed: {proc.stderr[-2000:]}")
        sig = -proc.returncode if proc.returncode < 0 else proc.returncode
        results.append({"i": current, "case": _case_name(current), "outcome": "crash",
                        "detail": f"process died (exit {proc.returncode}{', signal %d' % sig if proc.returncode < 0 else ''})"})
        start = current + 1


def _case_name(i):
    return _cases()[0][i][0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="torch,triton")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None)
    p.add_argument("--start", type=int, default=0)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.start)
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    report = {}
    for backend in args.backends.split(","):
        res = run_backend(backend, env)
        counts = Counter(r["outcome"] for r in res)
        report[backend] = {"counts": {k: counts.get(k, 0) for k in ("clear", "obscure", "silent", "crash")},
                           "cases": res}
        print(f"{backend}: {len(res)} cases: " + ", ".join(f"{k} {v}" for k, v in report[backend]["counts"].items()))
        for r in res:
            if r["outcome"] != "clear":
                print(f"  {r['outcome']:8s} {r['case']}: {r['detail']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
