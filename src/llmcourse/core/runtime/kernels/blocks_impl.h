// Block dot products for one instruction set. Included three times by blocks.cpp, each time inside
// its own namespace and `#pragma GCC target` region: BLK_SIMD undefined (portable scalar C++),
// BLK_SIMD=1 (AVX2: maddubs + madd), BLK_SIMD=2 (AVX-512 VNNI on 256-bit registers: dpbusd).
// Every function computes  sum_i w[i] * a[i]  over one row, with w as stored in the GGUF row
// (ggml's block structs) and a the row's 8-bit activation blocks (ActRow); integer sums are exact,
// scales are applied in fp32 per block (legacy types) or per 256-value super-block (k-quants).

static inline void quantize_row(const float* x, int64_t n, int bs, bool legacy, int8_t* q, float* d,
                                int32_t* s16, float* sd) {
  // 8-bit blocks of bs values, rounded half to even, as llama.cpp's CPU backend quantizes activations:
  // legacy (Q8_0): q = round(x · 127 / max|x|), d = fp16(max|x| / 127);
  // k-quants (Q8_K): with m the value of largest magnitude, q = min(127, round(x · (-127 / m))), d = 1 / (-127 / m).
  // s16: sums of q per 16 values; sd (legacy): fp16(max|x| / 127 · Σ q) per block, as ggml's Q8_1 ``s`` (the
  // minima of Q4_1/Q5_1 meet it).
  for (int64_t b = 0; b < n / bs; ++b) {
    const float* xb = x + b * bs;
    float amax = 0.f, m = 0.f;
    for (int i = 0; i < bs; ++i) {
      const float ax = std::fabs(xb[i]);
      if (ax > amax) { amax = ax; m = xb[i]; }
    }
    int8_t* qb = q + b * bs;
    if (legacy) {
      const float id = amax != 0.f ? 127.f / amax : 0.f;
      d[b] = fp16_to_fp32(fp32_to_fp16(amax / 127.f));
      for (int i = 0; i < bs; ++i) qb[i] = (int8_t)std::nearbyint(xb[i] * id);
    } else if (amax == 0.f) {
      d[b] = 0.f;
      for (int i = 0; i < bs; ++i) qb[i] = 0;
    } else {
      const float is = -127.f / m;
      d[b] = 1.f / is;
      for (int i = 0; i < bs; ++i) qb[i] = (int8_t)std::min(127.f, std::nearbyint(is * xb[i]));
    }
    int32_t total = 0;
    for (int k = 0; k < bs / 16; ++k) {
      int32_t s = 0;
      for (int i = 0; i < 16; ++i) s += qb[16 * k + i];
      s16[b * (bs / 16) + k] = s;
      total += s;
    }
    if (legacy) sd[b] = fp16_to_fp32(fp32_to_fp16(amax / 127.f * (float)total));
  }
}

#ifndef BLK_SIMD
// ------------------------------------------------------------------------------ portable scalar
static inline int32_t dot32(const uint8_t* u, const int8_t* a) {  // codes 0..255 (as int) times a
  int32_t s = 0;
  for (int i = 0; i < 32; ++i) s += (int32_t)u[i] * a[i];
  return s;
}

static float dot_q8_0(const uint8_t* w, const ActRow& a, int64_t nb) {
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 34;
    const int8_t* q = (const int8_t*)(blk + 2);
    int32_t s = 0;
    for (int i = 0; i < 32; ++i) s += (int32_t)q[i] * a.q[32 * b + i];
    sum += fp16_at(blk) * a.d[b] * (float)s;
  }
  return sum;
}

static inline void nibbles(const uint8_t* qs, uint8_t* u) {  // 16 bytes -> 32 codes (low nibbles first)
  for (int i = 0; i < 16; ++i) { u[i] = qs[i] & 15; u[i + 16] = qs[i] >> 4; }
}

static inline void fifth_bits(const uint8_t* qh, uint8_t* u) {  // bit j of qh -> +16 on code j
  uint32_t h; std::memcpy(&h, qh, 4);
  for (int i = 0; i < 32; ++i) u[i] |= ((h >> i) & 1) << 4;
}

