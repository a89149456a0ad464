"""Independent numpy reference of adakv's KV-cache compression methods.

Written from shared/docs/method.md (and the decisions in docs/compression.md), not from the C++
code: scores are computed in float64 with whole-matrix numpy operations and cast to float32 at
the same points where the C++ code casts (the final score of each entry), so both sides select
from bit-identical float32 scores in all but vanishingly rare rounding cases.

Array conventions (one layer of one sequence, all rows of the layer hold the same L entries):
  q: [nq, H, d]   the last nq prompt queries after RoPE (nq >= w; H2O uses all L)
  k: [L, Hkv, d]  keys after RoPE;  v: [L, Hkv, d] values
  o_proj: [hidden, H*d]  the checkpoint's o_proj.weight (out = W x)
Query head h reads kv head h // g, g = H / Hkv.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

CRITICAL_EPS = 1e-4
MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# attention probabilities

def _probs(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Softmax probabilities [H, nq, L] of the nq queries (the row's last nq tokens), causal."""
    nq, H, d = q.shape
    L, Hkv, _ = k.shape
    g = H // Hkv
    kh = np.repeat(k.astype(np.float64), g, axis=1)  # [L, H, d]
    z = np.einsum("ihd,jhd->hij", q.astype(np.float64), kh) / math.sqrt(d)
    qpos = L - nq + np.arange(nq)
    masked = np.arange(L)[None, :] > qpos[:, None]  # [nq, L]
    z = np.where(masked[None, :, :], -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _group(x: np.ndarray, hkv: int, how: str) -> np.ndarray:
    """[H, ...] -> [Hkv, ...] over each group of g consecutive query heads."""
    xs = x.reshape((hkv, x.shape[0] // hkv) + x.shape[1:])
    if how == "mean":
        return xs.mean(axis=1)
    if how == "max":
        return xs.max(axis=1)
    if how == "sum":
        return xs.sum(axis=1)
    raise ValueError(how)


def pool1d(x: np.ndarray, kind: str, kernel: int) -> np.ndarray:
    """Pool along the last axis: stride 1, padding kernel//2; avg counts the zero padding."""
    half = kernel // 2
    n = x.shape[-1]
    if kind == "max":
        padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], constant_values=-np.inf)
        return np.stack([padded[..., j:j + kernel].max(axis=-1) for j in range(n)], axis=-1) if n else x.copy()
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], constant_values=0.0)
    return np.stack([padded[..., j:j + kernel].sum(axis=-1) / kernel for j in range(n)], axis=-1) if n else x.copy()


# ----------------------------------------------------------------------------------------------
# scores (float64; callers cast)

def snapkv_scores64(q, k, w, gqa, pool, kernel):
    """[Hkv, L-w] pooled observation-window score of the prefix keys (method.md 1.1)."""
    L, hkv, _ = k.shape
    if L <= w:
        return np.zeros((hkv, 0))
    p = _probs(q[-w:], k)                   # [H, w, L]
    s = p[:, :, : L - w].mean(axis=1)        # [H, L-w]
    return pool1d(_group(s, hkv, gqa), pool, kernel)


def kvcompress_metric64(q, k, w, pool, kernel):
    """[Hkv, L]: squared probabilities summed over window queries and over the group, pooled."""
    L, hkv, _ = k.shape
    w = min(w, L)
    p = _probs(q[-w:], k)
    m = (p ** 2).sum(axis=1)                 # [H, L]
    return pool1d(_group(m, hkv, "sum"), pool, kernel)


def h2o_scores64(q, k, gqa):
    """[Hkv, L]: attention each key received from every query, group-reduced per query."""
    hkv = k.shape[1]
    p = _probs(q, k)                         # [H, nq, L]
    return _group(p, hkv, gqa).sum(axis=1)   # [Hkv, L]


