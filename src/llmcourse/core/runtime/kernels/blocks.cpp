// GGUF block products with 8-bit activations: y = x W^T for W stored as ggml blocks.
//
// The activations are quantized per row on the fly to 8-bit blocks (32 values with an fp16-rounded
// scale for the legacy types, as ggml's Q8_0; 256 values with an fp32 scale and 16-value sums for the
// k-quants, as ggml's Q8_K), so each block's inner product is an exact integer sum (blocks_impl.h).
// The instruction set is chosen at run time: AVX-512 VNNI (vpdpbusd on 256-bit registers), AVX2
// (vpmaddubsw + vpmaddwd), or portable C++; the caller may ask for a lower one (tests, benchmarks).
// Output rows are split over PyTorch's intra-op threads (at::parallel_for); with several activation
// rows (a prompt), each tile of ROWS weight rows meets every activation row while it is in cache.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BLK_X86 1
#endif

namespace {

enum : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };
// A legacy type (Q4_0 ... Q8_0) + X8: its rows interleaved 8 at a time (`interleave`), the same bytes in another
// order. Per group of 8 rows and block b (8 x the block's bytes): the 8 fp16 d, the 8 fp16 m (Q4_1, Q5_1), 32
// bytes of fifth-bit planes (Q5_0, Q5_1: bit p of byte 4j + k = bit 4p + k of row j's qh), then the codes in
// 32-byte vectors v whose byte 4j + k is byte 4v + k of row j's codes (Q8_0: 8 vectors of q; 4-bit: 4 of qs).
constexpr int64_t X8 = 256;
constexpr int64_t ROWS = 16;  // weight rows per tile of a prompt's product

struct ActRow {  // one activation row as 8-bit blocks
  const int8_t* q;     // the codes (n)
  const float* d;      // one scale per block
  const int32_t* s16;  // sums of the codes per 16 values
  const float* sd;     // legacy blocks: fp16(d · Σ q) (ggml's Q8_1 s)
};
using DotFn = float (*)(const uint8_t*, const ActRow&, int64_t);  // one weight row . one activation row
using RowsFn = void (*)(const uint8_t*, const ActRow*, int64_t, float*, int64_t);  // . NR activation rows
struct DotSet { RowsFn f[4]; };  // NR = 1..4

