// Implementation of csrc/topk_select.hpp.
#include "topk_select.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>

#include "parallel.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace rest_fast {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t pack(float s, int64_t index) {
  s += 0.0f;  // -0.0 -> +0.0
  int32_t bits;
  std::memcpy(&bits, &s, 4);
  if (bits < 0) bits ^= 0x7FFFFFFF;
  const uint64_t hi = static_cast<uint64_t>(static_cast<int64_t>(bits)) << 32;
  return static_cast<int64_t>(hi | (0xFFFFFFFFu - static_cast<uint32_t>(index)));
}

inline float unpack_score(int64_t key) {
  int32_t bits = static_cast<int32_t>(key >> 32);
  if (bits < 0) bits ^= 0x7FFFFFFF;
  float s;
  std::memcpy(&s, &bits, 4);
  return s;
}

inline int64_t unpack_index(int64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFF); }

// Threads for `rows` rows of `work` score reads each: about 64K reads per thread at least.
inline int threads_for(int64_t rows, int64_t work, int threads) {
  const int64_t by_work = std::max<int64_t>(1, rows * work / (1 << 16));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, rows, by_work})));
}


// Calls add(j) for every j < nb with s[j] > tau, in increasing j; add may raise tau (it is re-read).
// Once tau has risen almost no score passes, so 16 scores are tested at a time with SSE2 (x86-64
// baseline) and only blocks that hold a survivor are looked at one by one.
template <class Add>
inline void scan_greater(const float* s, int64_t nb, const float& tau, Add&& add) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 16 <= nb; j += 16) {
    const __m128 t = _mm_set1_ps(tau);
    const __m128 a = _mm_cmpgt_ps(_mm_loadu_ps(s + j), t), b = _mm_cmpgt_ps(_mm_loadu_ps(s + j + 4), t);
    const __m128 c = _mm_cmpgt_ps(_mm_loadu_ps(s + j + 8), t), d = _mm_cmpgt_ps(_mm_loadu_ps(s + j + 12), t);
    if (_mm_movemask_ps(_mm_or_ps(_mm_or_ps(a, b), _mm_or_ps(c, d))) == 0) continue;
    unsigned m = static_cast<unsigned>(_mm_movemask_ps(a) | (_mm_movemask_ps(b) << 4) |
                                       (_mm_movemask_ps(c) << 8) | (_mm_movemask_ps(d) << 12));
    while (m) {
      const int64_t i = j + __builtin_ctz(m);
      m &= m - 1;
      if (s[i] > tau) add(i);
    }
  }
#endif
  for (; j < nb; ++j)
    if (s[j] > tau) add(j);
}

inline void min_max(const float* s, int64_t nb, float& lo, float& hi) {
  int64_t j = 0;
  lo = std::numeric_limits<float>::infinity();
  hi = kNegInf;
#if defined(__SSE2__)
  if (nb >= 8) {
    __m128 l0 = _mm_loadu_ps(s), h0 = l0, l1 = _mm_loadu_ps(s + 4), h1 = l1;
    for (j = 8; j + 8 <= nb; j += 8) {
      const __m128 x = _mm_loadu_ps(s + j), y = _mm_loadu_ps(s + j + 4);
      l0 = _mm_min_ps(l0, x), h0 = _mm_max_ps(h0, x), l1 = _mm_min_ps(l1, y), h1 = _mm_max_ps(h1, y);
    }
    alignas(16) float lv[4], hv[4];
    _mm_store_ps(lv, _mm_min_ps(l0, l1));
    _mm_store_ps(hv, _mm_max_ps(h0, h1));
    for (int t = 0; t < 4; ++t) lo = std::min(lo, lv[t]), hi = std::max(hi, hv[t]);
  }
#endif
  for (; j < nb; ++j) lo = std::min(lo, s[j]), hi = std::max(hi, s[j]);
}

// A lower bound for the k-th largest of s[0 .. nb) (position x excluded, if in range), from a histogram
// of every `stride`-th score: kBuckets linear buckets between the sample's min and max (scores outside
// fall in the end buckets), counted from the top until the sample count reaches its share of k plus
// three standard deviations. With stride 1 every score in the buckets at or above the found one is > the
// returned value (one bucket of margin absorbs the rounding of the bucket arithmetic), so at least k
// eligible scores exceed it; a sampled bound is only likely to, and the caller checks. Returns -inf when
// the range is degenerate (all equal, or too wide to bucket in fp32).
constexpr int kBuckets = 1024;

