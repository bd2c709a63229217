"""Unit tests of the retrieval methods against naive reference implementations written here.

Every reference is deliberately written the slow, obvious way (loops over pixels, sets,
dense solves) and separately from the library code, on small random tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cbir.local.encoders import BoW, FisherVector, VLAD, fit_gmm, parse_encoder
from cbir.local.regions import parse_regions, selective_search, sliding_windows
from cbir.pooling import POOLINGS, combine_scales, parse_pooling, pool
from cbir.pooling import functional as F
from cbir.postprocess import LayerFusion, WhiteningPCA, parse_postprocess
from cbir.postprocess.transforms import learn_layer_weights, loo_map
from cbir.rerank import (database_augmentation, diffusion, k_reciprocal, parse_rerank, query_expansion,
                         rerank, rerank_shortlist)


def relu_map(n=2, c=5, h=6, w=7, seed=0, sparsity=0.4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    return torch.where(x < sparsity, torch.zeros_like(x), x)


def unit(v):
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------------- pooling


def ref_mac(x, y0, x0, hh, ww):
    n, c = x.shape[:2]
    out = np.full((n, c), -np.inf)
    for i in range(n):
        for k in range(c):
            for y in range(y0, y0 + hh):
                for xx in range(x0, x0 + ww):
                    out[i, k] = max(out[i, k], float(x[i, k, y, xx]))
    return out


def ref_rmac_grid(H, W, L):
    """R-MAC region grid, from the paper's recipe (Tolias et al. 2016, and its reference code)."""
    w = min(W, H)
    best, extra = None, 0
    for i, steps in enumerate(range(2, 8)):
        b = (max(H, W) - w) / (steps - 1)
        err = abs((w * w - w * b) / (w * w) - 0.4)
        if best is None or err < best:
            best, extra = err, i + 1
    Wd = extra if H < W else 0
    Hd = extra if H > W else 0
    regions = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        bw = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        bh = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        for i in range(l + Hd):
            for j in range(l + Wd):
                regions.append((int(math.floor(wl2 + i * bh) - wl2), int(math.floor(wl2 + j * bw) - wl2), wl))
    return regions


def test_rmac_grid_square_by_hand():
    # 5x5, two levels: the whole map, then four 3x3 windows at offsets 0 and 2.
    assert F.rmac_regions(5, 5, 2) == [(0, 0, 5, 5), (0, 0, 3, 3), (0, 2, 3, 3), (2, 0, 3, 3), (2, 2, 3, 3)]


