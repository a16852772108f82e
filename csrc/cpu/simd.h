// Vector helpers shared by the CPU kernels: a fixed-width float vector (GCC/Clang vector
// extensions, so one source compiles to AVX-512, AVX2, SSE or NEON; x86 intrinsics only where
// they save instructions), the few transcendental functions the kernels need, and a
// register-blocked matrix-multiply micro-kernel.
//
// The kernel sources are compiled once per instruction set (setup.py: AVX-512, AVX2 + FMA and
// the x86-64 baseline) and one path is picked at run time (csrc/cpu/entry.cpp). Everything here
// and in the kernels lives in namespace inl::INL_ISA, named after the instruction set the
// translation unit is compiled for, so no two paths share a symbol: the linker can never hand an
// AVX2 caller a function compiled for AVX-512. Kernel sources include no ATen header for the
// same reason (its inline functions would be compiled once per path under one name).
//
// Every result depends only on its own row's data and the weights, through one fixed sequence
// of operations: no reduction is split by thread count or batch size. That is what makes the
// kernels deterministic and batch invariant bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

// INL_AVX2: the 8-wide path (AVX2 with FMA); AVX alone takes the baseline path
#if defined(__AVX512F__)
#define INL_ISA avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define INL_ISA avx2
#define INL_AVX2 1
#else
#define INL_ISA base
#endif

namespace inl {
namespace INL_ISA {

#if defined(__AVX512F__)
constexpr int kVec = 16;       // floats per vector
constexpr int kRowBlock = 14;  // micro-kernel rows: 28 accumulators of 32 registers
#elif defined(INL_AVX2)
constexpr int kVec = 8;
constexpr int kRowBlock = 6;   // 12 accumulators of 16 registers
#else
constexpr int kVec = 4;
constexpr int kRowBlock = 6;
#endif
constexpr int kColBlock = 2 * kVec;  // micro-kernel columns

typedef float Vec __attribute__((vector_size(kVec * 4)));
typedef float VecU __attribute__((vector_size(kVec * 4), aligned(4)));  // unaligned access
typedef int32_t VecI __attribute__((vector_size(kVec * 4)));

inline Vec load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }
inline Vec splat(float a) {
#if defined(__AVX512F__)
  return (Vec)_mm512_set1_ps(a);  // one broadcast also from memory (the loop below may become 16)
#elif defined(INL_AVX2)
  return (Vec)_mm256_set1_ps(a);
#else
  Vec v;
  for (int i = 0; i < kVec; ++i) v[i] = a;
  return v;
#endif
}
inline Vec select(VecI mask, Vec a, Vec b) { return mask ? a : b; }
// vmax, vmin: where either operand is NaN they return b, on every path (the x86 max/min
// instructions do; the generic compare-and-select does too). So the operand whose NaN must come
// through goes second: vmax(splat(0.f), c) is a relu that keeps NaN, as torch.relu does.
inline Vec vmax(Vec a, Vec b) {
#if defined(__AVX512F__)
  return (Vec)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(INL_AVX2)
  return (Vec)_mm256_max_ps((__m256)a, (__m256)b);
#else
  return a > b ? a : b;
#endif
}
inline Vec vmin(Vec a, Vec b) {
#if defined(__AVX512F__)
  return (Vec)_mm512_min_ps((__m512)a, (__m512)b);
#elif defined(INL_AVX2)
  return (Vec)_mm256_min_ps((__m256)a, (__m256)b);
#else
  return a < b ? a : b;
#endif
}
inline Vec vabs(Vec a) { return (Vec)((VecI)a & 0x7fffffff); }
inline Vec neg_abs(Vec a) { return (Vec)((VecI)a | (int32_t)0x80000000); }
inline bool any(VecI m) {
  for (int i = 0; i < kVec; ++i)
    if (m[i]) return true;
  return false;
}
#if defined(__AVX512F__)
// r[i] holds row i of a 16×16 block; afterwards r[j] holds its column j.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif

// lanes summed in a fixed order, in double
inline double hsum(Vec v) {
  double s = 0.0;
  for (int i = 0; i < kVec; ++i) s += v[i];
  return s;
}
inline VecI lane_index() {
  VecI iota;
  for (int i = 0; i < kVec; ++i) iota[i] = i;
  return iota;
}

// N vectors handled as one value: each operation is applied to all N before the next one, so
// that N independent dependency chains advance side by side in program order. The transcendental
// functions below are chains of ~15-30 dependent instructions; written one vector at a time, the
// out-of-order window fills with one chain's waiting instructions and the vector units idle.
#define INL_INLINE inline __attribute__((always_inline))
template <int N>
struct Vecs {
  Vec v[N];
};
#define INL_VECS_BINARY(op)                                                      \
  template <int N>                                                               \
  INL_INLINE Vecs<N> operator op(const Vecs<N>& a, const Vecs<N>& b) {               \
    Vecs<N> r;                                                                   \
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] op b.v[i];                       \
    return r;                                                                    \
  }                                                                              \
  template <int N>                                                               \
  INL_INLINE Vecs<N> operator op(const Vecs<N>& a, float b) {                        \
    Vecs<N> r;                                                                   \
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] op b;                            \
    return r;                                                                    \
  }                                                                              \
  template <int N>                                                               \
  INL_INLINE Vecs<N> operator op(float a, const Vecs<N>& b) {                        \
    Vecs<N> r;                                                                   \
    for (int i = 0; i < N; ++i) r.v[i] = a op b.v[i];                            \
    return r;                                                                    \
  }
