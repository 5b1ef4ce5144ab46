// CPU kernels of mmbiformer (float32, channels-last).
//
// Built on first use by mmbiformer/ops/cpu_ext.py with
// torch.utils.cpp_extension.load; every kernel has a pure-torch fallback.
// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked
// at run time (GCC target_clones), so one build runs on any x86-64 CPU;
// below AVX-512 the build pins one level (MMB_ISA, below). The operator
// takes the attention kernels by default at AVX-512 and AVX2, where they
// were measured faster than its portable code (mmbiformer/ops/bra.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

// MMB_ISA pins one level instead (2: AVX2, 1: baseline), so that a forced
// ATEN_CPU_CAPABILITY runs the code of that level (mmbiformer/ops/cpu_ext.py).
#if defined(MMB_ISA) && MMB_ISA == 2
#define MMB_CLONES __attribute__((target("avx2,fma")))
#elif defined(MMB_ISA)
#define MMB_CLONES
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MMB_CLONES
#endif
// helpers inlined into each clone, so they are compiled for its target
#define MMB_INLINE inline __attribute__((always_inline))

namespace {

// A 4-D float32 view with unit innermost stride: (N, L, h, c) for the
// attention, (N, H, W, C) for the depthwise conv.
struct View4 {
  float* p;
  int64_t sn, sl, sh;
  MMB_INLINE float* at(int64_t n, int64_t l, int64_t hd) const {
    return p + n * sn + l * sl + hd * sh;
  }
};

View4 view4(const torch::Tensor& t) {
  return View4{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// ---------------------------------------------------------------------------
// Bi-level routing attention on channels-last maps, in the map's token order.
//
// q, k: (N, L, h, d), v: (N, L, h, dv) views of (N, H, W, h * d) maps (any
// strides, unit last stride), L = H * W, H = n_win * rh, W = n_win * rw,
// d and dv multiples of 16. topk_index: (N, n_win ** 2, K) int64, regions in
// row-major order. A query token of region r attends to the tokens of
// regions topk_index[n, r, :] (key j = kk * rh * rw + ty * rw + tx is token
// (ty, tx) of routed region kk):
//   out = softmax(scale * q k^T) v,  lse = log-sum-exp of the logits.
// Per (batch, query region, head) the kernels read the routed key/value rows
// where they lie (through row pointers); for regions of more than 16 tokens
// the logits read a transposed copy of the routed keys (amortised over the
// region's query blocks), for regions of 2, 4 or 8 tokens a grouped copy of
// the keys of the (batch, head) (see RoutedKeys), for the others they are
// dot products of rows. The backward needs lse, not the output.
// The products run in 4-query x 16-lane register blocks (GCC vector
// extensions), the exponentials in a vectorised exp (Cephes polynomial,
// about 1 ulp).

// The kernels compute on 16-float vectors `v16` (and `i16`, their integer
// bit patterns). At AVX-512 and baseline x86-64 they are GCC vector
// extensions. At AVX2 (MMB_ISA 2) a v16 is a pair of native 8-lane halves:
// GCC lowers a 16-lane vector shuffle to 32 scalar moves where the target
// has no 16-lane registers, which had made these kernels up to 8.5x slower
// than the operator's portable code there (docs/benchmarks.md). Lane shuffles go through shuffle2<Perm16> (constant
// two-source) and permute (one source, lane indices in a vector), so the
// kernels read the same at every level.

struct Perm16 {  // lane j of shuffle2(a, b) is (a | b)[m[j]], m[j] < 32
  int m[16];
};

#if defined(MMB_ISA) && MMB_ISA == 2
#include <immintrin.h>
#define MMB_SPLIT 1
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

struct v16 {
  v8 lo, hi;
  MMB_INLINE float& operator[](int i) { return reinterpret_cast<float*>(this)[i]; }
  MMB_INLINE float operator[](int i) const {
    return reinterpret_cast<const float*>(this)[i];
  }
};
struct i16 {
  vi8 lo, hi;
  MMB_INLINE int32_t& operator[](int i) {
    return reinterpret_cast<int32_t*>(this)[i];
  }
};

#define MMB_BINARY(T, OP)                                                  \
  MMB_INLINE T operator OP(T a, T b) { return {a.lo OP b.lo, a.hi OP b.hi}; } \
  MMB_INLINE T& operator OP##=(T& a, T b) { return a = a OP b; }
#define MMB_SCALAR(T, S, OP)                                                  \
  MMB_INLINE T operator OP(T a, S s) { return {a.lo OP s, a.hi OP s}; }       \
  MMB_INLINE T operator OP(S s, T a) { return {s OP a.lo, s OP a.hi}; }
MMB_BINARY(v16, +) MMB_BINARY(v16, -) MMB_BINARY(v16, *)
MMB_SCALAR(v16, float, +) MMB_SCALAR(v16, float, -) MMB_SCALAR(v16, float, *)
MMB_SCALAR(v16, float, /)
MMB_BINARY(i16, +) MMB_BINARY(i16, -) MMB_BINARY(i16, &) MMB_BINARY(i16, |)
MMB_SCALAR(i16, int32_t, +) MMB_SCALAR(i16, int32_t, -)
MMB_SCALAR(i16, int32_t, &)
#undef MMB_BINARY
#undef MMB_SCALAR
MMB_INLINE v16 operator-(v16 a) { return {-a.lo, -a.hi}; }
MMB_INLINE i16 operator~(i16 a) { return {~a.lo, ~a.hi}; }
MMB_INLINE i16 operator>>(i16 a, int s) { return {a.lo >> s, a.hi >> s}; }
MMB_INLINE i16 operator<<(i16 a, int s) { return {a.lo << s, a.hi << s}; }

MMB_INLINE v16 load16(const float* p) {
  return {*reinterpret_cast<const v8u*>(p),
          *reinterpret_cast<const v8u*>(p + 8)};
}
MMB_INLINE void store16(float* p, v16 x) {
  *reinterpret_cast<v8u*>(p) = x.lo;
  *reinterpret_cast<v8u*>(p + 8) = x.hi;
}
MMB_INLINE i16 as_int(v16 x) {
  return {reinterpret_cast<vi8>(x.lo), reinterpret_cast<vi8>(x.hi)};
}
MMB_INLINE v16 as_float(i16 x) {
  return {reinterpret_cast<v8>(x.lo), reinterpret_cast<v8>(x.hi)};
}

// One 8-lane half of shuffle2: the (at most two) source halves that its
// lanes read, and the lane indices into their concatenation.
struct HalfPerm {
  int first, second, idx[8];
};
constexpr HalfPerm half_perm(Perm16 p, int half) {
  HalfPerm h{p.m[8 * half] / 8, p.m[8 * half] / 8, {}};
  for (int j = 0; j < 8; ++j)
    if (p.m[8 * half + j] / 8 != h.first) h.second = p.m[8 * half + j] / 8;
  for (int j = 0; j < 8; ++j) {
    const int src = p.m[8 * half + j] / 8;
    // not a constant expression: a mask of three source halves fails to
    // compile
    if (src != h.first && src != h.second) throw "3 source halves";
    h.idx[j] = p.m[8 * half + j] % 8 + (src == h.first ? 0 : 8);
  }
  return h;
}
template <Perm16 P, int HALF>
MMB_INLINE v8 shuffle_half(const v8* src) {
  constexpr HalfPerm h = half_perm(P, HALF);
  constexpr vi8 idx = {h.idx[0], h.idx[1], h.idx[2], h.idx[3],
                       h.idx[4], h.idx[5], h.idx[6], h.idx[7]};
  return __builtin_shuffle(src[h.first], src[h.second], idx);
}
template <Perm16 P>
MMB_INLINE v16 shuffle2(v16 a, v16 b) {
  const v8 src[4] = {a.lo, a.hi, b.lo, b.hi};
  return {shuffle_half<P, 0>(src), shuffle_half<P, 1>(src)};
}
// lane j: x[idx[j]], 0 <= idx[j] < 16 (vpermps of both halves, blended)
MMB_INLINE v8 permute_half(v16 x, vi8 idx) {
  const __m256i i = reinterpret_cast<__m256i>(idx);
  const __m256 from_lo = _mm256_permutevar8x32_ps(x.lo, i);
  const __m256 from_hi = _mm256_permutevar8x32_ps(x.hi, i);
  // bit 3 of the index (a lane of the high half) to the sign bit
  return _mm256_blendv_ps(from_lo, from_hi,
                          reinterpret_cast<__m256>(idx << 28));
}
MMB_INLINE v16 permute(v16 x, i16 idx) {
  return {permute_half(x, idx.lo), permute_half(x, idx.hi)};
}
#else
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));

MMB_INLINE v16 load16(const float* p) { return *reinterpret_cast<const v16u*>(p); }
MMB_INLINE void store16(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
MMB_INLINE i16 as_int(v16 x) { return reinterpret_cast<i16>(x); }
MMB_INLINE v16 as_float(i16 x) { return reinterpret_cast<v16>(x); }
template <Perm16 P>
MMB_INLINE v16 shuffle2(v16 a, v16 b) {
  constexpr i16 m = {P.m[0], P.m[1], P.m[2],  P.m[3],  P.m[4],  P.m[5],
                     P.m[6], P.m[7], P.m[8],  P.m[9],  P.m[10], P.m[11],
                     P.m[12], P.m[13], P.m[14], P.m[15]};
  return __builtin_shuffle(a, b, m);
}
MMB_INLINE v16 permute(v16 x, i16 idx) { return __builtin_shuffle(x, idx); }
#endif

// Registers hold 2 x 16 lanes of accumulators per query of a register block
// at AVX-512 (32 registers of 16 lanes), 1 x 16 elsewhere (16 of 8 lanes).
#if defined(MMB_SPLIT)
constexpr int kMaxNV = 1;
#else
constexpr int kMaxNV = 2;
#endif

MMB_INLINE v16 splat(float x) { return v16{} + x; }

// Lane selects by the sign bit of a float vector, in integer ops. GCC
// compiles compares and ?: of 16-lane vectors element by element where the
// target has no 16-lane registers (AVX2, baseline x86-64); shifts and
// bitwise ops it splits into native vectors.
MMB_INLINE i16 negative_mask(v16 x) {  // all ones where x's sign bit is set
  return as_int(x) >> 31;
}
MMB_INLINE v16 select_mask(i16 m, v16 a, v16 b) {  // m ? a : b, per lane
  return as_float((m & as_int(a)) | (~m & as_int(b)));
}
MMB_INLINE v16 vmax(v16 a, v16 b) {  // a < b ? b : a (finite or +-inf)
  return select_mask(negative_mask(a - b), b, a);
}
MMB_INLINE v16 vabs(v16 x) { return as_float(as_int(x) & 0x7fffffff); }

MMB_INLINE v16 vexp(v16 x) {
  x = vmax(x, splat(-87.3f));
  const float magic = 12582912.f;  // 1.5 * 2^23: round to nearest integer
  const v16 t = x * 1.44269504088896341f + magic;
  const v16 n = t - magic;
  const i16 ni = as_int(t) - as_int(splat(magic));
  const v16 r = x - n * 0.693359375f - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const i16 e = (ni + 127) << 23;
  return p * as_float(e);
}

MMB_INLINE float hsum(v16 x) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}

MMB_INLINE float hmax(v16 x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, x[i]);
  return m;
}