template <int TYPE>
static float dot_legacy(const uint8_t* w, const ActRow& a, int64_t nb) {
  // Q4_0: d (q - 8)  Q4_1: d q + m  Q5_0: d (q - 16)  Q5_1: d q + m
  constexpr int size = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : TYPE == Q5_0 ? 22 : 24;
  float sum = 0.f;
  uint8_t u[32];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * size;
    const float dd = fp16_at(blk) * a.d[b];
    const int32_t sa = a.s16[2 * b] + a.s16[2 * b + 1];
    if (TYPE == Q4_0 || TYPE == Q4_1) nibbles(blk + (TYPE == Q4_0 ? 2 : 4), u);
    else { nibbles(blk + (TYPE == Q5_0 ? 6 : 8), u); fifth_bits(blk + (TYPE == Q5_0 ? 2 : 4), u); }
    const int32_t s = dot32(u, a.q + 32 * b);
    if (TYPE == Q4_0) sum += dd * (float)(s - 8 * sa);
    else if (TYPE == Q5_0) sum += dd * (float)(s - 16 * sa);
    else sum += dd * (float)s + fp16_at(blk + 2) * a.sd[b];
  }
  return sum;
}

template <int TYPE>
static float dot_k45(const uint8_t* w, const ActRow& a, int64_t nb) {
  // Q4_K / Q5_K: d sc_j q - dmin m_j over 8 sub-blocks of 32
  constexpr int size = TYPE == Q4_K ? 144 : 176;
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * size;
    uint8_t sc[8], mn[8];
    k_scales(blk + 4, sc, mn);
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + (TYPE == Q4_K ? 16 : 48);
    const int8_t* aq = a.q + 256 * b;
    const int32_t* bs = a.s16 + 16 * b;
    int32_t isum = 0, msum = 0;
    for (int j = 0; j < 4; ++j) {
      int32_t s0 = 0, s1 = 0;
      for (int l = 0; l < 32; ++l) {
        int32_t lo = qs[32 * j + l] & 15, hi = qs[32 * j + l] >> 4;
        if (TYPE == Q5_K) { lo += ((qh[l] >> (2 * j)) & 1) << 4; hi += ((qh[l] >> (2 * j + 1)) & 1) << 4; }
        s0 += lo * aq[64 * j + l];
        s1 += hi * aq[64 * j + 32 + l];
      }
      isum += sc[2 * j] * s0 + sc[2 * j + 1] * s1;
      msum += mn[2 * j] * (bs[4 * j] + bs[4 * j + 1]) + mn[2 * j + 1] * (bs[4 * j + 2] + bs[4 * j + 3]);
    }
    sum += fp16_at(blk) * a.d[b] * (float)isum - fp16_at(blk + 2) * a.d[b] * (float)msum;
  }
  return sum;
}

static float dot_q6_k(const uint8_t* w, const ActRow& a, int64_t nb) {
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    const int8_t* aq = a.q + 256 * b;
    const int32_t* bs = a.s16 + 16 * b;
    int32_t isum = 0;
    for (int n = 0; n < 2; ++n) {
      const uint8_t* ql = blk + 64 * n;
      const uint8_t* qh = blk + 128 + 32 * n;
      const int8_t* s = sc + 8 * n;
      const int8_t* y = aq + 128 * n;
      int32_t p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int l = 0; l < 32; ++l) {
        const int h = l / 16;
        p[0 + h] += ((ql[l] & 15) | ((qh[l] & 3) << 4)) * y[l];
        p[2 + h] += ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) * y[l + 32];
        p[4 + h] += ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) * y[l + 64];
        p[6 + h] += ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) * y[l + 96];
      }
      for (int k = 0; k < 8; ++k) isum += s[k] * p[k];
    }
    int32_t corr = 0;
    for (int k = 0; k < 16; ++k) corr += sc[k] * bs[k];
    sum += fp16_at(blk + 208) * a.d[b] * (float)(isum - 32 * corr);
  }
  return sum;
}

template <DotFn F, int NR>
static void rows_of(const uint8_t* w, const ActRow* a, int64_t nb, float* y, int64_t ys) {
  for (int r = 0; r < NR; ++r) y[r * ys] = F(w, a[r], nb);
}