INL_VECS_BINARY(+)
INL_VECS_BINARY(-)
INL_VECS_BINARY(*)
#undef INL_VECS_BINARY
template <int N>
INL_INLINE Vecs<N> operator-(const Vecs<N>& a) {
  Vecs<N> r;
  for (int i = 0; i < N; ++i) r.v[i] = -a.v[i];
  return r;
}
// f applied to each vector of the arguments in turn
template <int N, typename F, typename... A>
INL_INLINE Vecs<N> each(F&& f, const Vecs<N>& a, const A&... rest) {
  Vecs<N> r;
  for (int i = 0; i < N; ++i) r.v[i] = f(a.v[i], rest.v[i]...);
  return r;
}
template <int N>
INL_INLINE Vecs<N> vmax(const Vecs<N>& a, const Vecs<N>& b) {
  return each([](Vec x, Vec y) { return vmax(x, y); }, a, b);
}
template <int N>
INL_INLINE Vecs<N> vmin(const Vecs<N>& a, const Vecs<N>& b) {
  return each([](Vec x, Vec y) { return vmin(x, y); }, a, b);
}
template <int N>
INL_INLINE Vecs<N> vabs(const Vecs<N>& a) {
  return each([](Vec x) { return vabs(x); }, a);
}
template <int N>
INL_INLINE Vecs<N> neg_abs(const Vecs<N>& a) {
  return each([](Vec x) { return neg_abs(x); }, a);
}
// the value a float promotes to in V's arithmetic
template <typename V>
INL_INLINE V splat_as(float a) {
  if constexpr (std::is_same_v<V, Vec>) {
    return splat(a);
  } else {
    V r;
    for (auto& x : r.v) x = splat(a);
    return r;
  }
}
// z >= 0 ? a : b, lane by lane
INL_INLINE Vec select_nonneg(Vec z, Vec a, Vec b) { return select(z >= 0.f, a, b); }
template <int N>
INL_INLINE Vecs<N> select_nonneg(const Vecs<N>& z, const Vecs<N>& a, const Vecs<N>& b) {
  return each([](Vec s, Vec x, Vec y) { return select_nonneg(s, x, y); }, z, a, b);
}

// 1/x to ~1 ulp: the hardware estimate refined by one Newton step where there is one.
INL_INLINE Vec rcp_estimate(Vec x) {
#if defined(__AVX512F__)
  return (Vec)_mm512_rcp14_ps((__m512)x);
#elif defined(INL_AVX2)
  return (Vec)_mm256_rcp_ps((__m256)x);
#else
  return 1.f / x;
#endif
}
template <int N>
INL_INLINE Vecs<N> rcp_estimate(const Vecs<N>& x) {
  return each([](Vec a) { return rcp_estimate(a); }, x);
}
template <typename V>
INL_INLINE V vrcp(V x) {
  V r = rcp_estimate(x);
#if defined(__AVX512F__) || defined(INL_AVX2)
  return r * (2.f - x * r);
#else
  return r;
#endif
}

// p·2^n for integral n in [-150, 128] (n = 128 and above give inf); with AVX-512, p·2^floor(n) for any n
INL_INLINE Vec scale_pow2(Vec p, Vec n) {
#if defined(__AVX512F__)
  return (Vec)_mm512_scalef_ps((__m512)p, (__m512)n);  // gradual underflow included
#else
  // 2^n in two factors so that n down to -150 stays representable
  VecI ni = __builtin_convertvector(n, VecI);
  VecI half = ni >> 1;
  return p * (Vec)((half + 127) << 23) * (Vec)((ni - half + 127) << 23);
#endif
}
#if defined(__AVX512F__) && defined(__AVX512DQ__)
// t - floor(t), exact
INL_INLINE Vec reduce_floor(Vec t) { return (Vec)_mm512_reduce_ps((__m512)t, 0x09); }
template <int N>
INL_INLINE Vecs<N> reduce_floor(const Vecs<N>& t) {
  return each([](Vec a) { return reduce_floor(a); }, t);
}
#endif
template <int N>
INL_INLINE Vecs<N> scale_pow2(const Vecs<N>& p, const Vecs<N>& n) {
  return each([](Vec a, Vec b) { return scale_pow2(a, b); }, p, n);
}

