// Implementation of csrc/caption_cache.hpp. See the header for the rules shared with the Python twin.
#include "caption_cache.hpp"
#include "parallel.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <thread>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the caption cache file format is little-endian; add byte swapping for this target"
#endif

namespace rest_fast {

namespace {

constexpr uint32_t kEmpty = 0xFFFFFFFFu;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline bool is_ws(unsigned char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

inline uint32_t rd32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t rd64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline void wr32(unsigned char* p, uint32_t v) { std::memcpy(p, &v, 4); }
inline void wr64(unsigned char* p, uint64_t v) { std::memcpy(p, &v, 8); }
inline uint64_t pad8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

// Amortised growth by 1.25x instead of the library's 2x (memory budget, see the header).
template <class V>
void reserve_for(V& v, size_t extra) {
  const size_t need = v.size() + extra;
  if (need > v.capacity()) v.reserve(std::max(need, v.capacity() + v.capacity() / 4 + 16));
}

// True iff normalize(s) == s.
bool is_normalized(std::string_view s) {
  bool prev_space = true;  // forbids a leading space
  for (unsigned char c : s) {
    if (c == ' ') {
      if (prev_space) return false;
      prev_space = true;
    } else {
      if (is_ws(c) || (c >= 'A' && c <= 'Z')) return false;
      prev_space = false;
    }
  }
  return s.empty() || s.back() != ' ';
}

std::string range_msg(const char* arg, int64_t i, int64_t j, bool two_d, int64_t value, const char* what,
                      int64_t lo, int64_t hi) {
  std::string pos = std::string(arg) + "[" + std::to_string(i) + (two_d ? ", " + std::to_string(j) : "") + "]";
  return pos + " = " + std::to_string(value) + " is out of range: " + what + " must lie in [" +
         std::to_string(lo) + ", " + std::to_string(hi) + ")";
}

struct Crc32Tables {
  uint32_t t[8][256];
  Crc32Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int b = 0; b < 8; ++b) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (int k = 1; k < 8; ++k)
      for (int i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFF];
  }
};
const Crc32Tables& crc_tables() {
  static const Crc32Tables tables;
  return tables;
}

}  // namespace

// ---- helpers ----------------------------------------------------------------------------------------

void normalize_append(std::string_view s, std::string& out) {
  bool gap = false, any = false;
  for (unsigned char c : s) {
    if (is_ws(c)) {
      gap = any;
      continue;
    }
    if (gap) {
      out.push_back(' ');
      gap = false;
    }
    out.push_back(static_cast<char>(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c));
    any = true;
  }
}

std::string normalize_caption(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  normalize_append(s, out);
  return out;
}

bool valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;  // continuation byte, overlong lead (C0/C1) or > U+10FFFF lead
    }
    if (i + len > n) return false;
    for (size_t j = 1; j < len; ++j) {
      if ((p[i + j] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + j] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;  // overlong, out of range or a surrogate: Python's strict decoder rejects these too
    i += len;
  }
  return true;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t hash_bytes(const char* s, size_t n) {
  uint64_t h = 0x243F6A8885A308D3ull ^ (n * 0x9E3779B97F4A7C15ull);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, s, 8);
    h = (h ^ w) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 29;
    s += 8;
    n -= 8;
  }
  uint64_t w = 0;
  std::memcpy(&w, s, n);
  h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
  return splitmix64(h);
}