float F16[65536];  // every fp16 bit pattern as fp32 (exact), filled once at load

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
  float v;
  if (exp == 0) v = std::ldexp((float)man, -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp((float)(man | 1024), (int)exp - 25);
  uint32_t bits; std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

struct F16Init { F16Init() { for (uint32_t i = 0; i < 65536; ++i) F16[i] = half_bits_to_float((uint16_t)i); } } f16_init;

inline float fp16_to_fp32(uint16_t h) { return F16[h]; }
inline float fp16_at(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return F16[h]; }

uint16_t fp32_to_fp16(float f) {  // round to nearest even (as the F16C instruction)
  uint32_t x; std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7fffffff;
  if (x >= 0x7f800000) return (uint16_t)(sign | (x > 0x7f800000 ? 0x7e00 : 0x7c00));
  if (x >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // rounds to >= 65520: infinity
  if (x < 0x38800000) {  // a subnormal half (or zero)
    float v; std::memcpy(&v, &x, 4);
    return (uint16_t)(sign | (uint16_t)std::nearbyint(v * 16777216.f));
  }
  const uint32_t mant = x & 0x7fffff, e = (x >> 23) - 112;
  uint32_t h = (e << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return (uint16_t)(sign | h);
}

inline void k_scales(const uint8_t* s, uint8_t* sc, uint8_t* mn) {  // Q4_K/Q5_K's 12 bytes -> 8 x (6-bit scale, min)
  for (int j = 0; j < 4; ++j) { sc[j] = s[j] & 63; mn[j] = s[j + 4] & 63; }
  for (int j = 4; j < 8; ++j) {
    sc[j] = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

inline int legacy_bytes(int64_t t) { return t == Q4_0 ? 18 : t == Q4_1 ? 20 : t == Q5_0 ? 22 : t == Q5_1 ? 24 : 34; }
inline bool is_legacy(int64_t t) { return t == Q4_0 || t == Q4_1 || t == Q5_0 || t == Q5_1 || t == Q8_0; }
struct X8Layout {  // byte offsets in one stored block (qh, codes) and in one interleaved group-block (m, planes, codes)
  int bytes, qh, qs, nvec, g_m, g_h, g_codes;
  explicit X8Layout(int64_t t) {
    bytes = legacy_bytes(t);
    const bool m = t == Q4_1 || t == Q5_1, h = t == Q5_0 || t == Q5_1;
    qh = h ? (m ? 4 : 2) : -1;
    qs = 2 + (m ? 2 : 0) + (h ? 4 : 0);
    nvec = t == Q8_0 ? 8 : 4;
    g_m = m ? 16 : -1;
    g_h = h ? (m ? 32 : 16) : -1;
    g_codes = 16 + (m ? 16 : 0) + (h ? 32 : 0);
  }
};

// Row j's stored block -> its place in the group-block g (scatter), and back (gather).
void scatter_block(const X8Layout& L, const uint8_t* blk, int j, uint8_t* g) {
  std::memcpy(g + 2 * j, blk, 2);
  if (L.g_m >= 0) std::memcpy(g + L.g_m + 2 * j, blk + 2, 2);
  if (L.g_h >= 0) {
    uint32_t h; std::memcpy(&h, blk + L.qh, 4);
    for (int k = 0; k < 4; ++k) {
      uint8_t byte = 0;
      for (int p = 0; p < 8; ++p) byte |= (uint8_t)(((h >> (4 * p + k)) & 1) << p);
      g[L.g_h + 4 * j + k] = byte;
    }
  }
  for (int v = 0; v < L.nvec; ++v) std::memcpy(g + L.g_codes + 32 * v + 4 * j, blk + L.qs + 4 * v, 4);
}

void gather_block(const X8Layout& L, const uint8_t* g, int j, uint8_t* blk) {
  std::memcpy(blk, g + 2 * j, 2);
  if (L.g_m >= 0) std::memcpy(blk + 2, g + L.g_m + 2 * j, 2);
  if (L.g_h >= 0) {
    uint32_t h = 0;
    for (int k = 0; k < 4; ++k)
      for (int p = 0; p < 8; ++p) h |= (uint32_t)((g[L.g_h + 4 * j + k] >> p) & 1) << (4 * p + k);
    std::memcpy(blk + L.qh, &h, 4);
  }
  for (int v = 0; v < L.nvec; ++v) std::memcpy(blk + L.qs + 4 * v, g + L.g_codes + 32 * v + 4 * j, 4);
}

namespace portable {
#include "blocks_impl.h"
}

// The portable product of interleaved blocks: each row of the group gathered back, then the scalar kernel.
template <int64_t T, int NR>
void gathered8(const uint8_t* w, const ActRow* a, int64_t nb, float* y, int64_t ys) {
  static thread_local std::vector<uint8_t> row;
  const X8Layout L(T);
  row.resize(nb * L.bytes);
  const RowsFn f = portable::pick(T).f[NR - 1];
  for (int j = 0; j < 8; ++j) {
    for (int64_t b = 0; b < nb; ++b) gather_block(L, w + b * 8 * L.bytes, j, row.data() + b * L.bytes);
    f(row.data(), a, nb, y + j, ys);
  }
}

#define BLK_G8(t) DotSet{gathered8<t, 1>, gathered8<t, 2>, gathered8<t, 3>, gathered8<t, 4>}
DotSet portable_pick8(int64_t type) {
  switch (type) {
    case Q8_0: return BLK_G8(Q8_0);
    case Q4_0: return BLK_G8(Q4_0);
    case Q4_1: return BLK_G8(Q4_1);
    case Q5_0: return BLK_G8(Q5_0);
    case Q5_1: return BLK_G8(Q5_1);
    default: return {nullptr, nullptr, nullptr, nullptr};
  }
}
#undef BLK_G8

#ifdef BLK_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define BLK_SIMD 1
#include "blocks_impl.h"
#undef BLK_SIMD
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
namespace vnni {
#define BLK_SIMD 2
#include "blocks_impl.h"
#undef BLK_SIMD
}
#pragma GCC pop_options
#endif

int64_t detected_level() {  // 0 portable, 1 AVX2, 2 AVX-512 VNNI
#ifdef BLK_X86
  static const int64_t level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return (int64_t)2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return (int64_t)1;
    return (int64_t)0;
  }();
  return level;
#else
  return 0;
#endif
}

int64_t effective(int64_t level) { return level < 0 ? detected_level() : std::min(level, detected_level()); }

struct TypeInfo { int64_t block, bytes; bool k; int64_t unit; };  // unit: rows per call of a kernel

TypeInfo type_info(int64_t t) {
  if (t & X8) {
    TORCH_CHECK(is_legacy(t & ~X8), "block type ", t, " has no interleaved kernel");
    return {32, legacy_bytes(t & ~X8), false, 8};
  }
  switch (t) {
    case Q4_0: return {32, 18, false, 1};
    case Q4_1: return {32, 20, false, 1};
    case Q5_0: return {32, 22, false, 1};
    case Q5_1: return {32, 24, false, 1};
    case Q8_0: return {32, 34, false, 1};
    case Q4_K: return {256, 144, true, 1};
    case Q5_K: return {256, 176, true, 1};
    case Q6_K: return {256, 210, true, 1};
    default: TORCH_CHECK(false, "block type ", t, " has no kernel");
  }
  return {0, 0, false, 1};
}

using QuantFn = void (*)(const float*, int64_t, int, bool, int8_t*, float*, int32_t*, float*);

QuantFn quant_for(int64_t level) {
#ifdef BLK_X86
  if (level == 2) return vnni::quantize_row;
  if (level == 1) return avx2::quantize_row;
#endif
  return portable::quantize_row;
}

DotSet dot_for(int64_t level, int64_t type) {
  if (type & X8) {
#ifdef BLK_X86
    if (level == 2) return vnni::pick8(type & ~X8);
    if (level == 1) return avx2::pick8(type & ~X8);
#endif
    return portable_pick8(type & ~X8);
  }
#ifdef BLK_X86
  if (level == 2) return vnni::pick(type);
  if (level == 1) return avx2::pick(type);
#endif
  return portable::pick(type);
}

struct Quantized {  // a batch of activation rows as 8-bit blocks of one size
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s16;
  std::vector<float> sd;
  std::vector<ActRow> rows;
};

void quantize_rows(const float* xp, int64_t n, int64_t in, int64_t block, int64_t level, Quantized& out) {
  const int64_t nb = in / block;
  out.q.resize(n * in);
  out.d.resize(n * nb);
  out.s16.resize(n * in / 16);
  out.sd.resize(n * nb);
  const QuantFn quant = quant_for(level);
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      quant(xp + r * in, in, (int)block, block == 32, out.q.data() + r * in, out.d.data() + r * nb,
            out.s16.data() + r * in / 16, out.sd.data() + r * nb);
  });
  out.rows.resize(n);
  for (int64_t r = 0; r < n; ++r)
    out.rows[r] = {out.q.data() + r * in, out.d.data() + r * nb, out.s16.data() + r * in / 16, out.sd.data() + r * nb};
}

inline void scale_rows(float* __restrict y, const float* __restrict s, int64_t n) {  // y_i *= s_i (vectorized)
  for (int64_t i = 0; i < n; ++i) y[i] *= s[i];
}

struct Job {  // one weight's product: its blocks, row bytes, kernels and output
  const uint8_t* w;
  int64_t rb, nb, out, unit;
  DotSet dot;
  const ActRow* acts;
  float* y;
  const float* scale;  // per output row, applied after the product (nullptr: none)
};

// y_j = x W_j^T for several weights sharing the input x (q/k/v, gate/up): the activations are quantized once
// per block size and all the weights' output rows are split over the threads in one parallel region; each
// output row times scales[j] where given (the int8 lab's per-row scales: in this pass, not one more call).
std::vector<at::Tensor> block_mm_many(const at::Tensor& x, at::TensorList ws, at::IntArrayRef types,
                                      at::IntArrayRef outs, int64_t level, const c10::List<std::optional<at::Tensor>>& scales) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x must be (N, I) contiguous fp32");
  TORCH_CHECK(ws.size() == types.size() && ws.size() == outs.size() && !ws.empty(), "one type and size per weight");
  const int64_t n = x.size(0), in = x.size(1);
  level = effective(level);
  Quantized q32, q256;
  bool need32 = false, need256 = false;
  std::vector<Job> jobs;
  std::vector<at::Tensor> ys;
  int64_t total = 0;
  for (size_t j = 0; j < ws.size(); ++j) {
    const TypeInfo ti = type_info(types[j]);
    TORCH_CHECK(in % ti.block == 0, "inputs ", in, " are not a multiple of the block size ", ti.block);
    TORCH_CHECK(ws[j].scalar_type() == at::kByte && ws[j].is_contiguous(), "w must be contiguous uint8 blocks");
    const int64_t nb = in / ti.block, rb = nb * ti.bytes;
    TORCH_CHECK(ws[j].numel() == outs[j] * rb, "w holds ", ws[j].numel(), " bytes, expected ", outs[j] * rb);
    TORCH_CHECK(outs[j] % ti.unit == 0, "interleaved blocks need a multiple of ", ti.unit, " rows");
    (ti.k ? need256 : need32) = true;
    ys.push_back(at::empty({n, outs[j]}, x.options()));
    const float* sp = nullptr;
    if (j < scales.size()) {
      const std::optional<at::Tensor> s = scales.get(j);
      if (s.has_value() && s->defined()) {
        TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == outs[j],
                    "a scale must be contiguous fp32 with one value per output row");
        sp = s->data_ptr<float>();
      }
    }
    jobs.push_back({ws[j].data_ptr<uint8_t>(), rb, nb, outs[j], ti.unit, dot_for(level, types[j]), nullptr,
                    ys.back().data_ptr<float>(), sp});
    total += outs[j] / ti.unit;
  }
  if (need32) quantize_rows(x.data_ptr<float>(), n, in, 32, level, q32);
  if (need256) quantize_rows(x.data_ptr<float>(), n, in, 256, level, q256);
  for (size_t j = 0; j < jobs.size(); ++j) jobs[j].acts = type_info(types[j]).k ? q256.rows.data() : q32.rows.data();
  // the threads split the units of all the weights: rows, or groups of 8 interleaved rows
  const int64_t grain = std::max<int64_t>(2, total / (8 * std::max(1, at::get_num_threads())));
  at::parallel_for(0, total, grain, [&](int64_t b, int64_t e) {
    int64_t base = 0;
    for (const Job& job : jobs) {  // the part of [b, e) that falls in this weight's units
      const int64_t units = job.out / job.unit;
      const int64_t lo = std::max(b, base) - base, hi = std::min(e, base + units) - base;
      base += units;
      if (job.unit == 8) {  // a group of 8 rows, in cache, meets every activation row
        for (int64_t g = lo; g < hi; ++g)
          for (int64_t t = 0; t < n; t += 4) {
            const int64_t k = std::min<int64_t>(4, n - t);
            job.dot.f[k - 1](job.w + g * 8 * job.rb, job.acts + t, job.nb, job.y + t * job.out + 8 * g, job.out);
          }
        if (job.scale)
          for (int64_t t = 0; t < n; ++t) scale_rows(job.y + t * job.out + 8 * lo, job.scale + 8 * lo, 8 * (hi - lo));
        continue;
      }
      for (int64_t r0 = lo; r0 < hi; r0 += ROWS) {
        const int64_t r1 = std::min(hi, r0 + ROWS);
        for (int64_t t = 0; t < n; t += 4) {
          const int64_t k = std::min<int64_t>(4, n - t);
          for (int64_t r = r0; r < r1; ++r)
            job.dot.f[k - 1](job.w + r * job.rb, job.acts + t, job.nb, job.y + t * job.out + r, job.out);
        }
        if (job.scale)
          for (int64_t t = 0; t < n; ++t) scale_rows(job.y + t * job.out + r0, job.scale + r0, r1 - r0);
      }
    }
  });
  return ys;
}