#define BLK_ROWS(f) {rows_of<f, 1>, rows_of<f, 2>, rows_of<f, 3>, rows_of<f, 4>}
static DotSet pick(int64_t type) {
  switch (type) {
    case Q8_0: return BLK_ROWS(dot_q8_0);
    case Q4_0: return BLK_ROWS(dot_legacy<Q4_0>);
    case Q4_1: return BLK_ROWS(dot_legacy<Q4_1>);
    case Q5_0: return BLK_ROWS(dot_legacy<Q5_0>);
    case Q5_1: return BLK_ROWS(dot_legacy<Q5_1>);
    case Q4_K: return BLK_ROWS(dot_k45<Q4_K>);
    case Q5_K: return BLK_ROWS(dot_k45<Q5_K>);
    case Q6_K: return BLK_ROWS(dot_q6_k);
    default: return {nullptr, nullptr, nullptr, nullptr};
  }
}
#undef BLK_ROWS

#else
// ------------------------------------------------------------------------------ AVX2 / AVX-512 VNNI
static inline __m256i dot_us(__m256i u, __m256i s) {
  // 8 int32 sums of four u8 x s8 products
#if BLK_SIMD == 2
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline __m256i dot_us_scaled(__m256i u, __m256i s, int sa, int sb) {
  // 8 int32 lanes: sa x (four products) for the first 16 bytes, sb for the last 16. maddubs + madd on every
  // level: the pairs of products fit int16 (codes < 64 here: 2 x 63 x 128 < 2^15), and madd applies the
  // scales for free, where vpdpbusd would need a vpmulld (10 cycles' latency) after it.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s),
                           _mm256_setr_epi16(sa, sa, sa, sa, sa, sa, sa, sa, sb, sb, sb, sb, sb, sb, sb, sb));
}

static inline float f16_at(const uint8_t* p) {  // an fp16 scale through F16C (no table lookup)
  uint16_t h; std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

static inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

static inline __m256i load_nibbles(const uint8_t* qs) {  // 16 bytes -> 32 codes 0..15, low nibbles first
  const __m128i b = _mm_loadu_si128((const __m128i*)qs);
  const __m128i m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

static inline __m256i bits_to_16(const uint8_t* qh) {  // bit j of 4 bytes -> byte j = 16 or 0
  uint32_t h; std::memcpy(&h, qh, 4);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
}

// Each product takes NR activation rows at once (a prompt): a weight block is decoded once and meets all of
// them while in registers; y[r * ys] receives row r's dot product.
template <int NR>
static void dot_q8_0(const uint8_t* w, const ActRow* a, int64_t nb, float* y, int64_t ys) {
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 34;
    const float dw = f16_at(blk);
    const __m256i q = _mm256_loadu_si256((const __m256i*)(blk + 2));
    const __m256i u = _mm256_sign_epi8(q, q);  // |q|, and the activations take q's sign
    for (int r = 0; r < NR; ++r) {
      const __m256i s = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(a[r].q + 32 * b)), q);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(u, s)), _mm256_set1_ps(dw * a[r].d[b]), acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) y[r * ys] = hsum(acc[r]);
}

