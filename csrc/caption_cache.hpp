// The caption cache of REST: interned pseudo-captions, K scored slots per video, one pending caption
// per video, the per-round candidate gather (W~_i ∪ Ω_i of Eqs. 5-6), seeded sampling, round snapshots
// and a checksummed binary file format. Pure C++17, no Python: the pybind11 layer (bindings.cpp) only
// converts arguments and releases the GIL; the pure-Python twin (rest_fast/cache/_pycache.py) must
// behave identically, so every rule below is written down once here and mirrored there.
//
// Rules shared with the Python twin:
//  * Normalisation (normalize_caption): ASCII-only. Strip leading/trailing ASCII whitespace
//    (space, \t, \n, \v, \f, \r), collapse every internal run of it to one space, map A-Z to a-z.
//    Every other byte (all of non-ASCII UTF-8) passes through unchanged, so "ÉTÉ" stays "ÉTÉ".
//    This equals Python's  b" ".join(s.encode("utf-8").split()).lower().decode("utf-8").
//  * Caption ids are dense int32, given in order of first appearance; version == number of captions.
//  * Slot id -1 = empty slot, its score is stored as -inf. Pending id -1 = no pending caption.
//  * candidates row order: own slots (slot order), own pending, then for each neighbour column in
//    order its slots and its pending; -1 skipped; each id kept at its first occurrence; rows padded
//    right with -1 to L = the longest row of the call.
//  * sample: h = splitmix64(splitmix64(seed mod 2^64) XOR video); among the video's filled slots
//    (slot order) take number h mod count; -1 when the video has no filled slot.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace rest_fast {

// Exceptions with a fixed Python meaning (bindings.cpp translates them).
struct IndexError : std::out_of_range {
  using std::out_of_range::out_of_range;
};
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct OSError : std::runtime_error {
  OSError(int err, const std::string& msg, std::string file)
      : std::runtime_error(msg), errnum(err), filename(std::move(file)) {}
  int errnum;
  std::string filename;
};

// ---- helpers shared with the tests ---------------------------------------------------------------
void normalize_append(std::string_view s, std::string& out);  // appends normalize(s) to out
std::string normalize_caption(std::string_view s);
bool valid_utf8(std::string_view s);
uint64_t splitmix64(uint64_t x);
// zlib-compatible CRC-32 (reflected polynomial 0xEDB88320); crc32_update(0, ...) == zlib.crc32(...).
uint32_t crc32_update(uint32_t crc, const void* data, size_t n);
// Worker threads for `items` units of work: hardware threads (or REST_FAST_NUM_THREADS), at most
// one per `grain` items, at least 1.
int num_threads(size_t items, size_t grain);

// A strided read-only view of an int32 or int64 matrix (1-D arrays: cols == 1). Values are read
// once and range-checked where they are used, so a caller mutating the buffer concurrently can
// produce wrong answers but never an out-of-bounds access.
struct IndexView {
  const char* data = nullptr;
  int64_t rows = 0, cols = 1;
  int64_t row_stride = 0, col_stride = 0;  // in bytes
  bool wide = false;                       // int64 if true, int32 otherwise
  int64_t at(int64_t i, int64_t j) const;
};

inline constexpr int kMaxK = 1024;
inline constexpr int64_t kMaxVideos = INT32_MAX;
inline constexpr int64_t kMaxCaptions = INT32_MAX - 1;
// candidates dedups with a bitset of size()/8 bytes per thread up to this many captions (2 MB; measured
// at 1M captions = 128 KB, where it is L2-resident).
inline constexpr int64_t kCandidatesBitsetMax = int64_t{1} << 24;
inline constexpr size_t kHeaderBytes = 64;
inline constexpr char kMagic[8] = {'R', 'F', 'C', 'C', 'A', 'C', 'H', 'E'};
inline constexpr uint32_t kFormatVersion = 1;

// Reusable malloc'd blocks for candidates(): its output matrices and per-thread scratch are hundreds of MB
// per call at REST scale, and fresh blocks cost a page fault per 4 KiB page on first touch (about 40% of
// the call). Freed blocks are kept (up to kMaxIdleBytes) and handed out again, smallest fit first.
// Thread-safe; shared (shared_ptr) by the cache and every output array still alive, so an array may
// outlive its cache.
class BufferPool {
 public:
  static constexpr size_t kMaxIdleBytes = size_t{2} << 30;
  BufferPool() = default;
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  ~BufferPool();
  // A block of at least min_bytes (bytes set to its real size); throws std::bad_alloc.
  void* take(size_t min_bytes, size_t& bytes);
  void give(void* p, size_t bytes);  // p may be null
  size_t idle_bytes() const;