constexpr int QB = 4;  // queries per register block

// Blocks of QB queries x NV 16-lane vectors: NV = 2 where the width allows
// (each load or broadcast then feeds two products), else 1.

// s_i[jb + j] = scale * sum_c q_i[c] kt[c, jb + j], j < 16 * NV
template <int NV>
MMB_INLINE void logits4_block(const float* const* q, const float* kt,
                              float* const* s, int64_t d, int64_t nk16,
                              int64_t jb, float scale) {
  v16 acc[QB][NV] = {};
  for (int64_t c = 0; c < d; ++c) {
    v16 kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = load16(kt + c * nk16 + jb + 16 * v);
    for (int i = 0; i < QB; ++i) {
      const float qi = q[i][c];
      for (int v = 0; v < NV; ++v) acc[i][v] += qi * kv[v];
    }
  }
  for (int i = 0; i < QB; ++i)
    for (int v = 0; v < NV; ++v)
      store16(s[i] + jb + 16 * v, acc[i][v] * scale);
}

// s_i[j] = scale * sum_c q_i[c] kt[c, j], j < nk16 (kt: (d, nk16))
MMB_INLINE void logits4(const float* const* q, const float* kt, float* const* s,
             int64_t d, int64_t nk16, float scale) {
  int64_t jb = 0;
  for (; kMaxNV == 2 && jb + 32 <= nk16; jb += 32) logits4_block<2>(q, kt, s, d, nk16, jb, scale);
  for (; jb < nk16; jb += 16) logits4_block<1>(q, kt, s, d, nk16, jb, scale);
}