template <int TYPE, int NR>
static void dot_legacy(const uint8_t* w, const ActRow* a, int64_t nb, float* y, int64_t ys) {
  // Q4_0 / Q5_0: the codes minus their offset (8, 16) as signed bytes, multiplied as Q8_0 (llama.cpp's scheme:
  // no per-block correction term); Q4_1 / Q5_1: unsigned codes, + m · fp16(d_a Σ q_a) per block.
  constexpr int size = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : TYPE == Q5_0 ? 22 : 24;
  constexpr bool offset = TYPE == Q4_0 || TYPE == Q5_0;
  __m256 acc[NR];
  float corr[NR];
  for (int r = 0; r < NR; ++r) { acc[r] = _mm256_setzero_ps(); corr[r] = 0.f; }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * size;
    const float dw = f16_at(blk);
    __m256i u;
    if (TYPE == Q4_0 || TYPE == Q4_1) u = load_nibbles(blk + (TYPE == Q4_0 ? 2 : 4));
    else u = _mm256_or_si256(load_nibbles(blk + (TYPE == Q5_0 ? 6 : 8)), bits_to_16(blk + (TYPE == Q5_0 ? 2 : 4)));
    if (offset) u = _mm256_sub_epi8(u, _mm256_set1_epi8(TYPE == Q4_0 ? 8 : 16));
    const __m256i su = offset ? _mm256_sign_epi8(u, u) : u;
    for (int r = 0; r < NR; ++r) {
      const __m256i yq = _mm256_loadu_si256((const __m256i*)(a[r].q + 32 * b));
      const __m256i p = offset ? dot_us(su, _mm256_sign_epi8(yq, u)) : dot_us(u, yq);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a[r].d[b]), acc[r]);
      if (!offset) corr[r] += f16_at(blk + 2) * a[r].sd[b];
    }
  }
  for (int r = 0; r < NR; ++r) y[r * ys] = hsum(acc[r]) + corr[r];
}

template <int TYPE, int NR>
static void dot_k45(const uint8_t* w, const ActRow* a, int64_t nb, float* y, int64_t ys) {
  constexpr int size = TYPE == Q4_K ? 144 : 176;
  __m256 acc[NR];
  float corr[NR];
  for (int r = 0; r < NR; ++r) { acc[r] = _mm256_setzero_ps(); corr[r] = 0.f; }
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * size;
    uint8_t sc[8], mn[8];
    k_scales(blk + 4, sc, mn);
    const uint8_t* qs = blk + (TYPE == Q4_K ? 16 : 48);
    __m256i qh = _mm256_setzero_si256();
    if (TYPE == Q5_K) qh = _mm256_loadu_si256((const __m256i*)(blk + 16));
    __m256i isum[NR];
    for (int r = 0; r < NR; ++r) isum[r] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
      __m256i lo = _mm256_and_si256(q, m4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
      if (TYPE == Q5_K) {
        const __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * j))), b1 = _mm256_set1_epi8((char)(2 << (2 * j)));
        const __m256i sixteen = _mm256_set1_epi8(16);
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), sixteen));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen));
      }
      for (int r = 0; r < NR; ++r) {
        const int8_t* aq = a[r].q + 256 * b + 64 * j;
        isum[r] = _mm256_add_epi32(isum[r], dot_us_scaled(lo, _mm256_loadu_si256((const __m256i*)aq), sc[2 * j], sc[2 * j]));
        isum[r] = _mm256_add_epi32(isum[r], dot_us_scaled(hi, _mm256_loadu_si256((const __m256i*)(aq + 32)),
                                                          sc[2 * j + 1], sc[2 * j + 1]));
      }
    }
    const float dw = f16_at(blk), dmin = f16_at(blk + 2);
    for (int r = 0; r < NR; ++r) {
      const int32_t* bs = a[r].s16 + 16 * b;
      int32_t msum = 0;
      for (int j = 0; j < 8; ++j) msum += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(dw * a[r].d[b]), acc[r]);
      corr[r] -= dmin * a[r].d[b] * (float)msum;
    }
  }
  for (int r = 0; r < NR; ++r) y[r * ys] = hsum(acc[r]) + corr[r];
}

