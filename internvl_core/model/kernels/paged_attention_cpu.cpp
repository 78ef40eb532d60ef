// Paged attention on the CPU: every query row of a mixed batch (decodes, prefill chunks, prefix
// hits) attends over its sequence's keys read in place from the block pool, in one call per layer.
//
// q [T, H, d] float32, kv_cache [2, num_blocks, block_size, K, d] float32 (already holding this
// step's K/V), for S sequences: block_tables [S, W], query_start [S], query_lens [S], seq_lens [S]
// (int64, all on the CPU) -> writes out [T, H, d] at the S sequences' rows only (other rows are
// left to another path). Query row i of sequence s is q row query_start[s] + i, at position
// seq_lens[s] - query_lens[s] + i, and attends causally to positions 0..itself (H a multiple of K).
//
// Work: one job per (sequence, tile of up to kTileRows query rows, run of KV heads); a job keeps
// its rows' softmax state and output accumulators in L1/L2 and streams the sequence's keys and
// values block by block with an online softmax (running max, rescaled accumulators), so each key
// and value is read once per tile. Decode tiles cover several (usually all) KV heads: a block's
// keys of every head are one contiguous span. Keys come 16 at a time (a chunk):
// - scores: read slot after slot across the job's KV heads (the block in memory order; the next
//   block's keys and this chunk's values prefetched into L2), per (key, row) one vector of
//   lane-wise products over head_dim; a fold tree turns each row's 16 such vectors into one
//   vector of 16 scores (no per-key horizontal sum);
// - per row: the softmax update on that vector, and P @ V as 16 broadcast FMAs into the row's
//   accumulator held in registers.
// Vectors are GCC/Clang vector extensions (16 floats: one AVX-512 register, two AVX2 ones),
// compiled with -O3 -march=native; head_dim is a template parameter for the multiples of 16
// dispatched below, other head dims take a scalar path. exp is a polynomial that vectorises
// (relative error ~2e-7). Jobs are sorted longest first and taken from an atomic counter by the
// OpenMP threads (torch's own libgomp): no job waits behind a long sequence on a busy thread.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;       // query rows of one sequence sharing a pass over its keys
constexpr int64_t kKeys = 16;           // keys scored together: one 16-float vector per query row
constexpr int64_t kMaxRows = 256;       // tile rows x query heads per KV head, at most
constexpr int64_t kMaxHeadDim = 512;    // bound checked on entry; accumulators are heap rows
constexpr int64_t kJobsPerThread = 4;   // tiles split their KV heads until this many jobs
constexpr int64_t kMaxPartRows = 16;    // (KV head, row) pairs per job, unless one head has more

using Vec = float __attribute__((vector_size(64)));  // 16 floats
using IVec = int32_t __attribute__((vector_size(64)));
constexpr IVec kLane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
constexpr float kInf = std::numeric_limits<float>::infinity();

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof(v)); }

inline Vec splat(float x) { return Vec{} + x; }

inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }

// e^x for x <= 0 (scores minus their running max), lane-wise: 2^n * p(r), x = n ln2 + r,
// |r| <= ln2 / 2; x below -87 (or NaN) gives e^-87.
inline Vec exp_nonpositive(Vec x) {
  x = x > splat(-87.0f) ? x : splat(-87.0f);
  // Round x / ln2 to the nearest integer by adding and removing 1.5 * 2^23 (no libm call).
  constexpr float kShift = 12582912.0f;
  const Vec n = (x * 1.44269504088896341f + kShift) - kShift;
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IVec bits = reinterpret_cast<IVec>(p) + (__builtin_convertvector(n, IVec) << 23);
  return reinterpret_cast<Vec>(bits);
}