// A transpose-and-add tree over G = 2, 4, 8 or 16 vectors whose lane
// g * (16 / G) + t holds a partial sum g of output t: returns the 16 / G
// outputs of x[0], then those of x[1], ... (G = 16: out[j] = the sum of the
// lanes of x[j]).
template <int G>
MMB_INLINE v16 tree_sum(v16* x) {
  constexpr Perm16 lo8{{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}};
  constexpr Perm16 hi8{{8, 9, 10, 11, 12, 13, 14, 15,
                        24, 25, 26, 27, 28, 29, 30, 31}};
  constexpr Perm16 lo4{{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}};
  constexpr Perm16 hi4{{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}};
  constexpr Perm16 lo2{{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}};
  constexpr Perm16 hi2{{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}};
  constexpr Perm16 ev{{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
  constexpr Perm16 od{{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
  // each level halves the vectors and the partial sums per output: vector
  // p then holds those of inputs 2p and 2p + 1 in consecutive lane groups
  if (G >= 2)
    for (int p = 0; p < G / 2; ++p)
      x[p] = shuffle2<lo8>(x[2 * p], x[2 * p + 1]) +
             shuffle2<hi8>(x[2 * p], x[2 * p + 1]);
  if (G >= 4)
    for (int p = 0; p < G / 4; ++p)
      x[p] = shuffle2<lo4>(x[2 * p], x[2 * p + 1]) +
             shuffle2<hi4>(x[2 * p], x[2 * p + 1]);
  if (G >= 8)
    for (int p = 0; p < G / 8; ++p)
      x[p] = shuffle2<lo2>(x[2 * p], x[2 * p + 1]) +
             shuffle2<hi2>(x[2 * p], x[2 * p + 1]);
  if (G >= 16) x[0] = shuffle2<ev>(x[0], x[1]) + shuffle2<od>(x[0], x[1]);
  return x[0];
}

// q . kr as 16 lanes of partial sums; NV > 0: d = 16 * NV, the products
// unrolled with q in registers (qv) (with d a run-time loop bound the
// partial sums were spilled to the stack)
template <int NV>
MMB_INLINE v16 dot_lanes(const float* q, const v16* qv, const float* kr,
                         int64_t d) {
  if constexpr (NV > 0) {
    v16 a = qv[0] * load16(kr);
    for (int v = 1; v < NV; ++v) a += qv[v] * load16(kr + 16 * v);
    return a;
  } else {
    v16 a = load16(q) * load16(kr);
    for (int64_t c = 16; c < d; c += 16) a += load16(q + c) * load16(kr + c);
    return a;
  }
}

#if defined(MMB_SPLIT)
// 8-lane tree_sum<8>: lane j of the result is the sum of the lanes of x[j]
MMB_INLINE v8 tree_sum8(v8* x) {
  constexpr vi8 lo4 = {0, 1, 2, 3, 8, 9, 10, 11};
  constexpr vi8 hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  constexpr vi8 lo2 = {0, 1, 4, 5, 8, 9, 12, 13};
  constexpr vi8 hi2 = {2, 3, 6, 7, 10, 11, 14, 15};
  constexpr vi8 ev = {0, 2, 4, 6, 8, 10, 12, 14};
  constexpr vi8 od = {1, 3, 5, 7, 9, 11, 13, 15};
  for (int p = 0; p < 4; ++p)
    x[p] = __builtin_shuffle(x[2 * p], x[2 * p + 1], lo4) +
           __builtin_shuffle(x[2 * p], x[2 * p + 1], hi4);
  for (int p = 0; p < 2; ++p)
    x[p] = __builtin_shuffle(x[2 * p], x[2 * p + 1], lo2) +
           __builtin_shuffle(x[2 * p], x[2 * p + 1], hi2);
  return __builtin_shuffle(x[0], x[1], ev) + __builtin_shuffle(x[0], x[1], od);
}
#endif

// out[j] = q . rows[j], j < 16 (see dot_lanes for NV). At AVX-512 the 16
// vectors of partial sums go through one tree_sum<16>; with 8-lane halves
// 16 of them would not fit the registers, so each half folds its 8 keys'
// sums to 8 lanes first and takes an 8-lane tree.
template <int NV>
MMB_INLINE v16 dots16(const float* q, const float* const* rows, int64_t d) {
  v16 qv[NV > 0 ? NV : 1];
  for (int v = 0; v < NV; ++v) qv[v] = load16(q + 16 * v);
#if defined(MMB_SPLIT)
  v16 out;
  v8 acc[8];
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < 8; ++j) {
      const v16 a = dot_lanes<NV>(q, qv, rows[8 * h + j], d);
      acc[j] = a.lo + a.hi;
    }
    (h ? out.hi : out.lo) = tree_sum8(acc);
  }
  return out;
#else
  v16 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = dot_lanes<NV>(q, qv, rows[j], d);
  return tree_sum<16>(acc);
#endif
}

template <int NV>
MMB_INLINE void logits4_rows_nv(const float* const* q,
                                const float* const* rows, float* const* s,
                                int64_t d, int64_t nk16, float scale) {
  for (int64_t jb = 0; jb < nk16; jb += 16)
    for (int i = 0; i < QB; ++i)
      store16(s[i] + jb, dots16<NV>(q[i], rows + jb, d) * scale);
}

// s_i[j] = scale * q_i . rows[j], j < nk16 (rows: nk16 pointers, the
// padding ones to zeros): dot products of rows, for small regions, where a
// transposed copy of the keys would serve a single query block
MMB_INLINE void logits4_rows(const float* const* q, const float* const* rows,
                             float* const* s, int64_t d, int64_t nk16,
                             float scale) {
  if (d == 32) return logits4_rows_nv<2>(q, rows, s, d, nk16, scale);
  if (d == 16) return logits4_rows_nv<1>(q, rows, s, d, nk16, scale);
  logits4_rows_nv<0>(q, rows, s, d, nk16, scale);
}

// o_i[cb + c] (+)= inv_i * sum_{j < nk} p_i[j] rows[j][cb + c], c < 16 * NV
// (ADD: added to what o_i holds)
template <int NV, bool ADD>
MMB_INLINE void wsum4_block(const float* const* p, const float* const* rows,
                            float* const* o, const float* inv, int64_t nk,
                            int64_t cb) {
  v16 acc[QB][NV] = {};
  for (int64_t j = 0; j < nk; ++j) {
    v16 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = load16(rows[j] + cb + 16 * v);
    for (int i = 0; i < QB; ++i) {
      const float pi = p[i][j];
      for (int v = 0; v < NV; ++v) acc[i][v] += pi * vv[v];
    }
  }
  for (int i = 0; i < QB; ++i)
    for (int v = 0; v < NV; ++v) {
      float* dst = o[i] + cb + 16 * v;
      store16(dst, ADD ? load16(dst) + acc[i][v] * inv[i] : acc[i][v] * inv[i]);
    }
}

// o_i[c] (+)= inv_i * sum_{j < nk} p_i[j] rows[j][c]
template <bool ADD = false>
MMB_INLINE void wsum4(const float* const* p, const float* const* rows,
                      float* const* o, const float* inv, int64_t nk,
                      int64_t dv) {
  int64_t cb = 0;
  for (; kMaxNV == 2 && cb + 32 <= dv; cb += 32)
    wsum4_block<2, ADD>(p, rows, o, inv, nk, cb);
  for (; cb < dv; cb += 16) wsum4_block<1, ADD>(p, rows, o, inv, nk, cb);
}

// acc[j][cb + c] += sum_i w_i[j] x_i[cb + c], j < nk, c < 16 * NV
template <int NV>
MMB_INLINE void rank4_block(float* const* acc, const float* const* w,
                            const float* const* x, int64_t nk, int64_t cb) {
  v16 xv[QB][NV];
  for (int i = 0; i < QB; ++i)
    for (int v = 0; v < NV; ++v) xv[i][v] = load16(x[i] + cb + 16 * v);
  for (int64_t j = 0; j < nk; ++j) {
    float* a = acc[j] + cb;
    const float w0 = w[0][j], w1 = w[1][j], w2 = w[2][j], w3 = w[3][j];
    for (int v = 0; v < NV; ++v)
      store16(a + 16 * v, load16(a + 16 * v) + w0 * xv[0][v] +
                              w1 * xv[1][v] + w2 * xv[2][v] + w3 * xv[3][v]);
  }
}

// acc[j][c] += sum_i w_i[j] x_i[c], j < nk
MMB_INLINE void rank4(float* const* acc, const float* const* w,
                      const float* const* x, int64_t nk, int64_t c_dim) {
  int64_t cb = 0;
  for (; kMaxNV == 2 && cb + 32 <= c_dim; cb += 32) rank4_block<2>(acc, w, x, nk, cb);
  for (; cb < c_dim; cb += 16) rank4_block<1>(acc, w, x, nk, cb);
}

// s <- exp(s - shift) on j < nk, 0 on the padding; returns the sum
MMB_INLINE float exp_shift(float* s, int64_t nk, int64_t nk16, float shift) {
  v16 acc{};
  for (int64_t jb = 0; jb < nk16; jb += 16) {
    v16 e = vexp(load16(s + jb) - shift);
    if (jb + 16 > nk)
      for (int64_t i = nk - jb; i < 16; ++i) e[i] = 0.f;
    store16(s + jb, e);
    acc += e;
  }
  return hsum(acc);
}

MMB_INLINE float row_max(const float* s, int64_t nk) {
  float m = s[0];
  int64_t j = 0;
  if (nk >= 16) {
    v16 acc = load16(s);
    for (j = 16; j + 16 <= nk; j += 16) {
      const v16 x = load16(s + j);
      acc = vmax(acc, x);
    }
    m = hmax(acc);
  }
  for (; j < nk; ++j) m = std::max(m, s[j]);
  return m;
}

// ds[j] = p[j] * (ds[j] - delta) * scale on j < nk16 (in place on ds)
MMB_INLINE void softmax_grad(const float* p, float* ds, int64_t nk16, float delta,
                  float scale) {
  for (int64_t jb = 0; jb < nk16; jb += 16)
    store16(ds + jb, load16(p + jb) * (load16(ds + jb) - delta) * scale);
}

MMB_INLINE float dot(const float* a, const float* b, int64_t n16) {
  v16 acc{};
  for (int64_t c = 0; c < n16; c += 16) acc += load16(a + c) * load16(b + c);
  return hsum(acc);
}

// Token index of token t of region r: base[r] + off[t] (tables, so the
// hot loops do no integer division).
struct MapGeom {
  int64_t H, W, nw, rh, rw, K;
  const int64_t *base, *off;
  MMB_INLINE int64_t token(int64_t region, int64_t t) const {
    return base[region] + off[t];
  }
};

struct GeomTables {
  std::vector<int64_t> base, off;
  GeomTables(int64_t W, int64_t nw, int64_t rh, int64_t rw)
      : base(nw * nw), off(rh * rw) {
    for (int64_t r = 0; r < nw * nw; ++r)
      base[r] = (r / nw) * rh * W + (r % nw) * rw;
    for (int64_t t = 0; t < rh * rw; ++t) off[t] = (t / rw) * W + t % rw;
  }
  MapGeom geom(int64_t H, int64_t W, int64_t nw, int64_t K) const {
    return MapGeom{H, W, nw, H / nw, W / nw, K, base.data(), off.data()};
  }
};

// One level of transpose16: swaps the off-diagonal sub-blocks of width B
// between the rows i and i + B ((i & B) == 0); lo / hi pick, per lane, from
// the pair's two rows (lane index + 16: the second one).
template <int B, Perm16 LO, Perm16 HI>
MMB_INLINE void swap_blocks(v16* r) {
  for (int i = 0; i < 16; ++i) {
    if (i & B) continue;
    const v16 x = r[i], y = r[i + B];
    r[i] = shuffle2<LO>(x, y);
    r[i + B] = shuffle2<HI>(x, y);
  }
}

// Transposes the 16 x 16 block held in r (r[j][c] -> r[c][j]) in four
// levels of two-source lane shuffles (sub-block widths 8, 4, 2, 1).
MMB_INLINE void transpose16(v16* r) {
  swap_blocks<8, Perm16{{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}},
              Perm16{{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}}>(r);
  swap_blocks<4, Perm16{{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}},
              Perm16{{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}}>(r);
  swap_blocks<2, Perm16{{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}},
              Perm16{{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}}>(r);
  swap_blocks<1, Perm16{{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}},
              Perm16{{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}}>(r);
}

// Transposed copy (c_dim, nk16) of nk16 rows (the padding ones zeros), c_dim
// a multiple of 16: 16 x 16 blocks transposed in registers, each output row
// written 16 floats at a time (element by element, the copy took about a
// tenth of the attention backward at BiFormer-S's first stage).
MMB_INLINE void transpose_rows(const float* const* rows, int64_t c_dim,
                               int64_t nk16, float* tr) {
  v16 r[16];
  for (int64_t jb = 0; jb < nk16; jb += 16)
    for (int64_t cb = 0; cb < c_dim; cb += 16) {
      for (int j = 0; j < 16; ++j) r[j] = load16(rows[jb + j] + cb);
      transpose16(r);
      for (int c = 0; c < 16; ++c) store16(tr + (cb + c) * nk16 + jb, r[c]);
    }
}

// Pointers to the routed rows of one (batch, head) of a (N, L, h, c) view
// (key j = kk * tq + t); the padding keys up to nk16 point to pad.
template <typename T>
MMB_INLINE void routed_rows(const View4& x, const int64_t* routed, int64_t n,
                            int64_t hd, const MapGeom& g, int64_t nk16,
                            std::type_identity_t<T>* pad, T** rows) {
  const int64_t tq = g.rh * g.rw, nk = g.K * tq;
  for (int64_t kk = 0; kk < g.K; ++kk) {
    for (int64_t t = 0; t < tq; ++t)
      rows[kk * tq + t] = x.at(n, g.token(routed[kk], t), hd);
  }
  for (int64_t j = nk; j < nk16; ++j) rows[j] = pad;
}

// Regions of 2, 4 or 8 tokens have a grouped copy of their keys (G = 16 /
// tq): per (batch, head, region) c_dim / G vectors, lane g * tq + t of
// vector u holding channel u * G + g of token t. A query then meets G routed
// regions with full-width products and sums them in log2(G) levels of
// tree_sum, where dot products of rows need four levels per 16 keys
// (measured at BiFormer-S's third stage, 2x2 regions: 12-16 % off the
// attention forward and backward; for 16-token regions the rows stayed
// faster than a grouped copy).
MMB_INLINE int64_t key_groups(int64_t tq) {
  return tq >= 2 && tq <= 8 && 16 % tq == 0 ? 16 / tq : 0;
}

// The grouped copy of one (batch, head) of x: R blocks of c_dim * tq floats.
// Per 16 channels of a region, its TQ token rows (16 lanes each) become TQ
// vectors: vector k, lane l = gg * TQ + t holds channel k * G + gg of token
// t, i.e. lane l of token t's row shuffled by k * G + l / TQ, blended over t.
template <int TQ>
MMB_INLINE void group_rows_tq(const View4& x, int64_t n, int64_t hd,
                              const MapGeom& g, int64_t R, int64_t c_dim,
                              float* dst) {
  constexpr int G = 16 / TQ;
  i16 perm[TQ], tok[TQ];  // tok[t]: all ones on the lanes of token t
  for (int k = 0; k < TQ; ++k)
    for (int l = 0; l < 16; ++l) {
      perm[k][l] = k * G + l / TQ;
      tok[k][l] = l % TQ == k ? -1 : 0;
    }
  const float* src[TQ];
  for (int64_t r = 0; r < R; ++r) {
    float* o = dst + r * c_dim * TQ;
    for (int t = 0; t < TQ; ++t) src[t] = x.at(n, g.token(r, t), hd);
    for (int64_t cb = 0; cb < c_dim; cb += 16) {
      v16 rows[TQ];
      for (int t = 0; t < TQ; ++t) rows[t] = load16(src[t] + cb);
      for (int k = 0; k < TQ; ++k) {
        v16 out = permute(rows[0], perm[k]);
        for (int t = 1; t < TQ; ++t)
          out = select_mask(tok[t], permute(rows[t], perm[k]), out);
        store16(o, out);
        o += 16;
      }
    }
  }
}

MMB_INLINE void group_rows(const View4& x, int64_t n, int64_t hd,
                           const MapGeom& g, int64_t R, int64_t c_dim,
                           float* dst) {
  switch (g.rh * g.rw) {  // key_groups: 2, 4 or 8 tokens
    case 2: return group_rows_tq<2>(x, n, hd, g, R, c_dim, dst);
    case 4: return group_rows_tq<4>(x, n, hd, g, R, c_dim, dst);
    default: return group_rows_tq<8>(x, n, hd, g, R, c_dim, dst);
  }
}

// group_rows for items [i0, i1), item = batch * nh + head
MMB_CLONES
void group_items(const View4& x, const MapGeom& g, int64_t nh, int64_t R,
                 int64_t c_dim, float* dst, int64_t i0, int64_t i1) {
  const int64_t block = R * c_dim * g.rh * g.rw;
  for (int64_t item = i0; item < i1; ++item)
    group_rows(x, item / nh, item % nh, g, R, c_dim, dst + item * block);
}

// qe_i: query q_i spread to the grouped layout (vector u, lane g * tq + t:
// channel u * G + g), c_dim * tq floats
MMB_INLINE void spread_query(const float* q, float* qe, int64_t c_dim,
                             int64_t G) {
  const int64_t tq = 16 / G;
  i16 lane{};
  for (int l = 0; l < 16; ++l) lane[l] = static_cast<int32_t>(l / tq);
  for (int64_t u = 0; u < c_dim / G; ++u) {
    const int64_t c0 = u * G;
    const v16 src = load16(q + (c0 & ~int64_t{15}));
    store16(qe + u * 16,
            permute(src, lane + static_cast<int32_t>(c0 & 15)));
  }
}

// s_i[off + j] = scale * q_i . key_j for the 16 keys of G routed regions
// (grouped blocks blk[0..G)), NQ spread queries qe_i at a time
template <int G, int NQ>
MMB_INLINE void logits_grouped_block(const float* const* qe,
                                     const float* const* blk,
                                     float* const* s, int64_t nu, int64_t off,
                                     float scale) {
  v16 acc[NQ][G] = {};
  for (int64_t u = 0; u < nu; ++u) {
    v16 kv[G];
    for (int gg = 0; gg < G; ++gg) kv[gg] = load16(blk[gg] + u * 16);
    for (int i = 0; i < NQ; ++i) {
      const v16 qv = load16(qe[i] + u * 16);
      for (int gg = 0; gg < G; ++gg) acc[i][gg] += qv * kv[gg];
    }
  }
  for (int i = 0; i < NQ; ++i)
    store16(s[i] + off, tree_sum<G>(acc[i]) * scale);
}

// s_i[j] = scale * q_i . key_j, j < nk16, for the QB queries q and the
// grouped blocks of the routed regions (blk: nk16 / tq pointers, the
// padding ones to a zero block); qe: QB * c_dim * tq floats of scratch
template <int G>
MMB_INLINE void logits_grouped(const float* const* q, const float* const* blk,
                               float* const* s, int64_t c_dim, int64_t nk16,
                               float scale, float* qe) {
  constexpr int64_t tq = 16 / G;
  constexpr int NQ = G <= 4 ? 4 : 2;  // accumulators: NQ * G <= 16
  float* qs[QB];
  for (int i = 0; i < QB; ++i) {
    qs[i] = qe + i * c_dim * tq;
    spread_query(q[i], qs[i], c_dim, G);
  }
  for (int i0 = 0; i0 < QB; i0 += NQ)
    for (int64_t jb = 0; jb < nk16; jb += 16)
      logits_grouped_block<G, NQ>(qs + i0, blk + jb / tq, s + i0, c_dim / G,
                                  jb, scale);
}

void check_bra_inputs(const torch::Tensor& q, const torch::Tensor& k,
                      const torch::Tensor& v, const torch::Tensor& idx,
                      int64_t H, int64_t W, int64_t nw) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 &&
                  v.size(0) == q.size(0) && v.size(1) == q.size(1) &&
                  v.size(2) == q.size(2),
              "bra: q, k must be (N, L, h, d) and v (N, L, h, dv)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "bra: float32 only");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "bra: channels must be the innermost dim");
  TORCH_CHECK(q.size(3) % 16 == 0 && v.size(3) % 16 == 0,
              "bra: head dims must be multiples of 16");
  TORCH_CHECK(H % nw == 0 && W % nw == 0 && q.size(1) == H * W,
              "bra: the map must be n_win x n_win regions of H x W tokens");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() &&
                  idx.dim() == 3 && idx.size(0) == q.size(0) &&
                  idx.size(1) == nw * nw,
              "bra: topk_index must be a contiguous (N, n_win**2, K) int64");
}