template <int NR>
static void dot_q6_k(const uint8_t* w, const ActRow* a, int64_t nb, float* y, int64_t ys) {
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    __m256i isum[NR];
    for (int r = 0; r < NR; ++r) isum[r] = _mm256_setzero_si256();
    for (int n = 0; n < 2; ++n) {
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(blk + 64 * n));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(blk + 64 * n + 32));
      const __m256i h = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * n));
      const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
      const __m256i q2 = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4));
      const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4));
      const __m256i q4 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4));
      const int8_t* s = sc + 8 * n;
      for (int r = 0; r < NR; ++r) {
        const int8_t* yq = a[r].q + 256 * b + 128 * n;
        __m256i t = dot_us_scaled(q1, _mm256_loadu_si256((const __m256i*)(yq)), s[0], s[1]);
        t = _mm256_add_epi32(t, dot_us_scaled(q2, _mm256_loadu_si256((const __m256i*)(yq + 32)), s[2], s[3]));
        t = _mm256_add_epi32(t, dot_us_scaled(q3, _mm256_loadu_si256((const __m256i*)(yq + 64)), s[4], s[5]));
        t = _mm256_add_epi32(t, dot_us_scaled(q4, _mm256_loadu_si256((const __m256i*)(yq + 96)), s[6], s[7]));
        isum[r] = _mm256_add_epi32(isum[r], t);
      }
    }
    const float dw = f16_at(blk + 208);
    for (int r = 0; r < NR; ++r) {
      const int32_t* bs = a[r].s16 + 16 * b;
      int32_t corr = 0;
      for (int k = 0; k < 16; ++k) corr += sc[k] * bs[k];
      const __m256i is = _mm256_sub_epi32(isum[r], _mm256_setr_epi32(32 * corr, 0, 0, 0, 0, 0, 0, 0));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_set1_ps(dw * a[r].d[b]), acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) y[r * ys] = hsum(acc[r]);
}

// Interleaved legacy blocks (X8: eight weight rows repacked together at load, blocks.cpp `scatter_block`).
// One call multiplies a group of 8 rows: every 32-bit lane of a code vector holds 4 codes of one row, the same
// 4 positions in all eight, so one broadcast of 4 activation codes meets all rows and the 8 sums stay in the
// lanes (no horizontal sums); the 8 row scales convert at once (vcvtph2ps). y[r * ys + j] receives row j's
// product with activation row r. Q4_0/Q5_0 as unsigned codes minus z · Σ q_a per block (exact integers).
static void dot8_q8_0_row(const uint8_t* w, const ActRow& a, int64_t nb, float* y) {
  // Q8_0 in ggml's own order, so that each row's product is bit for bit llama.cpp's (ggml_vec_dot_q8_0_q8_0):
  // lane v of a row's sums is positions 4v..4v+3 of every block, accumulated in fp32 block by block
  // (acc_v = fma(cvt(sum_v), d_w · d_a, acc_v)), and the 8 lanes are added as its hsum_float_8 adds them.
  // Code vector v holds exactly those positions for the 8 rows, so acc[v] keeps lane v of all 8 rows.
  __m256 acc[8];
  for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* g = w + b * 272;
    const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g)), _mm256_set1_ps(a.d[b]));
    for (int v = 0; v < 8; ++v) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(g + 16 + 32 * v));
      int32_t a4; std::memcpy(&a4, a.q + 32 * b + 4 * v, 4);
      const __m256i s = _mm256_sign_epi8(_mm256_set1_epi32(a4), q);  // the activations take q's sign
      acc[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(_mm256_sign_epi8(q, q), s)), d, acc[v]);
    }
  }
  const __m256 lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
  const __m256 hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
  _mm256_storeu_ps(y, _mm256_add_ps(lo, hi));
}

template <int NR>
static void dot8_q8_0(const uint8_t* w, const ActRow* a, int64_t nb, float* y, int64_t ys) {
  for (int r = 0; r < NR; ++r) dot8_q8_0_row(w, a[r], nb, y + r * ys);  // the group stays in L1 between rows
}

