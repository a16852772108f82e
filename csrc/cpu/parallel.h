// What the CPU kernels share besides the vector helpers: the element types they are
// instantiated for (fp32, and bf16/fp16 converted exactly as c10 does: round to nearest even),
// the switch from a DType to one of them, and OpenMP helpers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <exception>
#include <mutex>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "simd.h"

namespace inl {
namespace INL_ISA {

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(float x) { return x; }
inline float to_float(BF16 x) { return bits_float(uint32_t(x.bits) << 16); }
inline float to_float(F16 x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000) << 16, e = (x.bits >> 10) & 0x1f, m = x.bits & 0x3ff;
  if (e == 0) return bits_float(sign | float_bits(float(m) * 0x1p-24f));  // zero or subnormal, exact
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));        // inf or NaN (payload kept)
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
#endif
}

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline BF16 from_float<BF16>(float f) {
  if (std::isnan(f)) return BF16{0x7fc0};
  const uint32_t u = float_bits(f);
  return BF16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <>
inline F16 from_float<F16>(float f) {
#if defined(__F16C__)
  return F16{uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT))};
#else
  // IEEE round to nearest even, as F16C and c10::Half do
  uint32_t x = float_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return F16{uint16_t(sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00))};
  if (x >= 0x477ff000u) return F16{uint16_t(sign | 0x7c00)};  // rounds to 65520 or more: inf
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, m·2^-24 with m rounded to even
    const float m = bits_float(x) * 0x1p24f;
    return F16{uint16_t(sign | uint16_t((m + 12582912.f) - 12582912.f))};
  }
  const uint32_t e = (x >> 23) - 112, m = x & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  const uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return F16{uint16_t(sign | h)};
#endif
}

// A growable array of trivially copyable T (the kernels' own, so that no std:: template is
// instantiated on a type shared by the paths; see simd.h); resizing within the capacity keeps it.
template <typename T>
class Array {
 public:
  Array() = default;
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  ~Array() { std::free(p_); }
  void resize(size_t n) {
    if (n > capacity_) {
      std::free(p_);
      p_ = static_cast<T*>(std::malloc(n * sizeof(T)));
      if (!p_) throw std::bad_alloc();
      capacity_ = n;
    }
  }
  T* data() { return p_; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
  size_t capacity_ = 0;
};

// f(scalar_t{}) for the element type of `t`
template <typename F>
void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(BF16{}); break;
    default: f(F16{}); break;
  }
}

// Threads for `tasks` independent pieces of work: at most `threads` (torch's setting, passed in by
// the entry), never more than there are pieces, and at least one.
inline int threads_for(int threads, int64_t tasks) {
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
}

// this thread's number in the enclosing parallel region
inline int omp_thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Thread `tid` of `nth`'s share [first, last) of `tasks` tasks: contiguous runs, in order, of
// sizes differing by at most one (some empty when there are more threads than tasks).
inline void share(int tasks, int tid, int nth, int& first, int& last) {
  first = int(int64_t(tasks) * tid / nth);
  last = int(int64_t(tasks) * (tid + 1) / nth);
}

// threads of the enclosing parallel region
inline int omp_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// An exception may not leave an OpenMP region (it would terminate the process): a loop body
// runs under `guard`, the first exception is kept, the remaining iterations are skipped, and
// `rethrow` raises it after the region.
class Errors {
 public:
  template <typename F>
  void guard(F&& f) {
    if (failed_) return;
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_ = true;
    }
  }
  void rethrow() {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
  volatile bool failed_ = false;
};

}  // namespace INL_ISA
}  // namespace inl