// Everything one call needs; forward leaves the gradient fields empty.
struct BraArgs {
  View4 q, k, v, out, grad_out, dq, dk, dv;
  const float* kg;  // forward: grouped copy of k (see RoutedKeys), or null
  float* lse;
  const int64_t* idx;
  MapGeom g;
  int64_t L, nh, d, dv_dim, R;
  float scale;
};

// Regions of at most this many tokens without a grouped copy (key_groups)
// take the logits as dot products of rows (logits4_rows); larger ones
// amortise a transposed copy of the routed keys over their query blocks
// (measured: 2x faster at 4 tokens, 1.2x at 16, 0.9x at 64).
constexpr int64_t kRowsMaxTokens = 16;

// The routed rows one query region reads as "keys" of its logits (k in
// q k^T, or v in dO v^T): row pointers where they are read, plus the
// grouped blocks of the routed regions (regions of 2, 4 or 8 tokens; the
// caller passes the grouped copy of the (batch, head)), else a transposed
// copy for regions of more than kRowsMaxTokens tokens.
struct RoutedKeys {
  int64_t tq, G, c_dim, nk16;
  bool by_rows, need_rows;
  std::vector<const float*> rows, blk;
  std::vector<float> tr, zero, qe;
  // rows_used: whether the caller reads `rows` itself (else they are only
  // set where the logits need them)
  RoutedKeys(int64_t tq, int64_t c_dim, int64_t nk16, bool rows_used = true)
      : tq(tq), G(key_groups(tq)), c_dim(c_dim), nk16(nk16),
        by_rows(G == 0 && tq <= kRowsMaxTokens),
        need_rows(rows_used || G == 0), rows(nk16),
        blk(G ? nk16 / tq : 0), tr(G || by_rows ? 0 : c_dim * nk16),
        zero(G ? c_dim * tq : 0, 0.f), qe(G > 1 ? QB * c_dim * tq : 0) {}
  // grouped: the grouped copy of (n, hd) when G != 0
  MMB_INLINE void load(const View4& x, const int64_t* routed, int64_t n,
                       int64_t hd, const MapGeom& g, const float* pad,
                       const float* grouped) {
    if (need_rows) routed_rows(x, routed, n, hd, g, nk16, pad, rows.data());
    if (G) {
      for (int64_t kk = 0; kk < g.K; ++kk)
        blk[kk] = grouped + routed[kk] * c_dim * tq;
      for (int64_t kk = g.K; kk < nk16 / tq; ++kk) blk[kk] = zero.data();
    } else if (!by_rows) {
      transpose_rows(rows.data(), c_dim, nk16, tr.data());
    }
  }
  // s_i[j] = scale * q_i . key_j for the 4 query rows q
  MMB_INLINE void logits(const float* const* q, float* const* s,
                         float scale) {
    switch (G) {
      case 2: return logits_grouped<2>(q, blk.data(), s, c_dim, nk16, scale,
                                       qe.data());
      case 4: return logits_grouped<4>(q, blk.data(), s, c_dim, nk16, scale,
                                       qe.data());
      case 8: return logits_grouped<8>(q, blk.data(), s, c_dim, nk16, scale,
                                       qe.data());
    }
    if (by_rows)
      logits4_rows(q, rows.data(), s, c_dim, nk16, scale);
    else
      logits4(q, tr.data(), s, c_dim, nk16, scale);
  }
};