float histogram_bound(const float* s, int64_t nb, int64_t x, int64_t k, int64_t stride) {
  float lo, hi;
  if (stride == 1) {
    min_max(s, nb, lo, hi);
  } else {
    lo = std::numeric_limits<float>::infinity(), hi = kNegInf;
    for (int64_t j = 0; j < nb; j += stride) lo = std::min(lo, s[j]), hi = std::max(hi, s[j]);
  }
  const float range = hi - lo;
  if (!(range > 0) || !std::isfinite(range) || range < 1e-30f) return kNegInf;
  const float scale = static_cast<float>(kBuckets - 1) / range;
  if (!std::isfinite(scale)) return kNegInf;
  // Four interleaved counters: scores cluster in a few buckets, and one counter array would serialise
  // on store-to-load forwarding of the same bucket.
  uint32_t h4[4][kBuckets] = {};
  auto bucket = [&](float v) { return std::min(kBuckets - 1, std::max(0, static_cast<int>((v - lo) * scale))); };
  int64_t j = 0;
  const int64_t st = stride;
  for (; j + 3 * st < nb; j += 4 * st) {
    ++h4[0][bucket(s[j])];
    ++h4[1][bucket(s[j + st])];
    ++h4[2][bucket(s[j + 2 * st])];
    ++h4[3][bucket(s[j + 3 * st])];
  }
  for (; j < nb; j += st) ++h4[0][bucket(s[j])];
  const int bx = x >= 0 && x < nb && x % st == 0 ? bucket(s[x]) : -1;  // the excluded key does not count
  auto h = [&](int b) { return int64_t{h4[0][b]} + h4[1][b] + h4[2][b] + h4[3][b] - (b == bx); };
  int64_t target = k;
  if (st > 1) {
    const double share = static_cast<double>(k) / static_cast<double>(st);
    target = static_cast<int64_t>(std::ceil(share + 3.0 * std::sqrt(share) + 2.0));
  }
  int64_t c = 0;
  int b = kBuckets - 1;
  for (; b > 0; --b) {
    c += h(b);
    if (c >= target) break;
  }
  if (b <= 1) return kNegInf;
  return lo + static_cast<float>(b - 1) / scale;
}

// Sorts keys[0 .. n) descending into `out` (n entries; `tmp` is scratch of n): an LSD radix sort on the
// 8 bytes of the packed keys, skipping bytes that are equal in every key (the index part's high bytes
// and, within one row's top-k, usually the score's sign/exponent byte). For a few thousand keys this
// is several times faster than a comparison sort.
void radix_sort_desc(int64_t* keys, int64_t n, int64_t* tmp) {
  if (n <= 1) return;
  // Descending order of signed keys == ascending order of ~(key ^ sign bit) as unsigned.
  uint64_t* a = reinterpret_cast<uint64_t*>(keys);
  uint64_t* b = reinterpret_cast<uint64_t*>(tmp);
  uint64_t diff = 0;
  for (int64_t i = 0; i < n; ++i) a[i] = ~(a[i] ^ (uint64_t{1} << 63));
  for (int64_t i = 1; i < n; ++i) diff |= a[i] ^ a[0];
  for (int byte = 0; byte < 8; ++byte) {
    const int sh = byte * 8;
    if (((diff >> sh) & 0xFF) == 0) continue;
    uint32_t cnt[256] = {};
    for (int64_t i = 0; i < n; ++i) ++cnt[(a[i] >> sh) & 0xFF];
    uint32_t sum = 0;
    for (int d = 0; d < 256; ++d) {
      const uint32_t c = cnt[d];
      cnt[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) b[cnt[(a[i] >> sh) & 0xFF]++] = a[i];
    std::swap(a, b);
  }
  if (a != reinterpret_cast<uint64_t*>(keys)) std::memcpy(keys, a, static_cast<size_t>(n) * 8);
  for (int64_t i = 0; i < n; ++i) keys[i] = static_cast<int64_t>(~keys[i] ^ (uint64_t{1} << 63));
}

}  // namespace

TopkSelector::TopkSelector(int64_t max_rows, int64_t k) : max_rows_(max_rows), k_(k) {
  if (max_rows < 1) throw std::invalid_argument("max_rows must be >= 1, got " + std::to_string(max_rows));
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  // Cut back to k every (cap - k) insertions: nth_element over cap keys, amortised O(1) per key.
  cap_ = k + std::max<int64_t>(k, 256);
  keys_.resize(static_cast<size_t>(max_rows * cap_));
  count_.assign(static_cast<size_t>(max_rows), 0);
  tau_.assign(static_cast<size_t>(max_rows), kNegInf);
}

void TopkSelector::reset(int64_t rows) {
  if (rows < 0 || rows > max_rows_)
    throw std::invalid_argument("rows must be in [0, " + std::to_string(max_rows_) + "], got " + std::to_string(rows));
  rows_ = rows;
  next_n0_ = 0;
  std::fill(count_.begin(), count_.begin() + rows, 0);
  std::fill(tau_.begin(), tau_.begin() + rows, kNegInf);
}