uint32_t crc32_update(uint32_t crc, const void* data, size_t n) {
  const auto& T = crc_tables().t;
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
  while (n >= 8) {  // slice-by-8
    const uint32_t a = rd32(p) ^ c, b = rd32(p + 4);
    c = T[7][a & 0xFF] ^ T[6][(a >> 8) & 0xFF] ^ T[5][(a >> 16) & 0xFF] ^ T[4][a >> 24] ^ T[3][b & 0xFF] ^
        T[2][(b >> 8) & 0xFF] ^ T[1][(b >> 16) & 0xFF] ^ T[0][b >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = T[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return ~c;
}

int num_threads(size_t items, size_t grain) {
  int hw = static_cast<int>(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("REST_FAST_NUM_THREADS")) {
    const int v = std::atoi(env);
    if (v > 0) hw = v;
  }
  hw = std::max(1, std::min(hw, 256));
  const size_t by_work = std::max<size_t>(1, items / std::max<size_t>(1, grain));
  return static_cast<int>(std::min<size_t>(static_cast<size_t>(hw), by_work));
}

int64_t IndexView::at(int64_t i, int64_t j) const {
  const char* p = data + i * row_stride + j * col_stride;
  if (wide) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return v;
  }
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- CaptionCache -----------------------------------------------------------------------------------

CaptionCache::CaptionCache(int64_t num_videos, int64_t k) : num_videos_(num_videos), k_(k) {
  if (num_videos < 1 || num_videos > kMaxVideos)
    throw ValueError("num_videos must lie in [1, " + std::to_string(kMaxVideos) + "], got " +
                     std::to_string(num_videos));
  if (k < 1 || k > kMaxK)
    throw ValueError("k must lie in [1, " + std::to_string(kMaxK) + "], got " + std::to_string(k));
  rows_.assign(static_cast<size_t>(num_videos * (k + 1)), -1);
  scores_.assign(static_cast<size_t>(num_videos * k), kNegInf);
}

int64_t CaptionCache::size() const {
  std::shared_lock lk(mu_);
  return static_cast<int64_t>(offsets_.size()) - 1;
}

int64_t CaptionCache::version() const { return size(); }

size_t CaptionCache::nbytes() const {
  std::shared_lock lk(mu_);
  return arena_.capacity() + offsets_.capacity() * sizeof(uint64_t) + table_.capacity() * sizeof(uint32_t);
}

void CaptionCache::grow_table(size_t min_captions) {
  const size_t count = offsets_.size() - 1;
  rehash(std::max<size_t>(16, 2 * std::max(min_captions, count)));  // load 0.5 after growth
}

void CaptionCache::rehash(size_t cap) {
  const size_t count = offsets_.size() - 1;
  std::vector<uint32_t> fresh(cap, kEmpty);
  for (size_t id = 0; id < count; ++id) {
    const auto s = view(static_cast<int64_t>(id));
    size_t i = ((hash_bytes(s.data(), s.size()) >> 32) * cap) >> 32;
    while (fresh[i] != kEmpty)
      if (++i == cap) i = 0;
    fresh[i] = static_cast<uint32_t>(id);
  }
  table_.swap(fresh);
}

int64_t CaptionCache::find(const char* s, size_t n, uint64_t h) const {
  const size_t cap = table_.size();
  if (cap == 0) return -1;
  for (size_t i = ((h >> 32) * cap) >> 32;; i = i + 1 == cap ? 0 : i + 1) {  // the load stays <= 0.75
    const uint32_t id = table_[i];
    if (id == kEmpty) return -1;
    const auto t = view(id);
    if (t.size() == n && std::memcmp(t.data(), s, n) == 0) return id;
  }
}

int64_t CaptionCache::lookup_or_insert(const char* s, size_t n, uint64_t h) {
  const size_t count = offsets_.size() - 1;
  if ((count + 1) * 4 > table_.size() * 3) grow_table(count + 1);  // keep the load factor <= 0.75
  const size_t cap = table_.size();
  size_t i = ((h >> 32) * cap) >> 32;  // any capacity < 2^32, no power of two needed
  for (;;) {
    const uint32_t id = table_[i];
    if (id == kEmpty) break;
    const auto t = view(id);
    if (t.size() == n && std::memcmp(t.data(), s, n) == 0) return id;
    if (++i == cap) i = 0;
  }
  if (static_cast<int64_t>(count) >= kMaxCaptions)
    throw ValueError("the caption cache is full (" + std::to_string(kMaxCaptions) + " captions)");
  reserve_for(arena_, n);
  reserve_for(offsets_, 1);
  arena_.insert(arena_.end(), s, s + n);
  offsets_.push_back(arena_.size());
  table_[i] = static_cast<uint32_t>(count);
  return static_cast<int64_t>(count);
}

void CaptionCache::intern(const std::vector<std::string_view>& texts, int32_t* out) {
  const int64_t n = static_cast<int64_t>(texts.size());
  size_t total = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    if (texts[i].size() > UINT32_MAX)  // lengths are stored as uint32 below: refuse, never truncate
      throw ValueError("texts[" + std::to_string(i) + "] is longer than 4 GiB");
    total += texts[i].size();
  }
  // Normalise and hash in parallel (no lock needed), then insert in input order so ids are
  // assigned by first appearance exactly as in the Python twin.
  const int T = std::min<int64_t>(num_threads(total + 16 * texts.size(), 1 << 16), std::max<int64_t>(n, 1));
  std::vector<std::string> bufs(T);
  std::vector<uint64_t> off(n), hashes(n);
  std::vector<uint32_t> lens(n);
  parallel_for(n, T, [&](int64_t b, int64_t e, int t) {
    size_t bytes = 0;
    for (int64_t i = b; i < e; ++i) bytes += texts[i].size();
    std::string& buf = bufs[t];
    buf.reserve(bytes);
    for (int64_t i = b; i < e; ++i) {
      const size_t start = buf.size();
      normalize_append(texts[i], buf);
      off[i] = start;
      lens[i] = static_cast<uint32_t>(buf.size() - start);
      hashes[i] = hash_bytes(buf.data() + start, lens[i]);
    }
  });
  std::unique_lock lk(mu_);
  const size_t old_count = offsets_.size() - 1;
  // Look every string up in parallel first: threads only read, and the unique lock keeps writers
  // out. Interning known captions (most of a round) then never touches the serial path, and the
  // number of misses sizes the table and arena once instead of growing them step by step.
  std::vector<size_t> misses(T, 0);
  parallel_for(n, T, [&](int64_t b, int64_t e, int t) {
    for (int64_t i = b; i < e; ++i) {
      out[i] = static_cast<int32_t>(find(bufs[t].data() + off[i], lens[i], hashes[i]));
      misses[t] += out[i] < 0;
    }
  });
  size_t new_max = 0;
  for (int t = 0; t < T; ++t) new_max += misses[t];
  if (new_max == 0) return;
  try {
    // Room for every miss at the maximal load 0.75 (misses may repeat within the batch, so no more:
    // the memory budget). Arena and offsets keep their 1.25x growth for the same reason.
    const size_t need = (old_count + new_max) * 4 / 3 + 1;
    if (need > table_.size()) rehash(need);
    for (int t = 0; t < T; ++t) {  // in input order: ids by first appearance, as in the Python twin
      auto [b, e] = chunk(n, T, t);
      for (int64_t i = b; i < e; ++i)
        if (out[i] < 0)
          out[i] = static_cast<int32_t>(lookup_or_insert(bufs[t].data() + off[i], lens[i], hashes[i]));
    }
  } catch (...) {
    // All or nothing: drop the captions this call added and rebuild the index.
    arena_.resize(offsets_[old_count]);
    offsets_.resize(old_count + 1);
    table_.clear();
    grow_table(old_count);
    throw;
  }
}

std::string CaptionCache::text(int64_t id) const {
  std::shared_lock lk(mu_);
  const int64_t C = static_cast<int64_t>(offsets_.size()) - 1;
  if (id < 0 || id >= C)
    throw IndexError("caption id " + std::to_string(id) + " is out of range [0, " + std::to_string(C) + ")");
  return std::string(view(id));
}

std::vector<std::string> CaptionCache::texts(const IndexView& ids) const {
  std::shared_lock lk(mu_);
  const int64_t C = static_cast<int64_t>(offsets_.size()) - 1;
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(ids.rows));
  for (int64_t i = 0; i < ids.rows; ++i) {
    const int64_t id = ids.at(i, 0);
    if (id < 0 || id >= C) throw IndexError(range_msg("ids", i, 0, false, id, "caption ids", 0, C));
    out.emplace_back(view(id));
  }
  return out;
}

std::vector<int32_t> CaptionCache::new_since(int64_t since) const {
  std::shared_lock lk(mu_);
  const int64_t C = static_cast<int64_t>(offsets_.size()) - 1;
  if (since < 0 || since > C)
    throw ValueError("version " + std::to_string(since) + " is not in [0, " + std::to_string(C) +
                     "] (the current version)");
  std::vector<int32_t> out(static_cast<size_t>(C - since));
  for (int64_t i = since; i < C; ++i) out[i - since] = static_cast<int32_t>(i);
  return out;
}

void CaptionCache::check_video(int64_t v, const char* arg, int64_t i) const {
  if (v < 0 || v >= num_videos_) throw IndexError(range_msg(arg, i, 0, false, v, "video ids", 0, num_videos_));
}

namespace {
std::vector<int64_t> read_videos(const IndexView& videos, int64_t num_videos) {
  std::vector<int64_t> v(static_cast<size_t>(videos.rows));
  for (int64_t i = 0; i < videos.rows; ++i) {
    v[i] = videos.at(i, 0);
    if (v[i] < 0 || v[i] >= num_videos)
      throw IndexError(range_msg("videos", i, 0, false, v[i], "video ids", 0, num_videos));
  }
  return v;
}
}  // namespace

void CaptionCache::get(const IndexView& videos, int32_t* ids_out, float* scores_out) const {
  const auto vids = read_videos(videos, num_videos_);
  std::shared_lock lk(mu_);
  const int64_t K = k_, W = k_ + 1;
  for (size_t i = 0; i < vids.size(); ++i) {
    std::memcpy(ids_out + i * K, &rows_[vids[i] * W], K * sizeof(int32_t));
    std::memcpy(scores_out + i * K, &scores_[vids[i] * K], K * sizeof(float));
  }
}

void CaptionCache::set(const IndexView& videos, const IndexView& ids, const float* scores) {
  const auto vids = read_videos(videos, num_videos_);
  const int64_t n = videos.rows, K = k_, W = k_ + 1;
  std::vector<int32_t> local(static_cast<size_t>(n * K));
  std::unique_lock lk(mu_);
  const int64_t C = static_cast<int64_t>(offsets_.size()) - 1;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t id = ids.at(i, j);
      if (id < -1 || id >= C) throw IndexError(range_msg("ids", i, j, true, id, "caption ids", -1, C));
      local[i * K + j] = static_cast<int32_t>(id);
    }
  std::vector<int32_t> row;
  for (int64_t i = 0; i < n; ++i) {
    row.assign(local.begin() + i * K, local.begin() + (i + 1) * K);
    std::sort(row.begin(), row.end());
    for (int64_t j = 1; j < K; ++j)
      if (row[j] >= 0 && row[j] == row[j - 1])
        throw ValueError("ids[" + std::to_string(i) + "] repeats caption id " + std::to_string(row[j]));
  }
  for (int64_t i = 0; i < n * K; ++i)
    if (local[i] >= 0 && std::isnan(scores[i]))
      throw ValueError("scores[" + std::to_string(i / K) + ", " + std::to_string(i % K) +
                       "] is NaN for a filled slot");
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < K; ++j) {
      const int32_t id = local[i * K + j];
      rows_[vids[i] * W + j] = id;
      scores_[vids[i] * K + j] = id < 0 ? kNegInf : scores[i * K + j];
    }
}