at::Tensor block_mm(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t out_features, int64_t level,
                    const std::optional<at::Tensor>& scale) {
  c10::List<std::optional<at::Tensor>> scales;
  scales.push_back(scale);
  return block_mm_many(x, {w}, {type}, {out_features}, level, scales)[0];
}

// The weight rows `ids` as fp32 (an embedding lookup of a quantized table): exact ggml de-quantization.
void dequant_block(int64_t t, const uint8_t* p, float* y) {
  uint8_t u[32];
  switch (t) {
    case Q8_0: { const float dd = fp16_at(p); for (int i = 0; i < 32; ++i) y[i] = (float)(int8_t)p[2 + i] * dd; return; }
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
      const int off = t == Q4_0 ? 2 : t == Q4_1 ? 4 : t == Q5_0 ? 6 : 8;
      for (int i = 0; i < 16; ++i) { u[i] = p[off + i] & 15; u[i + 16] = p[off + i] >> 4; }
      if (t == Q5_0 || t == Q5_1) {
        uint32_t h; std::memcpy(&h, p + (t == Q5_0 ? 2 : 4), 4);
        for (int i = 0; i < 32; ++i) u[i] |= ((h >> i) & 1) << 4;
      }
      const float dd = fp16_at(p);
      if (t == Q4_0 || t == Q5_0) { const int z = t == Q4_0 ? 8 : 16; for (int i = 0; i < 32; ++i) y[i] = (float)(u[i] - z) * dd; }
      else { const float m = fp16_at(p + 2); for (int i = 0; i < 32; ++i) y[i] = (float)u[i] * dd + m; }
      return;
    }
    case Q4_K: case Q5_K: {
      uint8_t sc[8], mn[8];
      k_scales(p + 4, sc, mn);
      const float dd = fp16_at(p), dm = fp16_at(p + 2);
      const uint8_t* qh = p + 16;
      const uint8_t* qs = p + (t == Q4_K ? 16 : 48);
      for (int j = 0; j < 4; ++j) {
        const float d1 = dd * sc[2 * j], m1 = dm * mn[2 * j], d2 = dd * sc[2 * j + 1], m2 = dm * mn[2 * j + 1];
        for (int l = 0; l < 32; ++l) {
          int lo = qs[32 * j + l] & 15, hi = qs[32 * j + l] >> 4;
          if (t == Q5_K) { lo += ((qh[l] >> (2 * j)) & 1) << 4; hi += ((qh[l] >> (2 * j + 1)) & 1) << 4; }
          y[64 * j + l] = d1 * (float)lo - m1;
          y[64 * j + 32 + l] = d2 * (float)hi - m2;
        }
      }
      return;
    }
    case Q6_K: {
      const float dd = fp16_at(p + 208);
      const int8_t* sc = (const int8_t*)(p + 192);
      for (int n = 0; n < 2; ++n) {
        const uint8_t* ql = p + 64 * n; const uint8_t* qh = p + 128 + 32 * n; const int8_t* s = sc + 8 * n;
        float* o = y + 128 * n;
        for (int l = 0; l < 32; ++l) {
          const int h = l / 16;
          o[l] = dd * s[h] * (float)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
          o[l + 32] = dd * s[h + 2] * (float)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
          o[l + 64] = dd * s[h + 4] * (float)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
          o[l + 96] = dd * s[h + 6] * (float)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
      }
      return;
    }
  }
}

