// Exact per-row top-k selection over blocks of fp32 scores: the CPU selection step of
// rest_fast.ops.topk_similarity (rest_fast/ops/topk_cpu.py computes the score blocks with a BLAS GEMM
// and hands them here). Pure C++17, no Python, no torch: callers pass raw buffers.
//
// Order: score descending, then key index ascending (lower index first), the GPU kernel's rule. It is
// one exact total order on packed int64 keys  (ordered_bits(score + 0.0f) << 32) | (2^32 - 1 - index),
// the same packing as rest_fast.ops.topk.pack_keys, so -0.0 ranks as +0.0.
//
// Per row the selector keeps a buffer of up to `cap` packed keys and, once it has seen k of them, the
// k-th best score so far, tau. Blocks must arrive in increasing key-index order, so a later key whose
// score equals tau ranks below the current k-th and can be dropped: a block row is scanned with one
// compare against tau per score (vectorised, 16 at a time) and only scores > tau are packed. When the
// buffer fills up, nth_element cuts it back to the k best and tau rises. Cost per row: one pass over the
// scores plus O(k log(N/k)) packed keys on random data; memory rows * cap * 8 bytes, never rows * N.
#pragma once

#include <cstdint>
#include <vector>

namespace rest_fast {

class TopkSelector {
 public:
  // max_rows: the most rows one block may have; k: neighbours per row (>= 1).
  TopkSelector(int64_t max_rows, int64_t k);

  // Start a new set of `rows` (<= max_rows) rows; keeps the allocated buffers.
  void reset(int64_t rows);

  // Offer scores [rows, nb] (row stride ld floats) of keys n0 .. n0+nb-1. exclude: nullptr or one global
  // key index per row (-1 = none); that key's score is overwritten with -inf in `scores` (it is the
  // caller's scratch buffer). n0 must be >= the end of the previous block (keys arrive in order).
  void push(float* scores, int64_t nb, int64_t ld, int64_t n0, const int64_t* exclude, int threads);

  // Write each row's k best, sorted, to out_scores/out_index [rows, k] (row strides ld_s, ld_i elements).
  // Throws std::invalid_argument when a row saw fewer than k keys.
  void finish(float* out_scores, int64_t ld_s, int64_t* out_index, int64_t ld_i, int threads);

  int64_t rows() const { return rows_; }
  int64_t max_rows() const { return max_rows_; }
  int64_t k() const { return k_; }
  int64_t cap() const { return cap_; }

 private:
  int64_t max_rows_, k_, cap_, rows_ = 0, next_n0_ = 0;
  std::vector<int64_t> keys_;  // [max_rows, cap]
  std::vector<int64_t> count_;
  std::vector<float> tau_;     // -inf until the row's buffer first holds k keys
};

}  // namespace rest_fast