void CaptionCache::add_pending(const IndexView& videos, const IndexView& ids) {
  const auto vids = read_videos(videos, num_videos_);
  const int64_t n = videos.rows, W = k_ + 1;
  std::vector<int32_t> local(static_cast<size_t>(n));
  std::unique_lock lk(mu_);
  const int64_t C = static_cast<int64_t>(offsets_.size()) - 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids.at(i, 0);
    if (id < -1 || id >= C) throw IndexError(range_msg("ids", i, 0, false, id, "caption ids", -1, C));
    local[i] = static_cast<int32_t>(id);
  }
  for (int64_t i = 0; i < n; ++i) rows_[vids[i] * W + k_] = local[i];
}

BufferPool::~BufferPool() {
  for (auto& [bytes, p] : free_) std::free(p);
}

void* BufferPool::take(size_t min_bytes, size_t& bytes) {
  {
    std::lock_guard lk(mu_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].first >= min_bytes && (best == free_.size() || free_[i].first < free_[best].first)) best = i;
    if (best < free_.size()) {
      auto [b, p] = free_[best];
      free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
      idle_ -= b;
      bytes = b;
      return p;
    }
  }
  void* p = std::malloc(std::max<size_t>(min_bytes, 1));
  if (!p) throw std::bad_alloc();
  bytes = std::max<size_t>(min_bytes, 1);
  return p;
}