// e^x within ~2 ulp: x = n·ln2 + r with |r| ≤ ln2/2, e^r by a degree-5 polynomial fitted to
// relative error on that interval (7.5e-8, below half an fp32 ulp, before rounding), times 2^n.
// With AVX-512 DQ the same polynomial runs re-expanded in f = t - floor(t), t = x·log2(e):
// 2^f = √2·e^((f - ½)·ln2) on [0, 1), f in one instruction (vreduceps) and 2^floor(t) by
// scalef, two instructions fewer; rounding t adds up to |x|·5e-8 relative (4e-6 at |x| = 88),
// which the callers do not see: sigmoid stays within 1.5e-7 absolute and softplus within 2e-7
// relative, as with the first form (checked against double over [-103, 88]). Inputs below -104
// give 0; NaN gives NaN (the clamps keep it, see vmax).
template <typename V>
INL_INLINE V vexp(V x) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  x = vmax(splat_as<V>(-104.f), x);  // scalef saturates large t to inf by itself
  V t = x * 1.44269504088896341f;
  V f = reduce_floor(t);
  V p = f * 1.877575939821692e-3f + 8.989341870254653e-3f;
  p = p * f + 5.5826316559678374e-2f;
  p = p * f + 2.401536175489785e-1f;
  p = p * f + 6.931530731417752e-1f;
  p = p * f + 9.999999250645698e-1f;
  return scale_pow2(p, t);
#else
#if defined(__AVX512F__)
  x = vmax(splat_as<V>(-104.f), x);  // scalef below saturates large n to inf by itself
#else
  x = vmin(splat_as<V>(88.f), vmax(splat_as<V>(-104.f), x));
#endif
  const float round_magic = 12582912.0f;  // 1.5·2^23: adding it rounds to the nearest integer
  V n = (x * 1.44269504088896341f + round_magic) - round_magic;
  V r = x - n * 0.693359375f;  // ln2 in two parts so that n·ln2_hi is exact
  r = r - n * -2.12194440e-4f;
  V p = r * 8.297651838694497e-3f + 4.191538181304915e-2f;
  p = p * r + 1.666757477692211e-1f;
  p = p * r + 4.999889485335344e-1f;
  p = p * r + 9.999996919773478e-1f;
  p = p * r + 1.0000000716543667f;
  return scale_pow2(p, n);
#endif
}

// log(1 + e) for e in [0, 1]: 2·atanh(s) = 2s·P(s²) with s = e / (2 + e) ≤ 1/3 and P of degree 4
// fitted to atanh(s)/s for s² in [0, 1/9] (relative error 4e-9). Exact for tiny e, unlike
// log(1 + e) after rounding 1 + e.
template <typename V>
INL_INLINE V vlog1p_unit(V e) {
  V s = e * vrcp(e + 2.f);
  V s2 = s * s;
  // 2·P(s²) with the coefficients doubled (exact in binary), so no separate s + s
  V p = s2 * 2.8178330025536236e-1f + 2.796060383969018e-1f;
  p = p * s2 + 4.0024910206681736e-1f;
  p = p * s2 + 6.666631468365981e-1f;
  p = p * s2 + 2.0000000079209874f;
  return s * p;
}

// sigmoid(z) = 1/(1 + e^-z): no cancellation for either sign; e^-z is capped at e^80 so that
// the reciprocal stays a normal number (sigmoid(-88.72 < z < -80) returns sigmoid(-80) ≈ 2e-35),
// and below -88.72, where e^-z overflows float32, it is 0 exactly, as torch.sigmoid gives (so a
// saturated gate times an infinite velocity is NaN in the kernel as in the reference); NaN stays
// NaN. vsigmoid_neg(y) is sigmoid(-y), for callers that have -z at hand.
template <typename V>
INL_INLINE V vsigmoid_neg(V y) {
  const V r = vrcp(1.f + vexp(vmin(splat_as<V>(80.f), y)));
  if constexpr (std::is_same_v<V, Vec>) {
    return select(y > 88.72283935546875f, Vec{}, r);
  } else {
    V out;
    for (int i = 0; i < int(sizeof(V) / sizeof(Vec)); ++i) out.v[i] = select(y.v[i] > 88.72283935546875f, Vec{}, r.v[i]);
    return out;
  }
}
template <typename V>
INL_INLINE V vsigmoid(V z) {
  return vsigmoid_neg(-z);
}