inline float hmax(Vec v) {
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

inline float hsum(Vec v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// One level of the fold tree: x and y hold G groups of 2w partial sums each (one group per key);
// the result holds their 2G groups of w (pairs added), x's and y's interleaved as the cheapest
// shuffles allow (256-bit halves, 128-bit quarters, then within 128-bit lanes).
inline Vec fold8(Vec x, Vec y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}

inline Vec fold4(Vec x, Vec y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}

inline Vec fold2(Vec x, Vec y) {
  return __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}

inline Vec fold1(Vec x, Vec y) {
  return __builtin_shufflevector(x, y, 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30) +
         __builtin_shufflevector(x, y, 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15, 29, 31);
}

// The key whose partial sums go in slot `slot` of the fold tree: the tree returns the sum of slot
// 4 * (L % 4) + L / 4 in lane L, so filling the slots in that (self-inverse) order puts key L in
// lane L.
constexpr int64_t fold_key(int64_t slot) { return (slot % 4) * 4 + slot / 4; }

// part [16] (slot order, see fold_key) -> lane L = the sum of the lanes of key L's partials.
inline Vec fold16(const Vec* part) {
  Vec half[8], quarter[4], eighth[2];
  for (int64_t i = 0; i < 8; ++i) half[i] = fold8(part[2 * i], part[2 * i + 1]);
  for (int64_t i = 0; i < 4; ++i) quarter[i] = fold4(half[2 * i], half[2 * i + 1]);
  for (int64_t i = 0; i < 2; ++i) eighth[i] = fold2(quarter[2 * i], quarter[2 * i + 1]);
  return fold1(eighth[0], eighth[1]);
}

// Starts loading D floats of KV heads [h0, h1) at slot p into L2 (not L1: a prefetch waiting on
// DRAM there holds one of L1's few miss buffers).
template <int64_t D>
inline void prefetch_slot(const float* p, int64_t h0, int64_t h1) {
  for (int64_t i = h0 * D; i < h1 * D; i += 16) __builtin_prefetch(p + i, 0, 2);
}

// Lane-wise partial products of a chunk's keys with query rows, keys read in memory order: key
// t < count of KV head h in [h0, h1) at k + t * stride + h * D, row r's query at q[r] +
// h * q_head_stride -> part [((h - h0) * rows + r) * 16 + slot of t] (zeros past count). Going
// slot after slot streams the block (a slot's KV heads are one contiguous span), two keys per
// query load. Prefetched alongside: the chunk's values (v, for P @ V) and the keys at next_k
// (the next block's: a random jump the hardware prefetchers cannot guess; null for none).
template <int64_t D>
inline void key_partials(const float* const* q, int64_t rows, int64_t q_head_stride,
                         const float* k, const float* v, const float* next_k, int64_t stride,
                         int64_t h0, int64_t h1, int64_t count, Vec* part) {
  constexpr int64_t V = D / 16;
  for (int64_t t = count; t < kKeys; ++t) {
    for (int64_t i = 0; i < (h1 - h0) * rows; ++i) part[i * kKeys + fold_key(t)] = Vec{};
  }
  for (int64_t t = 0; t < count; t += 2) {
    const bool pair = t + 1 < count;
    for (int64_t u = t; u < t + 1 + pair; ++u) {
      prefetch_slot<D>(v + u * stride, h0, h1);
      if (next_k != nullptr) prefetch_slot<D>(next_k + u * stride, h0, h1);
    }
    const float* k0 = k + t * stride;
    const float* k1 = k0 + stride;  // read only for a pair
    for (int64_t h = h0; h < h1; ++h) {
      Vec key0[V], key1[V];  // in registers across the rows
      for (int64_t j = 0; j < V; ++j) {
        key0[j] = load(k0 + h * D + 16 * j);
        key1[j] = pair ? load(k1 + h * D + 16 * j) : Vec{};
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* qr = q[r] + h * q_head_stride;
        Vec a0{}, a1{};
        for (int64_t j = 0; j < V; ++j) {
          const Vec qj = load(qr + 16 * j);
          a0 += qj * key0[j];
          a1 += qj * key1[j];
        }
        Vec* out = part + ((h - h0) * rows + r) * kKeys;
        out[fold_key(t)] = a0;
        if (pair) out[fold_key(t + 1)] = a1;
      }
    }
  }
}

// One row's online-softmax step over a chunk of 16 scores (lanes >= visible ignored) and the
// chunk's values v + t * stride: rescale the running sum and accumulator acc [D], add P @ V.
template <int64_t D>
inline void softmax_pv(Vec s, int64_t visible, float scale, float& row_max, Vec& row_sum,
                       float* acc, const float* v, int64_t stride) {
  constexpr int64_t V = D / 16;
  const auto live = kLane < static_cast<int32_t>(visible);
  s = live ? s * scale : splat(-kInf);
  const float new_max = std::max(row_max, hmax(s));
  const float correction =  // ~0 on the first chunk, mostly 1 later
      new_max == row_max ? 1.0f : exp_nonpositive(splat(row_max - new_max))[0];
  alignas(64) float p[kKeys];
  store(p, live ? exp_nonpositive(s - new_max) : Vec{});
  row_sum = row_sum * correction + load(p);
  row_max = new_max;
  // Keys round-robin over `kSets` accumulator sets: about 8 independent FMA chains (latency 4 x
  // 2 FMAs per cycle) instead of one chain of 16 dependent FMAs per vector.
  constexpr int64_t kSets = (8 + V - 1) / V;
  Vec a[kSets][V] = {};
  for (int64_t j = 0; j < V; ++j) a[0][j] = load(acc + 16 * j) * correction;
  int64_t t = 0;
  for (; t + kSets <= visible; t += kSets) {
    for (int64_t u = 0; u < kSets; ++u) {
      const float* vt = v + (t + u) * stride;
      for (int64_t j = 0; j < V; ++j) a[u][j] += p[t + u] * load(vt + 16 * j);
    }
  }
  for (; t < visible; ++t) {
    const float* vt = v + t * stride;
    for (int64_t j = 0; j < V; ++j) a[0][j] += p[t] * load(vt + 16 * j);
  }
  for (int64_t u = 1; u < kSets; ++u) {
    for (int64_t j = 0; j < V; ++j) a[0][j] += a[u][j];
  }
  for (int64_t j = 0; j < V; ++j) store(acc + 16 * j, a[0][j]);
}

// ---- jobs and the vector path ----

struct Job {
  int64_t seq;
  int64_t first_row;  // within the sequence's query rows
  int64_t num_rows;
  int64_t kv_begin, kv_end;  // KV heads [kv_begin, kv_end)
  int64_t cost;              // keys read x rows x KV heads, for the longest-first order
};

struct Layout {
  const float* q;
  const float* keys;    // cache[0]: [num_blocks, block_size, K, d]
  const float* values;  // cache[1]
  const int64_t* tables;
  const int64_t* query_start;
  const int64_t* query_lens;
  const int64_t* seq_lens;
  float* out;
  int64_t heads, kv_heads, head_dim, block_size, table_width;
  float scale;
};

// head_dim D a multiple of 16: vector path.
template <int64_t D>
void run_job(const Layout& L, const Job& job) {
  const int64_t group = L.heads / L.kv_heads;
  const int64_t q_len = L.query_lens[job.seq];
  const int64_t seq_len = L.seq_lens[job.seq];
  const int64_t first_pos = seq_len - q_len + job.first_row;  // position of the tile's row 0
  const int64_t num_keys = first_pos + job.num_rows;          // keys the tile's last row sees
  const int64_t rows = job.num_rows * group;  // (tile row, query head) pairs per KV head
  const int64_t heads = job.kv_end - job.kv_begin;
  const int64_t states = heads * rows;
  const int64_t* table = L.tables + job.seq * L.table_width;
  const int64_t token_stride = L.kv_heads * D;  // floats between two slots of a block

  thread_local std::vector<float> acc_buf, max_buf;
  thread_local std::vector<Vec> sum_buf, part_buf;
  acc_buf.assign(states * D, 0.0f);  // [KV head, row, D]
  max_buf.assign(states, -kInf);
  sum_buf.assign(states, Vec{});         // lane-wise softmax denominators
  part_buf.resize(states * kKeys);       // [KV head, row, 16] the chunk's key partials
  const float* qrow[kMaxRows];  // the row's query at KV head 0
  int64_t row_limit[kMaxRows];  // keys visible to the row (causal)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tile_row = r / group;
    const int64_t token = L.query_start[job.seq] + job.first_row + tile_row;
    qrow[r] = L.q + (token * L.heads + r % group) * D;
    row_limit[r] = first_pos + tile_row + 1;
  }
  const int64_t num_blocks = (num_keys + L.block_size - 1) / L.block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t block_start = b * L.block_size;
    const int64_t block_count = std::min(L.block_size, num_keys - block_start);
    const int64_t block_base = table[b] * L.block_size * L.kv_heads * D;
    for (int64_t c0 = 0; c0 < block_count; c0 += kKeys) {
      const int64_t start = block_start + c0;
      const int64_t count = std::min(kKeys, block_count - c0);
      const int64_t chunk = block_base + c0 * token_stride;  // slot c0, KV head 0
      const float* next_k = nullptr;  // the next block's keys, prefetched with this chunk
      if (c0 + kKeys >= block_count && b + 1 < num_blocks) {
        next_k = L.keys + table[b + 1] * L.block_size * L.kv_heads * D;
      }
      key_partials<D>(qrow, rows, group * D, L.keys + chunk, L.values + chunk, next_k,
                      token_stride, job.kv_begin, job.kv_end, count, part_buf.data());
      for (int64_t h = job.kv_begin; h < job.kv_end; ++h) {
        const float* vchunk = L.values + chunk + h * D;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t visible = std::min(count, row_limit[r] - start);
          if (visible <= 0) continue;
          const int64_t i = (h - job.kv_begin) * rows + r;
          softmax_pv<D>(fold16(part_buf.data() + i * kKeys), visible, L.scale, max_buf[i],
                        sum_buf[i], acc_buf.data() + i * D, vchunk, token_stride);
        }
      }
    }
  }
  for (int64_t h = job.kv_begin; h < job.kv_end; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = (h - job.kv_begin) * rows + r;
      const int64_t token = L.query_start[job.seq] + job.first_row + r / group;
      float* o = L.out + (token * L.heads + h * group + r % group) * D;
      const Vec inv = splat(1.0f / hsum(sum_buf[i]));
      const float* a = acc_buf.data() + i * D;
      for (int64_t j = 0; j < D / 16; ++j) store(o + 16 * j, load(a + 16 * j) * inv);
    }
  }
}