// Forward of work items [i0, i1), item = (batch, query region, head).
MMB_CLONES
void bra_forward_items(const BraArgs& a, int64_t i0, int64_t i1) {
  const MapGeom& g = a.g;
  const int64_t d = a.d, dv = a.dv_dim, nh = a.nh, R = a.R;
  const int64_t tq = g.rh * g.rw, nk = g.K * tq, nk16 = (nk + 15) / 16 * 16;
  RoutedKeys keys(tq, d, nk16, false);
  std::vector<float> s(QB * nk16);
  std::vector<float> pad(std::max(d, dv), 0.f), sink(dv);
  std::vector<const float*> vrow(nk16);
  float* srow[QB];
  for (int i = 0; i < QB; ++i) srow[i] = s.data() + i * nk16;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t hd = item % nh, r = (item / nh) % R, n = item / (nh * R);
    const int64_t* routed = a.idx + (n * R + r) * g.K;
    keys.load(a.k, routed, n, hd, g, pad.data(),
              a.kg ? a.kg + (n * nh + hd) * a.L * d : nullptr);
    routed_rows(a.v, routed, n, hd, g, nk16, pad.data(), vrow.data());
    for (int64_t t0 = 0; t0 < tq; t0 += QB) {
      const float* qrow[QB];
      float* orow[QB];
      float inv[QB], lse_b[QB];
      for (int i = 0; i < QB; ++i) {
        const bool real = t0 + i < tq;
        const int64_t l = real ? g.token(r, t0 + i) : 0;
        qrow[i] = real ? a.q.at(n, l, hd) : pad.data();
        orow[i] = real ? a.out.at(n, l, hd) : sink.data();
      }
      keys.logits(qrow, srow, a.scale);
      for (int i = 0; i < QB; ++i) {
        const float m = row_max(srow[i], nk);
        const float sum = exp_shift(srow[i], nk, nk16, m);
        inv[i] = 1.f / sum;
        lse_b[i] = m + std::log(sum);
      }
      wsum4(srow, vrow.data(), orow, inv, nk, dv);
      if (a.lse)
        for (int i = 0; i < QB && t0 + i < tq; ++i)
          a.lse[(n * nh + hd) * a.L + g.token(r, t0 + i)] = lse_b[i];
    }
  }
}