void BufferPool::give(void* p, size_t bytes) {
  if (!p) return;
  std::lock_guard lk(mu_);
  free_.emplace_back(bytes, p);
  idle_ += bytes;
  // Over budget: drop the smallest blocks first (the big ones are the expensive ones to fault in).
  while (idle_ > kMaxIdleBytes && !free_.empty()) {
    auto it = std::min_element(free_.begin(), free_.end());
    idle_ -= it->first;
    std::free(it->second);
    free_.erase(it);
  }
}

size_t BufferPool::idle_bytes() const {
  std::lock_guard lk(mu_);
  return idle_;
}

namespace {
// Growable int32 buffer without zero-filling, backed by the pool: taken at the start of a call, given
// back at the end, so the pages of earlier calls are reused; realloc lets it grow without a copy (mremap).
struct IdBuffer {
  int32_t* p = nullptr;
  size_t size = 0, cap = 0;
  BufferPool* pool = nullptr;
  explicit IdBuffer(BufferPool* pl) : pool(pl) {}
  IdBuffer(const IdBuffer&) = delete;
  IdBuffer& operator=(const IdBuffer&) = delete;
  ~IdBuffer() { pool->give(p, cap * sizeof(int32_t)); }
  void reserve(size_t need) {
    if (need <= cap) return;
    if (!p) {  // first use: the smallest pooled block that fits (or a fresh one)
      size_t bytes = 0;
      p = static_cast<int32_t*>(pool->take(std::max(need, size_t{1024}) * sizeof(int32_t), bytes));
      cap = bytes / sizeof(int32_t);
      if (need <= cap) return;
    }
    const size_t nc = std::max(need, cap + cap / 2);
    void* q = std::realloc(p, nc * sizeof(int32_t));
    if (!q) throw std::bad_alloc();
    p = static_cast<int32_t*>(q);
    cap = nc;
  }
};
}  // namespace