@pytest.mark.parametrize("h,w,L", [(6, 7, 3), (9, 5, 3), (4, 12, 2)])
def test_rmac_against_reference(h, w, L):
    x = relu_map(h=h, w=w)
    grid = ref_rmac_grid(h, w, L)
    assert [(y, x0, s) for y, x0, s, _ in F.rmac_regions(h, w, L)] == grid
    ref = np.zeros((2, 5))
    for (y0, x0, hh, ww) in [(0, 0, h, w)] + [(y, x0, s, s) for y, x0, s in grid]:
        m = ref_mac(x, y0, x0, hh, ww)
        ref += m / (np.linalg.norm(m, axis=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(F.rmac(x, L).numpy(), ref, rtol=1e-6)
    method, value = parse_pooling(f"RMAC{L}")
    np.testing.assert_allclose(pool(x, method, value).numpy(), ref, rtol=1e-6)


def test_spp_against_reference():
    x = relu_map(h=7, w=5)
    ref = []
    for i in range(2):
        feats = []
        for n in (1, 2, 4):
            for by in range(n):
                for bx in range(n):
                    y0, y1 = math.floor(by * 7 / n), math.ceil((by + 1) * 7 / n)
                    x0, x1 = math.floor(bx * 5 / n), math.ceil((bx + 1) * 5 / n)
                    feats += [max(float(x[i, k, y, xx]) for y in range(y0, y1) for xx in range(x0, x1)) for k in range(5)]
        ref.append(feats)
    out = F.spp(x).numpy()
    assert out.shape == (2, 21 * 5)
    np.testing.assert_allclose(out, np.array(ref), rtol=1e-7)


def test_crow_against_reference():
    x = relu_map(h=4, w=6)
    n, c, h, w = x.shape
    eps = 1e-6
    ref = np.zeros((n, c))
    for i in range(n):
        S = np.zeros((h, w))
        for y in range(h):
            for xx in range(w):
                S[y, xx] = sum(float(x[i, k, y, xx]) for k in range(c))
        norm = math.sqrt(sum(S[y, xx] ** 2 for y in range(h) for xx in range(w)))
        S = np.sqrt(S / (norm + eps))
        Q = [sum(1 for y in range(h) for xx in range(w) if x[i, k, y, xx] > 0) / (h * w) for k in range(c)]
        for k in range(c):
            beta = math.log((c * eps + sum(Q)) / (eps + Q[k]))
            ref[i, k] = beta * sum(S[y, xx] * float(x[i, k, y, xx]) for y in range(h) for xx in range(w))
    np.testing.assert_allclose(F.crow(x).numpy(), ref, rtol=1e-6)


def ref_largest_component(mask):
    h, w = len(mask), len(mask[0])
    seen, best = set(), set()
    for sy in range(h):
        for sx in range(w):
            if not mask[sy][sx] or (sy, sx) in seen:
                continue
            comp, stack = set(), [(sy, sx)]
            seen.add((sy, sx))
            while stack:
                y, xx = stack.pop()
                comp.add((y, xx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, xx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny][nx] and (ny, nx) not in seen:
                            seen.add((ny, nx))
                            stack.append((ny, nx))
            if len(comp) > len(best):
                best = comp
    return best


def test_scda_against_reference():
    x = relu_map(h=6, w=6, seed=3)
    x[0, :, 0:2, 0:2] += 3.0  # two bright blobs of different sizes in image 0
    x[0, :, 4:6, 3:6] += 3.0
    n, c, h, w = x.shape
    ref = []
    for i in range(n):
        A = [[sum(float(x[i, k, y, xx]) for k in range(c)) for xx in range(w)] for y in range(h)]
        mean = sum(map(sum, A)) / (h * w)
        comp = ref_largest_component([[A[y][xx] > mean for xx in range(w)] for y in range(h)])
        avg = np.array([sum(float(x[i, k, y, xx]) for y, xx in comp) / len(comp) for k in range(c)])
        mx = np.array([max(float(x[i, k, y, xx]) for y, xx in comp) for k in range(c)])
        ref.append(np.concatenate([avg / (np.linalg.norm(avg) + 1e-6), mx / (np.linalg.norm(mx) + 1e-6)]))
    np.testing.assert_allclose(F.scda(x).numpy(), np.array(ref), rtol=1e-6)
    # image 0: the larger blob (2x3) is the kept component
    assert len(ref_largest_component([[False] * 6] * 6)) == 0


def test_cam_against_reference():
    x = relu_map(h=3, w=4, seed=5)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(7, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    n, c, h, w = x.shape
    for k in (1, 3):
        ref = []
        for i in range(n):
            avg = [sum(float(x[i, ch, y, xx]) for y in range(h) for xx in range(w)) / (h * w) for ch in range(c)]
            scores = [sum(float(weight[j, ch]) * avg[ch] for ch in range(c)) + float(bias[j]) for j in range(7)]
            top = sorted(range(7), key=lambda j: -scores[j])[:k]
            att = np.zeros((h, w))
            for j in top:
                m = np.array([[max(0.0, sum(float(weight[j, ch]) * float(x[i, ch, y, xx]) for ch in range(c)))
                               for xx in range(w)] for y in range(h)])
                att += m / (m.max() + 1e-6) / k
            ref.append([sum(att[y, xx] * float(x[i, ch, y, xx]) for y in range(h) for xx in range(w)) / (att.sum() + 1e-6)
                        for ch in range(c)])
        out = pool(x, *parse_pooling(f"CAM{k}"), weight=weight, bias=bias).numpy()
        np.testing.assert_allclose(out, np.array(ref), rtol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        F.cam(x, weight[:, :3], bias)


def test_multiscale_combine_against_reference():
    g = torch.Generator().manual_seed(2)
    vs = [torch.rand(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    gem, p = parse_pooling("GeM3")
    ref = np.array([[(sum(float(v[i, k]) ** 3 for v in vs) / 3) ** (1 / 3) for k in range(4)] for i in range(3)])
    np.testing.assert_allclose(combine_scales(vs, gem, p).numpy(), ref, rtol=1e-9)
    ref_max = np.array([[max(float(v[i, k]) for v in vs) for k in range(4)] for i in range(3)])
    np.testing.assert_allclose(combine_scales(vs, *parse_pooling("MAX")).numpy(), ref_max)
    ref_mean = np.array([[sum(float(v[i, k]) for v in vs) / 3 for k in range(4)] for i in range(3)])
    np.testing.assert_allclose(combine_scales(vs, *parse_pooling("CroW")).numpy(), ref_mean)
    # GeM of the union of equal-size maps == power mean of the per-map GeMs
    maps = [relu_map(seed=s) for s in range(3)]
    whole = F.gem(torch.cat(maps, dim=-1), p=3.0)
    np.testing.assert_allclose(combine_scales([F.gem(m, 3.0) for m in maps], gem, p).numpy(), whole.numpy(), rtol=1e-6)


def test_registry_is_one_function_one_line():
    import inspect

    import cbir.pooling as P

    src = inspect.getsource(P)
    for name in ("RMAC", "SPP", "CroW", "SCDA", "CAM"):
        assert sum(1 for line in src.splitlines() if line.startswith(f'register_pooling("{name}"')) == 1
        assert POOLINGS[name].build.__module__ == "cbir.pooling.functional"


# ----------------------------------------------------------------------------- post-processing


def test_whitening_variants_against_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / (len(x) - 1)
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1][:4]
    lam, vec = lam[order], vec[:, order]
    for token, power, shrink in (("PCAW4", 0.5, 0.0), ("PCAWR4", 0.25, 0.0), ("PCAWS4", 0.5, 0.5), ("PCAWS4-0.2", 0.5, 0.2)):
        t = parse_postprocess(token)
        y = t.fit_transform(x.astype(np.float32))
        lam_s = (1 - shrink) * lam + shrink * lam.mean()
        ref = np.zeros((len(x), 4))
        for i in range(len(x)):
            for j in range(4):
                ref[i, j] = sum((x[i, d] - mu[d]) * vec[d, j] for d in range(6)) / (lam_s[j] + 1e-6) ** power
        signs = np.sign((y * ref).sum(0))  # eigenvectors are defined up to sign
        np.testing.assert_allclose(y * signs, ref, rtol=1e-3, atol=1e-4)
    assert isinstance(parse_postprocess("PCAWS8"), WhiteningPCA)


def test_layer_fusion_against_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    t = parse_postprocess("W0.25-0.75")
    t.dims_ = np.array([2, 3])
    y = t.transform(x)
    for i in range(3):
        a, b = x[i, :2], x[i, 2:]
        ref = np.concatenate([math.sqrt(0.25) * unit(a), math.sqrt(0.75) * unit(b)])
        np.testing.assert_allclose(y[i], ref, rtol=1e-5)
        assert abs(np.linalg.norm(y[i]) - 1) < 1e-5
    # inner product = weighted mean of per-layer cosines
    c = float(y[0] @ y[1])
    ref = 0.25 * unit(x[0, :2]) @ unit(x[1, :2]) + 0.75 * unit(x[0, 2:]) @ unit(x[1, 2:])
    assert abs(c - ref) < 1e-5


def test_learned_layer_weights_pick_the_informative_layer():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(6), 3)
    centres = rng.normal(size=(6, 8))
    good = centres[y] + 0.1 * rng.normal(size=(18, 8))  # clusters by label
    noise = rng.normal(size=(18, 4))  # unrelated to the label
    t = LayerFusion(None)
    t.dims_ = np.array([4, 8])
    t.fit(np.concatenate([noise, good], 1).astype(np.float32), y)
    assert t.weights_[1] > 0.5
    # the leave-one-out mAP helper against a hand-computed case
    sims = np.array([[1, .9, .1], [.9, 1, .2], [.1, .2, 1]])
    assert loo_map(sims, np.array([0, 0, 1])) == 1.0
    assert loo_map(-sims, np.array([0, 0, 1])) == 0.5
    with pytest.raises(ValueError, match="labelled"):
        LayerFusion(None).fit(np.zeros((3, 2)), None)
    assert learn_layer_weights([good / np.linalg.norm(good, axis=1, keepdims=True)], y).tolist() == [1.0]


# -------------------------------------------------------------------------------- re-ranking


def rand_unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_top(sims_row, k):
    return sorted(range(len(sims_row)), key=lambda j: (-sims_row[j], j))[:k]


def test_query_expansion_against_reference():
    q, db = rand_unit(3, 8, 0), rand_unit(20, 8, 1)
    for k, alpha in ((3, 0.0), (5, 3.0)):
        out = query_expansion(q, db, k, alpha)
        for i in range(3):
            s = [float(q[i] @ d) for d in db]
            v = q[i].astype(np.float64).copy()
            for j in ref_top(s, k):
                v += (1.0 if alpha == 0 else max(s[j], 0) ** alpha) * db[j]
            np.testing.assert_allclose(out[i], unit(v), rtol=1e-5, atol=1e-6)
    ranked = rerank(q, db, [parse_rerank("QE3")])
    np.testing.assert_allclose(ranked, query_expansion(q, db, 3) @ db.T, rtol=1e-6)


def test_dba_against_reference():
    db = rand_unit(12, 6, 2)
    out = database_augmentation(db, 3)
    for i in range(12):
        s = [float(db[i] @ d) for d in db]
        v = sum(db[j].astype(np.float64) for j in ref_top(s, 3))
        np.testing.assert_allclose(out[i], unit(v), rtol=1e-5, atol=1e-6)
    assert ref_top([float(db[0] @ d) for d in db], 1) == [0]  # itself first


def test_dba_on_shortlist_matches_full():
    q, db = rand_unit(1, 6, 3), rand_unit(30, 6, 4)
    full = rerank(q, db, [parse_rerank("DBA3"), parse_rerank("QE2")])[0]
    cand = np.argsort(-full)[:10]

    def neighbours(v, k):  # exact k-NN in the whole database, as a Flat index search gives
        sims = v @ db.T
        nn = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, nn, 1), db[nn]

    short = rerank_shortlist(q[0], db[cand], [parse_rerank("DBA3"), parse_rerank("QE2")], neighbours)
    # QE on the shortlist sees the same top-2 (they are in the shortlist) -> same scores
    np.testing.assert_allclose(short, full[cand], rtol=1e-5, atol=1e-6)


def ref_k_reciprocal(q, db, k1, k2, lam):
    allx = np.concatenate([q, db]).astype(np.float64)
    n, nq = len(allx), len(q)
    d = np.array([[max(0.0, float(((a - b) ** 2).sum())) for b in allx] for a in allx])
    d = d / d.max(axis=1, keepdims=True)
    knn = [sorted(range(n), key=lambda j: (d[i, j], j)) for i in range(n)]

    def R(i, k):
        return {j for j in knn[i][:k + 1] if i in knn[j][:k + 1]}

    V = np.zeros((n, n))
    for i in range(n):
        r = R(i, k1)
        exp = set(r)
        for c in r:
            rc = R(c, round(k1 / 2))
            if len(rc & r) > 2 / 3 * len(rc):
                exp |= rc
        wsum = sum(math.exp(-d[i, j]) for j in exp)
        for j in exp:
            V[i, j] = math.exp(-d[i, j]) / wsum
    V = np.array([V[knn[i][:k2]].mean(0) for i in range(n)])
    out = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(nq, n):
            mn = sum(min(V[i, t], V[j, t]) for t in range(n))
            mx = sum(max(V[i, t], V[j, t]) for t in range(n))
            out[i, j - nq] = (1 - lam) * (1 - mn / mx) + lam * d[i, j]
    return -out


def test_k_reciprocal_against_reference():
    q, db = rand_unit(2, 5, 5), rand_unit(14, 5, 6)
    np.testing.assert_allclose(k_reciprocal(q, db, 4, 3, 0.3), ref_k_reciprocal(q, db, 4, 3, 0.3), rtol=1e-4, atol=1e-5)
    r = parse_rerank("KRR4-3-0.3")
    assert (r.kind, r.k, r.k2, r.lam) == ("KRR", 4, 3, 0.3)


def test_diffusion_against_dense_solve():
    q, db = rand_unit(2, 5, 7), rand_unit(15, 5, 8)
    k, alpha, gamma = 4, 0.9, 3.0
    n = len(db)
    s = db.astype(np.float64) @ db.T
    A = np.zeros((n, n))
    for i in range(n):
        for j in ref_top(list(s[i]), k + 1):
            A[i, j] = max(s[i, j], 0) ** gamma
    A = np.minimum(A, A.T)
    np.fill_diagonal(A, 0)
    dinv = np.diag(1 / np.sqrt(np.maximum(A.sum(1), 1e-12)))
    L = np.eye(n) - alpha * dinv @ A @ dinv
    for i in range(2):
        y = np.zeros(n)
        qs = db @ q[i]
        for j in ref_top(list(qs), k):
            y[j] = max(qs[j], 0) ** gamma
        ref = np.linalg.solve(L, y)
        np.testing.assert_allclose(diffusion(q, db, k, alpha, gamma, iters=500, tol=1e-10)[i], ref, rtol=1e-4, atol=1e-6)


def test_rerank_tokens():
    assert parse_rerank("aQE10a3").alpha == 3 and parse_rerank("aQE10a3").k == 10
    assert parse_rerank("DIFF").k == 10 and parse_rerank("DIFF20a0.8").alpha == 0.8
    assert parse_rerank("QE") is None and parse_rerank("L2") is None
    with pytest.raises(ValueError, match="last"):
        rerank(rand_unit(1, 3, 0), rand_unit(5, 3, 1), [parse_rerank("KRR3"), parse_rerank("QE2")])


# ----------------------------------------------------------------------------- local encoders


def fitted(enc, **state):
    return enc.load_state(state)


def test_bow_tfidf_against_reference():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(4, 3)).astype(np.float32)
    idf = np.array([0.5, 1.0, 2.0, 0.1], np.float32)
    enc = fitted(BoW(4, d=3), centroids_=c, idf_=idf)
    locs = rng.normal(size=(9, 3)).astype(np.float32)
    x = enc.prepare(locs)  # L2-normalised (no PCA: D <= d)
    counts = np.zeros(4)
    for v in x:
        counts[min(range(4), key=lambda j: float(((v - c[j]) ** 2).sum()))] += 1
    np.testing.assert_allclose(enc.encode([locs])[0], unit(counts / 9 * idf), rtol=1e-5)


def test_vlad_against_reference():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(3, 4)).astype(np.float32)
    enc = fitted(VLAD(3, d=4), centroids_=c)
    locs = rng.normal(size=(10, 4)).astype(np.float32)
    x = enc.prepare(locs)
    v = np.zeros((3, 4))
    for xi in x:
        j = min(range(3), key=lambda j: float(((xi - c[j]) ** 2).sum()))
        v[j] += xi - c[j]
    v = np.sign(v) * np.sqrt(np.abs(v))  # power
    v = np.array([r / max(np.linalg.norm(r), 1e-12) for r in v])  # intra
    np.testing.assert_allclose(enc.encode([locs])[0], unit(v.ravel()), rtol=1e-5, atol=1e-6)


def test_fisher_vector_against_reference():
    rng = np.random.default_rng(2)
    K, D = 2, 3
    w = np.array([0.3, 0.7], np.float32)
    mu = rng.normal(size=(K, D)).astype(np.float32)
    var = rng.uniform(0.5, 1.5, size=(K, D)).astype(np.float32)
    enc = fitted(FisherVector(K, d=D), weights_=w, means_=mu, vars_=var)
    locs = rng.normal(size=(6, D)).astype(np.float32)
    x = enc.prepare(locs).astype(np.float64)
    T = len(x)
    gmu, gsig = np.zeros((K, D)), np.zeros((K, D))
    for t in range(T):
        dens = [w[k] * np.prod([math.exp(-(x[t, d] - mu[k, d]) ** 2 / (2 * var[k, d])) / math.sqrt(2 * math.pi * var[k, d])
                                for d in range(D)]) for k in range(K)]
        gam = [p / sum(dens) for p in dens]
        for k in range(K):
            for d in range(D):
                z = (x[t, d] - mu[k, d]) / math.sqrt(var[k, d])
                gmu[k, d] += gam[k] * z / (T * math.sqrt(w[k]))
                gsig[k, d] += gam[k] * (z * z - 1) / (T * math.sqrt(2 * w[k]))
    fv = np.concatenate([gmu.ravel(), gsig.ravel()])
    fv = np.sign(fv) * np.sqrt(np.abs(fv))
    np.testing.assert_allclose(enc.encode([locs])[0], unit(fv), rtol=1e-4, atol=1e-6)


def test_encoders_fit_and_gmm_recovers_clusters():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 2)) * 0.1 + [3, 0]
    b = rng.normal(size=(100, 2)) * 0.1 + [-3, 0]
    w, mu, var = fit_gmm(np.concatenate([a, b]), 2)
    order = np.argsort(mu[:, 0])
    np.testing.assert_allclose(mu[order], [[-3, 0], [3, 0]], atol=0.05)
    np.testing.assert_allclose(w[order], [1 / 3, 2 / 3], atol=0.02)
    sets = [rng.normal(size=(rng.integers(3, 8), 16)).astype(np.float32) for _ in range(12)]
    for token, dim in (("BoW8d4", 8), ("VLAD4d4", 16), ("FV2d4", 16)):
        enc = parse_encoder(token).fit(sets)
        out = enc.encode(sets[:3])
        assert out.shape == (3, dim) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
        assert enc.pca_components_.shape == (4, 16)


