// The tile loop of ekfac_lambda (csrc/cpu/ekfac_lambda.cpp), included once per instruction set
// inside a `#pragma GCC target` region and a namespace of its own, so that every function here
// (vector helpers included) is compiled for that instruction set before it is inlined.
// No include guard, on purpose. Expects v8/v16, Job, FASTINF_INLINE and std::min in scope.

template <class V>
FASTINF_INLINE V vload(const float* p);
template <>
FASTINF_INLINE v8 vload<v8>(const float* p) { return *reinterpret_cast<const v8u*>(p); }
template <>
FASTINF_INLINE v16 vload<v16>(const float* p) { return *reinterpret_cast<const v16u*>(p); }
template <class V>
FASTINF_INLINE void vstore(float* p, V x);
template <>
FASTINF_INLINE void vstore<v8>(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
template <>
FASTINF_INLINE void vstore<v16>(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }

// x in every lane (x - 0 is x exactly, so this folds to a plain broadcast, unlike 0 + x, which
// must turn -0 into +0)
template <class V>
FASTINF_INLINE V vbcast(float x) { return x - V{}; }

// sum_{examples of the chunk} (Xp_eᵀ Yp_e)^2 for one tile (TM x VW·TV), added into lam.
template <class V, int VW, int TM, int TV>
FASTINF_INLINE void tile_sums(const Job& j, const float* Xp, const float* Yp, int tn,
                              float* lam) {
  V s[TM][TV];
  for (int i = 0; i < TM; ++i)
    for (int v = 0; v < TV; ++v) s[i][v] = vload<V>(lam + i * tn + v * VW);
  for (int64_t e = j.e0; e < j.e1; ++e) {
    const int64_t r0 = j.offs[e] - j.r0, K = j.offs[e + 1] - j.offs[e];
    const float* x = Xp + r0 * TM;
    const float* y = Yp + r0 * tn;
    V acc[TM][TV];
    for (int i = 0; i < TM; ++i)
      for (int v = 0; v < TV; ++v) acc[i][v] = V{};
    for (int64_t k = 0; k < K; ++k) {
      V b[TV];
      for (int v = 0; v < TV; ++v) b[v] = vload<V>(y + k * tn + v * VW);
#pragma GCC unroll 8
      for (int i = 0; i < TM; ++i) {
        const V a = vbcast<V>(x[k * TM + i]);
        for (int v = 0; v < TV; ++v) acc[i][v] += a * b[v];
      }
    }
    for (int i = 0; i < TM; ++i)
      for (int v = 0; v < TV; ++v) s[i][v] += acc[i][v] * acc[i][v];
  }
  for (int i = 0; i < TM; ++i)
    for (int v = 0; v < TV; ++v) vstore<V>(lam + i * tn + v * VW, s[i][v]);
}

// Tiles [t0, t1) of the chunk (t = y-panel * nx + x-panel: a thread's column panel stays in L1
// across its row panels). The last column panel takes the half-width tile when that covers it.
template <class V, int VW, int TM, int TV>
FASTINF_INLINE void tiles(const Job& j, int64_t t0, int64_t t1) {
  constexpr int TN = VW * TV;
  alignas(64) float lam[TM * TN];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t q = t / j.nx, p = t % j.nx;
    const int64_t x0 = p * TM, y0 = q * TN;
    const int64_t nr = std::min<int64_t>(TM, j.X - x0), nc = std::min<int64_t>(TN, j.Y - y0);
    const int64_t ldo = j.transposed ? j.X : j.Y;
    // out entry of tile entry (i, k): out[x0 + i, y0 + k] or, transposed, out[y0 + k, x0 + i]
    const int64_t si = j.transposed ? 1 : ldo, sk = j.transposed ? ldo : 1;
    float* dst = j.out + (j.transposed ? y0 * ldo + x0 : x0 * ldo + y0);
    for (int k = 0; k < TM * TN; ++k) lam[k] = 0.f;
    if (!j.first)
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t k = 0; k < nc; ++k) lam[i * TN + k] = dst[i * si + k * sk];
    const float* Xp = j.Xp + p * j.rows * TM;
    const float* Yp = j.Yp + q * j.rows * TN;
    if (TV > 1 && nc <= VW)
      tile_sums<V, VW, TM, 1>(j, Xp, Yp, TN, lam);
    else
      tile_sums<V, VW, TM, TV>(j, Xp, Yp, TN, lam);
    for (int64_t i = 0; i < nr; ++i)
      for (int64_t k = 0; k < nc; ++k) dst[i * si + k * sk] = lam[i * TN + k];
  }
}