PooledIds CaptionCache::candidates(const IndexView& videos, const IndexView& nb, int64_t& L,
                                    int64_t bitset_max) const {
  const auto vids = read_videos(videos, num_videos_);
  const int64_t n = videos.rows, H = nb.cols, W = k_ + 1, N = num_videos_;
  std::shared_lock lk(mu_);
  const size_t C = offsets_.size() - 1;
  const int T = static_cast<int>(
      std::min<int64_t>(num_threads(static_cast<size_t>(n * (H + 1) * W), 1 << 16), std::max<int64_t>(n, 1)));
  struct Part {
    explicit Part(BufferPool* pl) : ids(pl) {}
    IdBuffer ids;
    std::vector<size_t> start;  // row r of the chunk is ids[start[r] : start[r+1]]
    int64_t bad_i = -1, bad_j = -1, bad_v = 0;
  };
  std::deque<Part> parts;  // (not movable: IdBuffer owns pooled memory)
  for (int t = 0; t < T; ++t) parts.emplace_back(pool_.get());
  const int32_t* rows = rows_.data();
  const size_t row_max = static_cast<size_t>((H + 1) * W);
  // Dedup within a row keeps each id's first occurrence. Normally a per-thread bitset over all caption
  // ids (bit id + 1; bit 0 is id -1, always set): C / 8 bytes, 128 KB for 1M captions, so it stays in
  // L2, needs no hashing or probing, and the test-and-set is branch-free (the new/duplicate outcome is
  // unpredictable, so a branch there mispredicts about half the time). After a row, only the words of
  // the ids it kept are cleared. Above `bitset_max` captions the bitset would no longer be cache
  // resident (and costs C / 8 bytes per thread), so a per-thread open-addressing table of
  // (id, stamp) sized to twice the longest possible row (load <= 0.5) is used instead; stamps make
  // clearing free.
  size_t tab_size = 16;
  while (tab_size < 2 * row_max) tab_size *= 2;
  // The bitset is zeroed once per thread and call, so a call with few rows over a huge caption set
  // takes the table instead (no more zeroing than its own gather work).
  const bool bitset = static_cast<int64_t>(C) <= bitset_max &&
                      (C + 1) / 64 <= std::max<size_t>(size_t{1} << 12, static_cast<size_t>(n) * row_max / T);
  parallel_for(n, T, [&](int64_t b, int64_t e, int t) {
    Part& p = parts[t];
    std::vector<uint64_t> bits(bitset ? (C + 1 + 63) / 64 : 0, 0);
    if (bitset) bits[0] = 1;
    struct Slot {
      int32_t id;
      uint32_t st;
    };
    std::vector<Slot> tab(bitset ? 0 : tab_size, Slot{-1, 0});
    const uint32_t mask = static_cast<uint32_t>(tab_size - 1);
    int shift = 32;
    for (size_t s = tab_size; s > 1; s >>= 1) --shift;
    p.start.reserve(static_cast<size_t>(e - b + 1));
    p.ids.reserve(static_cast<size_t>(e - b) * std::min<size_t>(row_max, 64));
    std::vector<int32_t> gathered(row_max), nbrow(static_cast<size_t>(H));
    constexpr size_t kAhead = 16;  // dedup prefetch distance, in ids (the bitset / table is in L2)
    // Neighbour rows are random reads over N * (K+1) * 4 bytes (3.8 MB at N=240K: L3 or DRAM), and a
    // gather step is only a few cycles, so the prefetch must run much further ahead than in the dedup.
    constexpr int64_t kRowAhead = 64;
    auto slot_of = [&](int32_t id) { return (static_cast<uint32_t>(id) * 0x9E3779B1u) >> shift; };
    for (int64_t i = b; i < e; ++i) {
      const uint32_t st = static_cast<uint32_t>(i - b + 1);
      p.start.push_back(p.ids.size);
      // 0) Read and check the row's neighbour ids once (any dtype / strides) into a dense int32 row,
      //    so the gather below is a tight loop over trusted ids.
      int32_t* nr = nbrow.data();
      for (int64_t h = 0; h < H; ++h) {
        const int64_t u = nb.at(i, h);
        if (u < -1 || u >= N) {
          p.bad_i = i, p.bad_j = h, p.bad_v = u;
          return;
        }
        nr[h] = static_cast<int32_t>(u);
      }
      for (int64_t h = 0; h < std::min(H, kRowAhead); ++h)
        if (nr[h] >= 0) __builtin_prefetch(rows + static_cast<int64_t>(nr[h]) * W);
      // 1) Gather the row's ids (own row, then neighbours' rows) into an L1-resident buffer,
      //    prefetching the neighbour row kRowAhead columns ahead.
      int32_t* g = gathered.data();
      size_t m = 0;
      for (int64_t j = 0; j < W; ++j) g[m++] = rows[vids[i] * W + j];
      for (int64_t h = 0; h < H; ++h) {
        if (h + kRowAhead < H) {
          const int32_t f = nr[h + kRowAhead];
          if (f >= 0) __builtin_prefetch(rows + static_cast<int64_t>(f) * W);
        }
        const int32_t u = nr[h];
        if (u < 0) continue;
        const int32_t* r = rows + static_cast<int64_t>(u) * W;
        if (W == 4) {  // K = 3, the paper's setting: a fixed-size copy the compiler inlines
          std::memcpy(g + m, r, 16);
          m += 4;
        } else {
          for (int64_t j = 0; j < W; ++j) g[m++] = r[j];
        }
      }
      // 2) Keep each id's first occurrence. The bitset word (or table slot) of the id kAhead
      //    positions later is prefetched, so the random accesses overlap instead of stalling.
      p.ids.reserve(p.ids.size + m);
      int32_t* out = p.ids.p + p.ids.size;
      size_t cnt = 0;
      if (bitset) {
        uint64_t* w = bits.data();
        for (size_t j = 0; j < m; ++j) {
          if (j + kAhead < m) __builtin_prefetch(&w[static_cast<uint32_t>(g[j + kAhead] + 1) >> 6]);
          const int32_t id = g[j];
          const uint32_t x = static_cast<uint32_t>(id + 1);
          const uint64_t word = w[x >> 6], bit = uint64_t{1} << (x & 63);
          w[x >> 6] = word | bit;
          out[cnt] = id;  // branch-free: advance only if the bit was clear
          cnt += (word & bit) == 0;
        }
        for (size_t c = 0; c < cnt; ++c) w[static_cast<uint32_t>(out[c] + 1) >> 6] = 0;
        w[0] = 1;
      } else {
        for (size_t j = 0; j < m; ++j) {
          if (j + kAhead < m && g[j + kAhead] >= 0) __builtin_prefetch(&tab[slot_of(g[j + kAhead])]);
          const int32_t id = g[j];
          if (id < 0) continue;
          for (uint32_t h = slot_of(id);; h = (h + 1) & mask) {
            Slot& sl = tab[h];
            if (sl.st != st) {
              sl.st = st;
              sl.id = id;
              out[cnt++] = id;
              break;
            }
            if (sl.id == id) break;
          }
        }
      }
      p.ids.size += cnt;
    }
    p.start.push_back(p.ids.size);
  });
  for (const Part& p : parts)  // chunks are in row order, so the first hit is the first bad entry
    if (p.bad_i >= 0) throw IndexError(range_msg("neighbours", p.bad_i, p.bad_j, true, p.bad_v, "video ids", -1, N));
  L = 0;
  for (const Part& p : parts)
    for (size_t r = 0; r + 1 < p.start.size(); ++r) L = std::max<int64_t>(L, p.start[r + 1] - p.start[r]);
  size_t out_bytes = 0;
  void* block = pool_->take(static_cast<size_t>(std::max<int64_t>(n * L, 1)) * sizeof(int32_t), out_bytes);
  PooledIds out(static_cast<int32_t*>(block), PoolDeleter{pool_, out_bytes});
  parallel_for(n, T, [&](int64_t b, int64_t e, int t) {
    const Part& p = parts[t];
    for (int64_t i = b; i < e; ++i) {
      const size_t s0 = p.start[i - b], s1 = p.start[i - b + 1];
      int32_t* o = out.get() + i * L;
      std::copy(p.ids.p + s0, p.ids.p + s1, o);
      std::fill(o + (s1 - s0), o + L, -1);
    }
  });
  return out;
}