// ---- scalar path (head_dim not a multiple of 16) ----

constexpr int64_t kScalarTransposeRows = 8;  // rows per KV head from which it transposes keys

// e^x for x <= 0 (scores minus their running max): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  // Round x / ln2 to the nearest integer by adding and removing 1.5 * 2^23 (plain float adds, so
  // the loop vectorises; no libm call).
  constexpr float kShift = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kShift) - kShift;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

// Any head_dim (not a multiple of 16): scalar loops, one KV head at a time.
void run_head_scalar(const Layout& L, const Job& job, int64_t kv_head) {
  const int64_t d = L.head_dim;
  const int64_t group = L.heads / L.kv_heads;
  const int64_t q_len = L.query_lens[job.seq];
  const int64_t seq_len = L.seq_lens[job.seq];
  const int64_t first_pos = seq_len - q_len + job.first_row;  // position of the tile's row 0
  const int64_t num_keys = first_pos + job.num_rows;          // keys the tile's last row sees
  const int64_t rows = job.num_rows * group;                  // (tile row, query head) pairs
  const int64_t* table = L.tables + job.seq * L.table_width;
  const int64_t token_stride = L.kv_heads * d;  // floats between two slots of a block

  thread_local std::vector<float> acc_buf, score_buf, key_buf;
  acc_buf.assign(rows * d, 0.0f);
  score_buf.resize(rows * kKeys);
  key_buf.resize(d * kKeys);
  float* acc = acc_buf.data();
  float* scores = score_buf.data();  // [rows, kKeys] softmax numerators of the current chunk
  float* keys_t = key_buf.data();    // [d, kKeys] the chunk's keys, transposed
  float row_max[kMaxRows], row_sum[kMaxRows];
  const float* qrow[kMaxRows];
  int64_t row_limit[kMaxRows];  // keys visible to the row (causal)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tile_row = r / group, head = kv_head * group + r % group;
    const int64_t token = L.query_start[job.seq] + job.first_row + tile_row;
    qrow[r] = L.q + (token * L.heads + head) * d;
    row_limit[r] = first_pos + tile_row + 1;
    row_max[r] = -std::numeric_limits<float>::infinity();
    row_sum[r] = 0.0f;
  }
  // Few rows (decodes): plain dot products; many rows (prefill tiles): transposing the chunk's
  // keys once pays for itself.
  const bool transpose = rows >= kScalarTransposeRows;
  const int64_t num_blocks = (num_keys + L.block_size - 1) / L.block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t block_start = b * L.block_size;
    const int64_t block_count = std::min(L.block_size, num_keys - block_start);
    const int64_t base = (table[b] * L.block_size * L.kv_heads + kv_head) * d;
    for (int64_t c0 = 0; c0 < block_count; c0 += kKeys) {
      // A chunk of up to kKeys keys: scores of every row by broadcast FMAs over head_dim into one
      // kKeys-wide vector (no horizontal sums), then the online-softmax update and P @ V.
      const int64_t start = block_start + c0;
      const int64_t count = std::min(kKeys, block_count - c0);
      const float* kchunk = L.keys + base + c0 * token_stride;
      const float* vchunk = L.values + base + c0 * token_stride;
      for (int64_t t = 0; transpose && t < kKeys; ++t) {
        const float* key = kchunk + t * token_stride;
        if (t < count) {
          for (int64_t i = 0; i < d; ++i) keys_t[i * kKeys + t] = key[i];
        } else {
          for (int64_t i = 0; i < d; ++i) keys_t[i * kKeys + t] = 0.0f;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t visible = std::min(count, row_limit[r] - start);  // may be <= 0
        float* p = scores + r * kKeys;
        if (visible <= 0) {
          for (int64_t t = 0; t < kKeys; ++t) p[t] = 0.0f;
          continue;
        }
        alignas(64) float s[kKeys] = {};
        const float* qr = qrow[r];
        if (transpose) {
          for (int64_t i = 0; i < d; ++i) {
            const float qi = qr[i];
            const float* kt = keys_t + i * kKeys;
#pragma omp simd
            for (int64_t t = 0; t < kKeys; ++t) s[t] += qi * kt[t];
          }
        } else {
          for (int64_t t = 0; t < visible; ++t) s[t] = dot(qr, kchunk + t * token_stride, d);
        }
        float chunk_max = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < visible; ++t) {
          s[t] *= L.scale;
          chunk_max = std::max(chunk_max, s[t]);
        }
        const float new_max = std::max(row_max[r], chunk_max);
        const float correction = exp_nonpositive(row_max[r] - new_max);  // ~0 on the first chunk
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < kKeys; ++t) {
          const float e = exp_nonpositive(s[t] - new_max);
          p[t] = t < visible ? e : 0.0f;
          sum += p[t];
        }
        row_sum[r] = row_sum[r] * correction + sum;
        row_max[r] = new_max;
        if (correction != 1.0f) {
          float* a = acc + r * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] *= correction;
        }
      }
      for (int64_t t = 0; t < count; ++t) {
        const float* v = vchunk + t * token_stride;
        for (int64_t r = 0; r < rows; ++r) {
          const float w = scores[r * kKeys + t];
          if (w == 0.0f) continue;
          float* a = acc + r * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += w * v[i];
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tile_row = r / group, head = kv_head * group + r % group;
    const int64_t token = L.query_start[job.seq] + job.first_row + tile_row;
    float* o = L.out + (token * L.heads + head) * d;
    const float inv = 1.0f / row_sum[r];
    const float* a = acc + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = a[i] * inv;
  }
}