// Backward of work items [i0, i1), item = (batch, head): the routed regions
// of its query regions overlap, so one thread owns its dK/dV rows and
// accumulates into them in place.
MMB_CLONES
void bra_backward_items(const BraArgs& a, int64_t i0, int64_t i1) {
  const MapGeom& g = a.g;
  const int64_t d = a.d, dvd = a.dv_dim, nh = a.nh, R = a.R;
  const int64_t tq = g.rh * g.rw, nk = g.K * tq, nk16 = (nk + 15) / 16 * 16;
  RoutedKeys keys(tq, d, nk16), vals(tq, dvd, nk16);
  // grouped copies of k and v of the item's (batch, head), if used
  std::vector<float> kg(keys.G ? a.L * d : 0), vg(vals.G ? a.L * dvd : 0);
  std::vector<float> p(QB * nk16), ds(QB * nk16);
  std::vector<float> pad(std::max(d, dvd), 0.f), sink(std::max(d, dvd));
  std::vector<float*> dkrow(nk16), dvrow(nk16);
  float* prow[QB];
  float* dsrow[QB];
  for (int i = 0; i < QB; ++i) {
    prow[i] = p.data() + i * nk16;
    dsrow[i] = ds.data() + i * nk16;
  }
  const float ones[QB] = {1.f, 1.f, 1.f, 1.f};
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t hd = item % nh, n = item / nh;
    // the item's dK/dV rows, accumulated in place below from zero
    for (int64_t l = 0; l < a.L; ++l) {
      std::fill_n(a.dk.at(n, l, hd), d, 0.f);
      std::fill_n(a.dv.at(n, l, hd), dvd, 0.f);
    }
    if (keys.G) {
      group_rows(a.k, n, hd, g, R, d, kg.data());
      group_rows(a.v, n, hd, g, R, dvd, vg.data());
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t* routed = a.idx + (n * R + r) * g.K;
      keys.load(a.k, routed, n, hd, g, pad.data(), kg.data());
      vals.load(a.v, routed, n, hd, g, pad.data(), vg.data());
      routed_rows(a.dk, routed, n, hd, g, nk16, sink.data(), dkrow.data());
      routed_rows(a.dv, routed, n, hd, g, nk16, sink.data(), dvrow.data());
      for (int64_t t0 = 0; t0 < tq; t0 += QB) {
        const float *qrow[QB], *gorow[QB];
        float* dqrow[QB];
        float lse_b[QB];
        for (int i = 0; i < QB; ++i) {
          const bool real = t0 + i < tq;
          const int64_t l = real ? g.token(r, t0 + i) : 0;
          qrow[i] = real ? a.q.at(n, l, hd) : pad.data();
          gorow[i] = real ? a.grad_out.at(n, l, hd) : pad.data();
          dqrow[i] = real ? a.dq.at(n, l, hd) : sink.data();
          lse_b[i] = real ? a.lse[(n * nh + hd) * a.L + l] : 0.f;
        }
        keys.logits(qrow, prow, a.scale);
        vals.logits(gorow, dsrow, 1.f);
        for (int i = 0; i < QB; ++i) {
          exp_shift(prow[i], nk, nk16, lse_b[i]);
          // dO_i . o_i = sum_j P_ij dP_ij (o_i = sum_j P_ij v_j): the
          // output need not be kept for the backward
          const float delta = dot(prow[i], dsrow[i], nk16);
          softmax_grad(prow[i], dsrow[i], nk16, delta, a.scale);
        }
        wsum4(dsrow, keys.rows.data(), dqrow, ones, nk, d);
        rank4(dkrow.data(), dsrow, qrow, nk, d);
        rank4(dvrow.data(), prow, gorow, nk, dvd);
      }
    }
  }
}


}  // namespace

// -> out (N, L, h, dv) (a fresh contiguous tensor), lse (N, h, L) float32.
std::vector<torch::Tensor> bra_forward(torch::Tensor q, torch::Tensor k,
                                       torch::Tensor v, torch::Tensor idx,
                                       int64_t H, int64_t W, int64_t nw,
                                       double scale, bool need_lse) {
  check_bra_inputs(q, k, v, idx, H, W, nw);
  const int64_t N = q.size(0), L = q.size(1), nh = q.size(2), d = q.size(3);
  const int64_t dv = v.size(3), R = nw * nw;
  auto out = torch::empty({N, L, nh, dv}, q.options());
  auto lse = need_lse ? torch::empty({N, nh, L}, q.options())
                      : torch::empty({0}, q.options());
  const View4 none{nullptr, 0, 0, 0};
  const GeomTables tables(W, nw, H / nw, W / nw);
  const MapGeom geom = tables.geom(H, W, nw, idx.size(2));
  // the grouped copy of k lives in a buffer kept per calling thread: a
  // fresh tensor of this size would cost page faults on every call
  thread_local std::vector<float> kg_buffer;
  const float* kg = nullptr;
  if (key_groups(geom.rh * geom.rw)) {
    if (kg_buffer.size() < static_cast<size_t>(N * L * nh * d))
      kg_buffer.resize(N * L * nh * d);
    float* dst = kg_buffer.data();
    const View4 kv = view4(k);
    at::parallel_for(0, N * nh, 1, [&](int64_t i0, int64_t i1) {
      group_items(kv, geom, nh, R, d, dst, i0, i1);
    });
    kg = dst;
  }
  const BraArgs a{view4(q), view4(k), view4(v), view4(out), none, none, none,
                  none, kg,
                  need_lse ? lse.data_ptr<float>() : nullptr,
                  idx.data_ptr<int64_t>(),
                  geom, L, nh, d,
                  dv, R, static_cast<float>(scale)};
  at::parallel_for(0, N * R * nh, 1, [&](int64_t i0, int64_t i1) {
    bra_forward_items(a, i0, i1);
  });
  return {out, lse};
}

// Writes dq, dk (N, L, h, d) and dv (N, L, h, dv): views with a unit last
// stride (e.g. slices of one qkv-shaped gradient), overwritten. Needs the
// forward's lse, not its output.
void bra_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k,
                  torch::Tensor v, torch::Tensor lse, torch::Tensor idx,
                  int64_t H, int64_t W, int64_t nw, double scale,
                  torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  check_bra_inputs(q, k, v, idx, H, W, nw);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.stride(3) == 1 &&
                  grad_out.scalar_type() == at::kFloat &&
                  lse.is_contiguous() &&
                  lse.numel() == q.size(0) * q.size(2) * q.size(1),
              "bra_backward: grad_out must be float32 (N, L, h, dv) with a "
              "unit last stride, lse (N, h, L)");
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() &&
                  dv.sizes() == v.sizes() && dq.stride(3) == 1 &&
                  dk.stride(3) == 1 && dv.stride(3) == 1 &&
                  dq.scalar_type() == at::kFloat &&
                  dk.scalar_type() == at::kFloat &&
                  dv.scalar_type() == at::kFloat,
              "bra_backward: dq, dk, dv must be float32 views shaped like q, "
              "k, v with a unit last stride");
  const int64_t N = q.size(0), L = q.size(1), nh = q.size(2), d = q.size(3);
  const int64_t dvd = v.size(3), R = nw * nw;
  const View4 none{nullptr, 0, 0, 0};
  const GeomTables tables(W, nw, H / nw, W / nw);
  const BraArgs a{view4(q), view4(k), view4(v), none, view4(grad_out),
                  view4(dq), view4(dk), view4(dv),
                  nullptr,
                  lse.data_ptr<float>(),
                  idx.data_ptr<int64_t>(),
                  tables.geom(H, W, nw, idx.size(2)), L, nh, d,
                  dvd, R, static_cast<float>(scale)};
  at::parallel_for(0, N * nh, 1, [&](int64_t i0, int64_t i1) {
    bra_backward_items(a, i0, i1);
  });
}