void CaptionCache::sample(const IndexView& videos, uint64_t seed, int32_t* out) const {
  const auto vids = read_videos(videos, num_videos_);
  const int64_t n = videos.rows, K = k_, W = k_ + 1;
  const uint64_t s = splitmix64(seed);
  std::shared_lock lk(mu_);
  parallel_for(n, num_threads(static_cast<size_t>(n), 1 << 15), [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const int32_t* r = &rows_[vids[i] * W];
      int64_t count = 0;
      for (int64_t j = 0; j < K; ++j) count += r[j] >= 0;
      if (count == 0) {
        out[i] = -1;
        continue;
      }
      int64_t pick = static_cast<int64_t>(splitmix64(s ^ static_cast<uint64_t>(vids[i])) % count);
      for (int64_t j = 0; j < K; ++j)
        if (r[j] >= 0 && pick-- == 0) {
          out[i] = r[j];
          break;
        }
    }
  });
}

void CaptionCache::snapshot_round(int64_t round) {
  std::unique_lock lk(mu_);
  if (round < 0) throw ValueError("round must be >= 0, got " + std::to_string(round));
  if (!snapshots_.empty() && round < snapshots_.rbegin()->first)
    throw ValueError("round " + std::to_string(round) + " is older than the latest snapshot (round " +
                     std::to_string(snapshots_.rbegin()->first) + ")");
  std::vector<int32_t> ids(static_cast<size_t>(num_videos_ * k_));
  for (int64_t v = 0; v < num_videos_; ++v)
    std::memcpy(&ids[v * k_], &rows_[v * (k_ + 1)], k_ * sizeof(int32_t));
  snapshots_[round] = std::move(ids);
}

std::vector<std::pair<int64_t, std::vector<std::string>>> CaptionCache::history(int64_t video) const {
  check_video(video, "video", 0);
  std::shared_lock lk(mu_);
  std::vector<std::pair<int64_t, std::vector<std::string>>> out;
  for (const auto& [round, ids] : snapshots_) {
    std::vector<std::string> t;
    for (int64_t j = 0; j < k_; ++j)
      if (ids[video * k_ + j] >= 0) t.emplace_back(view(ids[video * k_ + j]));
    out.emplace_back(round, std::move(t));
  }
  return out;
}

std::vector<int64_t> CaptionCache::rounds() const {
  std::shared_lock lk(mu_);
  std::vector<int64_t> out;
  for (const auto& kv : snapshots_) out.push_back(kv.first);
  return out;
}

// ---- file format ------------------------------------------------------------------------------------
// Little-endian. Header (64 bytes):
//   0 magic "RFCCACHE" | 8 u32 format version (1) | 12 u32 k | 16 u64 num_videos | 24 u64 num_captions C
//   32 u64 arena bytes A | 40 u64 snapshots S | 48 u64 body bytes | 56 u32 CRC-32 of the body
//   60 u32 CRC-32 of header bytes [0, 60)
// Body: u64 offsets[C+1] | arena[A] + zero padding to 8 | i32 rows[N, k+1] (k slot ids, pending id)
//       | f32 scores[N, k] | S x (i64 round, i32 slot ids[N, k]) in increasing round order.

