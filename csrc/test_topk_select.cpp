// Unit test of TopkSelector against a brute-force sort (ctest: topk_select_cpp). Random rows with ties,
// several block splits, exclusion, k = 1 and k = eligible; exits non-zero on the first mismatch.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "topk_select.hpp"

using rest_fast::TopkSelector;

static int failures = 0;
#define CHECK(c)                                                  \
  do {                                                            \
    if (!(c)) {                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s)\n", __FILE__, __LINE__, #c); \
      ++failures;                                                 \
    }                                                             \
  } while (0)

static void run_case(int64_t rows, int64_t n, int64_t k, int64_t block, int levels, bool exclude, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<float> s(rows * n);
  // `levels` distinct values (exact ties) or continuous values when levels == 0.
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto& v : s) v = levels ? static_cast<float>(rng() % levels) / levels : u(rng);
  std::vector<int64_t> ex(rows);
  for (int64_t r = 0; r < rows; ++r) ex[r] = exclude ? static_cast<int64_t>(rng() % n) : -1;
  TopkSelector sel(rows, k);
  sel.reset(rows);
  std::vector<float> buf(rows * block);
  for (int64_t n0 = 0; n0 < n; n0 += block) {
    const int64_t nb = std::min(block, n - n0);
    for (int64_t r = 0; r < rows; ++r) std::copy(&s[r * n + n0], &s[r * n + n0 + nb], &buf[r * block]);
    sel.push(buf.data(), nb, block, n0, ex.data(), 2);
  }
  std::vector<float> os(rows * k);
  std::vector<int64_t> oi(rows * k);
  sel.finish(os.data(), k, oi.data(), k, 2);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> idx;
    for (int64_t j = 0; j < n; ++j)
      if (j != ex[r]) idx.push_back(j);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return s[r * n + a] > s[r * n + b]; });
    for (int64_t j = 0; j < k; ++j) {
      CHECK(oi[r * k + j] == idx[j]);
      CHECK(os[r * k + j] == s[r * n + idx[j]]);
      if (oi[r * k + j] != idx[j]) return;
    }
  }
}

int main() {
  run_case(5, 1, 1, 1, 0, false, 1);
  run_case(7, 100, 10, 16, 0, true, 2);
  run_case(9, 3000, 50, 3000, 0, true, 3);     // sampled histogram bound
  run_case(9, 3000, 600, 1024, 0, true, 4);    // exact histogram bound, then streaming
  run_case(9, 3000, 50, 3000, 7, true, 5);     // massive exact ties
  run_case(4, 2048, 2047, 512, 0, true, 6);    // k = eligible
  run_case(4, 5000, 1, 777, 3, false, 7);      // k = 1 with ties
  run_case(3, 4096, 100, 4096, 1, false, 8);   // all equal: degenerate range
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("topk_select: all cases passed\n");
  return 0;
}