// softplus(z) = max(z, 0) + log(1 + e^-|z|); with SLOPE also its derivative sigmoid(z).
template <typename T>
struct same_type {  // keeps an argument out of template argument deduction
  using type = T;
};
template <bool SLOPE, typename V>
INL_INLINE V vsoftplus(V z, typename same_type<V>::type* slope) {
  V e = vexp(neg_abs(z));
  if constexpr (SLOPE) {
    V r = vrcp(1.f + e);
    *slope = select_nonneg(z, r, e * r);
  }
  return vmax(splat_as<V>(0.f), z) + vlog1p_unit(e);
}

// 64-byte aligned float scratch; resizing within the capacity reuses the memory.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) { resize(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p_(o.p_), n_(o.n_), capacity_(o.capacity_) { o.p_ = nullptr, o.n_ = o.capacity_ = 0; }
  ~Buffer() { std::free(p_); }
  void resize(size_t n) {
    n_ = n;
    if (n <= capacity_) return;
    std::free(p_);
    capacity_ = n;
    p_ = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64 + 64));
    if (!p_) throw std::bad_alloc();
  }
  void zero() { std::memset(p_, 0, n_ * sizeof(float)); }
  float* data() { return p_; }
  const float* data() const { return p_; }
  float& operator[](size_t i) { return p_[i]; }
  float operator[](size_t i) const { return p_[i]; }
  size_t size() const { return n_; }

 private:
  float* p_ = nullptr;
  size_t n_ = 0, capacity_ = 0;
};

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