// ---------------------------------------------------------------------------
// Weight gradient of a stride-1 "same" depthwise conv on channels-last maps.
//
// dw[c, i, j] = sum over n, h, w of g[n, h, w, c] * x[n, h + i - p, w + j - p, c]
// One output-gradient row stays in cache while the k input rows it meets
// are read; the channel loop vectorises at any level.

namespace {

void dw_grad_row(const View4& x, const View4& g, float* acc, int64_t n,
                 int64_t h, int64_t H, int64_t W, int64_t C, int64_t k) {
  const int64_t p = k / 2;
  const float* grow = g.at(n, h, 0);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t hx = h + i - p;
    if (hx < 0 || hx >= H) continue;
    const float* xrow = x.at(n, hx, 0);
    for (int64_t j = 0; j < k; ++j) {
      float* a = acc + (i * k + j) * C;
      const int64_t w0 = std::max<int64_t>(0, p - j);
      const int64_t w1 = std::min<int64_t>(W, W + p - j);
      for (int64_t w = w0; w < w1; ++w) {
        const float* xv = xrow + (w + j - p) * x.sh;
        const float* gv = grow + w * g.sh;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) a[c] += xv[c] * gv[c];
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// The MLP's GELU (exact, erf form) in its backward, recomputed from the
// pre-activation h: from h and the gradient da of the GELU's output it
// writes g = gelu(h) (for fc2's weight gradient) and da *= gelu'(h):
//   Phi(h) = erfc(-h / sqrt(2)) / 2, phi(h) = exp(-h^2 / 2) / sqrt(2 pi),
//   gelu(h) = h Phi(h), gelu'(h) = Phi(h) + h phi(h).
// erfc(x), x >= 0, as t exp(-x^2) Q(t) with t = 1 / (1 + x / 2) and Q a
// degree-11 polynomial least-squares fitted to erfc(x) exp(x^2) / t on
// [0, 9] (relative error of the fit 5e-10; in float32 the rounding of x^2
// dominates, about 1e-6 relative where erfc is below 1e-7; beyond 9 erfc
// is below 1e-36).

namespace {

MMB_INLINE v16 erfc_pos(v16 x, v16* e_minus_x2) {
  const v16 t = 1.f / (x * 0.5f + 1.f);
  v16 q = splat(-3.177410496e-02f);
  q = q * t + 2.363668734e-01f;
  q = q * t - 7.516168234e-01f;
  q = q * t + 1.294877175e+00f;
  q = q * t - 1.251859469e+00f;
  q = q * t + 6.646085084e-01f;
  q = q * t - 3.023899999e-01f;
  q = q * t + 1.692366793e-01f;
  q = q * t + 1.595389895e-01f;
  q = q * t + 2.489783066e-01f;
  q = q * t + 2.819336957e-01f;
  q = q * t + 2.821001690e-01f;
  const v16 e = vexp(-(x * x));
  *e_minus_x2 = e;
  return t * e * q;
}

MMB_CLONES
void gelu_grad_range(const float* h, float* da, float* g, int64_t i0,
                     int64_t i1) {
  const float inv_sqrt2 = 0.70710678118654752f;
  const float inv_sqrt_2pi = 0.39894228040143268f;
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const v16 x = load16(h + i);
    const v16 z = x * inv_sqrt2;
    v16 e;  // exp(-z^2) = exp(-h^2 / 2)
    const v16 half_erfc = erfc_pos(vabs(z), &e) * 0.5f;
    const v16 cdf = select_mask(negative_mask(z), half_erfc,
                                1.f - half_erfc);
    store16(g + i, x * cdf);
    store16(da + i, load16(da + i) * (cdf + x * (e * inv_sqrt_2pi)));
  }
  for (; i < i1; ++i) {
    const float x = h[i];
    const float cdf = 0.5f * std::erfc(-x * inv_sqrt2);
    g[i] = x * cdf;
    da[i] *= cdf + x * std::exp(-0.5f * x * x) * inv_sqrt_2pi;
  }
}

// ---------------------------------------------------------------------------
// A residual add and the LayerNorm that reads its sum, over the channels of
// (rows, C) maps, C a multiple of 16:
//   z = x + s y  (s: the row's sample factor, or 1),
//   out = (z - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps).
// The backward takes the gradients of z (gz, from its other consumers) and
// of out (gn) and writes dz = gz + the LayerNorm's input gradient in one
// pass; dy = s dz where asked; dw, db accumulate per thread.

MMB_CLONES
void add_norm_rows(const float* x, const float* y, const float* s,
                   int64_t rows_per_sample, const float* w, const float* b,
                   float eps, float* z, float* out, float* mean, float* rstd,
                   int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float sc = s ? s[r / rows_per_sample] : 1.f;
    const float *xr = x + r * C, *yr = y + r * C;
    float* zr = z + r * C;
    v16 acc{};
    for (int64_t c = 0; c < C; c += 16) {
      const v16 zv = load16(xr + c) + load16(yr + c) * sc;
      store16(zr + c, zv);
      acc += zv;
    }
    const float m = hsum(acc) / static_cast<float>(C);
    v16 acc2{};
    for (int64_t c = 0; c < C; c += 16) {
      const v16 dv = load16(zr + c) - m;
      acc2 += dv * dv;
    }
    const float rs =
        1.f / std::sqrt(hsum(acc2) / static_cast<float>(C) + eps);
    float* outr = out + r * C;
    for (int64_t c = 0; c < C; c += 16)
      store16(outr + c,
              (load16(zr + c) - m) * rs * load16(w + c) + load16(b + c));
    mean[r] = m;
    rstd[r] = rs;
  }
}

MMB_CLONES
void add_norm_grad_rows(const float* gz, const float* gn, const float* z,
                        const float* mean, const float* rstd, const float* w,
                        const float* s, int64_t rows_per_sample, float* dz,
                        float* dy, float* dw, float* db, int64_t C,
                        int64_t r0, int64_t r1) {
  const float inv_c = 1.f / static_cast<float>(C);
  for (int64_t r = r0; r < r1; ++r) {
    const float m = mean[r], rs = rstd[r];
    const float *zr = z + r * C, *gr = gn + r * C;
    v16 a{}, bsum{};
    for (int64_t c = 0; c < C; c += 16) {
      const v16 zh = (load16(zr + c) - m) * rs;
      const v16 g = load16(gr + c);
      const v16 gw = g * load16(w + c);
      a += gw;
      bsum += gw * zh;
      store16(dw + c, load16(dw + c) + g * zh);
      store16(db + c, load16(db + c) + g);
    }
    const float A = hsum(a) * inv_c, B = hsum(bsum) * inv_c;
    const float sc = s ? s[r / rows_per_sample] : 1.f;
    float* dzr = dz + r * C;
    for (int64_t c = 0; c < C; c += 16) {
      const v16 zh = (load16(zr + c) - m) * rs;
      v16 d = (load16(gr + c) * load16(w + c) - A - zh * B) * rs;
      if (gz) d += load16(gz + r * C + c);
      store16(dzr + c, d);
      if (dy) store16(dy + r * C + c, d * sc);
    }
  }
}

// Sums that the threads of a parallel loop over [0, n) accumulate: body(acc,
// i0, i1) adds into acc, a zeroed buffer of `shape` floats of its own
// thread; returns their sum over the threads (a tensor of `shape`).
template <typename Body>
torch::Tensor thread_sums(int64_t n, int64_t grain, at::IntArrayRef shape,
                          const at::TensorOptions& options, Body body) {
  std::vector<int64_t> full{at::get_num_threads()};
  full.insert(full.end(), shape.begin(), shape.end());
  auto partial = torch::zeros(full, options);
  const int64_t size = partial[0].numel();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    body(pp + at::get_thread_num() * size, i0, i1);
  });
  return partial.sum(0);
}

}  // namespace