template <int TYPE, int NR>
static void dot8_legacy(const uint8_t* w, const ActRow* a, int64_t nb, float* y, int64_t ys) {
  constexpr int size = 8 * (TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : TYPE == Q5_0 ? 22 : 24);
  constexpr bool has_m = TYPE == Q4_1 || TYPE == Q5_1, has_h = TYPE == Q5_0 || TYPE == Q5_1;
  constexpr int hoff = has_m ? 32 : 16, coff = hoff + (has_h ? 32 : 0);
  constexpr int z = TYPE == Q4_0 ? 8 : TYPE == Q5_0 ? 16 : 0;
  const __m256i low4 = _mm256_set1_epi8(15), bit5 = _mm256_set1_epi8(16);
#if BLK_SIMD != 2
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* g = w + b * size;
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g));
    __m256i is[NR];
    for (int r = 0; r < NR; ++r) is[r] = _mm256_setzero_si256();
    {
      __m256i h = _mm256_setzero_si256();
      if constexpr (has_h) h = _mm256_loadu_si256((const __m256i*)(g + hoff));
      for (int v = 0; v < 4; ++v) {
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(g + coff + 32 * v));
        __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        if constexpr (has_h) {  // bit plane v -> codes 4v..4v+3, plane 4 + v -> codes 16 + 4v.. (as +16)
          lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4 - v), bit5));
          hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi16(h, v), bit5));
        }
        for (int r = 0; r < NR; ++r) {
          int32_t al, ah;
          std::memcpy(&al, a[r].q + 32 * b + 4 * v, 4);
          std::memcpy(&ah, a[r].q + 32 * b + 16 + 4 * v, 4);
#if BLK_SIMD == 2
          is[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(is[r], lo, _mm256_set1_epi32(al)), hi, _mm256_set1_epi32(ah));
#else  // two pairs of products of codes < 32 fit int16: 2 · 2 · 31 · 127 < 2^15
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(al)),
                                             _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ah)));
          is[r] = _mm256_add_epi32(is[r], _mm256_madd_epi16(p, ones));
#endif
        }
      }
    }
    __m256 mw = _mm256_setzero_ps();
    if constexpr (has_m) mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(g + 16)));
    for (int r = 0; r < NR; ++r) {
      __m256i t = is[r];
      if constexpr (z != 0) t = _mm256_sub_epi32(t, _mm256_set1_epi32(z * (a[r].s16[2 * b] + a[r].s16[2 * b + 1])));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dw, _mm256_set1_ps(a[r].d[b])), acc[r]);
      if constexpr (has_m) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a[r].sd[b]), acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) _mm256_storeu_ps(y + r * ys, acc[r]);
}

#define BLK_X8(t) {dot8_legacy<t, 1>, dot8_legacy<t, 2>, dot8_legacy<t, 3>, dot8_legacy<t, 4>}
static DotSet pick8(int64_t type) {  // the interleaved layouts (type without the X8 flag)
  switch (type) {
    case Q8_0: return {dot8_q8_0<1>, dot8_q8_0<2>, dot8_q8_0<3>, dot8_q8_0<4>};
    case Q4_0: return BLK_X8(Q4_0);
    case Q4_1: return BLK_X8(Q4_1);
    case Q5_0: return BLK_X8(Q5_0);
    case Q5_1: return BLK_X8(Q5_1);
    default: return {nullptr, nullptr, nullptr, nullptr};
  }
}
#undef BLK_X8

#define BLK_ROWS(f) {f<1>, f<2>, f<3>, f<4>}
static DotSet pick(int64_t type) {
  switch (type) {
    case Q8_0: return BLK_ROWS(dot_q8_0);
    case Q4_0: return {dot_legacy<Q4_0, 1>, dot_legacy<Q4_0, 2>, dot_legacy<Q4_0, 3>, dot_legacy<Q4_0, 4>};
    case Q4_1: return {dot_legacy<Q4_1, 1>, dot_legacy<Q4_1, 2>, dot_legacy<Q4_1, 3>, dot_legacy<Q4_1, 4>};
    case Q5_0: return {dot_legacy<Q5_0, 1>, dot_legacy<Q5_0, 2>, dot_legacy<Q5_0, 3>, dot_legacy<Q5_0, 4>};
    case Q5_1: return {dot_legacy<Q5_1, 1>, dot_legacy<Q5_1, 2>, dot_legacy<Q5_1, 3>, dot_legacy<Q5_1, 4>};
    case Q4_K: return {dot_k45<Q4_K, 1>, dot_k45<Q4_K, 2>, dot_k45<Q4_K, 3>, dot_k45<Q4_K, 4>};
    case Q5_K: return {dot_k45<Q5_K, 1>, dot_k45<Q5_K, 2>, dot_k45<Q5_K, 3>, dot_k45<Q5_K, 4>};
    case Q6_K: return BLK_ROWS(dot_q6_k);
    default: return {nullptr, nullptr, nullptr, nullptr};
  }
}
#undef BLK_ROWS
#endif
