// C++ unit tests of the caption cache core (run by ctest). CHECK works in Release builds too.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "caption_cache.hpp"

using namespace rest_fast;

static int g_failures = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                          \
    }                                                                        \
  } while (0)

template <class E>
static bool throws(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

// Views over caller-owned vectors.
static IndexView col(const std::vector<int64_t>& v) {
  IndexView x;
  x.data = reinterpret_cast<const char*>(v.data());
  x.rows = static_cast<int64_t>(v.size());
  x.row_stride = 8;
  x.wide = true;
  return x;
}
static IndexView mat(const std::vector<int32_t>& v, int64_t rows, int64_t cols) {
  IndexView x;
  x.data = reinterpret_cast<const char*>(v.data());
  x.rows = rows;
  x.cols = cols;
  x.row_stride = cols * 4;
  x.col_stride = 4;
  return x;
}

static std::vector<int32_t> intern(CaptionCache& c, const std::vector<std::string>& texts) {
  std::vector<std::string_view> views(texts.begin(), texts.end());
  std::vector<int32_t> out(texts.size());
  c.intern(views, out.data());
  return out;
}

static void test_helpers() {
  CHECK(normalize_caption("  A  Dog\tRUNS \n") == "a dog runs");
  CHECK(normalize_caption(" \t\n\v\f\r ").empty());
  CHECK(normalize_caption("\xC3\x89T\xC3\x89") == "\xC3\x89t\xC3\x89");  // "ÉTÉ" -> "ÉtÉ" (ASCII-only)
  CHECK(normalize_caption("a\xC2\xA0" "b") == "a\xC2\xA0" "b");            // NBSP is not ASCII whitespace
  CHECK(normalize_caption("a\x1c" "b") == "a\x1c" "b");
  CHECK(valid_utf8("plain") && valid_utf8("\xC3\xA9") && valid_utf8("\xF0\x9F\x98\x80"));
  CHECK(!valid_utf8("\xFF") && !valid_utf8("\xC3") && !valid_utf8("\xC0\xAF"));  // bad byte, cut, overlong
  CHECK(!valid_utf8("\xED\xA0\x80") && !valid_utf8("\xF4\x90\x80\x80"));          // surrogate, > U+10FFFF
  CHECK(crc32_update(0, "123456789", 9) == 0xCBF43926u);
  CHECK(crc32_update(crc32_update(0, "1234", 4), "56789", 5) == 0xCBF43926u);
  CHECK(splitmix64(0) == 0xE220A8397B1DCDAFull);
}

static void test_intern() {
  CaptionCache c(4, 3);
  auto ids = intern(c, {"A dog", "a  dog ", "cat", "\tCAT", ""});
  CHECK((ids == std::vector<int32_t>{0, 0, 1, 1, 2}));
  CHECK(c.size() == 3 && c.version() == 3 && c.text(0) == "a dog" && c.text(2).empty());
  CHECK(throws<IndexError>([&] { c.text(3); }));
  CHECK(throws<IndexError>([&] { c.text(-1); }));
  CHECK((c.new_since(1) == std::vector<int32_t>{1, 2}));
  CHECK(throws<ValueError>([&] { c.new_since(4); }));
  // Many strings: the table grows several times and every string keeps its id.
  std::vector<std::string> many;
  for (int i = 0; i < 200000; ++i) many.push_back("Caption  number " + std::to_string(i % 150000));
  auto big = intern(c, many);
  CHECK(c.size() == 3 + 150000);
  CHECK(big[0] == 3 && big[150000] == 3 && big[149999] == 3 + 149999);
  CHECK(c.text(big[12345]) == "caption number 12345");
  // Memory: ~1.3x raw bytes + 16 B per caption at most.
  size_t raw = 0;
  for (int64_t i = 0; i < c.size(); ++i) raw += c.text(i).size();
  CHECK(c.nbytes() <= 1.3 * raw + 16.0 * c.size());
}

static void test_slots_and_candidates() {
  CaptionCache c(6, 3);
  std::vector<std::string> texts;
  for (int i = 0; i < 10; ++i) texts.push_back("caption " + std::to_string(i));
  intern(c, texts);
  std::vector<int64_t> v4{0, 1, 2, 3};
  std::vector<int32_t> ids{0, 1, 2, 2, 3, -1, -1, -1, 4, 5, 6, 7};
  std::vector<float> sc(12);
  for (int i = 0; i < 12; ++i) sc[i] = static_cast<float>(i);
  c.set(col(v4), mat(ids, 4, 3), sc.data());
  std::vector<int64_t> pv{0, 1, 4};
  std::vector<int32_t> pid{8, 0, 9};
  c.add_pending(col(pv), mat(pid, 3, 1));

  std::vector<int32_t> got(12);
  std::vector<float> gs(12);
  c.get(col(v4), got.data(), gs.data());
  CHECK(got == ids && gs[1] == 1.0f && std::isinf(gs[5]) && gs[5] < 0);

  // Validation happens before any change.
  std::vector<int64_t> one{0};
  std::vector<int32_t> bad_range{0, 1, 10}, bad_rep{4, 1, 4}, ok{9, 8, 7};
  std::vector<float> nan3{0, NAN, 0};
  CHECK(throws<IndexError>([&] { c.set(col(one), mat(bad_range, 1, 3), sc.data()); }));
  CHECK(throws<ValueError>([&] { c.set(col(one), mat(bad_rep, 1, 3), sc.data()); }));
  CHECK(throws<ValueError>([&] { c.set(col(one), mat(ok, 1, 3), nan3.data()); }));
  std::vector<int64_t> bad_video{6};
  CHECK(throws<IndexError>([&] { c.set(col(bad_video), mat(ok, 1, 3), sc.data()); }));
  c.get(col(v4), got.data(), gs.data());
  CHECK(got == ids);

  // candidates: own slots, own pending, then neighbours in column order; first occurrence kept.
  std::vector<int64_t> cv{0, 4, 5, 2};
  std::vector<int32_t> nb{1, -1, 3, 0, 0, 0, -1, -1, -1, -1, -1, -1, 4, 2, 5, 1};
  const std::vector<int32_t> expect{0, 1, 2, 8, 3, 5, 6, 7, 9, 0, 1, 2, 8, -1, -1, -1,
                                    -1, -1, -1, -1, -1, -1, -1, -1, 4, 9, 2, 3, 0, -1, -1, -1};
  for (const char* threads : {"1", "2", "3"}) {
    setenv("REST_FAST_NUM_THREADS", threads, 1);
    int64_t L = -1;
    auto out = c.candidates(col(cv), mat(nb, 4, 4), L);
    CHECK(L == 8 && std::vector<int32_t>(out.get(), out.get() + 32) == expect);
  }
  unsetenv("REST_FAST_NUM_THREADS");
  std::vector<int32_t> nb_bad{1, 2, 6, -1};
  std::vector<int64_t> two{0, 1};
  int64_t L = 0;
  CHECK(throws<IndexError>([&] { c.candidates(col(two), mat(nb_bad, 2, 2), L); }));
  std::vector<int32_t> nb_neg{-2};
  CHECK(throws<IndexError>([&] { c.candidates(col(one), mat(nb_neg, 1, 1), L); }));

  // sample follows the documented rule; -1 without a filled slot.
  std::vector<int64_t> sv{0, 1, 2, 3, 4, 5};
  std::vector<int32_t> s(6);
  c.sample(col(sv), 12345, s.data());
  c.get(col(v4), got.data(), gs.data());
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> filled;
    for (int j = 0; j < 3; ++j)
      if (got[i * 3 + j] >= 0) filled.push_back(got[i * 3 + j]);
    const uint64_t h = splitmix64(splitmix64(12345) ^ static_cast<uint64_t>(i));
    CHECK(s[i] == filled[h % filled.size()]);
  }
  CHECK(s[4] == -1 && s[5] == -1);

  // Snapshots and history.
  c.snapshot_round(0);
  std::vector<int32_t> row0{9, -1, 3};
  c.set(col(one), mat(row0, 1, 3), sc.data());
  c.snapshot_round(3);
  CHECK(throws<ValueError>([&] { c.snapshot_round(2); }));
  auto h = c.history(0);
  CHECK(h.size() == 2 && h[0].first == 0 && h[0].second.size() == 3 && h[1].first == 3);
  CHECK((h[1].second == std::vector<std::string>{"caption 9", "caption 3"}));
  CHECK(throws<IndexError>([&] { c.history(6); }));
}