void TopkSelector::push(float* scores, int64_t nb, int64_t ld, int64_t n0, const int64_t* exclude, int threads) {
  if (nb < 0 || ld < nb) throw std::invalid_argument("bad block shape");
  if (n0 < next_n0_)
    throw std::invalid_argument("key blocks must arrive in increasing index order (n0=" + std::to_string(n0) +
                                " < " + std::to_string(next_n0_) + ")");
  if (n0 + nb > (int64_t{1} << 32)) throw std::invalid_argument("key indices must be < 2**32");
  next_n0_ = n0 + nb;
  const int64_t K = k_, CAP = cap_;
  parallel_for(rows_, threads_for(rows_, nb, threads), [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) {
      float* s = scores + r * ld;
      int64_t* buf = keys_.data() + r * CAP;
      int64_t cnt = count_[r];
      float tau = tau_[r];
      int64_t added = 0;
      auto add = [&](int64_t j) {
        ++added;
        buf[cnt++] = pack(s[j], n0 + j);
        if (cnt == CAP) {
          std::nth_element(buf, buf + (K - 1), buf + CAP, std::greater<int64_t>());
          cnt = K;
          tau = unpack_score(buf[K - 1]);  // the k-th best so far; later keys must beat it strictly
        }
      };
      // A row with no threshold yet facing a wide block would pack (and repeatedly cut) most of it:
      // first lower tau to just under the block's k-th best (a histogram pass), which leaves about k
      // survivors. Valid for later blocks too: k seen keys score above it and have lower indices.
      const int64_t x = exclude ? exclude[r] - n0 : -1;
      if (cnt < K && nb >= 2 * K && nb >= 1024) {
        // Sampled first (a quarter of the scores), exact histogram if that bound lets fewer than k
        // through. A pass that collects fewer than k never filled the buffer, so it is undone by
        // resetting the count.
        // The excluded score is replaced by a copy of another one for the histogram (which then
        // discounts it by position) and by -inf for the scans.
        const bool has_x = x >= 0 && x < nb;
        const int64_t before = cnt;
        bool done = false;
        for (int64_t stride : {int64_t{4}, int64_t{1}}) {
          if (stride > 1 && nb < 8 * K) continue;
          if (has_x) s[x] = s[x == 0 ? 1 : 0];
          const float bound = histogram_bound(s, nb, x, K, stride);
          if (has_x) s[x] = kNegInf;
          if (!(bound > kNegInf)) continue;
          tau = bound;
          added = 0;
          scan_greater(s, nb, tau, add);
          if (added >= K) {
            done = true;
            break;
          }
          cnt = before;  // fewer than k added: the buffer never filled, nothing was cut
          tau = kNegInf;
        }
        if (done) {
          count_[r] = cnt;
          tau_[r] = tau;
          continue;
        }
      }
      if (x >= 0 && x < nb) s[x] = kNegInf;
      scan_greater(s, nb, tau, add);
      count_[r] = cnt;
      tau_[r] = tau;
    }
  });
}

void TopkSelector::finish(float* out_scores, int64_t ld_s, int64_t* out_index, int64_t ld_i, int threads) {
  const int64_t K = k_, CAP = cap_;
  for (int64_t r = 0; r < rows_; ++r)
    if (count_[r] < K)
      throw std::invalid_argument("row " + std::to_string(r) + " saw " + std::to_string(count_[r]) +
                                  " eligible keys, fewer than k=" + std::to_string(K));
  parallel_for(rows_, threads_for(rows_, K * 8, threads), [&](int64_t b, int64_t e, int) {
    std::vector<int64_t> tmp(static_cast<size_t>(CAP));
    for (int64_t r = b; r < e; ++r) {
      int64_t* buf = keys_.data() + r * CAP;
      int64_t cnt = count_[r];
      // Few extra keys: sort them all. Many (a streamed row that never filled up): cut to k first.
      if (cnt > K + K / 2 + 64) {
        std::nth_element(buf, buf + (K - 1), buf + cnt, std::greater<int64_t>());
        cnt = K;
      }
      if (K >= 64) {
        radix_sort_desc(buf, cnt, tmp.data());
      } else {
        std::partial_sort(buf, buf + K, buf + cnt, std::greater<int64_t>());
      }
      for (int64_t j = 0; j < K; ++j) {
        out_scores[r * ld_s + j] = unpack_score(buf[j]);
        out_index[r * ld_i + j] = unpack_index(buf[j]);
      }
    }
  });
}

}  // namespace rest_fast