 private:
  mutable std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;  // (bytes, block)
  size_t idle_ = 0;
};

// Returns a candidates() output block to its pool.
struct PoolDeleter {
  std::shared_ptr<BufferPool> pool;
  size_t bytes = 0;
  void operator()(int32_t* p) const {
    if (pool) pool->give(p, bytes);
  }
};
using PooledIds = std::unique_ptr<int32_t[], PoolDeleter>;

class CaptionCache {
 public:
  CaptionCache(int64_t num_videos, int64_t k);

  int64_t num_videos() const { return num_videos_; }
  int64_t k() const { return k_; }
  int64_t size() const;     // distinct captions
  int64_t version() const;  // == size(): grows by one per new string
  size_t nbytes() const;    // bytes held by the caption store (arena + offsets + hash table)

  // Normalises (in parallel) and interns `texts` (valid UTF-8); out[i] = id of texts[i].
  void intern(const std::vector<std::string_view>& texts, int32_t* out);
  std::string text(int64_t id) const;
  std::vector<std::string> texts(const IndexView& ids) const;
  // Ids >= since, in order; since must lie in [0, version].
  std::vector<int32_t> new_since(int64_t since) const;

  void get(const IndexView& videos, int32_t* ids_out, float* scores_out) const;
  // ids: [n, k]; scores: contiguous float32 [n, k]. Validates everything before changing anything.
  void set(const IndexView& videos, const IndexView& ids, const float* scores);
  void add_pending(const IndexView& videos, const IndexView& ids);
  // Returns the dense [n, L] matrix row-major (uninitialised allocation, every entry written) and sets L.
  // Dedup uses a per-thread bitset over caption ids while size() <= bitset_max, else a hashed stamp
  // table (same result; the parameter exists so the tests can exercise both paths on small caches).
  // The block comes from (and returns to) the cache's buffer pool.
  PooledIds candidates(const IndexView& videos, const IndexView& neighbours, int64_t& L,
                       int64_t bitset_max = kCandidatesBitsetMax) const;
  size_t pooled_bytes() const { return pool_->idle_bytes(); }
  void sample(const IndexView& videos, uint64_t seed, int32_t* out) const;

  void snapshot_round(int64_t round);
  std::vector<std::pair<int64_t, std::vector<std::string>>> history(int64_t video) const;
  std::vector<int64_t> rounds() const;

  // Writes to a temp file in the same directory, fsyncs, renames over `path`, fsyncs the directory.
  void save(const std::string& path) const;
  static std::unique_ptr<CaptionCache> load(const std::string& path, bool use_mmap);
  // Parses a whole file image; throws ValueError naming the problem.
  static std::unique_ptr<CaptionCache> from_bytes(const unsigned char* data, size_t size);

 private:
  int64_t find(const char* s, size_t n, uint64_t h) const;         // id or -1; caller holds a lock
  int64_t lookup_or_insert(const char* s, size_t n, uint64_t h);  // caller holds the unique lock
  void grow_table(size_t min_captions);
  void rehash(size_t capacity);
  void check_video(int64_t v, const char* arg, int64_t i) const;
  std::string_view view(int64_t id) const {
    return {arena_.data() + offsets_[id], static_cast<size_t>(offsets_[id + 1] - offsets_[id])};
  }

  int64_t num_videos_, k_;
  // Caption store: one contiguous arena, offsets[id]..offsets[id+1], and an open-addressing table of
  // ids (linear probing, any capacity, load factor <= 0.75). Grown by 1.25x, not 2x, to stay within
  // the memory budget of ~1.3x the raw UTF-8 bytes + 16 B per caption.
  std::vector<char> arena_;
  std::vector<uint64_t> offsets_{0};
  std::vector<uint32_t> table_;
  // rows_[v*(k+1) + j]: slot ids (j < k) then the pending id (j == k), so one candidates gather
  // touches one cache line per neighbour.
  std::vector<int32_t> rows_;
  std::vector<float> scores_;
  std::map<int64_t, std::vector<int32_t>> snapshots_;  // round -> slot ids [N, k]
  mutable std::shared_mutex mu_;
  std::shared_ptr<BufferPool> pool_ = std::make_shared<BufferPool>();
};

uint64_t hash_bytes(const char* s, size_t n);

}  // namespace rest_fast