void run_job_scalar(const Layout& L, const Job& job) {
  for (int64_t h = job.kv_begin; h < job.kv_end; ++h) run_head_scalar(L, job, h);
}

void paged_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                     const at::Tensor& block_tables, const at::Tensor& query_start,
                     const at::Tensor& query_lens, const at::Tensor& seq_lens, double scale,
                     const at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kv_cache.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "q [T, H, d], kv_cache [2, num_blocks, block_size, K, d]");
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && block_tables.is_contiguous() &&
                  query_start.is_contiguous() && query_lens.is_contiguous() &&
                  seq_lens.is_contiguous() && out.is_contiguous(),
              "contiguous inputs");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == at::kFloat, "out like q");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && query_start.scalar_type() == at::kLong &&
                  query_lens.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "int64 index tensors");
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == head_dim && heads % kv_heads == 0, "H a multiple of K");
  TORCH_CHECK(head_dim <= kMaxHeadDim && heads / kv_heads <= kMaxRows,
              "head_dim or query group too large");
  const int64_t tile_rows = std::min(kTileRows, kMaxRows / (heads / kv_heads));
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start.size(0) == num_seqs && query_lens.size(0) == num_seqs &&
                  block_tables.size(0) == num_seqs,
              "one block table and one query span per sequence");
  Layout L{q.data_ptr<float>(),
           kv_cache.data_ptr<float>(),
           kv_cache.data_ptr<float>() + kv_cache.stride(0),
           block_tables.data_ptr<int64_t>(),
           query_start.data_ptr<int64_t>(),
           query_lens.data_ptr<int64_t>(),
           seq_lens.data_ptr<int64_t>(),
           out.data_ptr<float>(),
           heads,
           kv_heads,
           head_dim,
           kv_cache.size(2),
           block_tables.size(1),
           static_cast<float>(scale)};
  const int64_t group = heads / kv_heads;
  int64_t tiles = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = L.query_lens[s];
    TORCH_CHECK(q_len >= 1 && q_len <= L.seq_lens[s], "1 <= query_len <= seq_len");
    TORCH_CHECK(L.query_start[s] >= 0 && L.query_start[s] + q_len <= q.size(0), "rows within q");
    const int64_t used_blocks = (L.seq_lens[s] + L.block_size - 1) / L.block_size;
    TORCH_CHECK(used_blocks <= L.table_width, "block table narrower than the sequence");
    for (int64_t b = 0; b < used_blocks; ++b) {
      const int64_t block = L.tables[s * L.table_width + b];
      TORCH_CHECK(block >= 0 && block < kv_cache.size(1), "block id outside the pool");
    }
    tiles += (q_len + tile_rows - 1) / tile_rows;
  }
  // A tile's job covers a run of KV heads: all of them (a block's keys in one contiguous span)
  // unless there are too few tiles to keep the threads busy, and at most kMaxPartRows (KV head,
  // row) pairs (one head for prefill tiles).
  const int64_t max_threads = at::get_num_threads();
  const int64_t parts = std::clamp<int64_t>(
      (kJobsPerThread * max_threads + tiles - 1) / std::max<int64_t>(tiles, 1), 1, kv_heads);
  const int64_t heads_per_job = (kv_heads + parts - 1) / parts;
  std::vector<Job> jobs;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = L.query_lens[s];
    for (int64_t first = 0; first < q_len; first += tile_rows) {
      const int64_t n = std::min(tile_rows, q_len - first);
      const int64_t keys = L.seq_lens[s] - q_len + first + n;
      const int64_t rows = n * group;  // per KV head
      const int64_t span = std::min(heads_per_job, std::max<int64_t>(1, kMaxPartRows / rows));
      for (int64_t h = 0; h < kv_heads; h += span) {
        const int64_t end = std::min(h + span, kv_heads);
        jobs.push_back({s, first, n, h, end, keys * n * (end - h)});
      }
    }
  }
  std::stable_sort(jobs.begin(), jobs.end(),
                   [](const Job& a, const Job& b) { return a.cost > b.cost; });
  void (*run)(const Layout&, const Job&) = run_job_scalar;
  switch (head_dim) {
    case 16: run = run_job<16>; break;
    case 32: run = run_job<32>; break;
    case 64: run = run_job<64>; break;
    case 80: run = run_job<80>; break;
    case 96: run = run_job<96>; break;
    case 128: run = run_job<128>; break;
    default: break;
  }
  std::atomic<int64_t> next{0};
  const int64_t total = static_cast<int64_t>(jobs.size());
  const int threads = static_cast<int>(std::min<int64_t>(max_threads, total));
#pragma omp parallel num_threads(threads)
  {
    for (int64_t j = next.fetch_add(1); j < total; j = next.fetch_add(1)) run(L, jobs[j]);
  }
}

}  // namespace

TORCH_LIBRARY(internvl_cpu, m) {
  m.def(
      "paged_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor query_start, "
      "Tensor query_lens, Tensor seq_lens, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(internvl_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