// x, g: (N, H, W, C) float32 with unit channel stride -> (C, 1, k, k)
torch::Tensor dwconv_weight_grad(torch::Tensor x, torch::Tensor g,
                                 int64_t k) {
  TORCH_CHECK(x.dim() == 4 && g.sizes() == x.sizes(),
              "dwconv_weight_grad: x and g must be (N, H, W, C) of one shape");
  TORCH_CHECK(x.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat,
              "dwconv_weight_grad: float32 only");
  TORCH_CHECK(x.stride(3) == 1 && g.stride(3) == 1,
              "dwconv_weight_grad: channels must be the innermost dim");
  TORCH_CHECK(k % 2 == 1, "dwconv_weight_grad: odd kernel sizes only");
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const View4 xv = view4(x), gv = view4(g);
  auto sums = thread_sums(N * H, 1, {k * k, C}, x.options(),
                          [&](float* acc, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      dw_grad_row(xv, gv, acc, r / H, r % H, H, W, C, k);
  });
  return sums.t().reshape({C, 1, k, k}).contiguous();
}

// h, da: contiguous float32 of one shape; da becomes da * gelu'(h) in
// place; returns gelu(h)
torch::Tensor gelu_grad(torch::Tensor h, torch::Tensor da) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && da.scalar_type() == at::kFloat
                  && h.is_contiguous() && da.is_contiguous() &&
                  h.sizes() == da.sizes(),
              "gelu_grad: h and da must be contiguous float32 tensors of one "
              "shape");
  auto g = torch::empty_like(h);
  const float* hp = h.data_ptr<float>();
  float* dp = da.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  at::parallel_for(0, h.numel(), 4096, [&](int64_t i0, int64_t i1) {
    gelu_grad_range(hp, dp, gp, i0, i1);
  });
  return g;
}

// x, y: contiguous float32 (N, ..., C) of one shape, C a multiple of 16;
// scale: None or (N,) per-sample factors of y; w, b: (C,).
// -> z = x + scale y, out = layer_norm(z), mean and rstd (rows,)
std::vector<torch::Tensor> add_layer_norm(torch::Tensor x, torch::Tensor y,
                                          std::optional<torch::Tensor> scale,
                                          torch::Tensor w, torch::Tensor b,
                                          double eps) {
  const int64_t C = x.size(-1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat
                  && x.is_contiguous() && y.is_contiguous() &&
                  x.sizes() == y.sizes() && x.dim() >= 2 && C > 0 &&
                  C % 16 == 0,
              "add_layer_norm: x and y must be contiguous float32 tensors of "
              "one shape (N, ..., C), C a positive multiple of 16");
  TORCH_CHECK(w.is_contiguous() && b.is_contiguous() && w.numel() == C &&
                  b.numel() == C && w.scalar_type() == at::kFloat &&
                  b.scalar_type() == at::kFloat,
              "add_layer_norm: weight and bias must be contiguous float32 (C,)");
  const int64_t rows = x.numel() / C, N = x.size(0);
  if (scale)
    TORCH_CHECK(scale->is_contiguous() && scale->numel() == N &&
                    scale->scalar_type() == at::kFloat,
                "add_layer_norm: scale must be a contiguous float32 (N,)");
  auto z = torch::empty_like(x), out = torch::empty_like(x);
  auto mean = torch::empty({rows}, x.options());
  auto rstd = torch::empty({rows}, x.options());
  const int64_t per = N ? rows / N : 1;
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    add_norm_rows(x.data_ptr<float>(), y.data_ptr<float>(), sp, per,
                  w.data_ptr<float>(), b.data_ptr<float>(),
                  static_cast<float>(eps), z.data_ptr<float>(),
                  out.data_ptr<float>(), mean.data_ptr<float>(),
                  rstd.data_ptr<float>(), C, r0, r1);
  });
  return {z, out, mean, rstd};
}

// Gradients of add_layer_norm from gz (of z; None: zero) and gn (of out):
// -> dz (also the gradient of x), dy = scale dz (empty unless need_dy),
// dw, db
std::vector<torch::Tensor> add_layer_norm_backward(
    std::optional<torch::Tensor> gz, torch::Tensor gn, torch::Tensor z,
    torch::Tensor mean, torch::Tensor rstd, torch::Tensor w,
    std::optional<torch::Tensor> scale, bool need_dy) {
  const int64_t C = z.size(-1), rows = z.numel() / C, N = z.size(0);
  TORCH_CHECK(gn.is_contiguous() && gn.sizes() == z.sizes() &&
                  gn.scalar_type() == at::kFloat &&
                  (!gz || (gz->is_contiguous() && gz->sizes() == z.sizes() &&
                           gz->scalar_type() == at::kFloat)),
              "add_layer_norm_backward: gz and gn must be contiguous float32 "
              "tensors shaped like z");
  TORCH_CHECK(C > 0 && C % 16 == 0 && z.is_contiguous() &&
                  mean.numel() == rows && rstd.numel() == rows &&
                  w.numel() == C && (!scale || scale->numel() == N),
              "add_layer_norm_backward: z, mean, rstd, weight and scale must "
              "be those of add_layer_norm");
  auto dz = torch::empty_like(z);
  auto dy = need_dy ? torch::empty_like(z) : torch::empty({0}, z.options());
  const int64_t per = N ? rows / N : 1;
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  const float* gzp = gz ? gz->data_ptr<float>() : nullptr;
  auto sums = thread_sums(rows, 16, {2, C}, z.options(),
                          [&](float* acc, int64_t r0, int64_t r1) {
    add_norm_grad_rows(gzp, gn.data_ptr<float>(), z.data_ptr<float>(),
                       mean.data_ptr<float>(), rstd.data_ptr<float>(),
                       w.data_ptr<float>(), sp, per, dz.data_ptr<float>(),
                       need_dy ? dy.data_ptr<float>() : nullptr, acc,
                       acc + C, C, r0, r1);
  });
  // two tensors of their own: an operator's outputs may not alias
  return {dz, dy, sums[0].clone(), sums[1].clone()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dwconv_weight_grad", &dwconv_weight_grad,
        "weight gradient of a stride-1 'same' depthwise conv (NHWC maps)");
  m.def("gelu_grad", &gelu_grad,
        "gelu(h), and da *= gelu'(h) in place (exact GELU)");
  m.def("add_layer_norm", &add_layer_norm,
        "z = x + scale y and layer_norm(z) in one pass (z, out, mean, rstd)");
  m.def("add_layer_norm_backward", &add_layer_norm_backward,
        "gradients of add_layer_norm (dz, dy, dw, db)");
  m.def("bra_forward", &bra_forward,
        "bi-level routing attention, token order (out, lse)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("idx"), py::arg("H"),
        py::arg("W"), py::arg("nw"), py::arg("scale"), py::arg("need_lse"));
  m.def("bra_backward", &bra_backward,
        "gradients of bra_forward, written into the given dq, dk, dv",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("lse"), py::arg("idx"), py::arg("H"), py::arg("W"),
        py::arg("nw"), py::arg("scale"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"));
}