// First-occurrence dedup the slow, obvious way (the reference for both native dedup paths).
static std::vector<int32_t> reference_row(const std::vector<int32_t>& rows, int64_t W, int64_t v,
                                          const std::vector<int32_t>& nb_row) {
  std::vector<int32_t> seq(rows.begin() + v * W, rows.begin() + (v + 1) * W), out;
  for (int32_t u : nb_row)
    if (u >= 0) seq.insert(seq.end(), rows.begin() + u * W, rows.begin() + (u + 1) * W);
  for (int32_t id : seq)
    if (id >= 0 && std::find(out.begin(), out.end(), id) == out.end()) out.push_back(id);
  return out;
}

static void test_candidates_paths() {
  // Both dedup paths (bitset over caption ids; hashed stamp table, forced by bitset_max = 0) on a small
  // and a larger caption set must match the reference.
  for (int captions : {100, 70000}) for (int64_t bitset_max : {kCandidatesBitsetMax, int64_t{0}}) {
    const int64_t N = 300, K = 3, W = 4, H = 25;
    CaptionCache c(N, K);
    std::vector<std::string> texts;
    for (int i = 0; i < captions; ++i) texts.push_back("x" + std::to_string(i));
    intern(c, texts);
    std::mt19937 rng(captions);
    std::vector<int64_t> all(N);
    std::vector<int32_t> ids(N * K), pend(N), rows(N * W), nb(N * H);
    std::vector<float> sc(N * K, 0.f);
    for (int64_t v = 0; v < N; ++v) {
      all[v] = v;
      for (int64_t j = 0; j < K; ++j) ids[v * K + j] = (rng() % 4 == 0) ? -1 : static_cast<int32_t>(v * K + j) % captions;
      pend[v] = static_cast<int32_t>(rng() % captions);
    }
    for (auto& x : nb) x = static_cast<int32_t>(rng() % (N + 1)) - 1;
    c.set(col(all), mat(ids, N, K), sc.data());
    c.add_pending(col(all), mat(pend, N, 1));
    for (int64_t v = 0; v < N; ++v) {
      for (int64_t j = 0; j < K; ++j) rows[v * W + j] = ids[v * K + j];
      rows[v * W + K] = pend[v];
    }
    int64_t L = 0;
    auto out = c.candidates(col(all), mat(nb, N, H), L, bitset_max);
    bool same = true;
    for (int64_t i = 0; i < N; ++i) {
      auto ref = reference_row(rows, W, i, std::vector<int32_t>(nb.begin() + i * H, nb.begin() + (i + 1) * H));
      ref.resize(static_cast<size_t>(L), -1);
      same &= std::equal(ref.begin(), ref.end(), out.get() + i * L);
    }
    CHECK(same);
  }
}

