// Static-chunk thread fan-out shared by the native modules (caption cache, top-k selection).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <utility>
#include <vector>

namespace rest_fast {

// Static chunking [begin, end) of n items over T threads, identical for every caller.
inline std::pair<int64_t, int64_t> chunk(int64_t n, int T, int t) {
  const int64_t per = (n + T - 1) / T;
  const int64_t b = std::min<int64_t>(n, per * t);
  return {b, std::min<int64_t>(n, b + per)};
}

// Runs fn(begin, end, thread_index) over T static chunks; the caller's thread runs chunk 0.
// Exceptions from workers are rethrown (the first in chunk order) after every thread has joined.
template <class F>
void parallel_for(int64_t n, int T, F&& fn) {
  if (T <= 1 || n <= 1) {
    fn(int64_t{0}, n, 0);
    return;
  }
  std::vector<std::exception_ptr> errs(T);
  std::vector<std::thread> pool;
  pool.reserve(T - 1);
  auto run = [&](int t) {
    auto [b, e] = chunk(n, T, t);
    try {
      if (b < e) fn(b, e, t);
    } catch (...) {
      errs[t] = std::current_exception();
    }
  };
  try {
    for (int t = 1; t < T; ++t) pool.emplace_back(run, t);
  } catch (...) {
    for (auto& th : pool) th.join();
    throw;
  }
  run(0);
  for (auto& th : pool) th.join();
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
}

}  // namespace rest_fast