# ----------------------------------------------------------------------------------- regions


def test_sliding_windows():
    boxes = sliding_windows(300, 400, 2)
    assert boxes[0] == (0, 0, 400, 300)
    # level 1: side 300, 2 windows along the width; level 2: side 200, 3 x 2 (R-MAC layout)
    sides = sorted({b[2] - b[0] for b in boxes[1:]})
    assert sides == [200, 300] and len(boxes) == 1 + 2 + 6
    assert all(0 <= b[0] < b[2] <= 400 and 0 <= b[1] < b[3] <= 300 for b in boxes)
    assert parse_regions("regions:proposals16@160").size == 160
    with pytest.raises(ValueError):
        parse_regions("regions:grid3")


def test_selective_search_finds_objects():
    img = np.zeros((120, 160, 3), np.uint8)
    img[...] = (40, 120, 40)
    img[20:60, 20:70] = (220, 30, 30)  # a red block
    img[70:110, 90:150] = (30, 30, 220)  # a blue block
    rng = np.random.default_rng(0)
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    boxes = selective_search(img, 10)
    assert boxes[0] == (0, 0, 160, 120)

    def iou(a, b):
        ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy)

    for target in ((20, 20, 70, 60), (90, 70, 150, 110)):
        assert max(iou(target, b) for b in boxes) > 0.8