static std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

static void test_save_load() {
  CaptionCache c(5, 2);
  intern(c, {"ab", "cd", "\xC3\xA9t\xC3\xA9"});
  std::vector<int64_t> v{0, 3};
  std::vector<int32_t> ids{0, 1, 2, -1};
  std::vector<float> sc{1, 2, 3, 4};
  c.set(col(v), mat(ids, 2, 2), sc.data());
  c.snapshot_round(1);
  char dir_tmpl[] = "/tmp/rest_fast_cc_XXXXXX";
  const std::string dir = mkdtemp(dir_tmpl);
  const std::string path = dir + "/cache.rfc";
  c.save(path);
  for (bool mm : {false, true}) {
    auto d = CaptionCache::load(path, mm);
    CHECK(d->size() == 3 && d->text(2) == "\xC3\xA9t\xC3\xA9" && d->rounds() == std::vector<int64_t>{1});
    std::vector<int32_t> got(4);
    std::vector<float> gs(4);
    d->get(col(v), got.data(), gs.data());
    CHECK(got == ids && gs[0] == 1.0f && std::isinf(gs[3]));
    CHECK(intern(*d, {"CD", "new"}) == (std::vector<int32_t>{1, 3}));
  }
  const auto data = read_file(path);
  // Every single-byte corruption and every truncation is a ValueError.
  std::mt19937 rng(7);
  for (size_t pos = 0; pos < data.size(); ++pos) {
    auto bad = data;
    bad[pos] ^= static_cast<unsigned char>(1 + rng() % 255);
    CHECK(throws<ValueError>([&] { CaptionCache::from_bytes(bad.data(), bad.size()); }));
  }
  for (size_t n = 0; n < data.size(); ++n)
    CHECK(throws<ValueError>([&] { CaptionCache::from_bytes(data.data(), n); }));
  auto longer = data;
  longer.push_back(0);
  CHECK(throws<ValueError>([&] { CaptionCache::from_bytes(longer.data(), longer.size()); }));
  CHECK(throws<OSError>([&] { CaptionCache::load(dir + "/missing", false); }));
  CHECK(throws<OSError>([&] { CaptionCache::load(dir, true); }));
  CHECK(throws<OSError>([&] { c.save(dir); }));  // rename over a directory fails...
  CHECK(read_file(path) == data);                 // ...and the existing file is untouched
  std::remove(path.c_str());
  rmdir(dir.c_str());
}