namespace {

struct Piece {
  const void* p;
  size_t n;
};

[[noreturn]] void throw_os(int err, const std::string& what, const std::string& path) {
  throw OSError(err, what + " '" + path + "': " + std::strerror(err), path);
}

void write_all(int fd, const void* data, size_t n, const std::string& tmp) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw_os(errno, "cannot write", tmp);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

void CaptionCache::save(const std::string& path) const {
  std::shared_lock lk(mu_);
  const uint64_t C = offsets_.size() - 1, A = arena_.size(), S = snapshots_.size();
  static const char zeros[8] = {0};
  std::vector<int64_t> round_keys;
  std::vector<Piece> body;
  body.push_back({offsets_.data(), (C + 1) * 8});
  body.push_back({arena_.data(), A});
  body.push_back({zeros, pad8(A) - A});
  body.push_back({rows_.data(), rows_.size() * 4});
  body.push_back({scores_.data(), scores_.size() * 4});
  round_keys.reserve(S);
  for (const auto& kv : snapshots_) round_keys.push_back(kv.first);
  size_t s = 0;
  for (const auto& kv : snapshots_) {
    body.push_back({&round_keys[s++], 8});
    body.push_back({kv.second.data(), kv.second.size() * 4});
  }
  uint64_t B = 0;
  uint32_t crc = 0;
  for (const auto& pc : body) {
    B += pc.n;
    crc = crc32_update(crc, pc.p, pc.n);
  }
  unsigned char hdr[kHeaderBytes] = {0};
  std::memcpy(hdr, kMagic, 8);
  wr32(hdr + 8, kFormatVersion);
  wr32(hdr + 12, static_cast<uint32_t>(k_));
  wr64(hdr + 16, static_cast<uint64_t>(num_videos_));
  wr64(hdr + 24, C);
  wr64(hdr + 32, A);
  wr64(hdr + 40, S);
  wr64(hdr + 48, B);
  wr32(hdr + 56, crc);
  wr32(hdr + 60, crc32_update(0, hdr, 60));

  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) throw_os(errno, "cannot create", tmp);
  try {
    write_all(fd, hdr, kHeaderBytes, tmp);
    for (const auto& pc : body) write_all(fd, pc.p, pc.n, tmp);
    if (::fsync(fd) != 0) throw_os(errno, "cannot fsync", tmp);
    if (::close(fd) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      throw_os(err, "cannot close", tmp);
    }
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw_os(err, "cannot replace", path);
  }
  // Make the rename itself durable (best effort: some file systems refuse to fsync a directory).
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::unique_ptr<CaptionCache> CaptionCache::load(const std::string& path, bool use_mmap) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_os(errno, "cannot open", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw_os(err, "cannot stat", path);
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw_os(EISDIR, "cannot load", path);
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (use_mmap && size > 0) {
    void* m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    if (m == MAP_FAILED) throw_os(err, "cannot mmap", path);
    ::madvise(m, size, MADV_SEQUENTIAL);
    try {
      auto c = from_bytes(static_cast<const unsigned char*>(m), size);
      ::munmap(m, size);
      return c;
    } catch (...) {
      ::munmap(m, size);
      throw;
    }
  }
  std::vector<unsigned char> buf(size);
  size_t got = 0;
  while (got < size) {
    const ssize_t r = ::read(fd, buf.data() + got, size - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw_os(err, "cannot read", path);
    }
    if (r == 0) break;  // the file shrank under us: from_bytes reports it as truncated
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  buf.resize(got);
  return from_bytes(buf.data(), buf.size());
}

std::unique_ptr<CaptionCache> CaptionCache::from_bytes(const unsigned char* d, size_t size) {
  if (size < kHeaderBytes)
    throw ValueError("truncated file: " + std::to_string(size) + " bytes, the header alone needs " +
                     std::to_string(kHeaderBytes));
  if (std::memcmp(d, kMagic, 8) != 0) throw ValueError("not a rest_fast caption cache file (bad magic)");
  const uint32_t version = rd32(d + 8);
  if (version != kFormatVersion)
    throw ValueError("unsupported caption cache format version " + std::to_string(version) +
                     " (this build reads version " + std::to_string(kFormatVersion) + ")");
  if (crc32_update(0, d, 60) != rd32(d + 60)) throw ValueError("header checksum mismatch: the header is corrupted");
  const uint64_t k = rd32(d + 12), N = rd64(d + 16), C = rd64(d + 24), A = rd64(d + 32), S = rd64(d + 40),
                 B = rd64(d + 48);
  const uint32_t body_crc = rd32(d + 56);
  if (k < 1 || k > static_cast<uint64_t>(kMaxK) || N < 1 || N > static_cast<uint64_t>(kMaxVideos) ||
      C > static_cast<uint64_t>(kMaxCaptions) || A > (uint64_t{1} << 48))
    throw ValueError("header sizes out of range (k=" + std::to_string(k) + ", num_videos=" + std::to_string(N) +
                     ", captions=" + std::to_string(C) + ", arena=" + std::to_string(A) + ")");
  const uint64_t snap = 8 + 4 * N * k;  // < 2^44
  if (S > (uint64_t{1} << 62) / snap) throw ValueError("header sizes out of range (snapshots=" + std::to_string(S) + ")");
  const uint64_t expected = 8 * (C + 1) + pad8(A) + 4 * N * (k + 1) + 4 * N * k + S * snap;  // < 2^63
  if (B != expected)
    throw ValueError("header sizes are inconsistent: body_bytes=" + std::to_string(B) + " but the sizes imply " +
                     std::to_string(expected));
  const uint64_t have = size - kHeaderBytes;
  if (have < B)
    throw ValueError("truncated file: " + std::to_string(size) + " bytes, expected " +
                     std::to_string(kHeaderBytes + B));
  if (have > B) throw ValueError(std::to_string(have - B) + " unexpected trailing bytes after the body");
  const unsigned char* p = d + kHeaderBytes;
  if (crc32_update(0, p, B) != body_crc) throw ValueError("body checksum mismatch: the file is corrupted");

  auto c = std::make_unique<CaptionCache>(static_cast<int64_t>(N), static_cast<int64_t>(k));
  // Captions: offsets, then the arena, each string valid UTF-8, normalised and unique.
  c->offsets_.resize(C + 1);
  std::memcpy(c->offsets_.data(), p, 8 * (C + 1));
  p += 8 * (C + 1);
  if (c->offsets_[0] != 0 || c->offsets_[C] != A) throw ValueError("caption offsets are inconsistent");
  for (uint64_t i = 0; i < C; ++i)
    if (c->offsets_[i + 1] < c->offsets_[i]) throw ValueError("caption offsets are inconsistent");
  c->arena_.assign(reinterpret_cast<const char*>(p), reinterpret_cast<const char*>(p) + A);
  for (uint64_t i = A; i < pad8(A); ++i)
    if (p[i] != 0) throw ValueError("non-zero padding after the caption bytes");
  p += pad8(A);
  for (uint64_t id = 0; id < C; ++id) {
    const auto s = c->view(static_cast<int64_t>(id));
    if (!valid_utf8(s)) throw ValueError("caption " + std::to_string(id) + " is not valid UTF-8");
    if (!is_normalized(s)) throw ValueError("caption " + std::to_string(id) + " is not normalised");
  }
  const size_t cap = std::max<size_t>(16, 2 * C);
  c->table_.assign(cap, kEmpty);
  for (uint64_t id = 0; id < C; ++id) {
    const auto s = c->view(static_cast<int64_t>(id));
    size_t i = ((hash_bytes(s.data(), s.size()) >> 32) * cap) >> 32;
    while (c->table_[i] != kEmpty) {
      if (c->view(c->table_[i]) == s)
        throw ValueError("caption " + std::to_string(id) + " repeats caption " + std::to_string(c->table_[i]));
      if (++i == cap) i = 0;
    }
    c->table_[i] = static_cast<uint32_t>(id);
  }
  // Slots, pending ids and scores.
  const int64_t K = static_cast<int64_t>(k), W = K + 1, NV = static_cast<int64_t>(N), CC = static_cast<int64_t>(C);
  auto check_ids = [&](const int32_t* ids, int64_t stride, const char* what) {
    std::vector<int32_t> row;
    for (int64_t v = 0; v < NV; ++v) {
      const int32_t* r = ids + v * stride;
      for (int64_t j = 0; j < stride; ++j)
        if (r[j] < -1 || r[j] >= CC)
          throw ValueError(std::string(what) + ": caption id " + std::to_string(r[j]) + " of video " +
                           std::to_string(v) + " is out of range");
      row.assign(r, r + K);
      std::sort(row.begin(), row.end());
      for (int64_t j = 1; j < K; ++j)
        if (row[j] >= 0 && row[j] == row[j - 1])
          throw ValueError(std::string(what) + ": video " + std::to_string(v) + " repeats caption id " +
                           std::to_string(row[j]));
    }
  };
  std::memcpy(c->rows_.data(), p, 4 * N * W);
  p += 4 * N * W;
  check_ids(c->rows_.data(), W, "slots");
  std::memcpy(c->scores_.data(), p, 4 * N * K);
  p += 4 * N * K;
  for (int64_t v = 0; v < NV; ++v)
    for (int64_t j = 0; j < K; ++j) {
      const float sc = c->scores_[v * K + j];
      const bool filled = c->rows_[v * W + j] >= 0;
      if (filled ? std::isnan(sc) : !(std::isinf(sc) && sc < 0))
        throw ValueError("score of video " + std::to_string(v) + " slot " + std::to_string(j) + " is invalid");
    }
  int64_t last = -1;
  for (uint64_t s = 0; s < S; ++s) {
    int64_t round;
    std::memcpy(&round, p, 8);
    p += 8;
    if (round < 0 || round <= last) throw ValueError("snapshot rounds are not increasing non-negative integers");
    last = round;
    std::vector<int32_t> ids(static_cast<size_t>(N * K));
    std::memcpy(ids.data(), p, 4 * N * K);
    p += 4 * N * K;
    check_ids(ids.data(), K, "snapshot");
    c->snapshots_.emplace(round, std::move(ids));
  }
  return c;
}

}  // namespace rest_fast