// C[R × NV·kVec] = Cin + Σ_seg Σ_k A(i, k) · B(k, :) with, in segment s,
//   A(i, k) = A[s·aseg + i·AI + k·lda]   and   B(k, n) = B[s·bseg + k·ldb + n].
// AI = 1 reads A as a packed panel (Panels below); AI = kColBlock reads the rows of a
// [M][kColBlock] block. Segments let one product skip padding between the parts of K. Cin is
// INIT: kZero (none), kLoad (rows of Cin; ldcin = 0 repeats one row) or kRowBias (Cin[i·ldcin]
// in every column of row i). The k loop runs in order, one FMA per element per k, for every R:
// a result does not depend on how many rows come with it.
enum Init { kZero = 0, kLoad = 1, kRowBias = 2 };
template <int R, int INIT, int AI, int NV>
inline void micro_kernel(int nseg, int K, const float* __restrict A, long lda, long aseg, const float* __restrict B,
                         long ldb, long bseg, const float* Cin, long ldcin, float* C, long ldc) {
  Vec acc[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = INIT == kLoad ? load(Cin + i * ldcin + v * kVec) : INIT == kRowBias ? splat(Cin[i * ldcin]) : Vec{};
  for (int s = 0; s < nseg; ++s) {
    const float* a = A + s * aseg;
    const float* b = B + s * bseg;
    for (int k = 0; k < K; ++k) {
      Vec bk[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bk[v] = load(b + v * kVec);
      b += ldb;
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const float ai = a[i * AI];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += ai * bk[v];
      }
      a += lda;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + i * ldc + v * kVec, acc[i][v]);
}

using MicroFn = void (*)(int, int, const float*, long, long, const float*, long, long, const float*, long, float*, long);

// rows of one micro-kernel call: R·NV accumulators, NV vectors of B and one broadcast of A must
// fit the vector registers (32 with AVX-512, 16 otherwise), or an accumulator spills to the
// stack and each of its FMAs waits for a store and a load
#if defined(__AVX512F__)
constexpr int kVecRegisters = 32;
#else
constexpr int kVecRegisters = 16;
#endif
template <int NV>
constexpr int kRowsFor = (kVecRegisters - NV - 1) / NV;

template <int INIT, int AI, int NV, int... Rs>
inline MicroFn micro_table(int rows, std::integer_sequence<int, Rs...>) {
  constexpr MicroFn table[] = {&micro_kernel<Rs + 1, INIT, AI, NV>...};
  return table[rows - 1];
}
template <int INIT, int AI, int NV = 2>
inline MicroFn micro_for_rows(int rows) {
  return micro_table<INIT, AI, NV>(rows, std::make_integer_sequence<int, kRowsFor<NV>>{});
}

// A matrix A(i, k) stored for the micro-kernel as panels of kRowBlock rows, each [K][kRowBlock]
// (padding rows zero): every k step reads one contiguous run, whatever A's original layout.
struct Panels {
  Buffer data;
  int M = 0, K = 0;
  template <typename F>
  void pack(int M_, int K_, F&& a) {
    M = M_, K = K_;
    const int panels = (M + kRowBlock - 1) / kRowBlock;
    data.resize(size_t(panels) * K * kRowBlock);
    data.zero();
    for (int p = 0; p < panels; ++p)
      for (int k = 0; k < K; ++k)
        for (int i = 0; i < kRowBlock && p * kRowBlock + i < M; ++i)
          data[(size_t(p) * K + k) * kRowBlock + i] = a(p * kRowBlock + i, k);
  }
  // the same for A(i, k) = conv(src[i·stride + k]): row by row, so that each row is read in order
  template <typename T, typename Conv>
  void pack_rows(int M_, int K_, const T* src, long stride, Conv&& conv) {
    M = M_, K = K_;
    const int panels = (M + kRowBlock - 1) / kRowBlock;
    data.resize(size_t(panels) * K * kRowBlock);
    for (int i = 0; i < M; ++i) {
      float* dst = data.data() + size_t(i / kRowBlock) * K * kRowBlock + i % kRowBlock;
      const T* row = src + i * stride;
      for (int k = 0; k < K; ++k) dst[size_t(k) * kRowBlock] = conv(row[k]);
    }
    for (int i = M; i < panels * kRowBlock; ++i) {  // the last panel's padding rows
      float* dst = data.data() + size_t(i / kRowBlock) * K * kRowBlock + i % kRowBlock;
      for (int k = 0; k < K; ++k) dst[size_t(k) * kRowBlock] = 0.f;
    }
  }
  int rows(int p) const { return M - p * kRowBlock < kRowBlock ? M - p * kRowBlock : kRowBlock; }
  const float* panel(int p) const { return data.data() + size_t(p) * K * kRowBlock; }
};

// C[M × N] = Cin + A·B with A in panels; K is split into nseg runs of kseg (B's runs bseg apart).
// N must be a multiple of kColBlock.
template <bool LOAD>
inline void gemm_panels(const Panels& A, int N, int nseg, int kseg, const float* B, long ldb, long bseg,
                        const float* Cin, long ldcin, float* C, long ldc) {
  const int panels = (A.M + kRowBlock - 1) / kRowBlock;
  for (int n0 = 0; n0 < N; n0 += kColBlock)
    for (int p = 0; p < panels; ++p) {
      const long m0 = long(p) * kRowBlock;
      micro_for_rows<LOAD, 1>(A.rows(p))(nseg, kseg, A.panel(p), kRowBlock, long(kseg) * kRowBlock, B + n0, ldb, bseg,
                                         LOAD ? Cin + m0 * ldcin + n0 : nullptr, ldcin, C + m0 * ldc + n0, ldc);
    }
}

// C[M × N] = Cin + A·B with A(i, k) = A[s·aseg + i·kColBlock + k]: the rows of a [M][kColBlock]
// block of transposed state, k running over the block's rows. Four vectors of columns at a
// time when N allows, so that A, the larger operand here, is read once.
template <bool LOAD, int NV>
inline void gemm_rows_nv(int M, int N, int nseg, const float* A, long aseg, const float* B, long ldb, long bseg,
                         const float* Cin, long ldcin, float* C, long ldc) {
  constexpr int rows_max = kRowsFor<NV>;
  for (int n0 = 0; n0 < N; n0 += NV * kVec)
    for (int m0 = 0; m0 < M; m0 += rows_max) {
      const int rows = M - m0 < rows_max ? M - m0 : rows_max;
      micro_for_rows<LOAD, kColBlock, NV>(rows)(nseg, kColBlock, A + long(m0) * kColBlock, 1, aseg, B + n0, ldb,
                                                bseg, LOAD ? Cin + long(m0) * ldcin + n0 : nullptr, ldcin,
                                                C + long(m0) * ldc + n0, ldc);
    }
}
template <bool LOAD>
inline void gemm_rows(int M, int N, int nseg, const float* A, long aseg, const float* B, long ldb, long bseg,
                      const float* Cin, long ldcin, float* C, long ldc) {
  if (N % (4 * kVec) == 0)
    gemm_rows_nv<LOAD, 4>(M, N, nseg, A, aseg, B, ldb, bseg, Cin, ldcin, C, ldc);
  else
    gemm_rows_nv<LOAD, 2>(M, N, nseg, A, aseg, B, ldb, bseg, Cin, ldcin, C, ldc);
}

}  // namespace INL_ISA
}  // namespace inl