def value_norms64(v, o_proj, num_heads):
    """[Hkv, L]: mean over the group of ||v_j W_o^h||_1."""
    L, hkv, d = v.shape
    g = num_heads // hkv
    out = np.zeros((hkv, L))
    for h in range(num_heads):
        w_h = o_proj[:, h * d:(h + 1) * d].astype(np.float64)  # [hidden, d]
        y = v[:, h // g, :].astype(np.float64) @ w_h.T         # [L, hidden]
        out[h // g] += np.abs(y).sum(axis=1)
    return out / g


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def random_scores(seed: int, layer: int, head: int, n: int) -> np.ndarray:
    base = splitmix64(splitmix64(splitmix64(seed) ^ layer) ^ head)
    return np.array([(splitmix64(base ^ j) >> 40) / float(1 << 24) for j in range(n)], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# selection and allocation

def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k best (higher score, then lower index), ascending."""
    idx = np.arange(len(scores))
    order = np.lexsort((idx, -scores.astype(np.float64)))
    return sorted(int(i) for i in order[: max(0, min(k, len(scores)))])


def ada_allocate(scores: list[np.ndarray], bs: int, alpha: float):
    """Returns (counts, rounded, budgets) per method.md 2.2 with the exact-sum decision."""
    hkv = len(scores)
    n = [len(s) for s in scores]
    target = hkv * bs
    if sum(n) <= target:
        return list(n), list(n), list(n)
    heads = np.concatenate([np.full(len(s), h) for h, s in enumerate(scores)])
    pos = np.concatenate([np.arange(len(s)) for s in scores])
    vals = np.concatenate([s.astype(np.float64) for s in scores])
    order = np.lexsort((pos, heads, -vals))          # best first
    counts = np.bincount(heads[order[:target]], minlength=hkv).tolist()
    f = math.floor(alpha * bs)
    rounded = [int(min(max(np.round((1.0 - alpha) * c + f), 0), n[h])) for h, c in enumerate(counts)]
    budgets = list(rounded)
    ranks = [np.lexsort((np.arange(len(s)), -s.astype(np.float64))) for s in scores]  # best first per head
    while sum(budgets) < target:
        best = None
        for h in range(hkv):
            if budgets[h] < n[h]:
                j = int(ranks[h][budgets[h]])
                key = (-float(scores[h][j]), h, j)   # smaller key = better candidate
                if best is None or key < best[0]:
                    best = (key, h)
        budgets[best[1]] += 1
    while sum(budgets) > target:
        worst = None
        for h in range(hkv):
            if budgets[h] > min(f, n[h]):
                j = int(ranks[h][budgets[h] - 1])
                key = (-float(scores[h][j]), h, j)   # larger key = worse candidate
                if worst is None or key > worst[0]:
                    worst = (key, h)
        budgets[worst[1]] -= 1
    return counts, rounded, budgets


def pyramid_schedule(num_layers: int, bs: int, prefix: int, beta: int, reference_rounding: bool) -> list[int]:
    if num_layers == 1:
        return [min(max(bs, 0), prefix)]
    mn = bs // beta
    mx = 2 * bs - mn
    if mx >= prefix:
        mx = prefix
        mn = 2 * bs - mx
    if reference_rounding:
        step = (mx - mn) // (num_layers - 1)
        return [min(max(mx - l * step, 0), prefix) for l in range(num_layers)]
    xs = [Fraction(mx) - Fraction(l * (mx - mn), num_layers - 1) for l in range(num_layers)]
    base = [math.floor(x) for x in xs]
    rest = num_layers * bs - sum(base)
    for l in sorted(range(num_layers), key=lambda l: (-(xs[l] - base[l]), l))[:rest]:
        base[l] += 1
    return [min(max(b, 0), prefix) for b in base]


def kvcompress_evict(metrics: list[np.ndarray], positions: list[np.ndarray], max_entries: int, block: int,
                     logical: int, protected: int) -> list[list[int]]:
    """Entry indices evicted from each row (method.md 2.4)."""
    orders, blocks = [], []
    total = sum(len(m) for m in metrics)
    for r, (m, p) in enumerate(zip(metrics, positions)):
        free = np.nonzero(p < logical - protected)[0]
        order = free[np.lexsort((-p[free].astype(np.int64), m[free].astype(np.float64)))]
        orders.append(order)
        n = len(m)
        hang = 0 if n == 0 else (n % block or block)
        k = 1
        while n and (k - 1) * block + hang - 1 < len(order):
            blocks.append((float(m[order[(k - 1) * block + hang - 1]]), -r, k, r, hang if k == 1 else block))
            k += 1
    blocks.sort()
    freed = [0] * len(metrics)
    for cost, _, k, r, entries in blocks:
        if total <= max_entries:
            break
        assert freed[r] == k - 1
        freed[r] = k
        total -= entries
    out = []
    for r, m in enumerate(metrics):
        if freed[r] == 0:
            out.append([])
            continue
        n = len(m)
        hang = n % block or block
        out.append(sorted(int(i) for i in orders[r][: (freed[r] - 1) * block + hang]))
    return out


# ----------------------------------------------------------------------------------------------
# whole-sequence plans

WINDOW_POLICIES = {"snapkv", "pyramidkv", "ada-snapkv", "ada-pyramidkv", "criticalkv", "ada-criticalkv"}


def plan_sequence(cfg: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray, o_proj: np.ndarray) -> dict:
    """cfg: the case's config; q: [N, L, H, d] all prompt queries; k, v: [N, L, Hkv, d];
    o_proj: [N, hidden, H*d]. Returns per layer the selection budget, counts, budgets, keep lists
    and the float32 scores the selection used."""
    policy = cfg["policy"]
    N, L, H, d = q.shape
    hkv = k.shape[2]
    w = cfg.get("window", 32)
    B = cfg.get("budget", 0)
    pool, kernel = cfg.get("pool", "max"), cfg.get("pool_kernel", 7)
    gqa, alpha, beta = cfg.get("gqa", "mean"), cfg.get("alpha", 0.2), cfg.get("beta", 20)
    layers = []
    if policy == "full":
        return {"layers": [{"keep": [list(range(L))] * hkv} for _ in range(N)]}
    if policy == "streamingllm":
        sink = cfg.get("sink", 4)
        keep = list(range(L)) if L <= B else list(range(sink)) + list(range(L - (B - sink), L))
        return {"layers": [{"keep": [keep] * hkv, "budgets": [len(keep)] * hkv} for _ in range(N)]}
    if policy == "kvcompress":
        T = cfg.get("max_cache_tokens", 0) or B
        metrics = []
        for l in range(N):
            m = kvcompress_metric64(q[l], k[l], w, pool, kernel).astype(np.float32)
            layers.append({"metric": m})
            metrics.extend(list(m))
        pos = [np.arange(L)] * (N * hkv)
        evict = kvcompress_evict(metrics, pos, N * hkv * T, cfg["block_size"], L, cfg.get("protected_window", 32))
        for l in range(N):
            layers[l]["keep"] = [sorted(set(range(L)) - set(evict[l * hkv + h])) for h in range(hkv)]
        return {"layers": layers}

    n = max(0, L - w)
    bs = B - w
    if policy in ("pyramidkv", "ada-pyramidkv"):
        sched = pyramid_schedule(N, bs, n, beta, cfg.get("pyramid_reference_rounding", False))
    else:
        sched = [bs] * N
    for l in range(N):
        entry = {"selection_budget": sched[l]}
        crit = None
        if policy in WINDOW_POLICIES:
            s64 = snapkv_scores64(q[l], k[l], w, gqa, pool, kernel)
            scores = s64.astype(np.float32)
            if policy in ("criticalkv", "ada-criticalkv"):
                norms = value_norms64(v[l][:n], o_proj[l], H) if n else np.zeros((hkv, 0))
                crit = ((s64 + CRITICAL_EPS) * norms).astype(np.float32)
                entry["crit"] = crit
        elif policy == "h2o":
            scores = h2o_scores64(q[l], k[l], gqa)[:, :n].astype(np.float32)
        elif policy == "random":
            scores = np.stack([random_scores(cfg.get("seed", 0), l, h, n) for h in range(hkv)])
        else:
            raise ValueError(policy)
        entry["scores"] = scores
        entry.update(plan_layer_from_scores(policy, sched[l], w, alpha, [L] * hkv, list(scores),
                                            None if crit is None else list(crit)))
        layers.append(entry)
    return {"layers": layers}


def plan_layer_from_scores(policy, bs, w, alpha, lengths, scores, crit):
    hkv = len(lengths)
    n = [max(0, L - w) for L in lengths]
    out = {}
    if policy.startswith("ada-"):
        counts, rounded, budgets = ada_allocate(scores, max(bs, 0), alpha)
        out["counts"], out["rounded"] = counts, rounded
    else:
        budgets = [min(max(bs, 0), n[h]) for h in range(hkv)]
    out["budgets"] = budgets
    keep = []
    for h in range(hkv):
        b = budgets[h]
        if b >= n[h]:
            chosen = list(range(n[h]))
        elif crit is None:
            chosen = top_k(scores[h], b)
        else:
            first = top_k(scores[h], b // 2)
            rest = np.array([j for j in range(n[h]) if j not in set(first)], dtype=np.int64)
            second = [int(rest[i]) for i in top_k(crit[h][rest], b - b // 2)]
            chosen = sorted(first + second)
        keep.append(chosen + list(range(n[h], lengths[h])))
    out["keep"] = keep
    return out