at::Tensor block_rows(const at::Tensor& w, const at::Tensor& ids, int64_t type, int64_t in_features) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8 blocks");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids must be contiguous int64");
  const TypeInfo ti = type_info(type);
  TORCH_CHECK(in_features % ti.block == 0, "inputs are not a multiple of the block size");
  const int64_t nb = in_features / ti.block, rb = nb * ti.bytes, rows = w.numel() / rb;
  const int64_t k = ids.numel();
  at::Tensor y = at::empty({k, in_features}, at::TensorOptions().dtype(at::kFloat));
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, "row ", ip[i], " out of range");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (type & X8) {  // row r is lane r % 8 of group r / 8
    const X8Layout L(type & ~X8);
    at::parallel_for(0, k, 64, [&](int64_t b, int64_t e) {
      uint8_t blk[34];
      for (int64_t i = b; i < e; ++i) {
        const uint8_t* g = wp + (ip[i] / 8) * 8 * rb;
        for (int64_t j = 0; j < nb; ++j) {
          gather_block(L, g + j * 8 * ti.bytes, (int)(ip[i] % 8), blk);
          dequant_block(type & ~X8, blk, yp + i * in_features + j * ti.block);
        }
      }
    });
    return y;
  }
  at::parallel_for(0, k, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < nb; ++j) dequant_block(type, wp + ip[i] * rb + j * ti.bytes, yp + i * in_features + j * ti.block);
  });
  return y;
}