static void test_concurrency() {
  const int64_t N = 2000, H = 64;
  CaptionCache c(N, 3);
  std::vector<std::string> texts;
  for (int i = 0; i < 5000; ++i) texts.push_back("t" + std::to_string(i));
  intern(c, texts);
  std::mt19937 rng(1);
  std::vector<int64_t> all(N);
  std::vector<int32_t> ids(N * 3), nb(N * H);
  std::vector<float> sc(N * 3, 0.f);
  for (int64_t i = 0; i < N; ++i) {
    all[i] = i;
    for (int j = 0; j < 3; ++j) ids[i * 3 + j] = static_cast<int32_t>((i * 3 + j) % 5000);
  }
  for (auto& x : nb) x = static_cast<int32_t>(rng() % (N + 1)) - 1;
  c.set(col(all), mat(ids, N, 3), sc.data());
  int64_t L0 = 0;
  const auto ref_ptr = c.candidates(col(all), mat(nb, N, H), L0);
  const std::vector<int32_t> ref(ref_ptr.get(), ref_ptr.get() + N * L0);
  std::vector<std::thread> pool;
  std::vector<int> ok(4, 1);
  for (int t = 0; t < 3; ++t)
    pool.emplace_back([&, t] {
      for (int r = 0; r < 5; ++r) {
        int64_t L = 0;
        auto got = c.candidates(col(all), mat(nb, N, H), L);
        ok[t] &= L == L0 && std::equal(ref.begin(), ref.end(), got.get());
      }
    });
  pool.emplace_back([&] {
    for (int r = 0; r < 5; ++r) {
      std::vector<std::string> more;
      for (int i = 0; i < 1000; ++i) more.push_back("more " + std::to_string(r) + " " + std::to_string(i));
      ok[3] &= intern(c, more)[0] == 5000 + r * 1000;
      c.set(col(all), mat(ids, N, 3), sc.data());
    }
  });
  for (auto& th : pool) th.join();
  CHECK(ok[0] && ok[1] && ok[2] && ok[3]);
  // Buffer pool: a released output block (and the per-thread scratch) is reused by the next call, and
  // an output may outlive its cache.
  {
    int64_t L = 0;
    c.candidates(col(all), mat(nb, N, H), L);
    const size_t idle = c.pooled_bytes();
    CHECK(idle >= static_cast<size_t>(N * L) * sizeof(int32_t));
    for (int r = 0; r < 3; ++r) {  // steady state: every block comes from the pool and goes back
      auto again = c.candidates(col(all), mat(nb, N, H), L);
      CHECK(c.pooled_bytes() < idle);
    }
    CHECK(c.pooled_bytes() == idle);
  }
  rest_fast::PooledIds survivor;
  {
    rest_fast::CaptionCache tmp(4, 2);
    int64_t L = 0;
    std::vector<int64_t> v{0, 1, 2, 3};
    std::vector<int32_t> nb4{1, 2, 3, 0};
    survivor = tmp.candidates(col(v), mat(nb4, 4, 1), L);
    CHECK(L == 0);
  }
  survivor.reset();  // returns the block to the pool the dead cache shared with it
}

int main() {
  test_helpers();
  test_intern();
  test_slots_and_candidates();
  test_candidates_paths();
  test_save_load();
  test_concurrency();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("caption cache C++ tests passed\n");
  return 0;
}