// W (O, I) as stored -> the same bytes interleaved 8 rows at a time (type + X8; O a multiple of 8), or back.
at::Tensor block_interleave(const at::Tensor& w, int64_t type, int64_t in_features, bool inverse) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8 blocks");
  TORCH_CHECK(is_legacy(type), "only Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks interleave");
  TORCH_CHECK(in_features % 32 == 0, "inputs are not a multiple of the block size");
  const X8Layout L(type);
  const int64_t nb = in_features / 32, rb = nb * L.bytes;
  TORCH_CHECK(w.numel() % (8 * rb) == 0, "interleaving needs a multiple of 8 rows");
  const int64_t groups = w.numel() / (8 * rb);
  at::Tensor out = at::empty_like(w);
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 16, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g)
      for (int j = 0; j < 8; ++j)
        for (int64_t k = 0; k < nb; ++k) {
          const int64_t grouped = g * 8 * rb + k * 8 * L.bytes, stored = (g * 8 + j) * rb + k * L.bytes;
          if (inverse) gather_block(L, src + grouped, j, dst + stored);
          else scatter_block(L, src + stored, j, dst + grouped);
        }
  });
  return out;
}

int64_t block_level() { return detected_level(); }

}  // namespace

TORCH_LIBRARY(llmcourse_blocks, m) {
  m.def("mm(Tensor x, Tensor w, int qtype, int out_features, int level, Tensor? scale=None) -> Tensor");
  m.def("mm_many(Tensor x, Tensor[] ws, int[] qtypes, int[] out_features, int level, Tensor?[] scales) -> Tensor[]");
  m.def("rows(Tensor w, Tensor ids, int qtype, int in_features) -> Tensor");
  m.def("interleave(Tensor w, int qtype, int in_features, bool inverse) -> Tensor");
  m.def("level() -> int", &block_level);
}

TORCH_LIBRARY_IMPL(llmcourse_blocks, CPU, m) {
  m.impl("mm", block_mm);
  m.impl("mm_many", block_mm_many);
  m.impl("rows", block_rows);
  m.impl("interleave", block_interleave);
}
